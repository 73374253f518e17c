"""Calibration: find the Q-Sched coefficients of a quantized model from a handful of prompts.

:func:`calibrate` loads the model once, quantizes its denoiser once, wraps its
scheduler once, and then, for each candidate the search proposes, only switches
the coefficients (``set_coefficients``) and samples the calibration prompts with
the same per-image noise ``(seed, i)``. The images are scored with the JAQ
definition, and the candidate with the highest JAQ becomes the schedule card.

Only the quantized model ever generates: a full-precision recipe is refused
unless ``allow_full_precision`` says the full-precision model is calibrated on
purpose (the control that shows whether a gain is specific to quantization).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from qsched.card import ScheduleCard
from qsched.errors import QSchedError
from qsched.prepare import ModelOptions, PreparedPipeline, prepare_pipeline, resolve_dtype
from qsched.provenance import package_versions, write_json_atomic
from qsched.quant import QuantRecipe
from qsched.schedule import QSchedCoefficients
from qsched.score.jaq import JAQ, JAQEvaluator, JAQResult, Reference
from qsched.search.samplers import SearchSettings, worker_seed
from qsched.search.space import SearchSpace
from qsched.search.study import (
    Candidate,
    Evaluation,
    StudyView,
    WorkerReport,
    best_candidate,
    open_storage,
    open_study,
    redact,
    run_worker,
)

#: The built-in calibration prompts (16), used when no prompts file is given.
BUILTIN_PROMPTS = Path(__file__).resolve().parent / "builtin" / "calibration_prompts.txt"
DEFAULT_STUDY = "qsched-calibrate"
STUDY_FILE = "study.db"
OUTPUTS = ("card.json", "trials.csv", "landscape.png", "compare.png", "run.json")


@dataclass(frozen=True)
class CalibrationResult:
    """The outcome of one worker's calibration: the card, the candidates and where they are."""

    out: Path
    card: ScheduleCard
    best: Candidate
    baseline: Candidate | None
    candidates: list[Candidate]
    space: SearchSpace
    budget: int
    wall_s: float
    worker: WorkerReport
    study: str
    storage: str
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def evaluated(self) -> int:
        return sum(1 for c in self.candidates if c.state == "COMPLETE")

    @property
    def failed(self) -> int:
        return sum(1 for c in self.candidates if c.state == "FAIL" and c.retried_as is None)

    def on_boundary(self) -> list[str]:
        """``name=value`` of each parameter of the best candidate that sits on a search bound."""
        bounds = (self.space.low, self.space.high)
        return [f"{name}={value:g}" for name, value in self.best.params.items()
                if any(math.isclose(value, bound, rel_tol=1e-9, abs_tol=1e-12) for bound in bounds)]

    def summary(self) -> str:
        """The closing summary: baseline JAQ, best JAQ and coefficients, candidates, wall time."""
        base = "n/a" if self.baseline is None or self.baseline.value is None else f"{self.baseline.value:.4f}"
        gain = ""
        if self.baseline is not None and self.baseline.value is not None:
            gain = f" ({self.best.value - self.baseline.value:+.4f} vs uncorrected)"
        coeffs = self.card.coefficients
        params = ", ".join(f"{k}={v:.4g}" for k, v in self.best.params.items())
        objective = self.card.objective or {}
        lines = [
            f"objective     JAQ '{objective.get('criterion')}': {objective.get('formula')}",
            f"baseline JAQ  {base} (uncorrected, {self.card.quant.get('name')})",
            f"best JAQ      {self.best.value:.4f}{gain}, candidate #{self.best.number}: {params}",
            f"coefficients  c_x = [{', '.join(f'{v:.4g}' for v in coeffs.c_x)}], "
            f"c_eps = [{', '.join(f'{v:.4g}' for v in coeffs.c_eps)}]",
            f"candidates    {self.evaluated} evaluated, {self.failed} failed (budget {self.budget}); "
            f"wall time {self.wall_s:.1f} s",
            f"wrote         {', '.join(str(p) for p in self.files.values())}",
        ]
        bound = self.on_boundary()
        if self.best.is_baseline:
            lines.insert(3, "note          no candidate beat the uncorrected sampler; the card holds all ones")
        elif bound:
            lines.insert(3, f"note          the best point lies on the search boundary ({', '.join(bound)}); "
                            "a wider --bounds may find a better one")
        return "\n".join(lines)


