"""Time-to-accuracy analysis: eval curves -> target, time to target, speedups, table, plots.

Owns the arithmetic of the `sift-bench` report and its outputs (a Markdown table, PNG plots).
An arm's curve is its list of evaluations, each a dict with `elapsed_s` (training time, eval time
excluded), `accuracy`, `loss`, `samples_backpropagated` and `spearman_exit_vs_full`.

How the target and the times are read off the curves (evaluations are points; between two
evaluations we interpolate linearly, the only assumption that needs no model of the curve):
- target = vanilla's metric at `target_fraction` (0.8) of its budget, interpolated between the two
  evaluations that bracket that time;
- time to target = the first time an arm's curve crosses the target: between the last evaluation
  short of it and the first one at or past it, interpolated linearly; None when it never gets there
  within its budget (the speedup is then None, and the table says "not reached").
A curve that wobbles can cross the target before 80% of vanilla's budget, vanilla's included: we
report the first crossing as measured. Loss targets (lower is better) are computed the same way;
the calibration notes found them steadier than accuracy targets at small scale.

Pure functions except `write_plots` (files).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

Curve = Sequence[dict[str, Any]]


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def points(curve: Curve, x: str, y: str) -> list[tuple[float, float]]:
    """(x, y) pairs of the evaluations where both are finite, sorted by x."""
    pts = [(float(e[x]), float(e[y])) for e in curve if _finite(e.get(x)) and _finite(e.get(y))]
    return sorted(pts)


def value_at(pts: Sequence[tuple[float, float]], x: float) -> float:
    """y at `x`, linearly interpolated between the bracketing points (clamped at the ends)."""
    if not pts:
        raise ValueError("value_at: the curve has no finite points")
    if x <= pts[0][0]:
        return pts[0][1]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return pts[-1][1]


def first_crossing(pts: Sequence[tuple[float, float]], target: float,
                   higher_is_better: bool = True) -> float | None:
    """The first x where the curve reaches `target` (interpolated), or None if it never does."""
    def reached(y: float) -> bool:
        return y >= target if higher_is_better else y <= target

    for i, (x1, y1) in enumerate(pts):
        if not reached(y1):
            continue
        if i == 0:
            return x1
        x0, y0 = pts[i - 1]
        # y0 is short of the target and y1 reaches it, so y1 != y0
        return x0 + (x1 - x0) * (target - y0) / (y1 - y0)
    return None


def target_from(curve: Curve, budget_s: float, metric: str = "accuracy",
                target_fraction: float = 0.8) -> float:
    """The reference's `metric` at `target_fraction` of its budget (training seconds)."""
    if not 0 < target_fraction <= 1:
        raise ValueError(f"target_fraction must be in (0, 1], got {target_fraction}")
    return value_at(points(curve, "elapsed_s", metric), target_fraction * budget_s)


def speedup(reference_s: float | None, arm_s: float | None) -> float | None:
    """reference time / arm time (> 1: the arm is faster); None when either never got there."""
    if reference_s is None or arm_s is None:
        return None
    if arm_s <= 0:
        return math.inf if reference_s > 0 else 1.0
    return reference_s / arm_s


def analyze(arms: dict[str, dict[str, Any]], budget_s: float, reference: str = "vanilla",
            target_fraction: float = 0.8, controls: dict[str, str] | None = None) -> dict[str, Any]:
    """Targets, times to target and speedups of every arm against `reference` (and its control).

    arms: name -> {"evals": curve, ...}. controls: SIFT arm -> the random arm of the same batch size.
    """
    if reference not in arms:
        raise ValueError(f"the reference arm {reference!r} is not among the arms {sorted(arms)}")
    ref = arms[reference]["evals"]
    targets = {"accuracy": target_from(ref, budget_s, "accuracy", target_fraction),
               "loss": target_from(ref, budget_s, "loss", target_fraction)}
    per_arm: dict[str, dict[str, Any]] = {}
    for name, arm in arms.items():
        curve = arm["evals"]
        t_acc = first_crossing(points(curve, "elapsed_s", "accuracy"), targets["accuracy"], True)
        t_loss = first_crossing(points(curve, "elapsed_s", "loss"), targets["loss"], False)
        s_acc = first_crossing(points(curve, "samples_backpropagated", "accuracy"),
                               targets["accuracy"], True)
        last = curve[-1] if curve else {}
        per_arm[name] = {"time_to_target_s": t_acc, "time_to_target_loss_s": t_loss,
                         "samples_to_target": s_acc, "final_accuracy": last.get("accuracy"),
                         "final_loss": last.get("loss"),
                         "final_spearman_exit_vs_full": last.get("spearman_exit_vs_full")}
    for name, row in per_arm.items():
        row["speedup_vs_vanilla"] = speedup(per_arm[reference]["time_to_target_s"],
                                            row["time_to_target_s"])
        row["speedup_vs_vanilla_loss"] = speedup(per_arm[reference]["time_to_target_loss_s"],
                                                 row["time_to_target_loss_s"])
        control = (controls or {}).get(name)
        row["control"] = control
        if control in per_arm:
            row["speedup_vs_control"] = speedup(per_arm[control]["time_to_target_s"],
                                                row["time_to_target_s"])
            row["speedup_vs_control_loss"] = speedup(per_arm[control]["time_to_target_loss_s"],
                                                     row["time_to_target_loss_s"])
            # a control that missed the target took longer than the budget: the arm is at least
            # budget / its time faster (None only when the arm itself missed)
            t_control = per_arm[control]["time_to_target_s"]
            row["speedup_vs_control_at_least"] = speedup(
                budget_s if t_control is None else t_control, row["time_to_target_s"])
    return {"target_accuracy": targets["accuracy"], "target_loss": targets["loss"],
            "target_fraction": target_fraction, "reference": reference, "arms": per_arm}


