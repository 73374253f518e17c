"""Is Q-Sched's gain specific to quantization? The control study (issue 11, item 3).

For one model and step count this calibrates one schedule card per recipe (default
fp, w4a8, w4a4; fp on purpose: the control), writes the cross-applied cards (fp's
coefficients on w4a8 and w4a8's on fp: ``ScheduleCard.for_recipe``), and evaluates
every configuration on the same prompts under several noise seeds:

    fp, fp+card, w4a8, w4a8+card, w4a4, w4a4+card, w4a8+fpcard, fp+w4a8card

Per metric it reports paired per-seed contrasts (the same noise for every
configuration of a seed), in percent of ``fp`` of the same seed, with mean ± std
and a 95% t interval over seeds:

* each configuration's change against ``fp``;
* the quantization-specific gain ``G_Q = (Q+card - Q) - (fp+card - fp)``: what the
  card of Q does for Q beyond what full precision's own card does for full precision;
* the cross-applied cards: ``w4a8+fpcard - w4a8+card`` (does W4A8 need its own
  coefficients?) and ``fp+w4a8card - fp+card``.

Everything resumes: a calibration continues its study (a finished one is reused), an
evaluation keeps its images. Writes ``OUT/calibration/<recipe>/`` (card, landscape),
``OUT/cards/`` (transplanted cards), ``OUT/seed<k>/`` (evaluations), ``OUT/control.json``
(every per-seed value, the cards, settings, versions) and ``OUT/control.md``.

    python benchmarks/bench_control.py --out runs/bench-control [--model builtin] [--steps 4] \\
        [--recipes fp,w4a8,w4a4] [--cross w4a8] [--seeds 5] [--num 300] [--metrics fid,clip,clipiqa] \\
        [--bounds 0.8 1.2] [--grid-points 5] [--threads 1]

Several finished studies side by side (one row per model and step count; FID and
CLIP-IQA contrasts with their intervals, and the cards):

    python benchmarks/bench_control.py --summarize runs/control/builtin-2 runs/control/builtin-4 ...

Smoke test (a minute or two):

    python benchmarks/bench_control.py --out /tmp/control-smoke --seeds 2 --num 8 --steps 2 \\
        --grid-points 2 --metrics clip,clipiqa --threads 1
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from qsched.builtin.captions import EVALUATION_FILE as EVALUATION_PROMPTS
from qsched.card import ScheduleCard
from qsched.errors import QSchedError
from qsched.prompts import read_prompts
from qsched.provenance import package_versions, write_json_atomic
from qsched.search.samplers import SearchSettings

# qsched.calibrate, .evaluate, .prepare and .quant load torch: imported where used, so the
# statistics below import in a blink (tests/test_bench_control.py)

FP = "fp"


# --- statistics (pure) ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Summary:
    """Mean, sample standard deviation and a t confidence interval of per-seed values."""

    mean: float
    std: float
    low: float
    high: float
    n: int

    def text(self) -> str:
        return f"{self.mean:+.2f} ± {self.std:.2f} [{self.low:+.2f}, {self.high:+.2f}]"


def t_interval(samples: Sequence[float], *, confidence: float = 0.95) -> tuple[float, float]:
    """Two-sided t confidence interval of the mean (nan, nan with fewer than two samples)."""
    n = len(samples)
    if n < 2:
        return math.nan, math.nan
    from scipy.stats import t

    mean = statistics.fmean(samples)
    half = float(t.ppf(0.5 + confidence / 2, n - 1)) * statistics.stdev(samples) / math.sqrt(n)
    return mean - half, mean + half


def summarize(samples: Sequence[float], *, confidence: float = 0.95) -> Summary:
    low, high = t_interval(samples, confidence=confidence)
    std = statistics.stdev(samples) if len(samples) > 1 else math.nan
    return Summary(mean=statistics.fmean(samples), std=std, low=low, high=high, n=len(samples))


def paired_contrast(values: Mapping[str, Sequence[float]], weights: Mapping[str, float], *,
                    relative_to: str | None = FP) -> list[float]:
    """Per seed, ``sum_c weights[c] * values[c][seed]``; in percent of ``values[relative_to][seed]`` unless None."""
    used = list(weights) + ([relative_to] if relative_to else [])
    counts = {len(values[c]) for c in used}
    if len(counts) != 1:
        raise ValueError(f"configurations have different numbers of seeds: { {c: len(values[c]) for c in used} }")
    out = []
    for seed in range(counts.pop()):
        value = sum(w * values[c][seed] for c, w in weights.items())
        out.append(100.0 * value / abs(values[relative_to][seed]) if relative_to else value)
    return out


def card_config(recipe: str) -> str:
    return f"{recipe}+card"


def cross_configs(recipe: str) -> tuple[str, str]:
    """Names of ``recipe`` with full precision's card, and of full precision with ``recipe``'s card."""
    return f"{recipe}+{FP}card", f"{FP}+{recipe}card"


def contrasts(recipes: Sequence[str], cross: Sequence[str]) -> dict[str, dict[str, float]]:
    """The reported contrasts as ``{label: {configuration: weight}}`` (each sums to 0 over configurations)."""
    quantized = [r for r in recipes if r != FP]
    rows: dict[str, dict[str, float]] = {}
    for recipe in recipes:
        for name in ([] if recipe == FP else [recipe]) + [card_config(recipe)]:
            rows[f"{name} - fp"] = {name: 1.0, FP: -1.0}
    for q in cross:
        for name in cross_configs(q):
            rows[f"{name} - fp"] = {name: 1.0, FP: -1.0}
    for q in quantized:
        rows[f"G_{q} = ({q}+card - {q}) - (fp+card - fp)"] = {card_config(q): 1.0, q: -1.0, card_config(FP): -1.0, FP: 1.0}
    for q in cross:
        on_q, on_fp = cross_configs(q)
        rows[f"{on_q} - {card_config(q)}"] = {on_q: 1.0, card_config(q): -1.0}
        rows[f"{on_fp} - {card_config(FP)}"] = {on_fp: 1.0, card_config(FP): -1.0}
    return rows


# --- the study -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ControlSettings:
    """What the study runs (paths are parameters; the search defaults are calibrate's)."""

    model: str
    out: Path
    recipes: tuple[str, ...] = (FP, "w4a8", "w4a4")
    cross: tuple[str, ...] = ("w4a8",)
    seeds: int = 5
    num: int = 300
    metrics: tuple[str, ...] = ("fid", "clip", "clipiqa")
    steps: int | None = None
    device: str = "cpu"
    prompts: Path = EVALUATION_PROMPTS
    search: SearchSettings = field(default_factory=SearchSettings)
    progress: bool = True

    def __post_init__(self) -> None:
        if self.seeds < 1 or self.num < 1:
            raise QSchedError(f"--seeds and --num must be positive, got {self.seeds} and {self.num}")
        if FP not in self.recipes:
            raise QSchedError(f"--recipes must include fp (the control), got {','.join(self.recipes)}")
        if len(set(self.recipes)) != len(self.recipes):
            raise QSchedError(f"--recipes lists a recipe twice: {','.join(self.recipes)}")
        wrong = [q for q in self.cross if q == FP or q not in self.recipes]
        if wrong:
            raise QSchedError(f"--cross takes quantized recipes among --recipes ({','.join(self.recipes)}), got {','.join(wrong)}")

    @property
    def options(self) -> Any:
        from qsched.prepare import ModelOptions

        return ModelOptions(steps=self.steps, device=self.device)


def calibrated_cards(settings: ControlSettings) -> dict[str, Path]:
    """One card per recipe in ``OUT/calibration/<recipe>/``; a finished calibration with the same search is reused."""
    from qsched.calibrate import calibrate
    from qsched.quant import parse_preset

    cards = {}
    for name in settings.recipes:
        recipe = parse_preset(name)
        folder = settings.out / "calibration" / name
        path = folder / "card.json"
        finished = (folder / "run.json").is_file() and path.is_file()
        if finished:
            card = ScheduleCard.load(path)
            finished = ((card.objective or {}).get("search") == settings.search.to_dict()
                        and card.quant == recipe.to_dict() and settings.steps in (None, card.steps))
        if not finished:
            started = time.perf_counter()
            result = calibrate(settings.model, recipe=recipe, out=folder, search=settings.search, resume=True,
                               allow_full_precision=recipe.is_noop, options=settings.options, progress=settings.progress)
            print(f"calibrated {name} in {time.perf_counter() - started:.0f} s:\n{result.summary()}\n", flush=True)
        cards[name] = path
    return cards


def transplanted_cards(settings: ControlSettings, cards: Mapping[str, Path]) -> dict[str, Path]:
    """``{configuration: card}`` of the cross-applied configurations, written to ``OUT/cards/``."""
    from qsched.quant import parse_preset

    out = {}
    for q in settings.cross:
        on_q, on_fp = cross_configs(q)
        for config, source, target in ((on_q, FP, q), (on_fp, q, FP)):
            card = ScheduleCard.load(cards[source]).for_recipe(
                parse_preset(target).to_dict(), note=f"{source}'s calibrated coefficients applied to {target} (control)")
            out[config] = card.save(settings.out / "cards" / f"{source}-on-{target}.json")
    return out


def configurations(settings: ControlSettings, cards: Mapping[str, Path], cross: Mapping[str, Path]) -> tuple[Any, ...]:
    from qsched.evaluate import EvalConfig
    from qsched.quant import parse_preset

    configs = []
    for name in settings.recipes:
        recipe = parse_preset(name)
        configs.append(EvalConfig(name=name, recipe=recipe))
        configs.append(EvalConfig(name=card_config(name), recipe=recipe, correction="card", card=str(cards[name])))
    for q in settings.cross:
        on_q, on_fp = cross_configs(q)
        configs.append(EvalConfig(name=on_q, recipe=parse_preset(q), correction="card", card=str(cross[on_q])))
        configs.append(EvalConfig(name=on_fp, recipe=parse_preset(FP), correction="card", card=str(cross[on_fp])))
    return tuple(configs)


def evaluate_seeds(settings: ControlSettings, configs: Sequence[Any]) -> tuple[dict[str, dict[str, list]], list[float]]:
    """``{config: {metric: [value per seed]}}`` (None where a metric failed) and each evaluation's wall time."""
    from qsched.evaluate import EvalSettings, evaluate

    prompts = tuple(read_prompts(settings.prompts)[: settings.num])
    values: dict[str, dict[str, list]] = {c.name: {m: [] for m in settings.metrics} for c in configs}
    walls = []
    for seed in range(settings.seeds):
        started = time.perf_counter()
        result = evaluate(EvalSettings(
            model=settings.model, prompts=prompts, configs=tuple(configs), out=str(settings.out / f"seed{seed}"),
            metrics=settings.metrics, seed=seed, options=settings.options, progress=settings.progress,
        ))
        walls.append(time.perf_counter() - started)
        for config, row in result.results.items():
            for metric in settings.metrics:
                values[config][metric].append(row[metric]["value"])
        print(f"seed {seed} ({walls[-1]:.0f} s, generated {sum(result.generated.values())} images): " + "; ".join(
            f"{c} " + ", ".join(f"{m} {_num(values[c][m][-1])}" for m in settings.metrics) for c in values), flush=True)
    return values, walls


def card_summary(path: Path) -> dict[str, Any]:
    """Coefficients, JAQ and landscape plot of a card (JAQ of its source recipe for a transplanted one)."""
    card = ScheduleCard.load(path)
    objective = card.objective or {}
    origin = card.parametrization.get("transplanted_from")
    landscape = path.parent / "landscape.png"
    return {"file": str(path), "quant": card.quant.get("name"), "steps": card.steps,
            "c_x": list(card.coefficients.c_x), "c_eps": list(card.coefficients.c_eps),
            "params": card.parametrization.get("values"), "coefficients_from": origin["quant"].get("name") if origin else None,
            "jaq": objective.get("value"), "baseline_jaq": objective.get("baseline_value"),
            "landscape": str(landscape) if landscape.is_file() else None}


def contrast_stats(settings: ControlSettings, values: Mapping[str, Mapping[str, list]]) -> dict[str, dict[str, Any]]:
    """``{label: {"weights": ..., metric: (per-seed values, Summary)}}`` for the metrics that never failed."""
    metrics = [m for m in settings.metrics if all(v is not None for row in values.values() for v in row[m])]
    stats: dict[str, dict[str, Any]] = {}
    for label, weights in contrasts(settings.recipes, settings.cross).items():
        stats[label] = {"weights": weights}
        for metric in metrics:
            per_seed = paired_contrast({c: values[c][metric] for c in values}, weights)
            stats[label][metric] = (per_seed, summarize(per_seed))
    return stats


def report(settings: ControlSettings, values: Mapping[str, Mapping[str, list]], stats: Mapping[str, Mapping[str, Any]],
           cards: Mapping[str, Mapping[str, Any]]) -> str:
    """The markdown report: values per configuration, the contrasts, the cards."""
    from qsched.evaluate.metrics import HIGHER_IS_BETTER

    metrics = [m for m in settings.metrics if m in next(iter(stats.values()))]
    failed = [m for m in settings.metrics if m not in metrics]
    header = " | ".join(f"{m} {'↑' if HIGHER_IS_BETTER.get(m, True) else '↓'}" for m in metrics)
    steps = cards[card_config(FP)]["steps"]
    lines = [f"## Control study: {settings.model}, {steps} steps, {settings.num} prompts, "
             f"{settings.seeds} seeds", "", "Values: mean ± std over seeds.", "",
             f"| configuration | {header} |", "|---|" + "---|" * len(metrics)]
    for config, row in values.items():
        lines.append(f"| `{config}` | " + " | ".join(
            f"{statistics.fmean(row[m]):.4g} ± {statistics.stdev(row[m]) if len(row[m]) > 1 else math.nan:.2g}"
            for m in metrics) + " |")
    lines += ["", "Paired contrasts, in % of `fp` of the same seed: mean ± std [95% t interval] over seeds.", "",
              f"| contrast | {header} |", "|---|" + "---|" * len(metrics)]
    for label, row in stats.items():
        lines.append(f"| {label} | " + " | ".join(row[m][1].text() for m in metrics) + " |")
    lines += ["", "Cards (c_x, c_eps per step; JAQ of the card vs uncorrected, on the calibration prompts of its source recipe):",
              "", "| card | c_x | c_eps | JAQ | uncorrected JAQ |", "|---|---|---|---|---|"]
    for name, card in cards.items():
        lines.append(f"| `{name}` | {', '.join(f'{v:.3g}' for v in card['c_x'])} | {', '.join(f'{v:.3g}' for v in card['c_eps'])} "
                     f"| {_num(card['jaq'])} | {_num(card['baseline_jaq'])} |")
    for q in settings.cross:
        own, other = cards[card_config(q)], cards[card_config(FP)]
        if (own["c_x"], own["c_eps"]) == (other["c_x"], other["c_eps"]):
            lines += ["", f"Note: the cards of {q} and fp hold the same coefficients, so the cross-applied "
                          "configurations repeat the own-card ones (their contrasts are 0 by construction)."]
    if failed:
        lines += ["", f"Failed metrics (left out): {', '.join(failed)}; see OUT/seed<k>/results.json."]
    return "\n".join(lines) + "\n"


def _num(value: float | None) -> str:
    return "failed" if value is None else f"{value:.4g}"


def run(settings: ControlSettings) -> dict[str, Any]:
    """Calibrate, transplant, evaluate every seed, report; returns what ``OUT/control.json`` holds."""
    from qsched.evaluate import known_metrics

    unknown = [m for m in settings.metrics if m not in known_metrics()]
    if unknown:  # before the calibrations, not after them
        raise QSchedError(f"unknown metric(s) {', '.join(unknown)}; allowed: {', '.join(known_metrics())}")
    started = time.perf_counter()
    cards = calibrated_cards(settings)
    cross = transplanted_cards(settings, cards)
    configs = configurations(settings, cards, cross)
    calibration_s = time.perf_counter() - started
    values, walls = evaluate_seeds(settings, configs)
    card_info = {card_config(r): card_summary(p) for r, p in cards.items()} | {c: card_summary(p) for c, p in cross.items()}
    stats = contrast_stats(settings, values)
    table = report(settings, values, stats, card_info)
    print("\n" + table)
    (settings.out / "control.md").write_text(table, encoding="utf-8")
    record = {
        "format": "qsched-bench-control", "version": 1,
        "settings": {"model": settings.model, "recipes": list(settings.recipes), "cross": list(settings.cross),
                     "seeds": settings.seeds, "num": settings.num, "metrics": list(settings.metrics),
                     "steps": settings.steps, "device": settings.device, "prompts": str(settings.prompts),
                     "search": settings.search.to_dict()},
        "configs": [{**c.identity(), "card": c.card} for c in configs],
        "cards": card_info,
        "values": values,
        "unit": "contrasts in percent of fp of the same seed; 95% t interval over seeds",
        "contrasts": {label: {k: v if k == "weights" else {"per_seed": v[0], **_finite(vars(v[1]))} for k, v in row.items()}
                      for label, row in stats.items()},
        "wall_s": {"calibration": round(calibration_s, 1), "evaluate": [round(w, 1) for w in walls]},
        "versions": package_versions(),
    }
    write_json_atomic(settings.out / "control.json", record)
    return record


SUMMARY_CONTRASTS = (("card on fp", "fp+card - fp"), ("G(w4a8)", "G_w4a8"), ("G(w4a4)", "G_w4a4"))


def summary_table(records: Sequence[Mapping[str, Any]], *, metrics: Sequence[str] = ("fid", "clipiqa")) -> str:
    """Markdown: per study (``control.json`` records), the card's gain on fp and G per recipe, mean [95% interval]."""

    def cell(contrast: Mapping[str, Any] | None, metric: str) -> str:
        stats = (contrast or {}).get(metric)
        if not stats:
            return "—"
        if stats.get("low") is None:
            return f"{stats['mean']:+.2f}"
        return f"{stats['mean']:+.2f} [{stats['low']:+.2f}, {stats['high']:+.2f}]"

    header = [f"{label} {metric}" for metric in metrics for label, _ in SUMMARY_CONTRASTS]
    lines = ["| model | steps | seeds × prompts | cards (c_x, c_eps starts) | " + " | ".join(header) + " |",
             "|---|---|---|---|" + "---|" * len(header)]
    for record in records:
        settings, found = record["settings"], record["contrasts"]
        by_prefix = {label: next((row for name, row in found.items() if name == key or name.startswith(key + " ")), None)
                     for label, key in SUMMARY_CONTRASTS}
        steps = settings["steps"] if settings["steps"] is not None else next(iter(record["cards"].values()))["steps"]
        own = {recipe: record["cards"][card_config(recipe)] for recipe in settings["recipes"]}
        cards = "; ".join(f"{recipe} {card['c_x'][0]:.2g}, {card['c_eps'][0]:.2g}" for recipe, card in own.items())
        lines.append(f"| {settings['model']} | {steps} | {settings['seeds']} × {settings['num']} | {cards} | "
                     + " | ".join(cell(by_prefix[label], metric) for metric in metrics for label, _ in SUMMARY_CONTRASTS)
                     + " |")
    return "\n".join(lines) + "\n"


def _finite(numbers: Mapping[str, Any]) -> dict[str, Any]:
    """NaN (a statistic of one seed) as null: JSON has no NaN."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in numbers.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin", help="registered family/model name or pipeline folder")
    parser.add_argument("--recipes", default="fp,w4a8,w4a4", help="recipes to calibrate and evaluate (must include fp)")
    parser.add_argument("--cross", default="w4a8", help="quantized recipes whose card swaps with fp's ('' for none)")
    parser.add_argument("--metrics", default="fid,clip,clipiqa")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--num", type=int, default=300, help="first NUM prompts of --prompts")
    parser.add_argument("--prompts", type=Path, default=EVALUATION_PROMPTS, help="evaluation prompts (default: built-in)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the family's)")
    parser.add_argument("--bounds", nargs=2, type=float, default=None, metavar=("LO", "HI"), help="calibration search bounds")
    parser.add_argument("--grid-points", type=int, default=None, help="calibration grid points per axis")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--out", type=Path, help="output folder (required unless --summarize)")
    parser.add_argument("--summarize", nargs="+", type=Path, metavar="STUDY",
                        help="print finished studies' control.json side by side and exit")
    args = parser.parse_args()
    if args.summarize:
        missing = [str(p) for p in args.summarize if not (p / "control.json").is_file()]
        if missing:
            parser.error(f"no control.json in {', '.join(missing)} (a study writes it when it finishes)")
        print(summary_table([json.loads((p / "control.json").read_text(encoding="utf-8")) for p in args.summarize]), end="")
        return
    if args.out is None:
        parser.error("--out is required (unless --summarize)")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    search = {}
    if args.bounds:
        search.update(low=args.bounds[0], high=args.bounds[1])
    if args.grid_points:
        search["grid_points"] = args.grid_points
    split = lambda text: tuple(s.strip().lower() for s in text.split(",") if s.strip())  # noqa: E731
    try:
        settings = ControlSettings(model=args.model, out=args.out, recipes=split(args.recipes), cross=split(args.cross),
                                   seeds=args.seeds, num=args.num, metrics=split(args.metrics), steps=args.steps,
                                   device=args.device, prompts=args.prompts, search=SearchSettings(**search),
                                   progress=not args.quiet)
    except QSchedError as err:
        parser.error(str(err))
    try:
        run(settings)
    except QSchedError as err:
        parser.exit(1, f"error: {err}\n")


if __name__ == "__main__":
    main()
