"""Sample-order benchmark: per-rank memory and time per batch of the training order, from 1e6 to
1e10 rows (indices only, no data).

    .venv/bin/python benchmarks/order_scaling.py [--out benchmarks/results/order_scaling.json]

Each (order, N) runs in a fresh process: it builds the order, reads `--batches` rank batches
(`--per-rank` samples of a `--world`-rank global batch) in runs of 16 consecutive global batches,
as training reads them, from starts spread over the first ten epochs, and reports the seconds per batch (median of the batches, first excluded) and the
process's memory growth: peak RSS (ru_maxrss) minus the RSS after imports. Orders:
- `keyed` (order version 2, the default): a keyed Feistel bijection evaluated per position;
- `mixture`: three sources with weights 0.5/0.3/0.2 (N rows split 60/30/10), `MixtureOrder`;
- `materialized` (order version 1): a numpy shuffle of arange(N) per epoch, held in memory;
  measured up to --materialized-max rows, beyond which it needs 4 bytes a row per rank (12 GB at
  3e9) and its shuffle takes minutes.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from data_prep.io_util import machine_info, write_json_atomic  # noqa: E402

WORKER = r"""
import json, resource, sys, time
import numpy as np
sys.path.insert(0, {root!r})
from pipeline.order import KeyedOrder, MaterializedOrder, MixtureOrder

kind, n, per_rank, world, batches = {kind!r}, {n}, {per_rank}, {world}, {batches}
def rss_kib():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
base = rss_kib()
if kind == "keyed":
    order = KeyedOrder(n, seed=1)
elif kind == "mixture":
    order = MixtureOrder([n * 6 // 10, n * 3 // 10, n - n * 6 // 10 - n * 3 // 10], [0.5, 0.3, 0.2], 1)
else:
    order = MaterializedOrder(n, seed=1)
rng = np.random.default_rng(0)
# runs of 16 consecutive global batches (as training reads them) from starts spread over 10 epochs
starts = np.sort(rng.integers(0, 10 * n, size=max(1, batches // 16)))
positions = [int(s) + k * per_rank * world for s in starts for k in range(16)]
times = []
for p in positions:
    t = time.perf_counter()
    idx, ep = order.rank_indices(int(p), per_rank, world - 1, world)
    times.append(time.perf_counter() - t)
    assert idx.min() >= 0 and idx.max() < n
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("RESULT " + json.dumps({{"s_per_batch": sorted(times[1:])[len(times[1:]) // 2],
                              "first_batch_s": times[0], "rss_growth_mib": (peak - base) / 1024}}))
"""


def measure(kind: str, n: int, args: argparse.Namespace) -> dict:
    code = WORKER.format(root=str(ROOT), kind=kind, n=n, per_rank=args.per_rank,
                         world=args.world, batches=args.batches)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"order_scaling: {kind} N={n} failed: {proc.stderr.strip()[-500:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return {"order": kind, "rows": n, **json.loads(line[7:])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/order_scaling.json")
    p.add_argument("--per-rank", type=int, default=128)
    p.add_argument("--world", type=int, default=8)
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--materialized-max", type=float, default=1e8)
    args = p.parse_args()
    rows = []
    for exp in range(6, 11):
        n = 10**exp
        for kind in ("keyed", "mixture", "materialized"):
            if kind == "materialized" and n > args.materialized_max:
                continue
            r = measure(kind, n, args)
            rows.append(r)
            print(f"{kind:>12} N=1e{exp}: {r['s_per_batch'] * 1e3:7.3f} ms/batch, first "
                  f"{r['first_batch_s'] * 1e3:9.1f} ms, RSS +{r['rss_growth_mib']:8.1f} MiB",
                  flush=True)
    keyed = [r for r in rows if r["order"] == "keyed"]
    result = {
        "benchmark": "order_scaling",
        "command": "python benchmarks/order_scaling.py " + " ".join(sys.argv[1:]),
        "per_rank": args.per_rank, "world": args.world, "batches": args.batches,
        "machine": machine_info(repo=ROOT),
        "rows": rows,
        "keyed_time_ratio_1e10_vs_1e6": keyed[-1]["s_per_batch"] / keyed[0]["s_per_batch"],
        "keyed_rss_growth_mib_max": max(r["rss_growth_mib"] for r in keyed),
        "materialized_bytes_per_row": 4,
    }
    write_json_atomic(args.out, result)
    lines = ["| order | rows | ms per batch | first batch ms | RSS growth MiB |", "|---|---|---|---|---|"]
    lines += [f"| {r['order']} | {r['rows']:.0e} | {r['s_per_batch'] * 1e3:.3f} | "
              f"{r['first_batch_s'] * 1e3:.1f} | {r['rss_growth_mib']:.1f} |" for r in rows]
    args.out.with_suffix(".md").write_text(
        f"# Sample order: memory and time per batch ({args.per_rank} samples a rank, "
        f"{args.world} ranks)\n\n" + "\n".join(lines) + "\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
