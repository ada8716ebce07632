"""`sift-bench --downstream DATASET`: every arm's final weights judged on a labeled task too.

Masked-LM accuracy says how well an arm predicts masked tokens; a selection policy could buy it
with representations that transfer worse. With --downstream, every arm saves its final checkpoint
(the job's `save_final`), and after the job each is exported (`sift-export`) and fine-tuned
(`sift-finetune`: the same fixed train/test split, seeds and settings for every arm); the report
puts downstream accuracy and macro-F1 (mean and 95% t-interval over the fine-tuning seeds) beside
the final masked-LM accuracy. The Hugging Face baseline arm saves no checkpoint and is skipped.

Both tools run as subprocesses, as a user runs them. Each arm's `downstream.json` (the
sift-finetune report) is kept on --resume when the arm's summary and the fine-tuning arguments
are those it was made from (`downstream_request.json`).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shlex
import sys
from pathlib import Path
from typing import Any, Callable

# sift-bench owns these sift-finetune flags: the seeds come from --downstream-seeds, the output
# file and the progress bars are the harness's.
OWNED_FLAGS = ("--seeds", "--output", "-o", "--progress", "--no-progress")


def check(dataset: str, seeds: str, extra: str) -> str | None:
    """Why these --downstream settings cannot work (None: they parse), said before any training."""
    from pipeline.finetune import FinetuneError, labeled_split, parse_seeds
    from pipeline.finetune_cli import build_parser, settings_from

    if not Path(dataset).exists():
        return f"--downstream {dataset}: no such file or directory"
    try:
        parse_seeds(seeds)
    except FinetuneError as exc:
        return f"--downstream-seeds: {exc}"
    try:
        words = shlex.split(extra)
    except ValueError as exc:  # an unbalanced quote
        return f"--downstream-args {extra!r}: {exc}"
    owned = [w for w in words if w.split("=", 1)[0] in OWNED_FLAGS]
    if owned:
        return f"--downstream-args: {owned[0]} is set by sift-bench (seeds: --downstream-seeds)"
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):
            args = build_parser().parse_args(["MODEL", dataset, *words])
    except SystemExit:
        why = said.getvalue().strip().removeprefix("sift-finetune: error: ").removesuffix(" (see --help)")
        return f"--downstream-args {extra!r}: {why}"
    try:  # the settings and the data, as sift-finetune will take them after hours of training
        settings_from(args)
        labeled_split(dataset, args.test_file, args.text_column, args.label_column, args.test_fraction,
                      args.split_seed)
    except FinetuneError as exc:
        return f"--downstream: {exc}"
    return None


def finetune_args(dataset: str, seeds: str, extra: str) -> list[str]:
    """sift-finetune's arguments after the model directory."""
    return [str(Path(dataset).resolve()), "--seeds", seeds, "--no-progress", *shlex.split(extra)]


def run_downstream(arm_names: list[str], work: Path, dataset: str, seeds: str, extra: str,
                   run_job: Callable[[list[str], dict[str, str], Path, float | None], None],
                   env: dict[str, str], timeout_s: float | None, resume: bool) -> dict[str, dict[str, Any]]:
    """Export and fine-tune every arm in `arm_names`; arm name -> `summary` of its report."""
    args = finetune_args(dataset, seeds, extra)
    out: dict[str, dict[str, Any]] = {}
    for name in arm_names:
        arm = work / "arms" / name
        report_path, request_path = arm / "downstream.json", arm / "downstream_request.json"
        request = {"finetune_args": args,
                   "arm_summary_sha256": hashlib.sha256((arm / "summary.json").read_bytes()).hexdigest()}
        if resume and report_path.is_file() and _read(request_path) == request:
            print(f"sift-bench: {name} downstream finished earlier with the same weights and "
                  "settings: kept", flush=True)
        else:
            report_path.unlink(missing_ok=True)  # never pair a stale report with new weights
            export = arm / "export"
            run_job([sys.executable, "-m", "pipeline.export_cli", str(arm / "checkpoints"), str(export)],
                    env, arm / "export.log", timeout_s)
            run_job([sys.executable, "-m", "pipeline.finetune_cli", str(export), *args,
                     "--output", str(report_path)], env, arm / "downstream.log", timeout_s)
            request_path.write_text(json.dumps(request, indent=2) + "\n")
        out[name] = summary(json.loads(report_path.read_text()), report_path)
    return out


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def summary(report: dict[str, Any], path: Path) -> dict[str, Any]:
    """What the benchmark report keeps of one sift-finetune report."""
    return {"accuracy": report["accuracy"], "macro_f1": report["macro_f1"],
            "majority_accuracy": report["majority_accuracy"],
            "per_seed_accuracy": [r["accuracy"] for r in report["runs"]],
            "num_train": report["dataset"]["num_train"], "num_test": report["dataset"]["num_test"],
            "report": str(path)}


