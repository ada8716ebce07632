"""Hugging Face `Trainer` + `DataCollatorForLanguageModeling` baseline (with its DeepSpeed integration).

    python benchmarks/hf_trainer_baseline.py --out-dir DIR --budget-s S --eval-interval-s I \
        --set data.data_dir=DIR [--recipe FILE] [--set section.key=value ...]

Under several ranks: `deepspeed --num_gpus 2 benchmarks/hf_trainer_baseline.py ...`. `sift-bench`
runs it after its arms with the same recipe and budget and reports `hf_trainer_time_ratio`; the
logic is in `benchmarks.sift_bench.hf_trainer`.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.sift_bench.hf_trainer import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