def calibrate(
    model: str | os.PathLike,
    *,
    recipe: QuantRecipe,
    out: str | os.PathLike,
    search: SearchSettings | None = None,
    jaq: JAQ | None = None,
    prompts: Sequence[str] | None = None,
    prompts_file: str | os.PathLike | None = None,
    storage: str | None = None,
    study: str = DEFAULT_STUDY,
    resume: bool = False,
    overwrite: bool = False,
    allow_full_precision: bool = False,
    options: ModelOptions | None = None,
    batch_size: int = 8,
    progress: bool = True,
    heartbeat_interval: int | None = 10,
    grace_period: int | None = 60,
) -> CalibrationResult:
    """Search the coefficients of ``model`` (set up by ``options``) quantized with ``recipe``; write to ``out``.

    ``prompts`` (a list) or ``prompts_file`` (any format :func:`qsched.prompts.read_prompts`
    reads); neither: the built-in calibration set. ``storage`` is an optuna database URL
    (default: ``out/study.db``), ``study`` the study name in it. ``resume`` continues
    (or joins, for several workers) a study with the same settings; without it an
    existing study is refused. Every input is checked before anything is written.
    """
    started = time.perf_counter()
    options = options or ModelOptions()
    search = SearchSettings() if search is None else search
    jaq = JAQ() if jaq is None else jaq
    if recipe.is_noop and not allow_full_precision:
        raise QSchedError(
            "calibration runs only the quantized model, and recipe 'fp' quantizes nothing; choose a "
            "quantization (e.g. --quant w4a8), or pass --allow-fp to calibrate full precision on purpose "
            "(the control beside a quantized calibration)"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise QSchedError(f"batch size must be a positive integer, got {batch_size!r}")
    if resume and overwrite:
        raise QSchedError("--resume continues the calibration in --out and --overwrite starts it over; pass one")
    prompt_list, prompt_info = _calibration_prompts(prompts, prompts_file)
    out = Path(out)
    _check_output_dir(out, resume=resume, overwrite=overwrite)
    explicit = None if storage is None else open_storage(storage, heartbeat_interval=heartbeat_interval, grace_period=grace_period)

    evaluator = jaq.build(device=options.device)  # loads the scorers' weights (a missing file is named)
    prepared = prepare_pipeline(model, recipe=recipe, options=options)
    space = search.space_for(prepared.steps)
    budget = search.budget(space)
    settings = _settings(prepared, prompt_info, search, space, jaq, options=options)

    if explicit is not None:  # join/create before creating --out: a refused resume writes nothing
        opened = open_study(explicit, name=study, settings=settings, baseline=space.identity_params(), resume=resume)
        _make_output_dir(out, overwrite=overwrite)
        storage_url = storage
    else:
        _make_output_dir(out, overwrite=overwrite)
        storage_url = f"sqlite:///{(out / STUDY_FILE).resolve()}"
        backing = open_storage(storage_url, heartbeat_interval=heartbeat_interval, grace_period=grace_period)
        opened = open_study(backing, name=study, settings=settings, baseline=space.identity_params(), resume=resume)
    salt = () if opened.created else (len(opened.study.get_trials(deepcopy=False)), os.getpid())
    opened.study.sampler = search.make_sampler(space, seed=worker_seed(search.proposal_seed, *salt))

    runner = _CandidateRunner(prepared, evaluator, prompt_list, seed=search.seed, batch_size=batch_size)
    with runner:
        report = run_worker(
            opened, space=space, evaluate=runner.evaluate_params(space), budget=budget,
            grid=search.grid_params(space), progress=progress,
        )
        candidates = StudyView.of(opened.study).candidates()
        files = {"trials": out / "trials.csv"}
        from qsched.search.report import plot_compare, plot_landscape, trial_rows, write_trials_csv

        write_trials_csv(files["trials"], trial_rows(candidates, space, alignment=jaq.alignment, quality=jaq.quality))
        best = best_candidate(candidates)
        if best is None:
            errors = sorted({c.error for c in candidates if c.error})
            raise QSchedError(
                f"every candidate failed (see {files['trials']}); first error: {errors[0] if errors else 'unknown'}"
            )
        baseline = next((c for c in candidates if c.is_baseline and c.state == "COMPLETE"), None)
        best_coefficients = space.coefficients(best.params)
        card = ScheduleCard(
            coefficients=best_coefficients,
            model=prepared.loaded.source,
            family=prepared.family,
            quant=recipe.to_dict(),
            steps=prepared.steps,
            guidance_scale=prepared.guidance_scale,
            seed=search.seed,
            parametrization={**space.to_dict(), "values": dict(best.params)},
            objective={
                **jaq.to_dict(),
                "value": best.value,
                "baseline_value": None if baseline is None else baseline.value,
                "reference": None if runner.reference is None else runner.reference.to_dict(),
                "best_trial": best.number,
                "search": search.to_dict(),
                "candidates": sum(1 for c in candidates if c.state == "COMPLETE"),
                "failed": sum(1 for c in candidates if c.state == "FAIL" and c.retried_as is None),
                "study": study,
                "storage": redact(storage_url),
            },
            prompts=prompt_info,
        )
        files["card"] = card.save(out / "card.json")
        title = f"{prepared.family} {recipe.name}, {prepared.steps} steps: {jaq.formula}"
        files["landscape"] = plot_landscape(
            out / "landscape.png", candidates, space,
            grid_points=search.grid_points if search.strategy == "grid" else None, title=title,
        )
        uncorrected = runner.images(QSchedCoefficients.identity(prepared.steps))
        corrected = runner.images(best_coefficients)
        files["compare"] = plot_compare(out / "compare.png", prompt_list, uncorrected, corrected,
                                        labels=(f"uncorrected {recipe.name}", "Q-Sched"))
    wall = time.perf_counter() - started
    files["run"] = write_json_atomic(out / "run.json", {
        "command": "calibrate",
        "settings": settings,
        "budget": budget,
        "study": study,
        "storage": redact(storage_url),
        "worker": {"evaluated": report.evaluated, "failed": report.failed, "reaped": report.reaped,
                   "surplus": report.surplus, "created_study": opened.created},
        "best_trial": best.number,
        "best_value": best.value,
        "baseline_value": None if baseline is None else baseline.value,
        "wall_s": round(wall, 3),
        "quant_report": prepared.report.to_dict(),
        "versions": package_versions(),
    })
    return CalibrationResult(
        out=out, card=card, best=best, baseline=baseline, candidates=candidates, space=space, budget=budget,
        wall_s=wall, worker=report, study=study, storage=redact(storage_url), files=files,
    )


# --- inputs ------------------------------------------------------------------------------


def _calibration_prompts(prompts: Sequence[str] | None, prompts_file: str | os.PathLike | None) -> tuple[list[str], dict[str, Any]]:
    from qsched.prompts import prompt_source, read_prompts

    if prompts is not None and prompts_file is not None:
        raise QSchedError("give calibration prompts as a list or as a file, not both")
    if prompts is not None:
        listed = [p.strip() for p in prompts if isinstance(p, str) and p.strip()]
        if not listed or len(listed) != len(list(prompts)):
            raise QSchedError("calibration prompts must be a non-empty list of non-empty strings")
        import hashlib

        digest = hashlib.sha256("\n".join(listed).encode("utf-8")).hexdigest()
        return listed, {"source": "list", "sha256": digest, "count": len(listed)}
    path = BUILTIN_PROMPTS if prompts_file is None else Path(prompts_file)
    listed = read_prompts(path)
    info = prompt_source(path)
    if prompts_file is None:
        info["source"] = "builtin:calibration_prompts.txt"
    return listed, info


def _check_output_dir(out: Path, *, resume: bool, overwrite: bool) -> None:
    from qsched.outdir import check_output_path

    check_output_path(out)
    if out.is_dir() and any(out.iterdir()) and not (resume or overwrite):
        raise QSchedError(
            f"output folder {out} exists and is not empty; pass --resume to continue the calibration in it, "
            "--overwrite to start over, or choose another --out"
        )


def _make_output_dir(out: Path, *, overwrite: bool) -> None:
    from qsched.outdir import prepare_output_dir

    owned = (*OUTPUTS, STUDY_FILE, f"{STUDY_FILE}-journal", f"{STUDY_FILE}-wal", f"{STUDY_FILE}-shm")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        return  # --resume: keep the study; the outputs are rewritten at the end
    prepare_output_dir(out, overwrite=overwrite, owned=owned)


def _settings(
    prepared: PreparedPipeline,
    prompt_info: dict[str, Any],
    search: SearchSettings,
    space: SearchSpace,
    jaq: JAQ,
    *,
    options: ModelOptions,
) -> dict[str, Any]:
    """Everything that decides a candidate's JAQ; a resumed or joining run must match it exactly."""
    search_settings = {k: v for k, v in search.to_dict().items() if k != "trials"}  # the budget may grow
    return {
        "model": prepared.loaded.source,
        "family": prepared.family,
        "steps": prepared.steps,
        "guidance_scale": prepared.guidance_scale,
        "height": prepared.height,
        "width": prepared.width,
        "quant": prepared.recipe.to_dict(),
        "backend": options.backend,
        "dtype": str(resolve_dtype(options.dtype, str(prepared.pipe.device))).replace("torch.", ""),
        "prompts": {"sha256": prompt_info["sha256"], "count": prompt_info["count"]},
        "search": search_settings,
        "space": space.to_dict(),
        "jaq": jaq.to_dict(),
    }


# --- candidates --------------------------------------------------------------------------


class _CandidateRunner:
    """Samples the calibration prompts under given coefficients and scores them.

    The pipeline is loaded and quantized once; its scheduler is wrapped once and only
    its coefficients change. The text encoders' outputs are cached for the run (the
    prompts never change), and the noise of image ``i`` is always ``(seed, i)``.
    """

    def __init__(self, prepared: PreparedPipeline, evaluator: JAQEvaluator, prompts: list[str], *, seed: int, batch_size: int) -> None:
        from qsched.scheduler import wrap

        self.prepared = prepared
        self.evaluator = evaluator
        self.prompts = prompts
        self.seed = seed
        self.batch_size = batch_size
        self.reference: Reference | None = None
        self._stack = contextlib.ExitStack()
        prepared.pipe.scheduler = wrap(prepared.pipe.scheduler, QSchedCoefficients.identity(prepared.steps))

    def __enter__(self) -> _CandidateRunner:
        self._stack.enter_context(cached_text_encoders(self.prepared.pipe))
        if self.evaluator.definition.needs_reference:
            alignment, quality = self.evaluator.scores(self.images(QSchedCoefficients.identity(self.prepared.steps)), self.prompts)
            self.reference = self.evaluator.definition.reference(alignment, quality)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()

    def images(self, coefficients: QSchedCoefficients) -> torch.Tensor:
        """Images ``[N, C, H, W]`` in [0, 1] of the calibration prompts under ``coefficients``."""
        from qsched.generate import batches, sample

        self.prepared.pipe.scheduler.set_coefficients(coefficients)
        chunks = []
        for chunk in batches(len(self.prompts), self.batch_size):
            out = sample(self.prepared, [self.prompts[i] for i in chunk], chunk, seed=self.seed, output_type="pt")
            chunks.append(torch.as_tensor(out).detach().float().cpu())
        return torch.cat(chunks)

    def evaluate(self, coefficients: QSchedCoefficients) -> JAQResult:
        return self.evaluator(self.images(coefficients), self.prompts, reference=self.reference)

    def evaluate_params(self, space: SearchSpace) -> Any:
        definition = self.evaluator.definition

        def evaluate(params: dict[str, float]) -> Evaluation:
            started = time.perf_counter()
            coefficients = space.coefficients(params)
            result = self.evaluate(coefficients)
            attrs: dict[str, Any] = dict(result.summary())
            attrs.update({
                f"scores.{definition.alignment}": [round(float(v), 6) for v in result.alignment],
                f"scores.{definition.quality}": [round(float(v), 6) for v in result.quality],
                "c_x": list(coefficients.c_x),
                "c_eps": list(coefficients.c_eps),
                "seconds": round(time.perf_counter() - started, 3),
            })
            return Evaluation(value=result.value, attrs=attrs)

        return evaluate


@contextlib.contextmanager
def cached_text_encoders(pipe: Any) -> Iterator[None]:
    """Memoise the pipeline's text encoders for the duration of the block.

    Calibration encodes the same prompts for every candidate; each encoder's
    ``forward`` returns the stored output for inputs it has seen (keyed by the
    input tensors' bytes and the other arguments), bit-identical to recomputing.
    """
    patched = []
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module) and "forward" not in vars(module):
            module.forward = _memoised(module.forward)
            patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward


def _memoised(forward: Any) -> Any:
    cache: dict[Any, Any] = {}

    def key_of(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return ("tensor", str(value.dtype), tuple(value.shape), str(value.device), value.detach().cpu().numpy().tobytes())
        if isinstance(value, (list, tuple)):
            return tuple(key_of(v) for v in value)
        if isinstance(value, dict):
            return tuple(sorted((k, key_of(v)) for k, v in value.items()))
        return repr(value)

    def cached(*args: Any, **kwargs: Any) -> Any:
        key = (key_of(args), key_of(kwargs))
        if key not in cache:
            cache[key] = forward(*args, **kwargs)
        return cache[key]

    return cached
