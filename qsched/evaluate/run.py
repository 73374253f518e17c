"""``evaluate``: generate a prompt set under several configurations, then metrics and the report.

Steps, all resumable: check inputs and load metric resources (fail fast) ->
per configuration, calibrate its correction if needed (Q-Sched card, PTQD
statistics; main process) and generate the images still missing (split across
processes) -> per-image metric values on each process, gathered on the main
process -> ``results.json``, ``results.md``, ``results.png``, ``grid.png``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from qsched.card import ScheduleCard
from qsched.errors import QSchedError
from qsched.evaluate.configs import EvalConfig
from qsched.evaluate.generation import (
    EvalSpec,
    check_manifest,
    collect_metadata,
    config_folder,
    generate_images,
    load_images,
    missing_indices,
    prompts_digest,
    write_manifest,
)
from qsched.evaluate.metrics import (
    DEFAULT_METRICS,
    MetricResult,
    MetricSettings,
    build_suite,
    denoiser_size,
    known_metrics,
    summarize,
)
from qsched.evaluate.parallel import Workers, current_workers
from qsched.evaluate.report import plot_bars, plot_grid, relative_change, results_table, write_markdown
from qsched.outdir import make_folder
from qsched.prepare import ModelOptions, PreparedPipeline, prepare_pipeline
from qsched.provenance import package_versions, sha256_file, write_json_atomic

BUILTIN_CALIBRATION_PROMPTS = Path(__file__).resolve().parents[1] / "builtin" / "calibration_prompts.txt"


@dataclass(frozen=True)
class EvalSettings:
    """Everything an evaluation depends on (library callers build this; the CLI parses into it)."""

    model: str
    prompts: tuple[str, ...]
    configs: tuple[EvalConfig, ...]
    out: str
    metrics: tuple[str, ...] = DEFAULT_METRICS
    seed: int = 0
    batch_size: int = 8
    options: ModelOptions = field(default_factory=ModelOptions)
    metric_settings: MetricSettings = field(default_factory=MetricSettings)
    keep_going: bool = False
    calibration_prompts: tuple[str, ...] | None = None
    calibration_search: Any = None
    grid_prompts: int = 8
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.prompts:
            raise QSchedError("no prompts to evaluate")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise QSchedError(f"batch size must be a positive integer, got {self.batch_size!r}")
        if not any(c.is_fp for c in self.configs):
            raise QSchedError("the configurations must include 'fp' (changes and MSE are measured against it)")
        unknown = [m for m in self.metrics if m not in known_metrics()]
        if unknown:
            raise QSchedError(f"unknown metric(s) {', '.join(unknown)}; allowed: {', '.join(known_metrics())}")
        unused = sorted(set(self.metric_settings.scorer_weights) - set(self.metrics))
        if unused:
            raise QSchedError(
                f"weights are given for {', '.join(unused)}, which is not among the metrics "
                f"({', '.join(self.metrics)}); add it to --metrics or drop its --scorer-weights"
            )


@dataclass(frozen=True)
class EvalResult:
    """What :func:`evaluate` wrote (main process) or None values on the other processes."""

    out: Path
    results: dict[str, dict[str, dict[str, Any]]]
    generated: dict[str, int]
    files: dict[str, Path]
    table: str


def evaluate(settings: EvalSettings, *, workers: Workers | None = None) -> EvalResult:
    """Run the evaluation of ``settings`` (see the module docstring)."""
    started = time.perf_counter()
    workers = workers or current_workers()
    device = workers.device(settings.options.device)
    out = Path(settings.out)
    fp_config = next(c for c in settings.configs if c.is_fp)
    fp = _prepare(settings, fp_config, device=device)
    spec = EvalSpec(model=fp.loaded.source, family=fp.family, steps=fp.steps, guidance_scale=fp.guidance_scale,
                    height=settings.options.height, width=settings.options.width, seed=settings.seed,
                    num_images=len(settings.prompts), prompts_sha256=prompts_digest(settings.prompts))
    cards = {c.name: _load_card(c.card, fp) for c in settings.configs if c.card is not None}
    check_manifest(out, spec)
    suite = build_suite(settings.metrics, settings.metric_settings, family=fp.family, device=device,
                        keep_going=settings.keep_going, need_reference=workers.is_main, progress=settings.progress)
    if workers.is_main:
        make_folder(out)
        write_manifest(out, spec, settings.configs)
    workers.barrier()

    prompts = list(settings.prompts)
    generated: dict[str, int] = {}
    corrections: dict[str, dict[str, Any] | None] = {}
    sizes: dict[str, MetricResult] = {}
    for config in settings.configs:
        correction = _resolve_correction(settings, config, cards, fp, out, workers, device=device)
        corrections[config.name] = correction
        folder = config_folder(out, config)
        missing = missing_indices(folder, config, prompts, seed=settings.seed, correction=correction)
        workers.barrier()  # everyone has read the folder before anyone writes to it
        share = workers.share(missing)
        prepared = None
        if share or ("size" in settings.metrics and workers.is_main and config.recipe.name not in _cached_sizes(out)):
            prepared = fp if config.is_fp else _prepare(settings, config, device=device, correction=correction)
        if share:
            generate_images(prepared, config, prompts, share, folder=folder, seed=settings.seed,
                            batch_size=settings.batch_size, correction=correction, progress=settings.progress)
        generated[config.name] = len(missing)
        if workers.is_main and "size" in settings.metrics:
            sizes[config.name] = _size(out, config, prepared)
        del prepared
        workers.barrier()
        if workers.is_main:
            collect_metadata(folder, len(prompts))

    results = _metrics(settings, suite, workers, out, prompts, fp_config, sizes)
    if not workers.is_main:
        workers.barrier()
        return EvalResult(out=out, results={}, generated=generated, files={}, table="")
    files, table = _write_outputs(settings, out, spec, results, corrections, generated, prompts,
                                  wall_s=time.perf_counter() - started, workers=workers)
    workers.barrier()
    return EvalResult(out=out, results=results, generated=generated, files=files, table=table)


# --- configurations ------------------------------------------------------------------------------

def _prepare(settings: EvalSettings, config: EvalConfig, *, device: str,
             correction: dict[str, Any] | None = None) -> PreparedPipeline:
    card = ScheduleCard.load(correction["file"]) if correction and correction["kind"] in ("card", "qsched") else None
    prepared = prepare_pipeline(settings.model, recipe=config.recipe, card=card,
                                options=settings.options.replace(device=device))
    if correction and correction["kind"] == "ptqd":
        from qsched.ptqd import PTQDStats, ptqd_wrap

        stats = PTQDStats.load(correction["file"])
        stats.check(family=prepared.family, steps=prepared.steps, quant=config.recipe.to_dict())
        prepared.pipe.scheduler = ptqd_wrap(prepared.pipe.scheduler, stats)
    return prepared


def _load_card(path: str, fp: PreparedPipeline) -> ScheduleCard:
    card = ScheduleCard.load(path)
    if card.family != fp.family or os.path.normpath(card.model) != os.path.normpath(fp.loaded.source):
        raise QSchedError(
            f"schedule card {path} was calibrated for model {card.model!r} (family {card.family!r}), "
            f"not {fp.loaded.source!r} (family {fp.family!r}); calibrate a card for this model"
        )
    card.check(family=fp.family, steps=fp.steps)
    return card


def _resolve_correction(settings: EvalSettings, config: EvalConfig, cards: dict[str, ScheduleCard],
                        fp: PreparedPipeline, out: Path, workers: Workers, *, device: str) -> dict[str, Any] | None:
    """Which file the configuration's correction comes from (calibrating it first if needed)."""
    if config.correction == "none":
        return None
    if config.correction in ("card", "qsched"):
        path = config.card
        if path is None:  # +qsched without a card: calibrate, once, into the output folder
            folder = out / "calibration" / config.recipe.name
            path = str(folder / "card.json")
            if workers.is_main and not Path(path).is_file():
                _calibrate(settings, config, fp, folder, device=device)
            workers.barrier()
        return {"kind": config.correction, "file": str(path), "sha256": sha256_file(path)}
    path = config.stats or str(out / "ptqd" / f"{config.recipe.name}.json")
    if config.stats is None and workers.is_main and not Path(path).is_file():
        _estimate_ptqd(settings, config, fp, Path(path), device=device)
    workers.barrier()
    return {"kind": "ptqd", "file": str(path), "sha256": sha256_file(path)}


