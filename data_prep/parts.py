"""Prep across nodes: which documents a part holds, and which part this process is.

Owns the slicing rule (document `d` belongs to part `d % count`, by its global position in the
input order, the same position the train/valid split is keyed on), reading the part from a
launcher's environment (SLURM, Open MPI, PMI), and the `--tokenizer-sample` size. Reads no corpus.

Why by document position rather than by input file: a corpus is often one huge JSONL file, and
the train/valid split and the duplicate decisions are keyed on global positions; every node
reads the whole input (cheap next to tokenizing) and tokenizes only its documents, so the
parts are disjoint, their union is every document, and each document gets the split it gets in
a single-node run.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

from data_prep.errors import PrepError

# Launchers' (rank, size) variables, in the order looked at.
ENV_PAIRS = (("SLURM_PROCID", "SLURM_NTASKS"),
             ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
             ("PMI_RANK", "PMI_SIZE"))
MAX_PARTS = 1 << 20
INDEX_PLACEHOLDER = "{index}"


@dataclass(frozen=True)
class Part:
    """Part `index` of `count`; count 1 is a whole (single-node) run."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.count <= MAX_PARTS:
            raise PrepError("--num-shards", f"must be in [1, {MAX_PARTS}], got {self.count}")
        if not 0 <= self.index < self.count:
            raise PrepError("--shard-index", f"must be in [0, {self.count - 1}] with --num-shards "
                                             f"{self.count}, got {self.index}")

    @property
    def sliced(self) -> bool:
        return self.count > 1

    def holds(self, doc: int) -> bool:
        """Whether global document `doc` is this part's to tokenize."""
        return doc % self.count == self.index

    def entry(self) -> dict | None:
        """The manifest's "part" value (None for a whole run: old manifests have none)."""
        return {"index": self.index, "count": self.count} if self.sliced else None

    def name(self) -> str:
        return f"part {self.index} of {self.count}"


def part_from_env(environ: Mapping[str, str]) -> Part:
    """The part of this task from the first launcher pair set (SLURM, Open MPI, PMI)."""
    for rank_var, size_var in ENV_PAIRS:
        if rank_var in environ or size_var in environ:
            try:
                rank, size = int(environ[rank_var]), int(environ[size_var])
            except (KeyError, ValueError):
                raise PrepError("--shard-from-env", f"{rank_var}={environ.get(rank_var)!r} and "
                                                    f"{size_var}={environ.get(size_var)!r} are not "
                                                    "two integers") from None
            return Part(rank, size)
    names = ", ".join(f"{r}/{s}" for r, s in ENV_PAIRS)
    raise PrepError("--shard-from-env", f"none of {names} is set (run under srun, mpirun or a "
                                        "PMI launcher, or give --num-shards and --shard-index)")


def part_output(template: str, part: Part) -> str:
    """--output with "{index}" replaced by the part index (every task of a launcher gets the
    same command line, and each needs its own directory)."""
    return template.replace(INDEX_PLACEHOLDER, str(part.index))


# ---------------------------------------------------------------------------------------------
# --tokenizer-sample

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SAMPLE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", re.IGNORECASE)


@dataclass(frozen=True)
class Sample:
    """How much text trains the tokenizer: `amount` bytes of UTF-8 text, or `amount` documents."""

    amount: int
    unit: str  # "bytes" | "docs"

    def __str__(self) -> str:  # canonical, what the manifest's settings record
        return f"{self.amount}{'B' if self.unit == 'bytes' else 'docs'}"


def parse_sample(text: str) -> Sample:
    """"100MB", "2GiB", "500000docs" -> Sample; a bare number is refused (bytes or documents?)."""
    m = _SAMPLE.fullmatch(text)
    unit = m.group(2).lower() if m else ""
    if m is None or not (unit in _UNITS or unit in ("doc", "docs")):
        raise PrepError("--tokenizer-sample", f"expected a size like 100MB, 2GiB or 500000docs, got {text!r}")
    value = float(m.group(1))
    if unit in ("doc", "docs"):
        if value != int(value):
            raise PrepError("--tokenizer-sample", f"a number of documents is whole, got {text!r}")
        amount, kind = int(value), "docs"
    else:
        amount, kind = int(value * _UNITS[unit]), "bytes"
    if amount < 1:
        raise PrepError("--tokenizer-sample", f"must be at least 1 byte or document, got {text!r}")
    return Sample(amount, kind)
