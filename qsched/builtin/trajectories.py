"""The teacher's sampling trajectories, stored: direct targets for the LCM student's consistency function.

The consistency function of a probability-flow ODE maps every state x_t of a trajectory to the
trajectory's end x0. Consistency distillation learns it through a chain of one-step teacher
targets; a stored trajectory of the teacher's own sampler gives the end directly, for every
state on it (Luhman & Luhman 2021 distil the same pairs; here they are an extra loss term).

One trajectory: noise at t = 999 (zero terminal SNR), a random *training* caption, the
teacher pipeline (classifier-free guidance, its own ``DDIMScheduler``, trailing spacing) for
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


def load_teacher(folder: str | Path):
    """The teacher pipeline of ``folder``; a missing teacher or a distilled student is refused
    (``train_student.load_teacher_unet``, the same check as for distillation)."""
    from diffusers import DDIMScheduler

    from qsched.builtin.pipeline import QSchedBuiltinPipeline
    from qsched.builtin.train_student import load_teacher_unet

    unet, patch_size = load_teacher_unet(folder)
    scheduler = DDIMScheduler.from_pretrained(str(Path(folder) / "scheduler"))
    pipe = QSchedBuiltinPipeline(unet=unet, scheduler=scheduler, patch_size=patch_size)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def sample_trajectories(pipe, noise: torch.Tensor, prompts: list[str], *, steps: int, guidance_scale: float,
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher pipeline's trajectories from ``noise`` [B, C, H, W]: (states [B, steps, C, H, W], x0, timesteps).

    The pipeline samples (its own CFG and scheduler) and a step-end callback keeps each state:
    ``states[:, k]`` is the sample before step k, ``x0`` the pipeline's output.
    """
    kept = [noise * pipe.scheduler.init_noise_sigma]

    def keep(_pipe, i, t, tensors):
        kept.append(tensors["latents"])

    x0 = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance_scale, latents=noise,
              output_type="latent", callback_on_step_end=keep).images
    return torch.stack(kept[:-1], 1), x0, pipe.scheduler.timesteps.clone()


def generate(teacher: str | Path, out: str | Path, spec: TrajectorySpec = TrajectorySpec(), *,
             threads: int = 1) -> Path:
    """Write (or complete) ``spec.count`` trajectories of the teacher pipeline folder to ``out``."""
    out = Path(out)
    spec_path = out / SPEC_FILE
    record = {**asdict(spec), "teacher": str(teacher)}
    if spec_path.is_file():
        previous = json.loads(spec_path.read_text())
        if previous != record:
            raise QSchedError(f"{out} holds trajectories of another spec ({previous}); choose another folder")
    torch.set_num_threads(threads)
    pipe = load_teacher(teacher)  # a wrong teacher path fails here, before the folder is made
    make_folder(out)
    spec_path.write_text(json.dumps(record, indent=1))
    tc.log_to(out / "generate.log")
    bank = tc.CaptionBank(max_templates=spec.max_templates)
    from tqdm import tqdm

    tc.logger.info("%d trajectories of %s in %d shards -> %s", spec.count, teacher, spec.shards, out)
    config = pipe.unet.config
    for shard in tqdm(range(spec.shards), desc="trajectory shards", disable=None):
        path = out / f"shard-{shard:05d}.safetensors"
        if path.is_file():
            continue
        n = min(spec.shard_size, spec.count - shard * spec.shard_size)
        gen = torch.Generator().manual_seed(spec.seed * 100_003 + shard)
        labels = torch.randint(0, len(bank.by_class), (n,), generator=gen)
        _, _, caption = bank.sample(labels, gen)
        noise = torch.randn((n, config.in_channels, config.sample_size, config.sample_size), generator=gen)
        t0 = time.perf_counter()
        states, x0, timesteps = sample_trajectories(pipe, noise, [bank.prompts[int(i)] for i in caption],
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