def _calibration_prompts(settings: EvalSettings) -> list[str]:
    if settings.calibration_prompts is not None:
        return list(settings.calibration_prompts)
    from qsched.prompts import read_prompts

    return read_prompts(BUILTIN_CALIBRATION_PROMPTS)


def _calibrate(settings: EvalSettings, config: EvalConfig, fp: PreparedPipeline, folder: Path, *, device: str) -> None:
    """Calibrate the card of ``config``; ``fp+qsched`` calibrates full precision on purpose (the control)."""
    from qsched.calibrate import calibrate

    calibrate(
        settings.model, recipe=config.recipe, out=folder, search=settings.calibration_search,
        prompts=_calibration_prompts(settings), resume=folder.is_dir() and any(folder.iterdir()),
        options=settings.options.replace(steps=fp.steps, device=device), progress=settings.progress,
        allow_full_precision=config.recipe.is_noop,
    )


def _estimate_ptqd(settings: EvalSettings, config: EvalConfig, fp: PreparedPipeline, path: Path, *, device: str) -> None:
    from qsched.ptqd import estimate_ptqd

    quantized = _prepare(settings, EvalConfig(name=config.recipe.name, recipe=config.recipe), device=device)
    stats = estimate_ptqd(fp, quantized, _calibration_prompts(settings), seed=settings.seed,
                          batch_size=settings.batch_size, progress=settings.progress)
    stats.save(path)


