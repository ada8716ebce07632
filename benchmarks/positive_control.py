"""The positive control's pool: a prepared corpus whose training half is copies of a few rows.

Selection can only win where some candidates teach nothing. Here about half the pool are copies of
`--copies-of` rows (64 by default): a warm start on this pool sees each of them hundreds of times,
so by the fork the model has learned them (full-model accuracy on them >= 0.8, checked by
evaluating the `learned` split), and a good score should leave them out. Vanilla and a random
subset keep spending half of every batch on them. See benchmarks/positive_control.toml for the
recipe and the measured result.

The output is an ordinary sift-prep directory (it loads, verifies and trains like any other):
- train: the source's train shards (copied) plus one shard of copies, appended last, so rows
  [0, N) are the source's and [N, 2N) the copies;
- `row_sources` in the train split's manifest entry names those two ranges, which the trainer
  reports as the share of kept rows per source (`select/kept_share/copies`);
- valid: the source's validation split (held-out text: the target every arm is judged on);
- learned: the copied rows once each, and fresh: as many other train rows (evaluate either with
  `data.valid_split=learned` / `fresh` to see what the model knows of each).

    python -m benchmarks.positive_control pool runs/bench_data64 runs/pc_data
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from data_prep.io_util import write_json_atomic
from data_prep.shards import count_tokens, npy_bytes
from pipeline.data import DataError, ShardDataset, load_manifest, verify_prepared


def pick_rows(num_rows: int, copies_of: int, seed: int) -> np.ndarray:
    """`copies_of` distinct row indices of [0, num_rows), sorted (a pure function of the seed)."""
    if not 0 < copies_of <= num_rows // 2:
        raise ValueError(f"--copies-of must be in [1, {num_rows // 2}] for {num_rows} rows")
    return np.sort(np.random.default_rng(seed).choice(num_rows, size=copies_of, replace=False))


def copies_layout(num_rows: int, picked: np.ndarray) -> np.ndarray:
    """Row indices of the copies shard: `picked` tiled to num_rows rows (half the final pool)."""
    reps = -(-num_rows // len(picked))
    return np.tile(picked, reps)[:num_rows]


def _shard_entry(out: Path, rel: str, rows: np.ndarray, dtype: str) -> dict:
    data = npy_bytes(rows.astype(dtype))  # rows() reads int64: stored as the manifest says
    (out / rel).parent.mkdir(parents=True, exist_ok=True)
    (out / rel).write_bytes(data)
    return {"num_sequences": int(rows.shape[0]), "path": rel,
            "sha256": hashlib.sha256(data).hexdigest()}


def make_pool(source: Path, out: Path, copies_of: int = 64, seed: int = 0,
              copies_only: bool = False) -> dict:
    """Write the pool directory `out` from the sift-prep directory `source`; returns its manifest.
    `copies_only`: the train split is the copies alone (the decay-only arm: no fresh data)."""
    verify_prepared(source)
    if out.exists():
        raise FileExistsError(f"{out} exists; remove it or name another output")
    manifest = load_manifest(source)
    train = ShardDataset(source, "train")
    n, pad = len(train), train.special_ids["pad"]
    picked = pick_rows(n, copies_of, seed)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copytree(source / "tokenizer", tmp / "tokenizer")
    for name, split in manifest["splits"].items():
        if copies_only and name == "train":
            continue
        for meta in split["shards"]:
            (tmp / meta["path"]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / meta["path"], tmp / meta["path"])
    new = copy.deepcopy(manifest)
    tr = new["splits"]["train"]
    copies = train.rows(copies_layout(n, picked))
    if copies_only:
        tr.update(shards=[], num_sequences=0, num_tokens=0)
    tr["shards"].append(_shard_entry(tmp, f"train/shard_{len(tr['shards']):06d}.npy", copies,
                                     manifest["dtype"]))
    tr["num_sequences"] += n
    tr["num_tokens"] = int(tr["num_tokens"]) + count_tokens(copies, pad)
    tr["row_sources"] = ([{"name": "copies", "rows": n}] if copies_only else
                         [{"name": "fresh", "rows": n}, {"name": "copies", "rows": n}])
    learned = train.rows(picked)
    others = np.setdiff1d(np.arange(n), picked)
    fresh = train.rows(np.sort(np.random.default_rng(seed + 1).choice(others, copies_of,
                                                                      replace=False)))
    for name, rows in (("learned", learned), ("fresh", fresh)):
        new["splits"][name] = {"num_sequences": int(rows.shape[0]),
                               "num_tokens": count_tokens(rows, pad),
                               "shards": [_shard_entry(tmp, f"{name}/shard_000000.npy", rows,
                                                       manifest["dtype"])]}
    new["positive_control"] = {"source": str(source), "copies_of": copies_of, "seed": seed,
                               "copies_only": copies_only, "copied_rows": picked.tolist()}
    write_json_atomic(tmp / "manifest.json", new)
    verify_prepared(tmp, full=True)
    tmp.rename(out)
    return new


def split_accuracy(export_dir: Path, data_dir: Path, splits: tuple[str, ...], masks: int = 4,
                   max_rows: int = 1024) -> dict[str, dict[str, float]]:
    """Full-model masked-LM accuracy and loss of an exported model on the first `max_rows` rows of
    splits of `data_dir`, summed over `masks` independent fixed maskings (64 rows x 15% is ~600
    masked tokens a mask)."""
    import torch

    from pipeline.data import VALID_MASK_SEED, MaskingConfig, validation_batches
    from pipeline.evaluation import evaluate_local
    from pipeline.model import SiftBertForMaskedLM

    model = SiftBertForMaskedLM.from_pretrained(str(export_dir)).eval()
    out = {}
    for split in splits:
        data = ShardDataset(data_dir, split)
        correct = tokens = 0
        loss = 0.0
        for m in range(masks):
            with torch.no_grad():
                batches = validation_batches(data, 64, MaskingConfig(), max_samples=max_rows,
                                             mask_seed=VALID_MASK_SEED + 7 + m)
                sums = evaluate_local(model, batches)
            correct, tokens, loss = correct + sums.correct, tokens + sums.tokens, loss + sums.loss_sum
        out[split] = {"accuracy": correct / tokens, "loss": loss / tokens, "masked_tokens": tokens}
    return out


def check(checkpoints: Path, data_dir: Path) -> dict[str, dict[str, float]]:
    """Export the checkpoint `latest` names (into a temp directory) and measure the learned
    (copied) rows against as many other training rows and the validation split."""
    import tempfile

    from pipeline.export_cli import export

    with tempfile.TemporaryDirectory() as tmp:
        out, tag_dir, step = export(checkpoints, Path(tmp) / "export")
        result = split_accuracy(out, data_dir, ("learned", "fresh", "valid"))
    result["checkpoint"] = {"path": str(tag_dir), "step": step}
    return result


def kept_share_series(metrics_jsonl: Path, source: str = "copies") -> list[tuple[int, float]]:
    """(step, share of the kept rows that came from `source`) of every train log line."""
    out = []
    key = f"select/kept_share/{source}"
    for line in metrics_jsonl.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if r.get("kind") == "train" and r.get(key) is not None:
            out.append((int(r["step"]), float(r[key])))
    return out


def decay_only_gain(decay_json: Path) -> dict:
    """The decay-only arm (vanilla on the copies alone, same fork, schedule and budget): its
    accuracy before and after, i.e. what the LR decay alone moves the target by."""
    arm = json.loads(decay_json.read_text())["arms"]["vanilla"]
    return {"accuracy_before": arm["accuracy_before"], "accuracy_after": arm["accuracy_after"],
            "gain": arm["accuracy_after"] - arm["accuracy_before"], "steps": arm["steps"],
            "train_time_s": arm["train_time_s"], "source": str(decay_json)}


def report(work_dir: Path, result_json: Path, decay_json: Path | None = None) -> dict:
    """Add the kept share of copies over time (per arm and seed), and the decay-only gain, to a
    sift-bench result JSON and its Markdown table."""
    result = json.loads(result_json.read_text())
    shares: dict[str, dict[str, list]] = {}
    for metrics in sorted(work_dir.glob("seed*/**/metrics.jsonl")):
        seed = next(p.name for p in metrics.parents if p.name.startswith("seed"))
        arm = metrics.parent.name
        series = kept_share_series(metrics)
        if series:
            shares.setdefault(arm, {})[seed] = series
    result["kept_share_copies"] = shares
    lines = []
    if decay_json is not None:
        d = result["decay_only"] = decay_only_gain(decay_json)
        lines += ["", "## Share of copies among the kept rows, and the decay-only gain", "",
                  f"Decay-only arm (vanilla on the copies alone, seed 42, same fork, schedule and "
                  f"budget): accuracy {d['accuracy_before']:.4f} -> {d['accuracy_after']:.4f} "
                  f"({d['gain']:+.4f}) in {d['steps']} steps: what the LR decay alone moves the "
                  "target by."]
    else:
        lines += ["", "## Share of copies among the kept rows"]
    write_json_atomic(result_json, result)
    lines += ["", "Half the candidates are copies of learned rows; a score that sees it keeps few.", "",
              "| arm | seed | first log window | middle | last |", "|---|---|---|---|---|"]
    for arm, by_seed in sorted(shares.items()):
        for seed, series in sorted(by_seed.items()):
            mid = series[len(series) // 2]
            lines.append(f"| {arm} | {seed[4:]} | {series[0][1]:.3f} (step {series[0][0]}) | "
                         f"{mid[1]:.3f} (step {mid[0]}) | {series[-1][1]:.3f} (step {series[-1][0]}) |")
    md = result_json.with_suffix(".md")
    if md.is_file():
        text = md.read_text()
        marker = "\n## Share of copies among the kept rows"
        text = text.split(marker)[0].rstrip("\n") + "\n"
        md.write_text(text + "\n".join(lines) + "\n")
    return shares


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    pool = sub.add_parser("pool", help="write the pool directory")
    pool.add_argument("source", type=Path, help="a sift-prep output directory")
    pool.add_argument("output", type=Path, help="the pool directory to write (must not exist)")
    pool.add_argument("--copies-of", type=int, default=64, help="distinct rows copied (default 64)")
    pool.add_argument("--seed", type=int, default=0, help="which rows are copied (default 0)")
    pool.add_argument("--copies-only", action="store_true",
                      help="train on the copies alone (the decay-only arm)")
    chk = sub.add_parser("check", help="full-model accuracy on the copies vs other rows")
    chk.add_argument("checkpoints", type=Path, help="the warm start's checkpoint directory")
    chk.add_argument("data", type=Path, help="the pool directory")
    rep = sub.add_parser("report", help="add the kept share of copies to a sift-bench result")
    rep.add_argument("work_dir", type=Path, help="sift-bench --work-dir of the combined run")
    rep.add_argument("result_json", type=Path, help="its <name>.json")
    rep.add_argument("--decay-only", type=Path, help="the decay-only sift-bench result JSON")
    args = p.parse_args(argv)
    try:
        if args.command == "pool":
            m = make_pool(args.source, args.output, args.copies_of, args.seed, args.copies_only)
            tr = m["splits"]["train"]
            print(f"positive_control: wrote {args.output}: train {tr['num_sequences']} rows "
                  f"({json.dumps(tr['row_sources'])}), learned/fresh {args.copies_of} rows each")
        elif args.command == "check":
            print(json.dumps(check(args.checkpoints, args.data), indent=1))
        else:
            shares = report(args.work_dir, args.result_json, args.decay_only)
            print(f"positive_control: kept share of copies for {len(shares)} arm(s) added to "
                  f"{args.result_json}")
    except (DataError, ValueError, OSError) as exc:
        print(f"positive_control: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
