"""Time-to-accuracy benchmark: the same entry as the `sift-bench` console script.

    python benchmarks/time_to_accuracy.py --data DIR [--quick] [--world-size 2] ...

All logic is in `pipeline.bench` (arms, launch, report); this file only makes it runnable from a
checkout without the console script installed.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
