"""`sift-bench`: time to accuracy of every selection policy, back to back, on one machine.

Owns the arm list (which runs a benchmark makes), the launch of one benchmark job for all of them
(`benchmarks.sift_bench.job`, under the `deepspeed` launcher for several ranks) and of the Hugging
Face `Trainer` baseline (`benchmarks.sift_bench.hf_trainer`), and the outputs: `<name>.json`,
`<name>.md` and three PNGs (`benchmarks.sift_bench.report` does the arithmetic and the drawing).

Every arm shares the corpus, model, seed, recipe and training-time budget, and differs from vanilla
in the selection settings only. Arms (`arms_for`):
- vanilla (policy none);
- the sweep policy (first SIFT policy given, sift-loss by default) at every fraction x pool mode;
- each other SIFT policy (sift-entropy, full-loss) at the base fraction and pool;
- the sweep policy at every other exit layer and exit-head kind (base fraction and pool);
- a random control for every (pool, fraction) a SIFT arm uses: the calibration notes found that a
  shrink-mode lead came from the smaller batch alone, so SIFT must beat random at the same batch.
Evaluation runs at fixed intervals of training time, eval time excluded (`eval.every_s`).

`--seeds 42,43,44` runs the whole benchmark once per seed (`run.seed`: initial weights, data
order, masking), each with its own vanilla and target, and writes each seed's report as
`<name>_seed<S>.*` plus `<name>.json` / `.md` with every seed's ratios and their medians: one seed
cannot resolve differences under ~20% in time to target at small scale (see the README).

`--quick` is the smoke test (tiny model, seconds per arm, one fraction and pool): it keeps the
harness working in CI and says nothing about speedups.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from benchmarks.sift_bench import downstream as bench_downstream
from benchmarks.sift_bench import report as bench_report
from data_prep.io_util import free_port, machine_info, write_json_atomic
from pipeline.cli_util import OneLineParser

REPO = Path(__file__).resolve().parents[2]
SIFT_POLICIES = ("sift-loss", "sift-entropy", "full-loss")
POLICIES = (*SIFT_POLICIES, "random")
HF_ARM = "hf-trainer"
# The settings an Arm owns (its name, description and random control follow from them).
ARM_KEYS = ("selection.policy", "selection.fraction", "selection.pool", "model.exit_layer",
            "model.exit_head")

# Settings the harness applies when no --recipe is given (a recipe owns them otherwise): a
# wall-time budget has no step horizon, so the LR is constant after warmup in every arm alike.
DEFAULT_OVERRIDES = ("optim.decay=constant",)
MAX_BUDGET_S = 30 * 86400  # a month per arm: beyond it a typo, not a benchmark
QUICK_OVERRIDES = (
    "model.preset=bert-tiny", "model.hidden_dropout=0.0", "model.attention_dropout=0.0",
    "optim.decay=constant", "optim.lr=2e-3", "optim.warmup_steps=10", "optim.weight_decay=0.0",
    "eval.max_samples=128", "eval.batch_size=64", "logging.every_steps=5",
    "logging.tensorboard=false",
)


@dataclass(frozen=True)
class Arm:
    """One run of the benchmark: the selection settings that differ from vanilla."""

    policy: str
    """none | random | sift-loss | sift-entropy | full-loss."""
    fraction: float = 1.0
    """Share of candidates kept (ignored by none)."""
    pool: str = "expand"
    """expand (B/f candidates, train on B) or shrink (B candidates, train on f*B)."""
    exit_layer: int = 1
    """Layer the exit head reads (only sift-loss / sift-entropy use it for selection)."""
    exit_head: str = "shared"
    """shared or separate."""
    tag: str = ""
    """Names a variant (`--variant TAG SET...`): the arm's name ends with `-TAG`."""
    extra: tuple[str, ...] = ()
    """The variant's own `--set` overrides, applied after the selection settings."""

    def __post_init__(self):
        if self.policy not in ("none", *POLICIES):
            raise ValueError(f"unknown policy {self.policy!r} (known: none, {', '.join(POLICIES)})")
        if not 0 < self.fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")
        if self.pool not in ("expand", "shrink"):
            raise ValueError(f"pool must be expand or shrink, got {self.pool!r}")
        if self.tag and not all(c.isalnum() or c in "._" for c in self.tag):
            raise ValueError(f"variant tag must be letters, digits, '.' or '_', got {self.tag!r}")
        if bool(self.tag) != bool(self.extra):
            raise ValueError("a variant needs both a tag and at least one override")
        fixed = [o for o in self.extra if o.split("=", 1)[0].strip() in ARM_KEYS]
        if fixed:
            raise ValueError(f"variant {self.tag!r} sets {fixed}: an arm's policy, fraction, pool "
                             "and exit are its own fields (and its control's), not variant settings")

    @property
    def name(self) -> str:
        if self.policy == "none":
            return "vanilla"
        name = f"{self.policy}-{self.pool}-f{self.fraction:g}"
        if self.policy in ("sift-loss", "sift-entropy"):
            name += "" if self.exit_layer == 1 else f"-L{self.exit_layer}"
            name += "" if self.exit_head == "shared" else f"-{self.exit_head}"
        return name + (f"-{self.tag}" if self.tag else "")

    def control(self) -> "Arm | None":
        """The random arm of the same batch size (None for vanilla and random)."""
        if self.policy not in SIFT_POLICIES:
            return None
        return Arm("random", self.fraction, self.pool)

    def overrides(self) -> list[str]:
        # strings quoted (TOML): a bare `none` would be read as "unset" and fall back to the default
        out = [f'selection.policy="{self.policy}"', f"model.exit_layer={self.exit_layer}",
               f'model.exit_head="{self.exit_head}"']
        if self.policy != "none":
            out += [f"selection.fraction={self.fraction}", f'selection.pool="{self.pool}"']
        return out + list(self.extra)

    def describe(self) -> dict[str, Any]:
        return {"policy": self.policy, "fraction": self.fraction if self.policy != "none" else 1.0,
                "pool": self.pool if self.policy != "none" else "", "exit_layer": self.exit_layer,
                "exit_head": self.exit_head,
                "exit": f"L{self.exit_layer}/{self.exit_head}" if self.policy.startswith("sift") else "",
                "variant": " ".join(self.extra)}


