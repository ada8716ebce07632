"""Where a trainer step's time goes: torch.profiler over a few real `Trainer.step` calls.

For one case (model preset, micro batch, DeepSpeed config; 1 rank), after warm-up steps it
profiles `--steps` steps of vanilla and of sift-loss (expand, f 0.5) and writes, per arm, the
operators ranked by self CPU time and by self device time, and per step the host-device
synchronizations (cudaStreamSynchronize, cudaDeviceSynchronize, aten::item,
aten::_local_scalar_dense) and copies (cudaMemcpyAsync), to a text report (`--out`, default benchmarks/results/profile_step.txt).

    python benchmarks/profile_step.py --case bert-medium:128 --data DIR --ds-config ds_configs/zero2_bf16.json
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from benchmarks.trainer_efficiency import build_trainers, case_ds_config, default_data  # noqa: E402

SYNC_OPS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "aten::item", "aten::_local_scalar_dense",
            "cudaMemcpyAsync")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="sift-prep output directory (default: the embedded corpus)")
    p.add_argument("--case", default=None, metavar="PRESET:MICRO_BATCH",
                   help="default bert-medium:128 on CUDA, bert-mini:32 on CPU")
    p.add_argument("--ds-config", default=None, help="DeepSpeed JSON (default zero0_autocast_bf16 / cpu_zero2_fp32)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rows", type=int, default=25, help="operators listed per table")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "profile_step.txt"))
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    preset, _, mb = (args.case or ("bert-medium:128" if cuda else "bert-mini:32")).partition(":")
    ds = args.ds_config or str(REPO / "ds_configs" / ("zero0_autocast_bf16.json" if cuda else "cpu_zero2_fp32.json"))
    data = Path(args.data).resolve() if args.data else default_data()

    from pipeline import comm

    comm.discover_env()
    comm.init_distributed()
    lines = [f"# profile_step: {preset} micro batch {mb}, {Path(ds).name}, {args.steps} steps per arm", ""]
    try:
        with tempfile.TemporaryDirectory(prefix="profile_step_") as tmp:
            ds_file = case_ds_config(ds, int(mb), Path(tmp))
            sift = ["selection.policy=sift-loss", "selection.pool=expand", "selection.fraction=0.5"]
            trainers = build_trainers(data, preset, ds_file, Path(tmp) / "run", False,
                                      {"vanilla": ["selection.policy=none"], "sift": sift})
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            for name, t in trainers.items():
                for _ in range(args.warmup):
                    t.step()
                if cuda:
                    torch.cuda.synchronize()
                with profile(activities=activities) as prof:
                    for _ in range(args.steps):
                        t.step()
                    if cuda:
                        torch.cuda.synchronize()
                t.close()
                events = prof.key_averages()
                lines.append(f"## {name}: per step, over {args.steps} steps")
                counts = {e.key: e.count for e in events if e.key in SYNC_OPS}
                lines.append("host-device syncs and copies (calls per step): " + ", ".join(
                    f"{k} {v / args.steps:.1f}" for k, v in sorted(counts.items())))
                lines.append("")
                lines.append(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))
                if cuda:
                    lines.append(events.table(sort_by="self_cuda_time_total", row_limit=args.rows))
                print("\n".join(lines[-5:]), flush=True)
    finally:
        comm.destroy_process_group()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
