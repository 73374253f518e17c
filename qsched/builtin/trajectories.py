"""The teacher's sampling trajectories, stored: direct targets for the LCM student's consistency function.

The consistency function of a probability-flow ODE maps every state x_t of a trajectory to the
trajectory's end x0. Consistency distillation learns it through a chain of one-step teacher
targets; a stored trajectory of the teacher's own sampler gives the end directly, for every
state on it (Luhman & Luhman 2021 distil the same pairs; here they are an extra loss term).

One trajectory: noise at t = 999 (zero terminal SNR), a random *training* caption, the
classifier-free-guided teacher sampled by its own ``DDIMScheduler`` (trailing spacing) for
``steps`` steps; kept are the state before each step (``x`` [steps, C, H, W], at
``timesteps``) and the final sample ``x0``. Generation writes shards of ``shard_size``
trajectories (``shard-NNNNN.safetensors``, each from its own seed) and skips the shards that
exist, so an interrupted run continues where it stopped and its result does not depend on
where that was.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from qsched.builtin import train_common as tc
from qsched.errors import QSchedError
from qsched.outdir import make_folder

SPEC_FILE = "spec.json"


@dataclass(frozen=True)
class TrajectorySpec:
    count: int = 2048
    steps: int = 25  # DDIM steps of the teacher: the student's 25-link training grid
    guidance_scale: float = 3.0
    shard_size: int = 128
    seed: int = 0
    max_templates: int | None = None  # fewer caption templates: tests only

    def __post_init__(self) -> None:
        if self.count < 1 or self.shard_size < 1 or self.steps < 1:
            raise QSchedError(f"count, shard_size and steps must be positive, got {self.count}, "
                              f"{self.shard_size}, {self.steps}")
        if self.guidance_scale < 1.0:
            raise QSchedError(f"guidance_scale must be >= 1, got {self.guidance_scale}")

    @property
    def shards(self) -> int:
        return -(-self.count // self.shard_size)


@torch.no_grad()
def sample_trajectories(
    unet: torch.nn.Module, scheduler, noise: torch.Tensor, ctx: torch.Tensor, mask: torch.Tensor,
    null_ctx: torch.Tensor, null_mask: torch.Tensor, *, steps: int, guidance_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The guided teacher's trajectories from ``noise`` [B, C, H, W]: (states [B, steps, C, H, W], x0, timesteps).

    The loop is the built-in pipeline's (uncond + s * (cond - uncond), ``scheduler.step`` with
    eta 0), so the final samples are the pipeline's for the same noise and prompt states.
    """
    scheduler.set_timesteps(steps)
    x = noise * scheduler.init_noise_sigma
    states = []
    for t in scheduler.timesteps:
        states.append(x)
        v_u, v_c = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([null_ctx, ctx]),
                        encoder_attention_mask=torch.cat([null_mask, mask])).sample.chunk(2)
        x = scheduler.step(v_u + guidance_scale * (v_c - v_u), t, x, eta=0.0).prev_sample
    return torch.stack(states, 1), x, scheduler.timesteps.clone()


def generate(teacher: str | Path, out: str | Path, spec: TrajectorySpec = TrajectorySpec(), *,
             threads: int = 1) -> Path:
    """Write (or complete) ``spec.count`` trajectories of the teacher pipeline folder to ``out``."""
    from diffusers import DDIMScheduler

    from qsched.builtin.train_student import load_teacher_unet

    out = Path(out)
    spec_path = out / SPEC_FILE
    record = {**asdict(spec), "teacher": str(teacher)}
    if spec_path.is_file():
        previous = json.loads(spec_path.read_text())
        if previous != record:
            raise QSchedError(f"{out} holds trajectories of another spec ({previous}); choose another folder")
    torch.set_num_threads(threads)
    unet, _ = load_teacher_unet(teacher)  # a wrong teacher path fails here, before the folder is made
    scheduler = DDIMScheduler.from_pretrained(str(Path(teacher) / "scheduler"))
    make_folder(out)
    spec_path.write_text(json.dumps(record, indent=1))
    tc.log_to(out / "generate.log")
    bank = tc.CaptionBank(max_templates=spec.max_templates)
    from tqdm import tqdm

    tc.logger.info("%d trajectories of %s in %d shards -> %s", spec.count, teacher, spec.shards, out)
    for shard in tqdm(range(spec.shards), desc="trajectory shards", disable=None):
        path = out / f"shard-{shard:05d}.safetensors"
        if path.is_file():
            continue
        n = min(spec.shard_size, spec.count - shard * spec.shard_size)
        gen = torch.Generator().manual_seed(spec.seed * 100_003 + shard)
        labels = torch.randint(0, len(bank.by_class), (n,), generator=gen)
        ctx, mask, caption = bank.sample(labels, gen)
        null_ctx, null_mask = bank.null(n)
        shape = (n, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
        noise = torch.randn(shape, generator=gen)
        t0 = time.perf_counter()
        states, x0, timesteps = sample_trajectories(unet, scheduler, noise, ctx, mask, null_ctx, null_mask,
                                                    steps=spec.steps, guidance_scale=spec.guidance_scale)
        tmp = path.with_suffix(".tmp")
        save_file({"states": states.contiguous(), "x0": x0.contiguous(), "timesteps": timesteps,
                   "caption": caption, "label": labels}, str(tmp))
        tmp.replace(path)  # a shard exists only once complete
        tc.logger.info("trajectory shard %d/%d (%d) in %.1fs", shard + 1, spec.shards, n, time.perf_counter() - t0)
    return out


class TrajectoryBank:
    """Every stored trajectory in memory; draws (state, timestep, x0, caption index) batches."""

    def __init__(self, folder: str | Path) -> None:
        folder = Path(folder)
        if not (folder / SPEC_FILE).is_file():
            raise QSchedError(f"no trajectories in {folder} (missing {SPEC_FILE}); write them first: "
                              "python -m qsched.builtin.train trajectories")
        record = json.loads((folder / SPEC_FILE).read_text())
        self.teacher = record.pop("teacher")
        self.spec = TrajectorySpec(**record)
        paths = sorted(folder.glob("shard-*.safetensors"))
        if len(paths) != self.spec.shards:
            raise QSchedError(f"{folder} holds {len(paths)} of {self.spec.shards} trajectory shards; complete it "
                              "with the same command (existing shards are kept)")
        shards = [load_file(str(p)) for p in paths]
        self.states = torch.cat([s["states"] for s in shards])
        self.x0 = torch.cat([s["x0"] for s in shards])
        self.caption = torch.cat([s["caption"] for s in shards])
        self.timesteps = shards[0]["timesteps"]

    def __len__(self) -> int:
        return len(self.x0)

    def sample(self, batch_size: int, generator: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_t, t, x0, caption index) for uniformly drawn trajectories and steps."""
        i = torch.randint(0, len(self), (batch_size,), generator=generator)
        j = torch.randint(0, len(self.timesteps), (batch_size,), generator=generator)
        return self.states[i, j], self.timesteps[j], self.x0[i], self.caption[i]