def arms_for(policies: Sequence[str], fractions: Sequence[float], pools: Sequence[str],
             exit_layers: Sequence[int], exit_heads: Sequence[str],
             variants: Sequence[Sequence[str]] = ()) -> list[Arm]:
    """The benchmark's arms in run order (see the module docstring); no duplicates.

    Each variant (TAG, SET, ...) is the base sweep arm (first SIFT policy, base fraction, pool,
    exit layer and head) with its own overrides on top, e.g. a later `selection.start_step`.
    """
    for p in policies:
        if p not in POLICIES:
            raise ValueError(f"unknown policy {p!r} (known: {', '.join(POLICIES)}; vanilla always runs)")
    if not (fractions and pools and exit_layers and exit_heads):
        raise ValueError("fractions, pools, exit layers and exit heads need one value each at least")
    f0 = 0.5 if 0.5 in fractions else fractions[0]
    pool0, layer0, head0 = pools[0], exit_layers[0], exit_heads[0]
    sift = [p for p in policies if p in SIFT_POLICIES]
    arms = [Arm("none")]
    if sift:
        sweep = sift[0]
        arms += [Arm(sweep, f, pool, layer0, head0) for pool in pools for f in fractions]
        arms += [Arm(p, f0, pool0, layer0, head0) for p in sift[1:]]
        arms += [Arm(sweep, f0, pool0, layer, head0) for layer in exit_layers[1:]]
        arms += [Arm(sweep, f0, pool0, layer0, head) for head in exit_heads[1:]]
        arms += [Arm(sweep, f0, pool0, layer0, head0, v[0], tuple(v[1:])) for v in variants]
    elif variants:
        raise ValueError("variants modify the base SIFT arm: give a SIFT policy")
    if "random" in policies:
        arms += [c for c in (a.control() for a in arms) if c is not None]
        if not sift:
            arms += [Arm("random", f, pool) for pool in pools for f in fractions]
    seen: dict[str, Arm] = {}
    for a in arms:
        if a.tag and a.name in seen:
            raise ValueError(f"variant {a.tag!r} would be named {a.name}, which another arm has")
        seen.setdefault(a.name, a)
    return list(seen.values())


