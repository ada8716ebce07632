"""The random twin of a Hugging Face BERT directory: the same config and tokenizer, fresh
`BertForMaskedLM(config)` weights (torch seed `seed`). Downstream, a pretrained model is judged
against its twin: what the twin reaches, pretraining did not teach.

    python -m benchmarks.random_twin MODEL_DIR OUT_DIR
"""
from __future__ import annotations

import sys
from pathlib import Path


def save_random_twin(model_dir: str | Path, out_dir: str | Path, seed: int = 0) -> Path:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    BertForMaskedLM(BertConfig.from_pretrained(model_dir)).save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out_dir)
    return Path(out_dir)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print("usage: python -m benchmarks.random_twin MODEL_DIR OUT_DIR", file=sys.stderr)
        sys.exit(2)
    save_random_twin(sys.argv[1], sys.argv[2])