# ----------------------------------------------------------------------------- statistics over seeds

LEVELS = (0.25, 0.5, 0.75, 1.0)
"""Targets: these fractions of vanilla's gain over its start (smoothed curve, same seed)."""


def isotonic(ys: Sequence[float], increasing: bool = True) -> list[float]:
    """The monotone least-squares fit of `ys` (pool adjacent violators): a learning curve with
    its evaluation noise removed under the one assumption that training does not unlearn."""
    sign = 1.0 if increasing else -1.0
    blocks: list[list[float]] = []  # [mean, weight]
    for y in ys:
        blocks.append([sign * float(y), 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m1, w1), (m2, w2) = blocks[-2], blocks.pop()
            blocks[-1] = [(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2]
    out: list[float] = []
    for mean, weight in blocks:
        out += [sign * mean] * int(weight)
    return out


def smoothed(pts: Sequence[tuple[float, float]], increasing: bool = True) -> list[tuple[float, float]]:
    """`pts` (sorted by x) with the y values replaced by their monotone fit."""
    return list(zip([x for x, _ in pts], isotonic([y for _, y in pts], increasing)))


def level_targets(ref: Sequence[tuple[float, float]], levels: Sequence[float] = LEVELS,
                  increasing: bool = True) -> list[float]:
    """Targets at `levels` of the reference's smoothed gain from its first to its last point."""
    fit = smoothed(ref, increasing)
    start, end = fit[0][1], fit[-1][1]
    return [start + q * (end - start) for q in levels]


def _time_to(pts: Sequence[tuple[float, float]], target: float, increasing: bool,
             budget_s: float) -> tuple[float, bool]:
    """(time to `target` on the smoothed curve, reached?); a miss counts as the budget.

    A crossing is resolved no finer than the evaluation grid: one at or before the first
    evaluation after the start counts at that evaluation's time. Otherwise a noisy resample whose
    first point already meets a low target gives a time of ~0 and a ratio of ~1e9.
    """
    t = first_crossing(smoothed(pts, increasing), target, increasing)
    if t is None:
        return budget_s, False
    first_eval = min((x for x, _ in pts if x > 0), default=1e-9)
    return max(t, first_eval), True


def noise_sd(pts: Sequence[tuple[float, float]]) -> float:
    """The evaluation noise of a curve: Gasser et al.'s (1986) difference estimator, whose
    second differences cancel a smooth trend, so the noise is not mistaken for learning (the
    residuals around the monotone fit would understate it: the fit bends toward the noise)."""
    ys = [y for _, y in pts]
    if len(ys) < 3:
        return 0.0
    d = [(ys[i - 1] - 2 * ys[i] + ys[i + 1]) ** 2 / 6 for i in range(1, len(ys) - 1)]
    return math.sqrt(sum(d) / len(d))


def _geomean(xs: Sequence[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def seed_ratios(curves: dict[str, Sequence[tuple[float, float]]], arm: str, versus: str,
                reference: str, budget_s: float, levels: Sequence[float] = LEVELS,
                increasing: bool = True) -> list[tuple[float, bool, bool]]:
    """Per level: (time of `versus` / time of `arm` to the target, arm reached?, versus reached?),
    targets from `reference`'s smoothed curve of the same seed."""
    out = []
    for target in level_targets(curves[reference], levels, increasing):
        t_arm, ok_arm = _time_to(curves[arm], target, increasing, budget_s)
        t_vs, ok_vs = _time_to(curves[versus], target, increasing, budget_s)
        out.append((t_vs / t_arm, ok_arm, ok_vs))
    return out


def ratio_intervals(per_seed: dict[Any, dict[str, Sequence[tuple[float, float]]]], arm: str,
                    versus: str, budget_s: float, reference: str = "vanilla",
                    levels: Sequence[float] = LEVELS, increasing: bool = True,
                    n_boot: int = 2000, rng_seed: int = 0) -> list[dict[str, Any]]:
    """`versus`'s time / `arm`'s time to each level's target: the geometric mean over seeds, and
    a 95% percentile interval from a bootstrap over seeds (drawn with replacement) and over
    evaluations (each curve's monotone fit plus fresh Gaussian noise of the curve's own noise
    level, `noise_sd`). A difference counts only when the interval excludes 1.

    per_seed: seed -> arm name -> curve points (x = training seconds, y = metric). A target not
    reached within the budget counts at the budget (so a missing arm's ratio is an upper bound,
    a missing `versus`'s a lower bound); `reached` says how often that happened.
    """
    import random

    rng = random.Random(rng_seed)
    seeds = list(per_seed)
    point = {s: seed_ratios(per_seed[s], arm, versus, reference, budget_s, levels, increasing)
             for s in seeds}
    fits = {s: {n: (smoothed(c, increasing), noise_sd(c))
                for n, c in per_seed[s].items() if n in (arm, versus, reference)} for s in seeds}

    def jitter(s: Any, name: str) -> list[tuple[float, float]]:
        fit, sd = fits[s][name]
        return [(x, f + rng.gauss(0.0, sd)) for (x, f) in fit]

    boot: list[list[float]] = [[] for _ in levels]
    for _ in range(n_boot):
        draw = [rng.choice(seeds) for _ in seeds]
        logs = [0.0] * len(levels)
        for s in draw:
            curves = {n: jitter(s, n) for n in fits[s]}
            for i, (r, _, _) in enumerate(seed_ratios(curves, arm, versus, reference, budget_s,
                                                      levels, increasing)):
                logs[i] += math.log(r)
        for i in range(len(levels)):
            boot[i].append(math.exp(logs[i] / len(draw)))
    rows = []
    for i, q in enumerate(levels):
        ratios = [point[s][i][0] for s in seeds]
        b = sorted(boot[i])
        lo, hi = b[int(0.025 * (len(b) - 1))], b[int(math.ceil(0.975 * (len(b) - 1)))]
        rows.append({"level": q, "ratio": _geomean(ratios), "ci95": [lo, hi],
                     "by_seed": {str(s): point[s][i][0] for s in seeds},
                     "arm_reached": sum(point[s][i][1] for s in seeds),
                     "versus_reached": sum(point[s][i][2] for s in seeds),
                     "seeds": len(seeds), "excludes_1": lo > 1.0 or hi < 1.0})
    return rows


def compare_seeds(per_seed: dict[Any, dict[str, Curve]], budget_s: float,
                  controls: dict[str, str], reference: str = "vanilla",
                  levels: Sequence[float] = LEVELS, n_boot: int = 2000) -> dict[str, Any]:
    """Every arm against vanilla and against its random control, at every level, on accuracy
    (the headline) and on loss: `ratio_intervals` for each. per_seed: seed -> arm name ->
    {"evals": curve, ...} (as `analyze` takes them)."""
    out: dict[str, Any] = {"levels": list(levels), "seeds": [str(s) for s in per_seed],
                           "reference": reference, "n_boot": n_boot, "arms": {}}
    names = [n for n in next(iter(per_seed.values())) if all(n in a for a in per_seed.values())]
    for metric, increasing in (("accuracy", True), ("loss", False)):
        curves = {s: {n: points(arms[n]["evals"], "elapsed_s", metric) for n in names}
                  for s, arms in per_seed.items()}
        out[f"targets_{metric}"] = {str(s): level_targets(c[reference], levels, increasing)
                                    for s, c in curves.items()}
        for name in names:
            row = out["arms"].setdefault(name, {"control": controls.get(name)})
            row[f"vs_vanilla_{metric}"] = ratio_intervals(curves, name, reference, budget_s,
                                                          reference, levels, increasing, n_boot)
            if controls.get(name) in names:
                row[f"vs_control_{metric}"] = ratio_intervals(
                    curves, name, controls[name], budget_s, reference, levels, increasing, n_boot)
    # Sample efficiency, the gain of the break-even condition (time speedup = this gain x vanilla's
    # time per sequence backpropagated / the arm's): vanilla's sequences backpropagated to each
    # accuracy target / the arm's. A miss counts at the most any arm backpropagated (an upper bound).
    samples = {s: {n: points(arms[n]["evals"], "samples_backpropagated", "accuracy") for n in names}
               for s, arms in per_seed.items()}
    if all(len(c) >= 2 for by_arm in samples.values() for c in by_arm.values()):
        most = max(x for by_arm in samples.values() for c in by_arm.values() for x, _ in c)
        for name in names:
            out["arms"][name]["samples_vs_vanilla_accuracy"] = ratio_intervals(
                samples, name, reference, most, reference, levels, True, n_boot)
    return out


def _ci_text(row: dict[str, Any]) -> str:
    lo, hi = row["ci95"]
    star = "" if row["excludes_1"] else " (noise)"
    return f"{row['ratio']:.2f}x [{lo:.2f}, {hi:.2f}]{star}"


def _cells(rows: Sequence[dict[str, Any]]) -> str:
    """One table cell per level: the ratio, its interval and, if not every seed got there, how many."""
    return " | ".join(_ci_text(r) + ("" if r["arm_reached"] == r["seeds"] else
                                     f" {r['arm_reached']}/{r['seeds']} reached") for r in rows)


def intervals_table(cmp: dict[str, Any], metric: str = "accuracy") -> str:
    """One row per arm: speedup vs vanilla and vs its control at each level, with 95% intervals."""
    levels = cmp["levels"]
    head = " | ".join(f"{int(q * 100)}%" for q in levels)
    lines = [f"Speedup to {', '.join(f'{int(q * 100)}%' for q in levels)} of vanilla's {metric} "
             f"gain (monotone-fitted curves; geometric mean over {len(cmp['seeds'])} seed(s), 95% "
             "bootstrap interval over seeds and evaluations; '(noise)': the interval includes 1):",
             "", f"| arm | vs | {head} |", "|---|---|" + "---|" * len(levels)]
    for name, row in cmp["arms"].items():
        for vs in ("vanilla", "control"):
            rows = row.get(f"vs_{vs}_{metric}")
            if rows is None or (vs == "vanilla" and name == cmp["reference"]):
                continue
            label = vs if vs == "vanilla" else f"control ({row['control']})"
            lines.append(f"| {name} | {label} | {_cells(rows)} |")
    efficiency = {n: row["samples_vs_vanilla_accuracy"] for n, row in cmp["arms"].items()
                  if n != cmp["reference"] and row.get("samples_vs_vanilla_accuracy")}
    if metric == "accuracy" and efficiency:
        lines += ["", "Sample efficiency: vanilla's sequences backpropagated / the arm's, to the same "
                  "targets (the time speedup is this times vanilla's time per sequence / the arm's: to "
                  "save time it must exceed the arm's step time over vanilla's):",
                  "", f"| arm | {head} |", "|---|" + "---|" * len(levels)]
        for name, rows in efficiency.items():
            lines.append(f"| {name} | {_cells(rows)} |")
    return "\n".join(lines) + "\n"


def median_or_none(values: Sequence[float | None], none_is_high: bool = False) -> float | None:
    """The median of ratios where None ("target not reached") ranks below every number (above, with
    `none_is_high`: for a time ratio, where a miss is the largest): None when the middle (either
    middle value, for an even count) is a None, so a median is never flattered by dropping the
    seeds that missed."""
    if not values:
        return None
    ranked = sorted(values, key=lambda v: ((v is None) == none_is_high, v if v is not None else 0.0))
    mid = len(ranked) // 2
    middle = ranked[mid - 1:mid + 1] if len(ranked) % 2 == 0 else ranked[mid:mid + 1]
    if any(v is None for v in middle):
        return None
    return sum(middle) / len(middle)


# speedup_vs_control_at_least, not speedup_vs_control: a seed where the control missed the target
# is a SIFT win (counted at the budget), not a miss
SEED_KEYS = ("speedup_vs_vanilla", "speedup_vs_control_at_least", "speedup_vs_vanilla_loss")


def across_seeds(analyses: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Per arm and per ratio (SEED_KEYS): its value under each seed, the median (None-aware, see
    `median_or_none`), min and max of the reached ones, and how many seeds reached the target.

    analyses: seed -> `analyze(...)` of that seed's arms (its own vanilla, its own target). Arms
    missing from a seed are left out of every seed (a partial result is not a median).
    """
    if not analyses:
        raise ValueError("across_seeds needs at least one seed's analysis")
    first = next(iter(analyses.values()))
    arms = [n for n in first["arms"] if all(n in a["arms"] for a in analyses.values())]
    out: dict[str, Any] = {"seeds": list(analyses), "arms": {}}
    for name in arms:
        row: dict[str, Any] = {"control": first["arms"][name].get("control")}
        for key in SEED_KEYS:
            by_seed = {s: a["arms"][name].get(key) for s, a in analyses.items()}
            reached = [v for v in by_seed.values() if v is not None]
            row[key] = {"by_seed": by_seed, "median": median_or_none(list(by_seed.values())),
                        "min": min(reached) if reached else None,
                        "max": max(reached) if reached else None, "reached": len(reached)}
        out["arms"][name] = row
    out["target_accuracy"] = {s: a["target_accuracy"] for s, a in analyses.items()}
    out["target_loss"] = {s: a["target_loss"] for s, a in analyses.items()}
    return out


def seeds_table(agg: dict[str, Any]) -> str:
    """One row per arm: speedup vs vanilla and vs its random control under each seed, and medians."""
    seeds = agg["seeds"]
    per_seed = " / ".join(f"s{s}" for s in seeds)
    lines = [
        f"Across {len(seeds)} seeds ({', '.join(map(str, seeds))}): each seed has its own vanilla and "
        "target (accuracy targets " + ", ".join(f"{agg['target_accuracy'][s]:.4f}" for s in seeds)
        + "); a median counts a seed where the arm missed the target as the slowest; vs control, a "
        "seed where only the control missed counts at the budget (a lower bound).",
        "",
        f"| arm | speedup vs vanilla ({per_seed}) | median | reached | vs control ({per_seed}) "
        "| median vs control |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in agg["arms"].items():
        van, ctl = row["speedup_vs_vanilla"], row["speedup_vs_control_at_least"]
        has_control = row.get("control") is not None
        lines.append(
            f"| {name} | {' / '.join(_times(van['by_seed'][s]) for s in seeds)} "
            f"| {_times(van['median'])} | {van['reached']}/{len(seeds)} "
            f"| {' / '.join(_times(ctl['by_seed'][s]) for s in seeds) if has_control else ''} "
            f"| {_times(ctl['median']) if has_control else ''} |")
    return "\n".join(lines) + "\n"


TIME_KEYS = ("data", "score", "select", "forward_backward", "optimizer")


def step_diagnostics(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Where an arm's training time went and what its selection kept, from its train records.

    records: the `"kind": "train"` lines of metrics.jsonl (each the mean over a logging window).
    Returns the mean seconds per optimizer step of each phase (`<phase>_s`), `step_s`, the share
    of step time spent scoring candidates (`score_share`) and selecting (`select_share`), and
    the mean score of the kept samples minus that of all candidates (`score_gap`, in the score's
    units: nats for loss policies; None without selection)."""
    phases = {k: [r[f"time/{k}_s"] for r in records if _finite(r.get(f"time/{k}_s"))]
              for k in TIME_KEYS}
    out: dict[str, Any] = {f"{k}_s": (sum(v) / len(v) if v else None) for k, v in phases.items()}
    step = sum(v for v in out.values() if v is not None)
    out["step_s"] = step if any(phases.values()) else None
    for k in ("score", "select"):
        out[f"{k}_share"] = out[f"{k}_s"] / step if step and out[f"{k}_s"] is not None else None
    gaps = [r["select/score_selected"] - r["select/score_all"] for r in records
            if _finite(r.get("select/score_selected")) and _finite(r.get("select/score_all"))]
    out["score_gap"] = sum(gaps) / len(gaps) if gaps else None
    return out


def diagnostics_table(arms: dict[str, dict[str, Any]]) -> str:
    """Per arm: seconds per step by phase, scoring share, selected-minus-all score."""
    lines = ["| arm | s/step (sum of phases) | score s | forward+backward s | optimizer s | scoring share "
             "| selected - all score |", "|---|---|---|---|---|---|---|"]
    for name, info in arms.items():
        d = info.get("diagnostics")
        if not d or d.get("step_s") is None:
            continue
        # a random arm's scores are uniform draws: their gap says nothing about the samples
        gap = "" if info.get("policy") == "random" else _fmt(d["score_gap"], "+.3f", "")
        lines.append(f"| {name} | {_fmt(d['step_s'], '.3f', 'n/a')} | {_fmt(d['score_s'], '.3f', 'n/a')} "
                     f"| {_fmt(d['forward_backward_s'], '.3f', 'n/a')} "
                     f"| {_fmt(d['optimizer_s'], '.3f', 'n/a')} "
                     f"| {_fmt(d['score_share'], '.1%', 'n/a')} | {gap} |")
    return "\n".join(lines) + "\n"


def _fmt(x: Any, spec: str, missing: str = "not reached") -> str:
    return format(x, spec) if _finite(x) else missing


def _times(x: Any) -> str:
    return f"{x:.2f}x" if _finite(x) else "n/a"


def markdown_table(analysis: dict[str, Any], arms: dict[str, dict[str, Any]]) -> str:
    """One row per arm: time to the accuracy and loss targets, speedups, final metrics."""
    a = analysis
    lines = [
        f"Target accuracy {a['target_accuracy']:.4f} / target loss {a['target_loss']:.4f}: what "
        f"`{a['reference']}` reaches at {a['target_fraction']:.0%} of its training-time budget "
        "(linear interpolation between evaluations; times are training seconds, eval excluded).",
        "",
        "| arm | policy | pool | f | exit | steps | seqs backprop | tokens/s | time to acc target (s) "
        "| speedup vs vanilla | vs control | time to loss target (s) | speedup (loss) "
        "| final acc | final loss | spearman exit/full |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in a["arms"].items():
        info = arms[name]
        control = row.get("control")
        vs_control = (f"{_times(row.get('speedup_vs_control'))} ({control})"
                      if control else "")
        lines.append(
            f"| {name} | {info.get('policy', '')} | {info.get('pool', '')} "
            f"| {info.get('fraction', '')} | {info.get('exit', '')} | {info.get('steps', '')} "
            f"| {info.get('samples_backpropagated', '')} | {_fmt(info.get('tokens_per_s'), '.0f', 'n/a')} "
            f"| {_fmt(row['time_to_target_s'], '.1f')} | {_times(row['speedup_vs_vanilla'])} "
            f"| {vs_control} | {_fmt(row['time_to_target_loss_s'], '.1f')} "
            f"| {_times(row['speedup_vs_vanilla_loss'])} "
            f"| {_fmt(row['final_accuracy'], '.4f', 'n/a')} | {_fmt(row['final_loss'], '.4f', 'n/a')} "
            f"| {_fmt(row['final_spearman_exit_vs_full'], '.3f', 'n/a')} |")
    return "\n".join(lines) + "\n"


def write_plots(arms: dict[str, dict[str, Any]], analysis: dict[str, Any], out_dir: Path,
                prefix: str = "time_to_accuracy") -> list[Path]:
    """Three PNGs: accuracy vs training time, accuracy vs samples backpropagated, and
    Spearman(exit loss, full loss) vs training time. Returns their paths."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a training box
    import matplotlib.pyplot as plt

    specs = [("accuracy_vs_time", "elapsed_s", "accuracy", "training time (s, eval excluded)",
              "validation MLM accuracy", True),
             ("accuracy_vs_samples", "samples_backpropagated", "accuracy",
              "sequences backpropagated", "validation MLM accuracy", True),
             ("spearman_vs_time", "elapsed_s", "spearman_exit_vs_full",
              "training time (s, eval excluded)", "Spearman(exit-head loss, full-model loss)", False)]
    paths = []
    for suffix, x, y, xlabel, ylabel, show_target in specs:
        fig, ax = plt.subplots(figsize=(11, 5.5))
        palette = plt.get_cmap("tab20").colors  # 20 distinct colours: one per arm of a full run
        others = [n for n in arms if n != analysis["reference"]]
        for name, arm in arms.items():
            pts = points(arm["evals"], x, y)
            if pts:
                ref = name == analysis["reference"]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "--" if "random" in name else "-",
                        marker=".", label=name, linewidth=2.4 if ref else 1.2,
                        color="black" if ref else palette[others.index(name) % len(palette)])
        if show_target:
            ax.axhline(analysis["target_accuracy"], color="black", linestyle=":", linewidth=1,
                       label=f"target {analysis['target_accuracy']:.4f}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the curves
        fig.tight_layout()
        path = Path(out_dir) / f"{prefix}_{suffix}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
