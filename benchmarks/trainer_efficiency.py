"""Trainer efficiency: the real training step against a plain torch loop over the same model.

In one process (1 rank), for each case (model preset x micro batch x DeepSpeed config), it times
side by side, in interleaved rounds so drift hits every arm alike:

  trainer_vanilla   `Trainer.step` of the project (DeepSpeed engine built from the user's
                    ds_config, prefetching loader, selection.policy = none), micro batch B
  plain_vanilla     a plain torch loop over the same model class and batch, with the data already
                    on the device: autocast in the engine's precision, clipping as the ds_config
                    says, AdamW (fused on CUDA), no DeepSpeed
  trainer_sift      the same engine and trainer with sift-loss, expand, f = 0.5: 2B candidates
                    scored by the exit pass, the global top B trained
  plain_sift        the plain loop's SIFT: `score_exit` over 2B candidates, top-k on the device,
                    the plain step on the B kept rows
  plain_exit        `score_exit` over the 2B candidates alone (for the ideal SIFT step)

and reports per case, each ratio as the median over rounds with the [min, max] of the rounds:

  tokens_per_s_*       trained tokens (rows x seq_len) per second of each arm
  efficiency_vanilla   trainer_vanilla tokens/s / plain_vanilla tokens/s        (target >= 0.90)
  efficiency_sift      trainer_sift tokens/s / plain_sift tokens/s              (target >= 0.90)
  sift_step_over_ideal trainer_sift step / (plain_exit + plain_vanilla step): the SIFT step
                       inside the trainer against the exit pass over the candidates plus the full
                       step on the selected, both at the model's own speed    (target <= 1.10)
  sift_over_vanilla    trainer_sift step / trainer_vanilla step: what skipping half the backward
                       passes saves inside the trainer (< 1 is cheaper)
  mfu_*                (CUDA) model FLOPs / step time / 989e12 (H100/H200 bf16 dense peak), with
                       model FLOPs from `pipeline.flops`: per token and encoder layer
                       2 (4 H^2 + 2 H I) + 4 S H forward, per masked token 2 (H^2 + H V) for the
                       sparse MLM head, training = 3 x forward, the exit pass = 1 x forward of
                       layers 1..k and the head over the candidates
  phases_ms            the trainer's own time/* split per step (data, score, select,
                       forward_backward, optimizer) from extra steps run with logging.profile on

CPU default: bert-mini, micro batch 32, ds_configs/cpu_zero2_fp32.json. GPU presets (`--gpu`):
bert-medium and bert-base at micro batch 128 and 256, ds_configs/zero0_autocast_bf16.json. Data: a
sift-prep directory (`--data`); by default the embedded corpus, prepared once under
runs/bench_data/. Writes benchmarks/results/trainer_efficiency.json (or `--out`).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/trainer_efficiency.py            # CPU default
    python benchmarks/trainer_efficiency.py --gpu --data DIR --out results/gpu/x.json
    python benchmarks/trainer_efficiency.py --quick                               # the test's run
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

RESULTS = REPO / "benchmarks" / "results" / "trainer_efficiency.json"
CPU_CASES = [("bert-mini", 32)]
GPU_CASES = [("bert-medium", 128), ("bert-medium", 256), ("bert-base", 128), ("bert-base", 256)]
ARMS = ("trainer_vanilla", "plain_vanilla", "trainer_sift", "plain_sift", "plain_exit")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="sift-prep output directory (default: the embedded corpus, "
                                  "prepared once under runs/bench_data/)")
    p.add_argument("--gpu", action="store_true", help="the GPU presets: bert-medium and bert-base "
                                                      "at micro batch 128 and 256")
    p.add_argument("--case", action="append", default=[], metavar="PRESET:MICRO_BATCH",
                   help="a case to run (repeatable), e.g. bert-base:256; overrides the defaults")
    p.add_argument("--ds-config", action="append", default=[],
                   help="DeepSpeed JSON (repeatable: each is a case); its micro batch is replaced "
                        "by the case's (default: cpu_zero2_fp32 on CPU, zero0_autocast_bf16 on CUDA)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per arm per round")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (after one warm-up round)")
    p.add_argument("--set", dest="overrides", action="append", nargs="+", default=[],
                   metavar="SECTION.KEY=VALUE", help="a training-config override for every arm, e.g. "
                   "model.config_file=my_bert.json (repeatable)")
    p.add_argument("--compile", nargs="?", const="on", default="off", choices=("off", "on", "both"),
                   help="model.compile = true in every arm (torch.compile of each encoder layer); "
                        "'both': every case uncompiled, then compiled, in the same process")
    p.add_argument("--quick", action="store_true",
                   help="bert-tiny, micro batch 8, 2 steps x 2 rounds (the test suite's run)")
    p.add_argument("--out", default=None, help=f"result JSON (default {RESULTS.relative_to(REPO)})")
    args = p.parse_args(argv)
    args.overrides = [o for group in args.overrides for o in group]
    if args.steps is not None and args.steps < 1 or args.rounds is not None and args.rounds < 1:
        p.error("--steps and --rounds must be >= 1")
    return args


def default_data() -> Path:
    """The embedded corpus, prepared by sift-prep once (vocab 8192, seq 128)."""
    out = REPO / "runs" / "bench_data" / "embedded-v8192-s128"
    if not (out / "manifest.json").is_file():
        print(f"preparing the embedded corpus in {out} (once)", flush=True)
        subprocess.run([sys.executable, "-m", "data_prep.cli", "--output", str(out),
                        "--vocab-size", "8192", "--seq-len", "128", "--no-progress"],
                       cwd=REPO, check=True)
    return out


def case_ds_config(path: str, micro_batch: int, work: Path) -> Path:
    """A copy of the user's ds_config with the case's micro batch and no accumulation."""
    cfg = json.loads(Path(path).read_text())
    cfg.pop("train_batch_size", None)
    cfg["train_micro_batch_size_per_gpu"] = micro_batch
    cfg["gradient_accumulation_steps"] = 1
    out = work / f"ds_{Path(path).stem}_b{micro_batch}.json"
    out.write_text(json.dumps(cfg, indent=1))
    return out


class Sync:
    """Waits for the device (CUDA) so wall-clock spans cover the work, not its launch."""

    def __init__(self, device):
        self.device = device

    def __call__(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def plain_arms(cfg, facts, train_set, device, batches_b, batches_2b) -> dict[str, Callable[[int], None]]:
    """The plain torch loop: same model class, seed, batch, precision, clipping and AdamW."""
    import torch

    from pipeline.engine import param_groups
    from pipeline.model import build_model
    from pipeline.scoring import score_exit

    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg.model, train_set.vocab_size, train_set.seq_len,
                        train_set.special_ids["pad"]).to(device)
    o = cfg.optim
    opt = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=o.betas, eps=o.eps,
                            fused=device.type == "cuda")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(facts.precision.split("-")[0])
    clip = facts.gradient_clipping

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    def train_on(batch) -> None:
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = model(batch["input_ids"], batch["attention_mask"], batch["labels"]).loss
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()

    def vanilla(i: int) -> None:
        train_on(batches_b[i % len(batches_b)])

    def exit_scores(i: int):
        with autocast():
            return score_exit(model, batches_2b[i % len(batches_2b)])  # (2B,)

    def sift(i: int) -> None:
        cand = batches_2b[i % len(batches_2b)]
        keep = torch.topk(exit_scores(i), facts.micro_batch).indices  # on the device
        train_on({k: v[keep] for k, v in cand.items()})

    return {"plain_vanilla": vanilla, "plain_sift": sift, "plain_exit": exit_scores}


def time_arm(fn: Callable[[int], Any], steps: int, sync: Sync, start: int,
             finish: Callable[[], None] | None = None) -> float:
    """Seconds per step of `steps` calls, the device drained before and after; `finish` runs
    inside the timed span (the trainer's loader completes the batches it queued, so their cost
    is billed to the trainer and not to the arm timed next)."""
    sync()
    t0 = time.perf_counter()
    for i in range(steps):
        fn(start + i)
    if finish is not None:
        finish()
    sync()
    return (time.perf_counter() - t0) / steps


def summarize(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def build_trainers(data: Path, preset: str, ds_file: Path, out_dir: Path, compile_: bool,
                   variants: dict[str, list[str]], overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Project Trainers sharing one DeepSpeed engine (1 rank), one per variant (a list of config
    overrides). The step's speed does not depend on the weights, so the arms share them."""
    import torch

    from pipeline.config import load_config
    from pipeline.data import ShardDataset
    from pipeline.ds_config import load_ds_config
    from pipeline.engine import build_engine
    from pipeline.metrics import MetricsWriter
    from pipeline.model import build_model
    from pipeline.trainer import Trainer

    base = [f"data.data_dir={data}", f"model.preset={preset}", f"run.ds_config={ds_file}",
            f"run.output_dir={out_dir}", "logging.tensorboard=false", "logging.progress_bar=false",
            "optim.decay=constant", "optim.warmup_steps=0", "optim.lr=1e-4",
            f"model.compile={'true' if compile_ else 'false'}", *overrides]
    cfgs = {name: load_config(None, [*base, *extra]) for name, extra in variants.items()}
    first = next(iter(cfgs.values()))
    train_set = ShardDataset(data, "train")
    valid_set = ShardDataset(data, "valid")
    torch.manual_seed(first.run.seed)
    model = build_model(first.model, train_set.vocab_size, train_set.seq_len, train_set.special_ids["pad"])
    engine, facts = build_engine(model, first.optim, load_ds_config(ds_file, 1))
    writer = MetricsWriter(out_dir, 0, tensorboard=False, progress_bar=False)
    return {name: Trainer(c, engine, facts, train_set, valid_set, writer, 0, 1) for name, c in cfgs.items()}