# --- sizes and metrics ---------------------------------------------------------------------------------

def _cached_sizes(out: Path) -> dict[str, Any]:
    try:
        return json.loads((out / "sizes.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _size(out: Path, config: EvalConfig, prepared: PreparedPipeline | None) -> MetricResult:
    cached = _cached_sizes(out)
    key = config.recipe.name
    if key not in cached:
        try:
            result = denoiser_size(prepared, out / "packed" / f"{key}.safetensors")
        except QSchedError as err:
            return MetricResult(value=None, error=str(err))
        cached[key] = {"value": result.value, "extra": result.extra}
        write_json_atomic(out / "sizes.json", cached)
    return MetricResult(value=cached[key]["value"], count=1, extra=cached[key]["extra"])


def _metrics(settings: EvalSettings, suite: Any, workers: Workers, out: Path, prompts: list[str],
             fp_config: EvalConfig, sizes: dict[str, MetricResult]) -> dict[str, dict[str, dict[str, Any]]]:
    indices = workers.share(range(len(prompts)))
    fp_images = load_images(config_folder(out, fp_config), indices)
    per_image_names = [m for m in settings.metrics if m != "size"]
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for config in settings.configs:
        images = fp_images if config.is_fp else load_images(config_folder(out, config), indices)
        local = suite.per_image(images, [prompts[i] for i in indices], fp_images) if per_image_names else {}
        gathered = workers.gather(local)
        if not workers.is_main:
            continue
        row: dict[str, dict[str, Any]] = {}
        for name in settings.metrics:
            if name in suite.failed:
                row[name] = MetricResult(value=None, error=suite.failed[name]).to_dict()
            elif name == "size":
                row[name] = sizes[config.name].to_dict()
            else:
                row[name] = summarize(name, [g[name] for g in gathered if name in g], reference=suite.reference).to_dict()
        results[config.name] = row
    return results


def _write_outputs(settings: EvalSettings, out: Path, spec: EvalSpec, results: dict[str, Any],
                   corrections: dict[str, Any], generated: dict[str, int], prompts: list[str], *,
                   wall_s: float, workers: Workers) -> tuple[dict[str, Path], str]:
    metrics = list(settings.metrics)
    for row in results.values():
        for metric, entry in row.items():
            if row is not results.get("fp") and entry.get("status") == "ok":
                fp_entry = results.get("fp", {}).get(metric, {})
                entry["change_vs_fp_percent"] = relative_change(entry["value"], fp_entry.get("value") if fp_entry.get("status") == "ok" else None)
    table = results_table(results, metrics)
    title = f"{spec.family} ({Path(spec.model).name}), {spec.steps} steps, {spec.num_images} prompts, seed {spec.seed}"
    failed = [f"`{c}` {m}: {e['error']}" for c, row in results.items() for m, e in row.items() if e.get("status") != "ok"]
    notes = ["Change in parentheses: relative to `fp` on the same prompts and seeds (image i's noise depends only on (seed, i)).",
             "MSE to fp: mean squared pixel difference in [0, 1] to the full-precision image of the same seed.",
             "size: the denoiser on disk (packed int checkpoint for quantized recipes, FP32 tensors for fp)."]
    notes += [f"failed: {f}" for f in failed]
    files = {"json": out / "results.json", "md": out / "results.md", "png": out / "results.png", "grid": out / "grid.png"}
    write_json_atomic(files["json"], {
        "format": "qsched-evaluation-results", "version": 1, "spec": spec.to_dict(),
        "configs": [{**c.identity(), "correction_source": corrections.get(c.name)} for c in settings.configs],
        "metrics": metrics, "results": results, "generated_this_run": generated,
        "settings": {"batch_size": settings.batch_size, "device": settings.options.device,
                     "dtype": str(settings.options.dtype), "backend": settings.options.backend, "processes": workers.world, "keep_going": settings.keep_going,
                     "metric_settings": {k: getattr(settings.metric_settings, k) for k in settings.metric_settings.__dataclass_fields__}},
        "wall_s": round(wall_s, 3), "versions": package_versions(),
    })
    write_markdown(files["md"], table, title=title, notes=notes)
    plot_bars(files["png"], results, metrics, title=title)
    count = min(settings.grid_prompts, len(prompts))
    grid_indices = list(range(count))
    columns = {c.name: load_images(config_folder(out, c), grid_indices) for c in settings.configs}
    plot_grid(files["grid"], columns, prompts[:count])
    return files, table


def device_threads(workers: Workers) -> None:
    """Split the CPU threads among processes on one machine (each process would take them all)."""
    if workers.world > 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers.world))
