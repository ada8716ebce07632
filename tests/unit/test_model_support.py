"""Helpers shared by the model, scoring and export tests (no tests here).

Real inputs: a small WordPiece tokenizer trained with `tokenizers` on the start of the embedded
State of the Union corpus (data_prep/corpus, read through data_prep's own reader, so these tests
need nothing beside the repo), and batches made by tokenizing real lines of it and masking 15% of
the ordinary tokens with a seeded generator, in the batch contract's layout (input_ids, labels
with -100, attention_mask, sample_index).
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from data_prep import sources

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # ids 0..4, as data_prep trains them
VOCAB = 600
"""Vocabulary of the shared test tokenizer (the `tokenizer_dir` fixture in tests/unit/conftest.py)."""


@lru_cache(maxsize=None)
def corpus_lines(max_chars: int = 400_000) -> tuple[str, ...]:
    """Lines (> 20 chars) from the first `max_chars` characters of the embedded corpus (the
    addresses in order, 1945 on; a line is a paragraph, a title or a date)."""
    pieces, size = [], 0
    reader = sources.iter_pieces(sources.embedded_source(), sources.ReadOptions())  # strict UTF-8
    for piece, _ in reader:
        pieces.append(piece)
        size += len(piece)
        if size >= max_chars:
            break
    reader.close()  # closes the .xz file now rather than at garbage collection
    text = "\n".join(pieces)[:max_chars]  # "\n": a document's last line ends where the next begins
    return tuple(line.strip() for line in text.splitlines() if len(line.strip()) > 20)


def train_tokenizer(out_dir: Path, vocab_size: int = 600) -> Path:
    """Train a lowercase WordPiece tokenizer and save it in Hugging Face format under out_dir."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(corpus_lines(),
                            trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIALS))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    fast.save_pretrained(str(out_dir))
    return out_dir


def real_batch(tokenizer_dir: Path, batch_size: int, seq_len: int, seed: int = 0,
               mask_rate: float = 0.15, first_line: int = 0) -> dict[str, torch.Tensor]:
    """A masked batch of real sentences: [CLS] ... [SEP] [PAD]..., 15% of ordinary tokens masked.

    Masked positions get [MASK] (id 4) and their true id in labels; others -100. Each row has at
    least one masked token.
    """
    tok = PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir))
    lines = list(corpus_lines()[first_line:first_line + batch_size])
    enc = tok(lines, max_length=seq_len, truncation=True, padding="max_length", return_tensors="pt")
    ids = enc["input_ids"].long()
    attention = enc["attention_mask"].long()
    g = torch.Generator().manual_seed(seed)
    ordinary = ids >= len(SPECIALS)  # (B, L)
    chosen = (torch.rand(ids.shape, generator=g) < mask_rate) & ordinary
    first = ordinary.float().argmax(dim=1)  # guarantee one masked token per row
    chosen[torch.arange(ids.shape[0]), first] = True
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    input_ids = torch.where(chosen, torch.full_like(ids, tok.mask_token_id), ids)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention,
            "sample_index": torch.arange(first_line, first_line + ids.shape[0])}
