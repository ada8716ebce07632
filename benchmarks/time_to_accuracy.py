"""Time-to-accuracy benchmark: the same entry as the `sift-bench` console script.

    python benchmarks/time_to_accuracy.py --data DIR [--quick] [--world-size 2] ...

The full run (about 2 hours on 2 CPU cores: 17 arms + the HF baseline, 300 s of training each):

    sift-prep ../shared/data/nltk ../shared/data/wikitext-2/valid.txt \
        --valid-input ../shared/data/wikitext-2/test.txt --output runs/bench_data \
        --vocab-size 8192 --seq-len 128 --encoding-errors replace
    sift-bench --data runs/bench_data --recipe benchmarks/time_to_accuracy.toml \
        --world-size 2 --budget-s 300 --eval-interval-s 30

It writes benchmarks/results/time_to_accuracy.{json,md} and three PNGs.
All logic is in `benchmarks.sift_bench` (arms, launch, report); this file only makes it runnable from a
checkout without the console script installed.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.sift_bench.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
