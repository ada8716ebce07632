"""How much of a selection score belongs to the text: test-retest of per-row scores, per fix.

A row's SIFT score is the mean loss over its masked tokens, and which tokens the random mask hit
is most of it (../shared/notes/selection-noise-2026-12.md). This benchmark scores the same rows
under D independent masks and reports, for the exit score and the full model's loss:

- `retest`: Pearson correlation of two draws' scores of the same rows (1: the score is the text's;
  0: it is the mask's), averaged over disjoint pairs of draws;
- `retest_k`: the same for the mean of k draws against the mean of k other draws (k = 2, 4, 8, ...
  while two groups fit in D), which is what
  "several masks in the scoring pass" or "scores averaged over k visits" (selection.history =
  mean, a model that changes little between visits) would select by;
- `top_half_overlap`: the share of the top half by one draw that is in the top half by another
  (0.5 by chance);
for each masking rate and normalization asked (`none`, `unigram`: minus the unigram surprisal of
the masked tokens). The issue's target: retest >= 0.6 for the score the recommended setting uses.

    python -m benchmarks.score_reliability runs/pc_warm/checkpoints runs/bench_data64 \
        --rows 2048 --rates 0.15,0.4 --draws 8 --out benchmarks/results/score_reliability.json

CHECKPOINT is a checkpoint directory (its `latest` is exported to a temp directory) or a Hugging
Face model directory (config.json), with the data's vocabulary.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def retest(draws: np.ndarray, k: int = 1) -> float:
    """Mean Pearson correlation between the means of disjoint groups of k draws (draws: (D, N))."""
    groups = [draws[i:i + k].mean(axis=0) for i in range(0, draws.shape[0] - k + 1, k)]
    pairs = [(a, b) for i, a in enumerate(groups) for b in groups[i + 1:]]
    if not pairs:
        return float("nan")
    return float(np.mean([np.corrcoef(a, b)[0, 1] for a, b in pairs]))


def group_sizes(draws: int) -> list[int]:
    """The k of the `retest_k` columns: powers of two from 2 while two disjoint groups fit (16
    draws reach k = 8, the loss history's default `history_visits`)."""
    sizes, k = [], 2
    while 2 * k <= draws:
        sizes.append(k)
        k *= 2
    return sizes


def top_half_overlap(draws: np.ndarray) -> float:
    """Mean share of one draw's top half that is in another's (0.5 for unrelated scores)."""
    n = draws.shape[1]
    tops = [set(np.argsort(-d)[: n // 2].tolist()) for d in draws]
    pairs = [(a, b) for i, a in enumerate(tops) for b in tops[i + 1:]]
    return float(np.mean([len(a & b) / (n // 2) for a, b in pairs]))


def score_draws(model, data, rows: int, rate: float, draws: int, baseline) -> dict[str, np.ndarray]:
    """(D, N) exit and full scores of the first `rows` train rows under D independent masks
    (rows without a masked token under some draw score 0, as in selection)."""
    from pipeline.data import VALID_MASK_SEED, MaskingConfig, validation_batches
    from pipeline.scoring import score_exit, score_full

    out = {"exit": [], "full": []}
    for d in range(draws):
        e, f = [], []
        for b in validation_batches(data, 128, MaskingConfig(rate=rate), max_samples=rows,
                                    mask_seed=VALID_MASK_SEED + 1000 + d):
            e.append(score_exit(model, b, "loss", baseline).numpy())
            f.append(score_full(model, b, "loss", baseline).numpy())
        out["exit"].append(np.concatenate(e))
        out["full"].append(np.concatenate(f))
    return {k: np.stack(v) for k, v in out.items()}


def load_model(path: Path, tmp: Path):
    from pipeline.export_cli import export
    from pipeline.model import SiftBertForMaskedLM

    if not (path / "config.json").is_file():
        path, _, _ = export(path, tmp / "export")
    return SiftBertForMaskedLM.from_pretrained(str(path)).eval()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", type=Path, help="checkpoint directory or Hugging Face model dir")
    p.add_argument("data", type=Path, help="sift-prep directory with the model's vocabulary")
    p.add_argument("--split", default="train", help="which split's rows to score (default train)")
    p.add_argument("--rows", type=int, default=2048)
    p.add_argument("--rates", default="0.15,0.4", help="masking rates (comma list)")
    p.add_argument("--normalize", default="none,unigram", help="none and/or unigram")
    p.add_argument("--draws", type=int, default=8, help="independent masks per row (>= 2)")
    p.add_argument("--out", type=Path, default=None, help="result JSON (default: print only)")
    args = p.parse_args(argv)
    from pipeline.data import DataError, ShardDataset, token_counts
    from pipeline.scoring import unigram_surprisal

    torch.set_num_threads(1)
    try:
        data = ShardDataset(args.data, args.split)
        with tempfile.TemporaryDirectory() as tmp:
            model = load_model(args.checkpoint, Path(tmp))
    except (DataError, OSError, ValueError) as exc:
        print(f"score_reliability: {exc}", file=sys.stderr)
        return 2
    baselines = {"none": None}
    if "unigram" in args.normalize:
        baselines["unigram"] = unigram_surprisal(token_counts(ShardDataset(args.data, "train")))
    rows = []
    for rate in [float(r) for r in args.rates.split(",")]:
        for name in [n for n in args.normalize.split(",") if n]:
            draws = score_draws(model, data, args.rows, rate, args.draws, baselines[name])
            for scorer, d in draws.items():
                row = {"rate": rate, "normalize": name, "scorer": scorer, "rows": d.shape[1],
                       "retest": retest(d, 1), "top_half_overlap": top_half_overlap(d)}
                for k in group_sizes(args.draws):
                    row[f"retest_{k}"] = retest(d, k)
                rows.append(row)
                print(json.dumps(row), flush=True)
    result = {"benchmark": "score_reliability", "checkpoint": str(args.checkpoint),
              "data": str(args.data), "split": args.split, "draws": args.draws,
              "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "rows": rows}
    if args.out:
        from data_prep.io_util import write_json_atomic

        write_json_atomic(args.out, result)
        print(f"score_reliability: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
