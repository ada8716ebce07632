"""The tokenizer: train a WordPiece one, or load an existing one; save it in Hugging Face format.

Owns: the WordPiece recipe (BertNormalizer, BertPreTokenizer, WordPiece decoder, special tokens
[PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4), loading local or named tokenizers, the Hugging Face
save (so `AutoTokenizer.from_pretrained(OUT/"tokenizer")` encodes exactly like the
`tokenizers.Tokenizer` we used) and the fingerprint (sha256 of the saved tokenizer.json).
Reads no corpus itself: documents come in as an iterator of strings.
"""
from __future__ import annotations

import hashlib
import json
import os
import unicodedata
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterable

from data_prep.errors import PrepError

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
SPECIAL_KEYS = ("pad", "unk", "cls", "sep", "mask")


def new_wordpiece(lowercase: bool):
    """An untrained BERT-style WordPiece tokenizer (normalizer, pre-tokenizer, decoder)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    # strip_accents follows lowercase, as in BERT's uncased / cased vocabularies.
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    return tok


def _is_isolated(c: str) -> bool:
    """Characters BERT's pre-tokenization always makes a word of their own (never a "##" piece)."""
    cp = ord(c)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    if unicodedata.category(c).startswith("P"):
        return True
    # The CJK blocks BertNormalizer surrounds with spaces (handle_chinese_chars).
    return any(lo <= cp <= hi for lo, hi in ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF),
                                              (0x2A700, 0x2B73F), (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF),
                                              (0xF900, 0xFAFF), (0x2F800, 0x2FA1F)))


def continuation_alphabet(raw_chars: Iterable[str], lowercase: bool) -> list[str]:
    """Sorted "##c" tokens for every character c the normalized corpus can have inside a word.

    Why: tokenizers' WordPiece trainer numbers "##c" tokens in the order it meets them while
    iterating a Rust HashMap with a per-process random seed, and merge ties are broken by those
    numbers; so two trainings on the same text give different vocabularies (measured: 4 of 8192
    entries and 870 ids differed between two runs on the embedded corpus). Registering every
    "##c" up front, in code-point order, fixes the numbering and makes training reproducible.
    """
    normalized = new_wordpiece(lowercase).normalizer.normalize_str("".join(sorted(set(raw_chars))))
    chars = {c for c in normalized if not c.isspace() and not _is_isolated(c)}
    return [f"##{c}" for c in sorted(chars)]


def train_wordpiece(texts: Iterable[str], vocab_size: int, lowercase: bool, raw_chars: Iterable[str],
                    show_progress: bool = True):
    """Train WordPiece on a stream of texts (never held in memory); deterministic.

    `raw_chars`: every character of the corpus (before normalization), collected by an earlier
    pass; see `continuation_alphabet` for why the trainer needs them before it starts.
    """
    from tokenizers import models, processors, trainers

    prefixed = continuation_alphabet(raw_chars, lowercase)
    trainer = trainers.WordPieceTrainer(vocab_size=max(vocab_size, len(SPECIAL_TOKENS) + len(prefixed)),
                                        special_tokens=list(SPECIAL_TOKENS) + prefixed,
                                        show_progress=show_progress)
    scratch = new_wordpiece(lowercase)
    scratch.train_from_iterator(texts, trainer=trainer)
    # Rebuild from the vocabulary alone: the "##c" helpers must be plain vocabulary entries, not
    # special (added) tokens that would match literal "##c" in text.
    vocab = scratch.get_vocab(with_added_tokens=True)
    tok = new_wordpiece(lowercase)
    tok.model = models.WordPiece(vocab=vocab, unk_token="[UNK]")
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    if ids != list(range(len(SPECIAL_TOKENS))):  # the trainer puts special tokens first
        raise RuntimeError(f"trained tokenizer has special ids {ids}, expected 0..4")
    # The post-processor only matters for users of the saved tokenizer (AutoTokenizer adds
    # [CLS]/[SEP] like BERT); shards are encoded with add_special_tokens=False.
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return tok


