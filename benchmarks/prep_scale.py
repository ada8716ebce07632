"""Data prep at corpus scale: sift-prep tokens/s, peak RSS and bytes on disk per token on corpora
of growing size (the largest at least 1 GB), against the raw `tokenizers` call on the same text.

    .venv/bin/python benchmarks/prep_scale.py [--sizes-gb 0.1,0.3,1.0] [--workers 2]
        [--out benchmarks/results/prep_scale.json]

The corpus: one JSONL built from the shared corpora (../shared/data: every file's text, one
record per file), repeated until it reaches each size, each repeat's records prefixed with its
number ("copy 17: ...") so no two records are equal (the same text, so the same token rate, but
nothing a deduplicating run would drop). It is written once, at the largest size, and the smaller
corpora are its first bytes (cut at a record boundary).

sift-prep runs as a subprocess with a tokenizer trained once on the shared corpora (--tokenizer:
what every node of a multi-node prep does), --workers W and RAYON_NUM_THREADS=W, timed from start
to exit (reading, decoding, both passes, packing, hashing, fsync'd writes), with its peak RSS
(os.wait4). The baseline, on the largest corpus only, gets the same <= 64 Ki-character pieces
sift-prep feeds the tokenizer, already read, in chunks of 20,000 (the whole corpus's encodings
would not fit in memory), and times only its `encode_batch_fast` calls on W threads; both sides
must count the same tokens. Bytes on disk: the shard files per text token.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from benchmarks.prep_throughput import prep_cmd, run_rss, stream_tokens  # noqa: E402
from data_prep.io_util import machine_info, write_json_atomic  # noqa: E402

BASELINE = r"""
import json, resource, sys, time
from tokenizers import Tokenizer
from data_prep import sources
tok = Tokenizer.from_file(sys.argv[1])
opts = sources.ReadOptions(encoding_errors="replace", max_piece_chars=65536)
res = {"texts": 0, "tokens": 0, "seconds": 0.0, "cpu_seconds": 0.0}
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
def encode(chunk):
    t0, c0 = time.perf_counter(), cpu()
    encs = tok.encode_batch_fast(chunk, add_special_tokens=False)
    res["seconds"] += time.perf_counter() - t0
    res["cpu_seconds"] += cpu() - c0
    res["tokens"] += sum(len(e.ids) for e in encs)
chunk = []
for s in sources.resolve_inputs([sys.argv[2]]):
    for text, _ in sources.iter_pieces(s, opts):
        chunk.append(text)
        res["texts"] += 1
        if len(chunk) == 20000:
            encode(chunk)
            chunk = []
if chunk:
    encode(chunk)