def build_parser() -> argparse.ArgumentParser:
    """The command line (names and types; `parse_args` adds the checks that read files)."""
    def floats(s: str) -> list[float]:
        return [float(x) for x in s.split(",") if x]

    def ints(s: str) -> list[int]:
        return [int(x) for x in s.split(",") if x]

    def words(s: str) -> list[str]:
        return [x.strip() for x in s.split(",") if x.strip()]

    p = OneLineParser(prog="sift-bench", description=__doc__.splitlines()[0])
    from pipeline import __version__

    p.add_argument("--version", action="version", version=f"sift-bench {__version__}")
    p.add_argument("--data", required=True, help="sift-prep output directory (train + valid splits)")
    p.add_argument("--recipe", help="TOML training recipe shared by every arm (default: built-in "
                   "defaults plus optim.decay=constant)")
    p.add_argument("--set", dest="overrides", action="append", nargs="+", default=[],
                   metavar="SECTION.KEY=VALUE", help="override a recipe setting for every arm")
    p.add_argument("--out", default="runs/bench/results",
                   help="where the JSON, table and plots go (default runs/bench/results; the "
                        "committed results only when asked: --out benchmarks/results)")
    p.add_argument("--name", help="output file stem (default time_to_accuracy, "
                   "time_to_accuracy_quick with --quick)")
    p.add_argument("--work-dir", help="per-arm run directories (default runs/bench/<name>)")
    p.add_argument("--budget-s", type=float, help="training seconds per arm, eval excluded "
                   "(default 300; 6 with --quick)")
    p.add_argument("--eval-interval-s", type=float,
                   help="evaluate every this many training seconds (default budget / 10)")
    p.add_argument("--world-size", type=int, default=1, help="ranks (> 1: the deepspeed launcher)")
    p.add_argument("--policies", type=words, default=list(POLICIES),
                   help="comma list of sift-loss, sift-entropy, full-loss, random (vanilla always runs)")
    p.add_argument("--fractions", type=floats, help="comma list (default 0.25,0.5,0.75)")
    p.add_argument("--pools", type=words, help="comma list (default expand,shrink)")
    p.add_argument("--exit-layers", type=ints, help="comma list; the first is the base (default 1,2)")
    p.add_argument("--exit-heads", type=words, help="comma list; the first is the base "
                   "(default shared,separate)")
    p.add_argument("--variant", dest="variants", action="append", nargs="+", default=[],
                   metavar=("TAG", "SECTION.KEY=VALUE"),
                   help="one more arm: the base SIFT arm with these overrides, named <base>-TAG "
                        "(repeatable), e.g. --variant start300 selection.start_step=300")
    p.add_argument("--seeds", type=ints,
                   help="comma list: the whole benchmark once per seed (run.seed), each with its own "
                        "vanilla and target; the report gives each seed's ratios and their medians "
                        "(default: the recipe's seed, once)")
    p.add_argument("--resume", action="store_true",
                   help="keep the arms (and HF baseline) a previous run of this --work-dir "
                        "finished with the same settings; run only the others")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the arms and results of an earlier benchmark of this --name / "
                        "--work-dir (without it, or --resume, an earlier one is refused)")
    p.add_argument("--target-fraction", type=float, default=0.8,
                   help="target = vanilla's accuracy at this fraction of its budget")
    p.add_argument("--hf-baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the Hugging Face Trainer baseline (needs accelerate)")
    p.add_argument("--warm-start", metavar="STEPS|CHECKPOINT_DIR",
                   help="compare past the start: every arm forks (checkpoint.init_from) from a "
                        "vanilla run of STEPS optimizer steps (trained once per seed: the recipe's "
                        "warmup, then its peak LR) or from a checkpoint of yours; the arms skip "
                        "warmup and decay over their own budget")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: bert-tiny, 6 s per arm, f=0.5 expand only (< 3 min)")
    p.add_argument("--timeout-s", type=float, default=None,
                   help="kill a benchmark job that runs longer than this (default: generous)")
    p.add_argument("--downstream", metavar="DATASET",
                   help="also judge every arm downstream: export its final checkpoint (sift-export) "
                        "and fine-tune it on DATASET (sift-finetune: a labeled .csv/.tsv/.jsonl or a "
                        "directory of class subdirectories); the report puts downstream accuracy "
                        "beside masked-LM accuracy (default: off)")
    p.add_argument("--downstream-seeds", default=None,
                   help="sift-finetune seeds per arm (default 1,2,3)")
    p.add_argument("--downstream-args", default="", metavar="FLAGS",
                   help="more sift-finetune flags, one quoted string, e.g. "
                        "\"--max-length 128 --truncation left\"")
    return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    args.overrides = [o for group in args.overrides for o in group]
    for flag in ("policies", "fractions", "pools", "exit_layers", "exit_heads", "seeds"):
        if getattr(args, flag, None) == []:  # given, but empty (a shell variable that was unset)
            p.error(f"--{flag.replace('_', '-')} needs at least one value")
    if any(len(v) < 2 for v in args.variants):
        p.error("--variant needs a TAG and at least one SECTION.KEY=VALUE")
    tags = [v[0] for v in args.variants]
    if len(set(tags)) != len(tags):
        p.error(f"--variant tags must differ: {sorted({t for t in tags if tags.count(t) > 1})} given twice")
    if args.quick:
        defaults = dict(budget_s=6.0, eval_interval_s=1.5, fractions=[0.5], pools=["expand"],
                        exit_layers=[1], exit_heads=["shared"], name="time_to_accuracy_quick")
    else:
        defaults = dict(budget_s=300.0, fractions=[0.25, 0.5, 0.75], pools=["expand", "shrink"],
                        exit_layers=[1, 2], exit_heads=["shared", "separate"], name="time_to_accuracy")
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.eval_interval_s is None:
        args.eval_interval_s = args.budget_s / 10
    if not 0 < args.target_fraction <= 1:
        p.error(f"--target-fraction must be in (0, 1], got {args.target_fraction}")
    if not (0 < args.budget_s < math.inf and 0 < args.eval_interval_s < math.inf):
        p.error("--budget-s and --eval-interval-s must be > 0 and finite")
    if args.budget_s > MAX_BUDGET_S:  # every arm runs this long, one after another
        p.error(f"--budget-s must be at most {MAX_BUDGET_S:g} seconds (~{MAX_BUDGET_S / 86400:.0f} days) "
                f"an arm, got {args.budget_s:g}")
    if args.timeout_s is not None and not args.timeout_s > 0:
        p.error(f"--timeout-s must be > 0, got {args.timeout_s}")
    if args.world_size < 1:
        p.error("--world-size must be >= 1")
    if args.world_size > (os.cpu_count() or 1):  # every rank is a process on this machine
        p.error(f"--world-size {args.world_size} is more ranks than this machine's {os.cpu_count()} "
                "cores (sift-bench runs every rank here)")
    if args.eval_interval_s >= args.budget_s:
        p.error(f"--eval-interval-s {args.eval_interval_s:g} is not shorter than --budget-s "
                f"{args.budget_s:g}: no evaluation between the start and the end to time accuracy by")
    if args.seeds is not None and (not args.seeds or len(set(args.seeds)) != len(args.seeds)
                                   or not all(0 <= s < 2**63 for s in args.seeds)):
        p.error("--seeds needs distinct integers in [0, 2**63), e.g. --seeds 42,43,44")
    if not args.name or Path(args.name).name != args.name or args.name in (".", ".."):
        p.error(f"--name must be a file name (no directory), got {args.name!r}")
    if len(args.name.encode()) > 200:  # its files are NAME.json, NAME_seed42_accuracy_vs_time.png...
        p.error(f"--name must be at most 200 bytes, got {len(args.name.encode())}")
    for flag in ("policies", "fractions", "pools", "exit_layers", "exit_heads"):
        values = getattr(args, flag) or []
        twice = sorted({str(v) for v in values if values.count(v) > 1})
        if twice:  # the same arm twice: twice the time for one result
            p.error(f"--{flag.replace('_', '-')} lists {', '.join(twice)} more than once")
    for flag, where in (("--out", args.out), ("--work-dir", args.work_dir)):
        if where is not None and Path(where).exists() and not Path(where).is_dir():
            p.error(f"{flag} {where}: exists and is not a directory")
    if args.warm_start is not None:
        if args.warm_start.isdigit():
            args.warm_start = int(args.warm_start)
            if args.warm_start < 1:
                p.error("--warm-start STEPS must be >= 1")
        elif Path(args.warm_start).is_dir():
            args.warm_start = str(Path(args.warm_start).resolve())
        else:
            p.error(f"--warm-start {args.warm_start}: neither a step count nor a checkpoint "
                    "directory")
    if not Path(args.data, "manifest.json").is_file():
        p.error(f"--data {args.data}: no manifest.json (run sift-prep first)")
    from pipeline.data import DataError, verify_prepared

    try:  # a damaged data directory fails every arm: say so now
        verify_prepared(args.data)
    except DataError as exc:
        p.error(f"--data: {exc}")
    if args.downstream is None and (args.downstream_seeds is not None or args.downstream_args):
        p.error("--downstream-seeds and --downstream-args need --downstream DATASET")
    if args.downstream_seeds is None:
        args.downstream_seeds = "1,2,3"
    if args.downstream is not None:  # now, not after hours of training
        problem = bench_downstream.check(args.downstream, args.downstream_seeds, args.downstream_args)
        if problem:
            p.error(problem)
    return args