def section(dataset: str, seeds: str, extra: str, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The report's `downstream` key: settings, and per arm the final masked-LM accuracy beside
    the downstream scores."""
    return {"dataset": str(Path(dataset).resolve()), "seeds": seeds, "finetune_args": shlex.split(extra),
            "arms": {name: {"mlm_accuracy": r.get("accuracy_after"), **r["downstream"]}
                     for name, r in results.items() if "downstream" in r}}


def _mean_ci(s: dict[str, Any]) -> str:
    if s["ci95"] is None:
        return f"{s['mean']:.4f}"
    return f"{s['mean']:.4f} [{s['ci95'][0]:.4f}, {s['ci95'][1]:.4f}]"


def table(sec: dict[str, Any]) -> str:
    """Markdown: one row per arm, masked-LM accuracy beside downstream accuracy and macro-F1."""
    arms = sec["arms"]
    if not arms:
        return ""
    first = next(iter(arms.values()))
    lines = [f"Downstream: `sift-finetune` on `{sec['dataset']}` ({first['num_train']} train / "
             f"{first['num_test']} test, seeds {sec['seeds']}"
             f"{', ' + ' '.join(sec['finetune_args']) if sec['finetune_args'] else ''}; majority class "
             f"{first['majority_accuracy']:.4f}); mean [95% t-interval over seeds].", "",
             "| arm | final MLM accuracy | downstream accuracy | downstream macro-F1 |",
             "|---|---|---|---|"]
    for name, a in arms.items():
        mlm = f"{a['mlm_accuracy']:.4f}" if isinstance(a["mlm_accuracy"], (int, float)) else "n/a"
        lines.append(f"| {name} | {mlm} | {_mean_ci(a['accuracy'])} | {_mean_ci(a['macro_f1'])} |")
    return "\n".join(lines) + "\n"


def across_seeds(reports: dict[int, dict[str, Any]]) -> dict[str, Any] | None:
    """The seed summary's `downstream`: per arm, each benchmark seed's downstream accuracy mean."""
    per = {s: r["downstream"]["arms"] for s, r in reports.items() if r.get("downstream")}
    if not per:
        return None
    names = list(next(iter(per.values())))
    return {"arms": {n: {"accuracy_by_seed": {s: per[s][n]["accuracy"]["mean"] for s in per if n in per[s]},
                         "mlm_accuracy_by_seed": {s: per[s][n]["mlm_accuracy"] for s in per if n in per[s]}}
                     for n in names}}


def seeds_table(agg: dict[str, Any] | None) -> str:
    if not agg:
        return ""
    lines = ["Downstream accuracy (mean over fine-tuning seeds) per benchmark seed:", "",
             "| arm | " + " | ".join(f"seed {s}" for s in next(iter(agg["arms"].values()))["accuracy_by_seed"])
             + " |"]
    lines.append("|---|" + "---|" * (lines[-1].count("|") - 2))
    for n, a in agg["arms"].items():
        lines.append(f"| {n} | " + " | ".join(f"{v:.4f}" for v in a["accuracy_by_seed"].values()) + " |")
    return "\n".join(lines) + "\n"