def run_case(args: argparse.Namespace, compile_: bool, data: Path, preset: str, micro_batch: int, ds_path: str,
             work: Path) -> dict[str, Any]:
    import numpy as np
    import torch

    from pipeline.data import train_batch
    from pipeline.order import KeyedOrder
    from pipeline.flops import forward_flops, peak_flops, train_flops
    from pipeline.model import IGNORE_INDEX

    ds_file = case_ds_config(ds_path, micro_batch, work)
    out_dir = work / f"run_{preset}_b{micro_batch}_{Path(ds_path).stem}{'_compiled' if compile_ else ''}"
    sift = ["selection.policy=sift-loss", "selection.pool=expand", "selection.fraction=0.5"]
    variants = {"trainer_vanilla": ["selection.policy=none"], "trainer_sift": sift,
                "profile_vanilla": ["selection.policy=none", "logging.profile=true"],
                "profile_sift": [*sift, "logging.profile=true"]}
    trainers = build_trainers(data, preset, ds_file, out_dir, compile_, variants, args.overrides)
    any_trainer = trainers["trainer_vanilla"]
    cfg_v, cfg_s = any_trainer.cfg, trainers["trainer_sift"].cfg
    engine, facts, train_set = any_trainer.engine, any_trainer.facts, any_trainer.train_set
    device = engine.device
    records: dict[str, list[dict[str, Any]]] = {name: [] for name in trainers}

    def trainer_fn(name: str) -> Callable[[int], None]:
        t = trainers[name]

        def step(_: int) -> None:
            records[name].append(t.step())
        return step

    # the plain loop's data: built by the same loader, already on the device
    sampler = KeyedOrder(len(train_set), cfg_v.run.seed)
    n_batches = 4

    def on_device(count: int, k: int) -> dict[str, torch.Tensor]:
        b = train_batch(train_set, sampler, cfg_v.masking, k * count, count, 0, 1)
        return {key: v.to(device) for key, v in b.items()}

    batches_b = [on_device(micro_batch, k) for k in range(n_batches)]
    batches_2b = [on_device(2 * micro_batch, k) for k in range(n_batches)]
    arms: dict[str, Callable[[int], Any]] = {
        "trainer_vanilla": trainer_fn("trainer_vanilla"), "trainer_sift": trainer_fn("trainer_sift"),
        **plain_arms(cfg_v, facts, train_set, device, batches_b, batches_2b)}
    sync = Sync(device)
    # CPU steps take seconds: fewer of them; a GPU step is milliseconds: more, for steady means
    steps = args.steps or (2 if args.quick else 10 if device.type == "cuda" else 3)
    rounds = args.rounds or (2 if args.quick else 5 if device.type == "cuda" else 4)
    times: dict[str, list[float]] = {a: [] for a in ARMS}
    print(f"{preset} micro batch {micro_batch} {Path(ds_path).name} ({facts.precision}, "
          f"ZeRO-{facts.zero_stage}) on {device}: 1 warm-up + {rounds} rounds x {steps} steps",
          flush=True)
    for r in range(rounds + 1):  # round 0 warms up (allocator, autotuning, compilation)
        for arm in ARMS:
            finish = trainers[arm].loader.drain if arm in trainers else None
            t = time_arm(arms[arm], steps, sync, start=r * steps, finish=finish)
            if r:
                times[arm].append(t)
        if r:
            print("  round " + str(r) + ": " + ", ".join(f"{a} {times[a][-1] * 1e3:.1f} ms"
                                                          for a in ARMS), flush=True)
    for name in ("profile_vanilla", "profile_sift"):  # phase split with the device synchronized
        fn = trainer_fn(name)
        for i in range(steps + 1):
            fn(i)
    for t in trainers.values():
        t.close()

    seq_len = train_set.seq_len
    tokens = micro_batch * seq_len
    per_round = {a: np.array(times[a]) for a in ARMS}
    ideal = per_round["plain_exit"] + per_round["plain_vanilla"]
    ratios = {
        "efficiency_vanilla": per_round["plain_vanilla"] / per_round["trainer_vanilla"],
        "efficiency_sift": per_round["plain_sift"] / per_round["trainer_sift"],
        "sift_step_over_ideal": per_round["trainer_sift"] / ideal,
        "plain_sift_step_over_ideal": per_round["plain_sift"] / ideal,
        "sift_over_vanilla": per_round["trainer_sift"] / per_round["trainer_vanilla"],
        "plain_sift_over_vanilla": per_round["plain_sift"] / per_round["plain_vanilla"],
    }
    masked_b = float(np.mean([int(b["labels"].ne(IGNORE_INDEX).sum()) for b in batches_b]))
    masked_2b = float(np.mean([int(b["labels"].ne(IGNORE_INDEX).sum()) for b in batches_2b]))
    bert = trainers["trainer_vanilla"].bert_config
    flops_vanilla = train_flops(bert, micro_batch, seq_len, masked_b)
    flops_exit = forward_flops(bert, 2 * micro_batch, seq_len, masked_2b, layers=cfg_s.model.exit_layer)
    flops_sift = flops_vanilla + flops_exit  # the kept half has ~the mean masked count
    peak = peak_flops(device, facts.precision)
    result: dict[str, Any] = {
        "preset": preset, "micro_batch": micro_batch, "seq_len": seq_len,
        "vocab_size": train_set.vocab_size, "ds_config": str(ds_path), "zero_stage": facts.zero_stage,
        "precision": facts.precision, "device": str(device), "compile": compile_,
        "overrides": args.overrides,
        "steps_per_round": steps, "rounds": rounds,
        "step_ms": {a: summarize([t * 1e3 for t in times[a]]) for a in ARMS},
        "tokens_per_s": {a: summarize([tokens / t for t in times[a]]) for a in ARMS if a != "plain_exit"},
        **{k: summarize(v.tolist()) for k, v in ratios.items()},
        "model_flops_per_step": {"vanilla": flops_vanilla, "sift": flops_sift, "exit_pass": flops_exit},
        "phases_ms": {name: _phases(records[name][1:]) for name in ("profile_vanilla", "profile_sift")},
        "unprofiled_phases_ms": {name: _phases(records[name][steps:])
                                 for name in ("trainer_vanilla", "trainer_sift")},
        "prefetch_hits": {n: [trainers[n].loader.hits, trainers[n].loader.misses] for n in trainers},
    }
    if peak:
        result["peak_flops"] = peak
        for arm, flops in (("trainer_vanilla", flops_vanilla), ("plain_vanilla", flops_vanilla),
                           ("trainer_sift", flops_sift), ("plain_sift", flops_sift)):
            result[f"mfu_{arm}"] = summarize([flops / t / peak for t in times[arm]])
    del trainers, any_trainer, engine, arms
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def _phases(records: list[dict[str, Any]]) -> dict[str, float]:
    names = ("data", "score", "select", "forward_backward", "optimizer")
    if not records:
        return {}
    return {n: 1e3 * statistics.mean(float(r[f"time/{n}_s"]) for r in records) for n in names}


