"""Q-Sched wrapper overhead per sampling step (goal: <= 1% of a sampling step).

Measures, in one run and interleaved to cancel drift:
  1. scheduler.step() alone, plain vs wrapped with non-identity coefficients, on an
     SD1.5-sized latent (1x4x64x64): the absolute cost of the wrapper in microseconds;
  2. a whole pipeline call (tiny LCM pipeline, 4 steps), plain vs wrapped: the
     relative overhead per sampling step where the denoiser is as cheap as it gets.

    python benchmarks/bench_wrap.py [--repeats 200]
"""

from __future__ import annotations

import argparse
import statistics
import time

import diffusers
import torch

from qsched import QSchedCoefficients, wrap
from qsched.testing import TINY_CALL_KWARGS, build_tiny_pipeline

STEPS = 4
COEFFICIENTS = QSchedCoefficients.from_ramps(cx_start=1.05, ceps_start=0.95, num_steps=STEPS)


def time_steps(scheduler, latents: torch.Tensor, eps: torch.Tensor) -> float:
    scheduler.set_timesteps(STEPS)
    start = time.perf_counter()
    x = latents
    for t in scheduler.timesteps:
        if hasattr(scheduler, "scale_model_input"):
            scheduler.scale_model_input(x, t)  # as pipelines do; Euler schedulers warn otherwise
        x = scheduler.step(eps, t, x, return_dict=False)[0]
    return (time.perf_counter() - start) / STEPS


def time_pipeline(pipe, generator_seed: int = 0) -> float:
    start = time.perf_counter()
    pipe("a photo", num_inference_steps=STEPS, generator=torch.Generator().manual_seed(generator_seed), **TINY_CALL_KWARGS)
    return (time.perf_counter() - start) / STEPS


def interleaved(fn_a, fn_b, repeats: int) -> tuple[float, float]:
    a, b = [], []
    for _ in range(repeats):
        a.append(fn_a())
        b.append(fn_b())
    return statistics.median(a), statistics.median(b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    latents, eps = torch.randn(1, 4, 64, 64), torch.randn(1, 4, 64, 64)
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, 1 thread, median of {args.repeats}")
    for name in ("LCMScheduler", "EulerAncestralDiscreteScheduler", "FlowMatchEulerDiscreteScheduler"):
        plain = getattr(diffusers, name)()
        wrapped = wrap(getattr(diffusers, name)(), COEFFICIENTS)
        t_plain, t_wrapped = interleaved(lambda: time_steps(plain, latents, eps),
                                         lambda: time_steps(wrapped, latents, eps), args.repeats)
        print(f"step() {name:34s} plain {t_plain * 1e6:8.1f} us  wrapped {t_wrapped * 1e6:8.1f} us  "
              f"overhead {(t_wrapped - t_plain) * 1e6:+7.1f} us/step")
    plain_pipe = build_tiny_pipeline("lcm")
    wrapped_pipe = build_tiny_pipeline("lcm")
    wrapped_pipe.scheduler = wrap(wrapped_pipe.scheduler, COEFFICIENTS)
    for pipe in (plain_pipe, wrapped_pipe):
        pipe.set_progress_bar_config(disable=True)
    t_plain, t_wrapped = interleaved(lambda: time_pipeline(plain_pipe), lambda: time_pipeline(wrapped_pipe),
                                     max(10, args.repeats // 10))
    print(f"tiny LCM pipeline, per sampling step: plain {t_plain * 1e3:.2f} ms  wrapped {t_wrapped * 1e3:.2f} ms  "
          f"ratio {t_wrapped / t_plain:.4f}")


if __name__ == "__main__":
    main()