def missing_packages(args: argparse.Namespace) -> list[str]:
    """The optional packages this benchmark will need that are not installed: matplotlib for
    the plots, accelerate for the Hugging Face Trainer baseline."""
    import importlib.util

    wanted = ["matplotlib"] + (["accelerate"] if args.hf_baseline and args.warm_start is None else [])
    return [name for name in wanted if importlib.util.find_spec(name) is None]


def job_env(world_size: int) -> dict[str, str]:
    """The environment of a benchmark job: CPU DeepSpeed defaults unless the caller set them."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    if not _has_cuda():
        env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world_size)))
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def launch_cmd(module: str, world_size: int, args: Sequence[str]) -> list[str]:
    """One plain process for one rank, else the deepspeed launcher on this node."""
    if world_size == 1:
        return [sys.executable, "-m", module, *args]
    launcher = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")
    return [launcher, "--num_gpus", str(world_size), "--master_port", str(free_port()),
            "--module", module, *args]


def run_job(cmd: list[str], env: dict[str, str], log: Path, timeout_s: float | None) -> None:
    """Run `cmd`, its output to `log` and to our stdout; a failure raises with the log's tail."""
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"sift-bench: {' '.join(cmd)}\n  (log: {log})", flush=True)
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        try:
            for line in proc.stdout:
                fh.write(line)
                if line.startswith(("sift-bench:", "hf-trainer", "arm ", "eval step", "done",
                                    "sift-export:", "sift-finetune:")):
                    print("  " + line.rstrip(), flush=True)
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise RuntimeError(f"{cmd[0]} ran past {timeout_s} s; see {log}") from None
    if proc.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-40:])
        raise RuntimeError(f"benchmark job failed ({proc.returncode}); last lines of {log}:\n{tail}")


def load_arm(work: Path, name: str) -> dict[str, Any]:
    path = work / "arms" / name / "summary.json"
    if not path.is_file():
        raise RuntimeError(f"arm {name} wrote no summary ({path})")
    summary = json.loads(path.read_text())
    t, n = summary.get("train_time_s"), summary.get("samples_backpropagated")
    summary["samples_per_s"] = n / t if t else None
    summary["tokens_per_s"] = n * summary["seq_len"] / t if t else None
    metrics = work / "arms" / name / "metrics.jsonl"  # the project trainer's arms, not the HF one
    if metrics.is_file():
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        summary["diagnostics"] = bench_report.step_diagnostics(
            [r for r in records if r.get("kind") == "train"])
    return summary


