"""Packing token streams into fixed-length rows, and writing them as .npy shards atomically.

Owns: the row layout (`[CLS] tokens... [SEP]`, documents packed back to back, each closed by a
[SEP] inside the stream, RoBERTa-style; the split's last partial row padded with [PAD]), shard
cutting (a fixed number of rows per shard, so shard boundaries depend only on the token stream),
the stream position at each shard boundary (what a resumed run needs to skip), and atomic shard
writes (temp name, fsync, os.replace). Reads no corpus.

Memory: about one shard of ids in flight (16384 x 126 ids as uint32 = 8 MiB at the defaults),
whatever the corpus size.
"""
from __future__ import annotations

import hashlib
import io
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep.io_util import write_atomic


def dtype_for(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab <= 65536), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


@dataclass(frozen=True)
class RowLayout:
    """How a token stream becomes rows."""

    seq_len: int
    """Tokens per row, [CLS] and the closing [SEP] included."""
    cls_id: int
    """Id opening every row."""
    sep_id: int
    """Id closing every row and every document."""
    pad_id: int
    """Id filling the split's last partial row."""

    def __post_init__(self) -> None:
        if self.seq_len < 8:
            raise ValueError(f"seq_len must be >= 8, got {self.seq_len}")

    @property
    def body(self) -> int:
        """Stream tokens per row (seq_len minus [CLS] and [SEP])."""
        return self.seq_len - 2


def make_rows(stream: np.ndarray, layout: RowLayout, dtype: np.dtype) -> np.ndarray:
    """A flat token stream -> (ceil(n / body), seq_len) rows; the last row padded after its [SEP]."""
    n = len(stream)
    body = layout.body
    num_rows = -(-n // body)
    rows = np.full((num_rows, layout.seq_len), layout.pad_id, dtype=dtype)  # (R, L)
    rows[:, 0] = layout.cls_id
    full = n // body
    if full:
        rows[:full, 1:-1] = stream[: full * body].reshape(full, body)  # (full, L-2)
        rows[:full, -1] = layout.sep_id
    rest = n - full * body
    if rest:
        rows[full, 1 : 1 + rest] = stream[full * body :]
        rows[full, 1 + rest] = layout.sep_id
    return rows


@dataclass(frozen=True)
class Position:
    """Where in a split's document stream a shard starts: resume reads from here."""

    doc: int
    """Global document index."""
    skip: int
    """Tokens of that document (its closing [SEP] counted) that earlier shards already hold."""


class Packer:
    """One split's token stream -> shards of `shard_rows` rows, with the position after each.

    Feed documents in order with `add(doc, ids, ends_document)`; collect finished shards with
    `take_shards()`; `finish()` returns the last, partial shard (padded), if any.
    """

    def __init__(self, layout: RowLayout, shard_rows: int, dtype: np.dtype, start: Position) -> None:
        if shard_rows < 1:
            raise ValueError("shard_rows must be >= 1")
        self.layout = layout
        self.dtype = dtype
        self.shard_tokens = shard_rows * layout.body
        self._pending: deque[tuple[int, int, np.ndarray]] = deque()  # (doc, offset in doc, ids)
        self._pending_len = 0
        self._doc = -1  # document of the last piece added
        self._doc_offset = 0  # tokens of self._doc added so far (skipped ones included)
        self._skip = start.skip
        self._start_doc = start.doc

    def wants(self, doc: int) -> bool:
        """False for documents wholly inside shards already written (a resumed run skips them)."""
        return doc >= self._start_doc

    def add(self, doc: int, ids: np.ndarray, ends_document: bool) -> None:
        """Append a piece of document `doc` (ids without specials); close it with [SEP] if it ends."""
        if ends_document:
            ids = np.append(ids, np.uint32(self.layout.sep_id))
        if doc != self._doc:
            self._doc, self._doc_offset = doc, 0
        offset = self._doc_offset
        self._doc_offset += len(ids)
        if doc == self._start_doc and self._skip:
            # Resuming inside this document: its first `skip` tokens are in written shards.
            drop = min(self._skip, len(ids))
            ids, offset, self._skip = ids[drop:], offset + drop, self._skip - drop
        if len(ids):
            self._pending.append((doc, offset, ids))
            self._pending_len += len(ids)

    def ready(self) -> bool:
        """Whether a full shard is waiting."""
        return self._pending_len >= self.shard_tokens

    def take_shard(self) -> tuple[np.ndarray, Position]:
        """The next full shard (shard_rows, seq_len) and the stream position right after it."""
        return self._take(self.shard_tokens)

    def finish(self) -> tuple[np.ndarray, Position] | None:
        """The last shard (fewer rows, last one padded), or None when nothing is left."""
        if not self._pending_len:
            return None
        return self._take(self._pending_len)

    def _take(self, n: int) -> tuple[np.ndarray, Position]:
        parts, need = [], n
        while need:
            doc, offset, ids = self._pending.popleft()
            if len(ids) > need:
                self._pending.appendleft((doc, offset + need, ids[need:]))
                ids = ids[:need]
            parts.append(ids)
            need -= len(ids)
        self._pending_len -= n
        if self._pending:
            doc, offset, _ = self._pending[0]
            after = Position(doc, offset)
        else:
            after = Position(self._doc, self._doc_offset)
        return make_rows(np.concatenate(parts), self.layout, self.dtype), after


def shard_name(split: str, index: int) -> str:
    """Relative path of a shard: `train/shard_000000.npy`."""
    return f"{split}/shard_{index:06d}.npy"


def npy_bytes(rows: np.ndarray) -> bytes:
    """The exact bytes np.save writes (hashed before writing, so the manifest needs no re-read)."""
    buf = io.BytesIO()
    np.save(buf, rows, allow_pickle=False)
    return buf.getvalue()


def write_shard(out: Path, split: str, index: int, rows: np.ndarray) -> dict:
    """Write one shard atomically; returns its manifest entry {path, num_sequences, sha256}."""
    rel = shard_name(split, index)
    data = npy_bytes(rows)
    write_atomic(out / rel, data)
    return {"path": rel, "num_sequences": int(rows.shape[0]), "sha256": hashlib.sha256(data).hexdigest()}


def count_tokens(rows: np.ndarray, pad_id: int) -> int:
    """Non-[PAD] tokens in rows ([CLS]/[SEP] included): the manifest's num_tokens."""
    return int(rows.size - np.count_nonzero(rows == pad_id))