print(json.dumps(res))
"""


def shared_records(shared: Path) -> list[str]:
    """The text of every shared corpus file (latin-1 files decoded with replacement)."""
    return [p.read_bytes().decode("utf-8", errors="replace")
            for p in sorted(shared.rglob("*.txt")) if p.is_file()]


def write_corpus(path: Path, records: list[str], size: int) -> list[int]:
    """JSONL of numbered copies of `records` until at least `size` bytes; the byte offset after
    each whole copy (the smaller corpora are prefixes ending there)."""
    ends = []
    with open(path, "w", encoding="utf-8") as f:
        copy = 0
        while not ends or ends[-1] < size:
            for text in records:
                f.write(json.dumps({"text": f"copy {copy}: {text}"}) + "\n")
            copy += 1
            ends.append(f.tell())
    return ends


def prefix(src: Path, dst: Path, size: int, ends: list[int]) -> None:
    """The first whole copies of `src` reaching `size` bytes, as `dst`."""
    end = next(e for e in ends if e >= size)
    with open(src, "rb") as f, open(dst, "wb") as g:
        remaining = end
        while remaining:
            block = f.read(min(remaining, 1 << 24))
            g.write(block)
            remaining -= len(block)


def shard_bytes(out: Path) -> int:
    return sum(p.stat().st_size for p in out.rglob("shard_*.npy"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--sizes-gb", default="0.1,0.3,1.0", help="corpus sizes in GB (1e9 bytes)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--tmp", type=Path, default=None, help="scratch directory (needs ~3x the largest size)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "prep_scale.json")
    args = ap.parse_args()
    if not args.shared.is_dir():
        sys.exit(f"benchmarks/prep_scale.py: shared corpora not found at {args.shared}")
    sizes = sorted(int(float(x) * 1e9) for x in args.sizes_gb.split(","))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "RAYON_NUM_THREADS": str(args.workers)}
    result = {"benchmark": "prep_scale",
              "command": "python benchmarks/prep_scale.py " + " ".join(sys.argv[1:]),
              "machine": machine_info(("tokenizers", "numpy"), repo=ROOT),
              "workers": args.workers, "runs": []}
    with tempfile.TemporaryDirectory(prefix="sift-prep-scale-", dir=args.tmp) as tmp:
        tmp = Path(tmp)
        wall, rss, _, _, _ = run_rss(prep_cmd([args.shared], tmp / "trained"), env)
        tok_json = tmp / "trained" / "tokenizer" / "tokenizer.json"
        print(f"tokenizer trained on the shared corpora in {wall:.1f} s", flush=True)
        full = tmp / "corpus_full.jsonl"
        ends = write_corpus(full, shared_records(args.shared), sizes[-1])
        for size in sizes:
            corpus = tmp / f"corpus_{size}.jsonl"
            prefix(full, corpus, size, ends)
            out = tmp / f"prep_{size}"
            wall, rss, _, _, cpu = run_rss(prep_cmd([corpus], out, "--tokenizer", str(tok_json),
                                                    "--workers", str(args.workers)), env)
            m = json.loads((out / "manifest.json").read_text())
            docs = m.get("documents", {}).get("seen")
            run = {"corpus_bytes": corpus.stat().st_size, "seconds": wall, "cpu_seconds": cpu,
                   "peak_rss_mb": rss, "stream_tokens": stream_tokens(m),
                   "tokens_per_s": stream_tokens(m) / wall, "documents": docs,
                   "shard_bytes": shard_bytes(out),
                   "bytes_on_disk_per_token": shard_bytes(out) / stream_tokens(m)}
            print(json.dumps(run), flush=True)
            if size == sizes[-1]:
                proc = run_rss([sys.executable, "-c", BASELINE, str(tok_json), str(corpus)], env)
                base = json.loads(proc[2])
                text_tokens = stream_tokens(m) - docs  # one closing [SEP] per document
                assert text_tokens == base["tokens"], (text_tokens, base)  # same work, or void
                run["encode_batch_fast"] = base
                run["throughput_ratio_vs_encode_batch_fast"] = base["seconds"] / wall
                print(json.dumps(base), flush=True)
            result["runs"].append(run)
            shutil.rmtree(out)
            corpus.unlink()
    big = result["runs"][-1]
    result["throughput_ratio_vs_encode_batch_fast"] = big["throughput_ratio_vs_encode_batch_fast"]
    result["peak_rss_mb_by_size"] = {f"{r['corpus_bytes'] / 1e9:.2f} GB": r["peak_rss_mb"]
                                     for r in result["runs"]}
    rate = big["tokens_per_s"]
    result["projection_1T_tokens_hours"] = {
        f"{n}_nodes": 1e12 / (rate * n) / 3600 for n in (1, 8, 64, 512)}
    result["projection_note"] = (f"tokenizing only, at this machine's {args.workers}-worker rate "
                                 "per node; each node also reads the whole corpus (twice) when "
                                 "it prepares a slice: docs/data-prep-at-scale.md")
    result["targets"] = {"throughput_ratio_vs_encode_batch_fast": ">= 0.8",
                         "peak_rss": "flat with corpus size"}
    result["machine"]["loadavg_at_end"] = os.getloadavg()
    write_json_atomic(args.out, result)
    print(json.dumps({k: result[k] for k in ("throughput_ratio_vs_encode_batch_fast",
                                             "peak_rss_mb_by_size",
                                             "projection_1T_tokens_hours")}, indent=2))


if __name__ == "__main__":
    main()