def run_arms(args: argparse.Namespace, arms: list[Arm], overrides: list[str], work: Path
             ) -> dict[str, dict[str, Any]]:
    """The benchmark job (all arms), then the HF baseline; arm name -> its summary + settings."""
    plan = {"recipe": args.recipe, "overrides": overrides, "out_dir": str(work),
            "budget_s": args.budget_s, "eval_interval_s": args.eval_interval_s,
            "resume": args.resume, "warm_start": args.warm_start,
            "save_final": args.downstream is not None,  # the weights sift-finetune judges
            "arms": [{"name": a.name, "overrides": a.overrides()} for a in arms]}
    work.mkdir(parents=True, exist_ok=True)
    (work / "plan.json").write_text(json.dumps(plan, indent=2) + "\n")
    env = job_env(args.world_size)
    run_job(launch_cmd("benchmarks.sift_bench.job", args.world_size, ["--plan", str(work / "plan.json")]),
            env, work / "bench_run.log", args.timeout_s)
    results = {a.name: {**a.describe(), **load_arm(work, a.name)} for a in arms}
    if args.hf_baseline and args.warm_start is not None:
        print(f"sift-bench: no {HF_ARM} baseline under --warm-start (it cannot start from our "
              "checkpoint)", flush=True)
    elif args.hf_baseline:
        hf_dir = work / "arms" / HF_ARM
        hf_args = [*(["--recipe", args.recipe] if args.recipe else []), "--set", *overrides,
                   "--out-dir", str(hf_dir), "--budget-s", str(args.budget_s),
                   "--eval-interval-s", str(args.eval_interval_s)]
        request = hf_request(args, hf_args, overrides)
        if args.resume and hf_finished(hf_dir, request):
            print(f"sift-bench: {HF_ARM} finished earlier with the same settings: kept", flush=True)
        else:
            hf_dir.mkdir(parents=True, exist_ok=True)
            (hf_dir / "summary.json").unlink(missing_ok=True)  # never pair a stale summary with new settings
            (hf_dir / "request.json").write_text(json.dumps(request, indent=2) + "\n")
            run_job(launch_cmd("benchmarks.sift_bench.hf_trainer", args.world_size, hf_args), env,
                    work / "hf_trainer.log", args.timeout_s)
        results[HF_ARM] = {"policy": "hf-trainer", "fraction": 1.0, "pool": "", "exit": "",
                           **load_arm(work, HF_ARM)}
    return results


def hf_request(args: argparse.Namespace, hf_args: list[str], overrides: list[str]) -> dict[str, Any]:
    """What the HF baseline's result depends on: its arguments and, by content, the files they
    name (recipe, DeepSpeed JSON, data manifest), so `--resume` never keeps a run of other files."""
    from pipeline.config import load_config, resolve_path

    ds_path = Path(resolve_path(load_config(args.recipe, overrides).run.ds_config))
    return {"args": hf_args, "world_size": args.world_size,
            "recipe": Path(args.recipe).read_text() if args.recipe else None,
            "ds_config": ds_path.read_text() if ds_path.is_file() else None,
            "manifest": Path(args.data, "manifest.json").read_text()}


def hf_finished(hf_dir: Path, request: dict[str, Any]) -> bool:
    """Whether the HF baseline in `hf_dir` ran to its summary with exactly these arguments."""
    try:
        return (json.loads((hf_dir / "request.json").read_text()) == request
                and (hf_dir / "summary.json").is_file())
    except (OSError, ValueError):
        return False


HEADLINE_LEVEL = 0.75
"""The headline target: 75% of vanilla's smoothed accuracy gain over its start (the 100% level is
censored: vanilla reaches it only at its budget's end)."""
HEADLINE_RULE = ("time to 75% of vanilla's accuracy gain over its start (the same seed's vanilla, "
                 "monotone-fitted curves), vanilla's (or the control's) time / the arm's; "
                 "geometric mean over seeds; 95% bootstrap interval over seeds and evaluations")


