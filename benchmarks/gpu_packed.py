"""GPU check of packed execution: memory and time per denoiser call on CUDA (one short script).

Builds the real SD1.5 (LCM) UNet configuration with random fp16 weights on the GPU,
then for fp16, fake W4A8/W8A8 and packed W4A8/W8A8 (with and without the int8
``torch._int_mm`` kernel) records the GPU memory held by the model, the peak of one
call and the median time per call at a 64x64 latent (512 px images). Prints JSON lines.

    python benchmarks/gpu_packed.py --repeats 10 --out gpu.json

Needs a CUDA GPU; the project's CI does not run it.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_memory import SPECS, denoiser_inputs  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: this check runs on a GPU only")
    from diffusers import UNet2DConditionModel

    from qsched.quant import parse_preset, quantize
    from qsched.quant.packed_modules import use_int8_kernel
    from qsched.quant.stream import pack_model

    spec = SPECS["sd15"]
    torch.manual_seed(0)
    base = UNet2DConditionModel.from_config(spec.config).to(torch.float16).eval()  # kept on the CPU
    inputs = {k: v.to("cuda", torch.float16) if torch.is_tensor(v) and v.is_floating_point() else
              (v.to("cuda") if torch.is_tensor(v) else v) for k, v in denoiser_inputs(spec, base.config, args.latent).items()}
    rows = []
    for name in ("fp16", "fake w8a8", "fake w4a8", "packed w8a8", "packed w8a8 int8", "packed w4a8", "packed w4a8 int8"):
        model = copy.deepcopy(base).to("cuda")
        if name != "fp16":
            kind, preset = name.split()[:2]
            if kind == "fake":
                quantize(model, parse_preset(preset))
            else:
                pack_model(model, parse_preset(preset))
                if name.endswith("int8"):
                    use_int8_kernel(model)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        held = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        torch.cuda.reset_peak_memory_stats()
        times = []
        with torch.no_grad():
            model(**inputs)
            for _ in range(args.repeats):
                torch.cuda.synchronize()
                start = time.perf_counter()
                model(**inputs)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
        row = {"run": name, "model_gb": held / 1e9, "peak_gb": torch.cuda.max_memory_allocated() / 1e9,
               "median_s": statistics.median(times), "min_s": min(times)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        del model
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
