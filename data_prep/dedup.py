"""Exact deduplication: a 64-bit hash of each document's normalized text, first occurrence kept.

Owns the normalization (whitespace runs collapsed: the same words in the same order are the same
document, however they were wrapped or indented; case and punctuation count), the hash, the
keep decision over a whole corpus, and the check that no two parts hold the same document.
Reads no corpus: documents come in as pieces of text.

Why 64 bits: 8 bytes a document held in memory; the expected number of distinct documents
wrongly taken for duplicates is n^2 / 2^65, 0.03 for a billion documents.
"""
from __future__ import annotations

import hashlib

import numpy as np


class DocHasher:
    """Hashes one document fed piece by piece; the result does not depend on where it was cut."""

    def __init__(self) -> None:
        self._h = hashlib.blake2b(digest_size=8, person=b"sift-dedup")
        self._tail = ""  # a word that may go on in the next piece

    def update(self, piece: str) -> None:
        text = self._tail + piece
        words = text.split()
        # A piece cut inside a word (no whitespace in reach): hold its start for the next piece.
        self._tail = words.pop() if words and not text[-1].isspace() else ""
        if words:
            self._h.update(" ".join(words).encode("utf-8", "surrogatepass"))
            self._h.update(b" ")

    def digest(self) -> int:
        if self._tail:
            self._h.update(self._tail.encode("utf-8", "surrogatepass"))
            self._h.update(b" ")
            self._tail = ""
        return int.from_bytes(self._h.digest(), "little")


def text_hash(text: str) -> int:
    """The hash of a whole document (what DocHasher gives for any cut of it)."""
    h = DocHasher()
    h.update(text)
    return h.digest()


def first_occurrences(hashes: np.ndarray) -> np.ndarray:
    """(n,) bool: True for each document whose hash no earlier document has."""
    keep = np.zeros(len(hashes), dtype=bool)
    _, first = np.unique(hashes, return_index=True)  # the lowest index of each value
    keep[first] = True
    return keep


def shared_hashes(parts: list[np.ndarray]) -> tuple[int, int, int] | None:
    """(hash, part a, part b) for a document hash found in two parts, or None when disjoint.

    Each array holds one part's distinct hashes."""
    if not parts:
        return None
    values = np.concatenate(parts)
    owner = np.concatenate([np.full(len(p), i, dtype=np.int64) for i, p in enumerate(parts)])
    order = np.argsort(values, kind="stable")
    values, owner = values[order], owner[order]
    same = np.flatnonzero(values[1:] == values[:-1])
    if not len(same):
        return None
    i = int(same[0])
    return int(values[i]), int(owner[i]), int(owner[i + 1])