def table(results: list[dict[str, Any]]) -> str:
    def cell(d: dict[str, float], fmt: str = "{:.2f}") -> str:
        return f"{fmt.format(d['median'])} [{fmt.format(d['min'])}, {fmt.format(d['max'])}]"

    lines = ["| case | trainer vanilla ms | plain vanilla ms | efficiency vanilla | trainer SIFT ms | "
             "plain SIFT ms | efficiency SIFT | SIFT over ideal | SIFT / vanilla (trainer) | MFU trainer |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        mfu = cell(r["mfu_trainer_vanilla"], "{:.3f}") if "mfu_trainer_vanilla" in r else "n/a"
        lines.append(
            f"| {r['preset']} B{r['micro_batch']} {Path(r['ds_config']).stem}"
            f"{' compiled' if r['compile'] else ''} | {cell(r['step_ms']['trainer_vanilla'], '{:.1f}')} | "
            f"{cell(r['step_ms']['plain_vanilla'], '{:.1f}')} | {cell(r['efficiency_vanilla'])} | "
            f"{cell(r['step_ms']['trainer_sift'], '{:.1f}')} | {cell(r['step_ms']['plain_sift'], '{:.1f}')} | "
            f"{cell(r['efficiency_sift'])} | {cell(r['sift_step_over_ideal'])} | "
            f"{cell(r['sift_over_vanilla'])} | {mfu} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    data = Path(args.data).resolve() if args.data else default_data()
    if not (data / "manifest.json").is_file():
        print(f"trainer_efficiency: --data {data}: no manifest.json (run sift-prep first)", file=sys.stderr)
        return 2
    if args.case:
        cases = []
        for text in args.case:
            preset, _, mb = text.partition(":")
            if not mb.isdigit() or int(mb) < 1:
                print(f"trainer_efficiency: --case {text!r}: expected PRESET:MICRO_BATCH", file=sys.stderr)
                return 2
            cases.append((preset, int(mb)))
    else:
        cases = [("bert-tiny", 8)] if args.quick else GPU_CASES if args.gpu else CPU_CASES
    ds_configs = args.ds_config or [str(REPO / "ds_configs" / ("zero0_autocast_bf16.json" if cuda else "cpu_zero2_fp32.json"))]
    for p in ds_configs:
        if not Path(p).is_file():
            print(f"trainer_efficiency: --ds-config {p}: not found", file=sys.stderr)
            return 2

    from pipeline import comm
    from data_prep.io_util import machine_info

    comm.discover_env()
    comm.init_distributed()
    from pipeline.data import DataError

    results = []
    try:
        with tempfile.TemporaryDirectory(prefix="trainer_eff_") as tmp:
            compiles = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
            for ds in ds_configs:
                for preset, mb in cases:
                    for compile_ in compiles:
                        results.append(run_case(args, compile_, data, preset, mb, ds, Path(tmp)))
    except (ValueError, DataError, FileNotFoundError) as exc:  # ConfigError is a ValueError
        print(f"trainer_efficiency: {exc}", file=sys.stderr)
        return 2
    finally:
        comm.destroy_process_group()
    out = Path(args.out) if args.out else RESULTS
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"benchmark": "trainer_efficiency", "argv": list(argv if argv is not None else sys.argv[1:]),
              "data": str(data), "threads": torch.get_num_threads(), "machine": machine_info(repo=REPO),
              "targets": {"efficiency_vanilla": ">= 0.90", "efficiency_sift": ">= 0.90",
                          "sift_step_over_ideal": "<= 1.10"},
              "cases": results, "table": table(results)}
    out.write_text(json.dumps(report, indent=1))
    print(table(results))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