def headline(cmp: dict[str, Any]) -> dict[str, Any]:
    """The report's headline keys from `report.compare_seeds`: ratio and interval per arm, vs
    vanilla and vs control, at HEADLINE_LEVEL of accuracy; the targets (median over seeds)."""
    i = cmp["levels"].index(HEADLINE_LEVEL)

    def pick(key: str, field: str) -> dict[str, Any]:
        return {n: row[key][i][field] for n, row in cmp["arms"].items() if key in row}

    targets = sorted(t[i] for t in cmp["targets_accuracy"].values())
    return {"headline_rule": HEADLINE_RULE,
            "target_accuracy": targets[len(targets) // 2],
            "speedup_vs_vanilla": pick("vs_vanilla_accuracy", "ratio"),
            "speedup_vs_vanilla_ci95": pick("vs_vanilla_accuracy", "ci95"),
            "speedup_vs_control": pick("vs_control_accuracy", "ratio"),
            "speedup_vs_control_ci95": pick("vs_control_accuracy", "ci95")}


def build_report(args: argparse.Namespace, argv: Sequence[str], overrides: list[str], work: Path,
                 results: dict[str, dict[str, Any]], analysis: dict[str, Any],
                 intervals: dict[str, Any], started: datetime.datetime) -> dict[str, Any]:
    """The JSON document: headline numbers first, then settings, machine, analysis, every arm."""
    per_arm = analysis["arms"]
    has_hf = HF_ARM in per_arm
    return {
        "benchmark": "time_to_accuracy", "quick": args.quick,
        "created": started.isoformat(timespec="seconds"),
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": ["sift-bench", *argv],
        "machine": machine_info(repo=REPO),
        "settings": {"budget_s": args.budget_s, "eval_interval_s": args.eval_interval_s,
                     "world_size": args.world_size, "recipe": args.recipe, "overrides": overrides,
                     "work_dir": str(work),
                     "data": _data_facts(Path(args.data)), "target_fraction": args.target_fraction,
                     "analysis_target_rule": "vanilla's metric at target_fraction x budget, linearly "
                                    "interpolated between the bracketing evaluations; time to "
                                    "target = first crossing, linearly interpolated"},
        **headline(intervals),
        "target_loss": analysis["target_loss"],
        "speedup_vs_vanilla_loss": {n: r["speedup_vs_vanilla_loss"] for n, r in per_arm.items()},
        "hf_trainer_time_ratio": _hf_ratio(per_arm, "time_to_target_s") if has_hf else None,
        "hf_trainer_time_ratio_loss": _hf_ratio(per_arm, "time_to_target_loss_s") if has_hf else None,
        # a baseline that never reaches the target within the budget is at least this much slower
        "hf_trainer_time_ratio_at_least": (_hf_floor(per_arm, args.budget_s) if has_hf else None),
        "hf_trainer_tokens_per_s_ratio": (results[HF_ARM]["tokens_per_s"] / results["vanilla"]["tokens_per_s"]
                                          if has_hf else None),
        "analysis": analysis,
        "arms": results,
    }


def earlier_benchmark(work: Path, out: Path, name: str, allowed: bool) -> str | None:
    """Why this run would silently replace an earlier benchmark's arms or results (None: it
    would not, or --resume / --overwrite says to)."""
    if allowed:
        return None
    candidates = [work / "arms", *sorted(work.glob("seed*/arms")), out / f"{name}.json",
                  *sorted(out.glob(f"{name}_seed*.json"))]  # one run, or one per seed
    found = [str(p) for p in candidates if (p.is_dir() and any(p.iterdir())) or p.is_file()]
    if not found:
        return None
    return (f"an earlier benchmark named {name} is there ({', '.join(found)}): --resume keeps "
            "its finished arms, --overwrite replaces them, or give this one another --name / "
            "--work-dir")


def beside_the_data(data: str, work: Path, out: Path) -> str | None:
    """The arms' work directory and the report's directory lie apart from the corpus (the arms
    would write their runs among its shards)."""
    from pipeline.rundir import overlap

    for flag, where in (("--work-dir", work), ("--out", out)):
        how = overlap(where, Path(data))
        if how in ("is", "lies inside"):
            return f"{flag} {where} {how} the data directory {data}: choose another directory"
    return None


def unwritable(work: Path, out: Path) -> str | None:
    """The work and report directories, created and written to now (the last check: a refused
    benchmark creates nothing), not when the first arm or the report writes there."""
    from pipeline.rundir import RunDirError, check_writable

    for flag, where in (("--work-dir", work), ("--out", out)):
        try:
            check_writable(where, "benchmark's files")
        except RunDirError as exc:
            return f"{flag} {exc}"
    return None


def bad_arm_config(args: argparse.Namespace, arms: list["Arm"], overrides: list[str],
                   work: Path) -> str | None:
    """Every arm's configuration (recipe, --set, --variant, the harness's settings) as the job
    will build it, checked now: a bad setting is one line before any job, not a traceback inside
    one an hour later."""
    from benchmarks.sift_bench.job import HARNESS_KEYS, arm_config, warm_start_config
    from pipeline.config import ConfigError
    from pipeline.rundir import PreflightError

    for flag, settings in [("--set", args.overrides)] + [(f"--variant {v[0]}", v[1:]) for v in args.variants]:
        owned = sorted({o.split("=", 1)[0].strip() for o in settings} & HARNESS_KEYS)
        if owned:  # the harness's value would win silently, or the arms would not compare
            return (f"{flag}: {', '.join(owned)} is set by sift-bench for every arm (budgets, "
                    "evaluation, checkpoints and outputs are the harness's; --data names the corpus)")

    plan = {"recipe": args.recipe, "overrides": overrides, "out_dir": str(work),
            "budget_s": args.budget_s, "eval_interval_s": args.eval_interval_s,
            "warm_start": args.warm_start}
    from pipeline.data import load_manifest
    from pipeline.model import bert_config

    manifest = load_manifest(args.data)  # checked readable before this
    data_shape = (int(manifest["vocab_size"]), int(manifest["seq_len"]),
                  int(manifest["special_tokens"]["pad"]))
    try:
        if isinstance(args.warm_start, int):
            warm_start_config(plan)
        for arm in arms:
            cfg = arm_config(plan, {"name": arm.name, "overrides": arm.overrides()})
            if cfg.model.init_from is None:  # the model's own sizes: e.g. an exit past its layers
                bert_config(cfg.model, *data_shape)
            if isinstance(args.warm_start, str):  # a user's checkpoint: does it fit every arm?
                warm_start_fits(cfg, args.warm_start, args.data, args.world_size)
    except (ConfigError, ValueError) as exc:  # ConfigError is a ValueError
        return str(exc)
    except PreflightError as exc:
        return f"--warm-start: {exc}"
    return None


def warm_start_fits(cfg: Any, warm: str, data: str, world_size: int) -> None:
    """The check each arm's job makes before forking from `warm` (architecture, vocabulary,
    tokenizer, ZeRO stage: pipeline.run.check_checkpoint), made here once per arm."""
    from pipeline import checkpoint
    from pipeline.config import resolve_path
    from pipeline.data import ShardDataset
    from pipeline.ds_config import load_ds_config
    from pipeline.run import check_checkpoint

    source = checkpoint.resolve_resume(warm, Path(warm), what="--warm-start")
    if source is None:
        return  # bad_warm_start says so
    check_checkpoint(cfg, source, ShardDataset(data, cfg.data.train_split),
                     load_ds_config(resolve_path(cfg.run.ds_config), world_size),
                     checkpoint.saved_positions(*source), fork=True)


def bad_warm_start(warm: str | None) -> str | None:
    """A --warm-start CHECKPOINT_DIR that no arm could fork from, said before any job starts."""
    if warm is None or isinstance(warm, int):  # a step count: the warm start is ours
        return None
    from pipeline.checkpoint import CheckpointError, read_client_state, resolve_resume

    try:
        found = resolve_resume(warm, Path(warm), what="--warm-start")
        if found is not None:
            read_client_state(*found)
    except CheckpointError as exc:
        return str(exc)
    except (OSError, ValueError) as exc:
        return f"--warm-start {warm}: unreadable client state ({exc})"
    return None if found is not None else f"--warm-start {warm}: no checkpoint found there"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    missing = missing_packages(args)
    if missing:  # now, not when the plots are drawn after hours of training
        print(f"sift-bench: error: needs {', '.join(missing)}: pip install -e '.[bench]' "
              "(or --no-hf-baseline when only accelerate is missing)", file=sys.stderr)
        return 2
    if args.recipe:
        args.recipe = str(Path(args.recipe).resolve())  # the jobs run from the repository root
    try:
        arms = arms_for(args.policies, args.fractions, args.pools, args.exit_layers,
                        args.exit_heads, args.variants)
    except ValueError as exc:
        print(f"sift-bench: error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    work = Path(args.work_dir or REPO / "runs" / "bench" / args.name).resolve()
    args.work_dir = str(work)
    problem = beside_the_data(args.data, work, out) or \
        earlier_benchmark(work, out, args.name, args.resume or args.overwrite) or \
        bad_warm_start(args.warm_start)
    if problem:
        print(f"sift-bench: error: {problem}", file=sys.stderr)
        return 2
    overrides = [*(QUICK_OVERRIDES if args.quick else () if args.recipe else DEFAULT_OVERRIDES),
                 *args.overrides, f"data.data_dir={Path(args.data).resolve()}"]
    problem = bad_arm_config(args, arms, overrides, work) or unwritable(work, out)
    if problem:
        print(f"sift-bench: error: {problem}", file=sys.stderr)
        return 2
    seeds = args.seeds or []
    print(f"sift-bench: {len(arms)} arms x {args.budget_s:g} s of training on {args.world_size} "
          f"rank(s){f' x {len(seeds)} seeds' if len(seeds) > 1 else ''}: "
          f"{', '.join(a.name for a in arms)}", flush=True)
    started = datetime.datetime.now(datetime.timezone.utc)
    if len(seeds) <= 1:
        seed_sets = [f"run.seed={seeds[0]}"] if seeds else []
        run_benchmark(args, argv, arms, [*overrides, *seed_sets], work, out, args.name, started)
        return 0
    reports = {}
    for seed in seeds:  # one whole benchmark per seed: its own vanilla, target and work dir
        print(f"sift-bench: seed {seed}", flush=True)
        reports[seed] = run_benchmark(args, argv, arms, [*overrides, f"run.seed={seed}"],
                                      work / f"seed{seed}", out, f"{args.name}_seed{seed}", started)
    write_seed_summary(args, argv, reports, out, started)
    return 0


def run_benchmark(args: argparse.Namespace, argv: Sequence[str], arms: list[Arm],
                  overrides: list[str], work: Path, out: Path, name: str,
                  started: datetime.datetime) -> dict[str, Any]:
    """Every arm (and the HF baseline) in `work`, then `<name>.json`, `.md` and the PNGs in `out`;
    returns the JSON document."""
    results = run_arms(args, arms, overrides, work)
    if args.downstream is not None:
        scores = bench_downstream.run_downstream(
            [a.name for a in arms], work, args.downstream, args.downstream_seeds,
            args.downstream_args, run_job, job_env(1), args.timeout_s, args.resume)
        for arm_name, score in scores.items():
            results[arm_name]["downstream"] = score
    controls = {a.name: a.control().name for a in arms
                if a.control() is not None and a.control().name in results}
    analysis = bench_report.analyze(results, args.budget_s, "vanilla", args.target_fraction, controls)
    own = {a: r for a, r in results.items() if a != HF_ARM}  # the HF arm has no control
    intervals = bench_report.compare_seeds({name: own}, args.budget_s, controls)
    report = build_report(args, argv, overrides, work, results, analysis, intervals, started)
    report["intervals"] = intervals
    if args.downstream is not None:
        report["downstream"] = bench_downstream.section(args.downstream, args.downstream_seeds,
                                                        args.downstream_args, results)

    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{name}.json"
    write_json_atomic(json_path, report)
    table = (_headline_text(report) + bench_report.intervals_table(intervals)
             + "\nFirst crossings of the raw curves (target: vanilla's accuracy at "
             f"{args.target_fraction:g} of its budget):\n\n"
             + bench_report.markdown_table(analysis, results))
    if HF_ARM in results:
        table += (f"\nHugging Face Trainer time to target / vanilla's: "
                  f"{_ratio_text(report['hf_trainer_time_ratio'])} (accuracy; at least "
                  f"{_ratio_text(report['hf_trainer_time_ratio_at_least'])}), "
                  f"{_ratio_text(report['hf_trainer_time_ratio_loss'])} (loss); tokens/s ratio "
                  f"{_ratio_text(report['hf_trainer_tokens_per_s_ratio'])}.\n")
    table += ("\nWhere the time went (means over the logged training windows; scoring = the exit or "
              "full-model pass over the candidates):\n\n" + bench_report.diagnostics_table(results))
    if "downstream" in report:
        table += "\n" + bench_downstream.table(report["downstream"])
    (out / f"{name}.md").write_text(table)
    plots = bench_report.write_plots(results, analysis, out, name)
    print(table)
    print(f"sift-bench: wrote {json_path}, {out / (name + '.md')}, "
          f"{', '.join(str(p) for p in plots)}", flush=True)
    return report


def _headline_text(report: dict[str, Any]) -> str:
    return (f"Headline target: {report['target_accuracy']:.4f} accuracy ({HEADLINE_RULE}).\n\n")


HF_TIME_KEYS = ("hf_trainer_time_ratio", "hf_trainer_time_ratio_loss")
HF_KEYS = (*HF_TIME_KEYS, "hf_trainer_time_ratio_at_least", "hf_trainer_tokens_per_s_ratio")


def _medians(agg: dict[str, Any], key: str) -> dict[str, float | None]:
    return {n: row[key]["median"] for n, row in agg["arms"].items()}


def write_seed_summary(args: argparse.Namespace, argv: Sequence[str],
                       reports: dict[int, dict[str, Any]], out: Path,
                       started: datetime.datetime) -> dict[str, Any]:
    """`<name>.json` and `.md` over the seeds: the headline ratios are geometric means over the
    seeds with 95% intervals (`headline`; the raw first crossings' medians are in
    `across_seeds`); every seed's own report sits beside it as `<name>_seed<S>`."""
    agg = bench_report.across_seeds({s: r["analysis"] for s, r in reports.items()})
    first = next(iter(reports.values()))
    controls = {n: row["control"] for n, row in first["analysis"]["arms"].items() if row.get("control")}
    intervals = bench_report.compare_seeds(
        {s: {n: a for n, a in r["arms"].items() if n != HF_ARM} for s, r in reports.items()},
        args.budget_s, controls)
    doc = {
        "benchmark": "time_to_accuracy", "quick": args.quick, "seeds": list(reports),
        "created": started.isoformat(timespec="seconds"),
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": ["sift-bench", *argv], "machine": machine_info(repo=REPO),
        "settings": {**first["settings"], "work_dir": args.work_dir,
                     "overrides": [o for o in first["settings"]["overrides"]
                                   if not o.startswith("run.seed=")]},
        **headline(intervals),
        "target_loss": bench_report.median_or_none(list(agg["target_loss"].values())),
        "speedup_vs_vanilla_loss": _medians(agg, "speedup_vs_vanilla_loss"),
        "speedup_vs_control_at_least": {n: m for n, m in
                                        _medians(agg, "speedup_vs_control_at_least").items()
                                        if agg["arms"][n]["control"]},
        # time ratios (HF / ours): a miss is the slowest, so it ranks high
        **{key: bench_report.median_or_none([r[key] for r in reports.values()],
                                            none_is_high=key in HF_TIME_KEYS) for key in HF_KEYS},
        "intervals": intervals,
        "across_seeds": agg,
        "per_seed_reports": {s: f"{args.name}_seed{s}.json" for s in reports},
        "downstream": bench_downstream.across_seeds(reports),
    }
    write_json_atomic(out / f"{args.name}.json", doc)
    table = (_headline_text(doc) + bench_report.intervals_table(intervals)
             + "\nFirst crossings of the raw curves, per seed:\n\n" + bench_report.seeds_table(agg))
    if doc["downstream"]:
        table += "\n" + bench_downstream.seeds_table(doc["downstream"])
    (out / f"{args.name}.md").write_text(
        table + "\nEach seed's full table: " + ", ".join(f"`{args.name}_seed{s}.md`" for s in reports)
        + ".\n")
    print(table)
    print(f"sift-bench: wrote {out / (args.name + '.json')}, {out / (args.name + '.md')}", flush=True)
    return doc


def _hf_ratio(per_arm: dict[str, dict[str, Any]], key: str) -> float | None:
    """HF Trainer's time to target over vanilla's (> 1: the HF recipe is slower)."""
    hf, ours = per_arm[HF_ARM][key], per_arm["vanilla"][key]
    return hf / ours if hf is not None and ours else None


def _hf_floor(per_arm: dict[str, dict[str, Any]], budget_s: float) -> float | None:
    """budget / vanilla's time to the accuracy target when HF misses it (else its ratio)."""
    hf, ours = per_arm[HF_ARM]["time_to_target_s"], per_arm["vanilla"]["time_to_target_s"]
    if not ours:
        return None
    return (hf if hf is not None else budget_s) / ours


def _ratio_text(x: float | None) -> str:
    return f"{x:.2f}x" if x is not None else "n/a (target not reached)"


def _data_facts(data: Path) -> dict[str, Any]:
    m = json.loads((data / "manifest.json").read_text())
    return {"dir": str(data.resolve()), "seq_len": m["seq_len"], "vocab_size": m["vocab_size"],
            "splits": {k: {"num_sequences": v["num_sequences"], "num_tokens": v.get("num_tokens")}
                       for k, v in m["splits"].items()},
            "sources": [s.get("path") for s in m.get("sources", [])][:50],
            "tokenizer_fingerprint": m.get("tokenizer_fingerprint")}


if __name__ == "__main__":
    sys.exit(main())