def load_tokenizer(spec: str):
    """A `tokenizers.Tokenizer` from a tokenizer.json, a local Hugging Face dir or a hub name.

    Only fast (Rust-backed) tokenizers are accepted: the shard writer needs batch encoding.
    Network or unknown-name failures become a PrepError naming `spec`.
    """
    from tokenizers import Tokenizer

    path = Path(spec)
    looks_local = spec.startswith(("/", "./", "../", "~")) or spec.endswith(".json")
    if looks_local and not path.exists():  # hub names never look like this: say what is wrong
        raise PrepError(spec, "no such file or directory")
    if path.is_file():
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise PrepError(spec, f"not a tokenizers JSON file ({msg})") from e
    else:
        if path.is_dir() and not (path / "tokenizer.json").is_file():
            raise PrepError(spec, "directory has no tokenizer.json (only fast tokenizers are supported)")
        try:
            from transformers import AutoTokenizer

            quiet_hub_logs()
            hf = AutoTokenizer.from_pretrained(spec)
        except Exception as e:  # OSError offline, ValueError/KeyError for odd configs
            msg = (str(e).strip().splitlines() or [""])[0][:300]
            raise PrepError(spec, f"cannot load tokenizer ({type(e).__name__}: {msg})") from e
        if not getattr(hf, "is_fast", False) or getattr(hf, "backend_tokenizer", None) is None:
            raise PrepError(spec, "not a fast (tokenizers-backed) tokenizer")
        tok = hf.backend_tokenizer
    tok.no_truncation()
    tok.no_padding()
    return tok


def quiet_hub_logs() -> None:
    """Keep huggingface_hub's retry warnings off stderr: a failure becomes our one-line error."""
    try:
        from huggingface_hub.utils import logging as hub_logging

        hub_logging.set_verbosity_error()
    except ImportError:
        pass


def special_token_ids(tok) -> dict[str, int]:
    """{pad, unk, cls, sep, mask: id}; cls, sep and pad are required to build shards."""
    ids = {}
    for key, token in zip(SPECIAL_KEYS, SPECIAL_TOKENS):
        i = tok.token_to_id(token)
        if i is None:  # e.g. RoBERTa-style names
            alt = {"pad": "<pad>", "unk": "<unk>", "cls": "<s>", "sep": "</s>", "mask": "<mask>"}[key]
            i = tok.token_to_id(alt)
        ids[key] = i
    missing = [k for k in ("pad", "cls", "sep") if ids[k] is None]
    if missing:
        raise PrepError("--tokenizer", f"tokenizer lacks the special tokens {missing} "
                                       "([PAD]/[CLS]/[SEP] or <pad>/<s>/</s>)")
    return ids


def tokenizer_json(tok) -> bytes:
    """The tokenizer.json we write: exactly the tokenizer that encodes the shards."""
    return tok.to_str(pretty=True).encode()


def fingerprint_of(tok) -> str:
    """sha256 hex of `tokenizer_json(tok)`, i.e. of OUT/tokenizer/tokenizer.json."""
    return hashlib.sha256(tokenizer_json(tok)).hexdigest()


def save_hf_async(tok, directory: Path, seq_len: int, lowercase: bool) -> Future:
    """`save_hf` on a copy of `tok` in a background thread.

    Why: importing transformers costs ~1.3 s wall (0.8 s CPU) here, a third of the time of a
    22 MB corpus; in a thread it overlaps the scan and the tokenization (which runs in Rust with
    the GIL released). The copy keeps transformers from touching the tokenizer being used.
    """
    from tokenizers import Tokenizer

    copy = Tokenizer.from_str(tok.to_str())
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sift-prep-hf-save")
    future = pool.submit(save_hf, copy, directory, seq_len, lowercase)
    pool.shutdown(wait=False)
    return future


def save_hf(tok, directory: Path, seq_len: int, lowercase: bool) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json to `directory`.

    transformers 5 no longer writes special_tokens_map.json; we write it ourselves because the
    shard format promises it. tokenizer_class is set to PreTrainedTokenizerFast, a name that both
    transformers 4 and 5 resolve, so the output loads with either.
    """
    from transformers import PreTrainedTokenizerFast

    ids = special_token_ids(tok)
    names = {k: tok.id_to_token(i) for k, i in ids.items() if i is not None}
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, model_max_length=seq_len, do_lower_case=lowercase,
        **{f"{k}_token": v for k, v in names.items()})
    hf.save_pretrained(str(directory))
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (directory / "special_tokens_map.json").write_text(
        json.dumps({f"{k}_token": v for k, v in names.items()}, indent=2, sort_keys=True) + "\n")


def fingerprint(directory: Path) -> str:
    """sha256 hex of the saved tokenizer.json: identical files encode identically."""
    with open(directory / "tokenizer.json", "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def set_threads(workers: int) -> None:
    """Size the Rust thread pool tokenizers' batch encoding uses (before its first use)."""
    os.environ["RAYON_NUM_THREADS"] = str(workers)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
