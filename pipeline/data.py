"""Reading packed token shards: the dataset and dynamic masking.

Owns two small pieces, each usable alone (the global sample order, which row sits at which
position, is `pipeline.order`'s; `train_batch` reads and masks the rows an order names):

* `ShardDataset`: the rows of one split of a `sift-prep` output directory, memory-mapped
  (zero-copy reads; pickling keeps only the path, so DataLoader workers reopen the maps).
* Masking: 15% (configurable) of the non-special tokens of each row, 80% -> [MASK], 10% -> a random
  token, 10% kept, from counter-based random numbers keyed by (seed, epoch, global sample index),
  vectorized over the batch. Any rank, any resume, any world size reproduces the same masks.
  Validation uses one fixed masking (a constant seed, epoch 0) so every run, whatever its training
  seed, is scored on the same positions.

A batch is a dict of CPU tensors with dim 0 = sample: `input_ids`, `labels` (-100 where not masked),
`attention_mask` (0 at [PAD]) and `sample_index` (the global dataset index), all int64.

Rank and world size arrive as plain ints.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from data_prep.manifest import FORMAT, FORMAT_VERSION, MANIFEST  # the shard format: one definition

if TYPE_CHECKING:  # torch is imported where batches are built: reading a config needs none of it
    import torch

    from pipeline.order import SampleOrder

IGNORE_INDEX = -100
"""Label of a position that is not masked (what torch's cross_entropy ignores)."""

VALID_MASK_SEED = 0x5EED_BA5E
RETEST_MASK_SEED = VALID_MASK_SEED + 1
"""The second, independent validation masking: the same rows re-scored (pipeline.evaluation)."""
"""The fixed masking seed of validation: independent of the training seed, so runs compare."""

MASKING_VERSION = 2
"""The masking algorithm (1: a numpy Generator per row; 2: counter-based and vectorized). Runs of
different versions see different masks, training and validation alike; checkpoints record it."""

SPECIAL_TOKEN_NAMES = ("pad", "unk", "cls", "sep", "mask")


class DataError(ValueError):
    """A data directory that cannot be read as `sift-prep` output; the message says why."""


def load_manifest(data_dir: str | Path) -> dict:
    """Read and check `DATA_DIR/manifest.json`; raise DataError with a one-line reason."""
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise DataError(f"{data_dir}: no manifest.json (prepare the corpus with sift-prep first)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{path}: not a sift-prep manifest (a JSON {type(manifest).__name__})")
    if manifest.get("format") != FORMAT:
        raise DataError(f"{path}: not a sift-prep manifest (format {manifest.get('format')!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{path}: shard format version {manifest.get('format_version')}, "
                        f"this reader knows {FORMAT_VERSION}")
    _check_layout(path, manifest)
    return manifest


def _check_layout(path: Path, manifest: dict) -> None:
    """The keys a reader uses, with their types: a damaged or hand-edited manifest.json is one
    DataError naming the key, not a KeyError or TypeError from deep inside a run."""
    def fail(what: str) -> DataError:
        return DataError(f"{path}: {what}; prepare the data again with sift-prep")

    for key, kind in (("seq_len", int), ("vocab_size", int), ("dtype", str),
                      ("tokenizer_fingerprint", str), ("special_tokens", dict), ("splits", dict)):
        value = manifest.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise fail(f"{key!r} is missing" if key not in manifest else
                       f"{key!r} is {value!r:.60}, not {'an integer' if kind is int else 'a ' + kind.__name__}")
    try:
        integer = np.issubdtype(np.dtype(manifest["dtype"]), np.integer)
    except TypeError:
        integer = False
    if not integer:
        raise fail(f"dtype {manifest['dtype']!r:.40} is not an integer type")
    if manifest["seq_len"] < 1 or manifest["vocab_size"] < 1:
        raise fail(f"seq_len {manifest['seq_len']} and vocab_size {manifest['vocab_size']} must be >= 1")
    for name in SPECIAL_TOKEN_NAMES:
        i = manifest["special_tokens"].get(name)
        if type(i) is not int or not 0 <= i < manifest["vocab_size"]:
            raise fail(f"special token {name!r} is {i!r}, not an id below vocab_size "
                       f"{manifest['vocab_size']}")
    for name, split in manifest["splits"].items():
        shards = split.get("shards") if isinstance(split, dict) else None
        if not isinstance(shards, list) or not all(
                isinstance(m, dict) and isinstance(m.get("path"), str)
                and type(m.get("num_sequences")) is int and m["num_sequences"] >= 0 for m in shards):
            raise fail(f"split {name!r} is not a list of shards with a path and a row count each")


def verify_prepared(data_dir: str | Path, full: bool = False) -> None:
    """Check a sift-prep directory before training on it (DataError naming what is wrong):
    the tokenizer is there and is the one the shards were encoded with (its sha256 against the
    manifest's fingerprint), and every shard of every split exists with the shape and the size
    the manifest implies (a truncated copy fails here, not at the first checkpoint or epoch).
    `full`: also each shard's sha256 against the manifest (reads every byte: data.verify)."""
    import hashlib

    data_dir = Path(data_dir)
    manifest = load_manifest(data_dir)
    tok = data_dir / "tokenizer" / "tokenizer.json"
    if not tok.is_file():
        raise DataError(f"{data_dir}: tokenizer/tokenizer.json is missing (checkpoints copy it and "
                        "export needs it); prepare the data again with sift-prep")
    raw = tok.read_bytes()
    if hashlib.sha256(raw).hexdigest() != manifest["tokenizer_fingerprint"]:
        raise DataError(f"{tok} is not the tokenizer the shards were encoded with (its sha256 "
                        "differs from manifest.json's tokenizer_fingerprint)")
    ids = _tokenizer_ids(raw)
    if ids > manifest["vocab_size"]:  # the model would be built too small for the shards' ids
        raise DataError(f"{data_dir / 'manifest.json'}: vocab_size {manifest['vocab_size']}, but its "
                        f"tokenizer has {ids} ids; prepare the data again with sift-prep")
    seq_len = int(manifest["seq_len"])
    dtype = np.dtype(manifest["dtype"])
    for name, split in manifest["splits"].items():
        for meta in split["shards"]:
            path = data_dir / meta["path"]
            if not path.is_file():
                raise DataError(f"{path}: shard of split {name!r} listed in manifest.json is missing")
            try:
                arr = np.load(path, mmap_mode="r")
            except (ValueError, OSError, EOFError) as exc:  # numpy: "mmap length is greater than file size"
                raise DataError(f"{path}: truncated or not a shard ({exc})") from None
            if not isinstance(arr, np.ndarray):
                raise DataError(f"{path}: not a shard (an .npz archive, not one array)")
            if arr.shape != (meta["num_sequences"], seq_len) or arr.dtype != dtype:
                raise DataError(f"{path}: shape {arr.shape} of {arr.dtype}, manifest.json says "
                                f"({meta['num_sequences']}, {seq_len}) of {dtype}")
            del arr
            if full:
                with open(path, "rb") as f:
                    if hashlib.file_digest(f, "sha256").hexdigest() != meta.get("sha256"):
                        raise DataError(f"{path}: corrupted (its sha256 differs from manifest.json)")


def _tokenizer_ids(raw: bytes) -> int:
    """How many token ids a tokenizers JSON file defines (vocabulary and added tokens); 0 when
    it cannot tell (the fingerprint check has already tied the file to the shards)."""
    try:
        tj = json.loads(raw)
        vocab = (tj.get("model") or {}).get("vocab")
        n = len(vocab) if isinstance(vocab, (dict, list)) else 0
        if isinstance(vocab, dict):
            n = max([n, *(i + 1 for i in vocab.values() if isinstance(i, int))])
        return max([n, *(t["id"] + 1 for t in tj.get("added_tokens") or [] if isinstance(t.get("id"), int))])
    except (ValueError, AttributeError, TypeError, KeyError):
        return 0


class RowSources:
    """Names and first rows of the data sources of a dataset's row space (`row_sources`):
    the per-source counts of kept rows in TensorBoard are by these."""

    @property
    def row_sources(self) -> list[tuple[str, int]]:
        raise NotImplementedError

    @property
    def row_source_names(self) -> list[str]:
        return [name for name, _ in self.row_sources]

    @property
    def row_source_starts(self) -> np.ndarray:
        """(S,) int64: the global index of each source's first row."""
        rows = [n for _, n in self.row_sources]
        return np.concatenate([[0], np.cumsum(rows)[:-1]]).astype(np.int64)


class ShardDataset(RowSources):
    """The rows of one split (`train` or `valid`) of a sift-prep directory, memory-mapped."""

    def __init__(self, data_dir: str | Path, split: str = "train"):
        self.data_dir = Path(data_dir)
        self.split = split
        self.manifest = load_manifest(self.data_dir)
        splits = self.manifest["splits"]
        if split not in splits:
            raise DataError(f"{self.data_dir}: no split {split!r} (has {sorted(splits)})")
        self._shard_meta = splits[split]["shards"]
        counts = [s["num_sequences"] for s in self._shard_meta]
        # starts[i] = global index of shard i's first row; starts[-1] = number of rows.
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        if len(self) == 0:
            raise DataError(f"{self.data_dir}: split {split!r} holds no sequences")
        self._shards: list[np.ndarray] | None = None
        self._continues_word: np.ndarray | None = None

    # Pickle only the location: each process (DataLoader worker, spawned rank) maps on its own.
    def __getstate__(self):
        return {"data_dir": self.data_dir, "split": self.split}

    def __setstate__(self, state):
        self.__init__(state["data_dir"], state["split"])

    @property
    def seq_len(self) -> int:
        return int(self.manifest["seq_len"])

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @property
    def special_ids(self) -> dict[str, int]:
        """Ids of [PAD] [UNK] [CLS] [SEP] [MASK] under the names pad, unk, cls, sep, mask."""
        return {k: int(v) for k, v in self.manifest["special_tokens"].items()}

    @property
    def tokenizer_dir(self) -> Path:
        return self.data_dir / "tokenizer"

    @property
    def fingerprint(self) -> str:
        """The tokenizer fingerprint: checkpoints record it so a resume on other data is caught."""
        return str(self.manifest["tokenizer_fingerprint"])

    @property
    def row_sources(self) -> list[tuple[str, int]]:
        """(name, rows) of each data source, in row order: the manifest's `row_sources` for the
        split (a pool assembled from several sources), else one source named "all"."""
        sources = self.manifest["splits"][self.split].get("row_sources")
        if not sources:
            return [("all", len(self))]
        if sum(int(s["rows"]) for s in sources) != len(self):
            raise DataError(f"{self.data_dir}: row_sources of split {self.split!r} cover "
                            f"{sum(int(s['rows']) for s in sources)} rows, the split has {len(self)}")
        return [(str(s["name"]), int(s["rows"])) for s in sources]

    @property
    def continues_word(self) -> np.ndarray:
        """(V,) bool: the tokenizer's "##" continuation pieces (masking.whole_word); read once.
        A DataError when the tokenizer is not WordPiece."""
        if self._continues_word is None:
            path = self.tokenizer_dir / "tokenizer.json"
            try:
                self._continues_word = word_continuation_table(json.loads(path.read_text()),
                                                               self.vocab_size)
            except (OSError, json.JSONDecodeError) as exc:
                raise DataError(f"{path}: cannot read the tokenizer ({exc})") from None
            except ValueError as exc:
                raise DataError(f"{self.data_dir}: {exc}") from None
        return self._continues_word

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _open(self) -> list[np.ndarray]:
        if self._shards is None:
            shards = []
            for meta in self._shard_meta:
                path = self.data_dir / meta["path"]
                if not path.is_file():
                    raise DataError(f"{path}: shard listed in the manifest is missing")
                arr = np.load(path, mmap_mode="r")
                if arr.ndim != 2 or arr.shape != (meta["num_sequences"], self.seq_len):
                    raise DataError(f"{path}: shape {arr.shape}, manifest says "
                                    f"({meta['num_sequences']}, {self.seq_len})")
                shards.append(arr)
            self._shards = shards
        return self._shards

    def rows(self, indices: np.ndarray) -> np.ndarray:
        """Token rows for global indices, as int64 (n, seq_len), in the order given."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"sample index out of range [0, {len(self)})")
        shards = self._open()
        out = np.empty((indices.size, self.seq_len), dtype=np.int64)
        shard_of = np.searchsorted(self._starts, indices, side="right") - 1
        for s in np.unique(shard_of):
            sel = np.nonzero(shard_of == s)[0]
            out[sel] = shards[s][indices[sel] - self._starts[s]]
            # an id the model has no embedding for: a shard changed after sift-prep wrote it
            # (data.verify = "size" checks sizes only); one max per batch costs microseconds
            if out[sel].max(initial=0) >= self.vocab_size:
                raise DataError(f"{self.data_dir / self._shard_meta[s]['path']}: a row holds token id "
                                f"{int(out[sel].max())}, outside the vocabulary of {self.vocab_size}: the "
                                "shard changed since sift-prep wrote it (data.verify = \"sha256\" checks "
                                "every byte before training); prepare it again")
        return out

    def __getitem__(self, index: int) -> np.ndarray:
        return self.rows(np.array([index]))[0]


class MixtureDataset(RowSources):
    """One split of several sift-prep directories as one row space (`data.sources`): part s's
    row i is global row `offsets[s] + i`, so sample indices, masks and the loss history stay
    global. The parts share one tokenizer (the same tokenizer.json) and one sequence length."""

    def __init__(self, parts: list[tuple[str, ShardDataset]]):
        if not parts:
            raise DataError("a mixture needs at least one source")
        self.parts = parts
        first_name, first = parts[0]
        for name, part in parts[1:]:
            if part.seq_len != first.seq_len:
                raise DataError(f"{part.data_dir}: sequence length {part.seq_len}, source "
                                f"{first_name!r} has {first.seq_len}: the sources of a mixture "
                                "must be prepared with one --seq-len")
            if part.fingerprint != first.fingerprint:
                raise DataError(f"{part.data_dir}: prepared with another tokenizer than source "
                                f"{first_name!r} ({first.data_dir}): the sources of a mixture must "
                                "share one (sift-prep --tokenizer DIR)")
        sizes = [len(part) for _, part in parts]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.parts]

    @property
    def sizes(self) -> list[int]:
        return [len(part) for _, part in self.parts]

    # one tokenizer and one sequence length: the first part speaks for all
    seq_len = property(lambda self: self.parts[0][1].seq_len)
    vocab_size = property(lambda self: self.parts[0][1].vocab_size)
    special_ids = property(lambda self: self.parts[0][1].special_ids)
    tokenizer_dir = property(lambda self: self.parts[0][1].tokenizer_dir)
    fingerprint = property(lambda self: self.parts[0][1].fingerprint)
    continues_word = property(lambda self: self.parts[0][1].continues_word)

    @property
    def row_sources(self) -> list[tuple[str, int]]:
        """Each part's sources, named "<part>" (or "<part>/<its source>" for a pooled part)."""
        out = []
        for name, part in self.parts:
            inner = part.row_sources
            out += [(name if len(inner) == 1 else f"{name}/{sub}", rows) for sub, rows in inner]
        return out

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def rows(self, indices: np.ndarray) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"sample index out of range [0, {len(self)})")
        out = np.empty((indices.size, self.seq_len), dtype=np.int64)
        part_of = np.searchsorted(self.offsets, indices, side="right") - 1
        for s in np.unique(part_of):
            sel = np.nonzero(part_of == s)[0]
            out[sel] = self.parts[s][1].rows(indices[sel] - self.offsets[s])
        return out


def source_names(data_dirs: list[str]) -> list[str]:
    """Short distinct names for the sources of a mixture: each directory's name, or as many of
    its last path components as tell it apart. The same directory twice is a DataError."""
    paths = [Path(d).resolve() for d in data_dirs]
    seen = {}
    for given, path in zip(data_dirs, paths):
        if path in seen:
            raise DataError(f"{given}: listed twice in data.sources (as {seen[path]!r}); give "
                            "one source a larger weight instead")
        seen[path] = given
    for depth in range(1, max(len(p.parts) for p in paths) + 1):
        names = ["/".join(p.parts[-depth:]) for p in paths]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]  # unreachable: distinct paths differ in some component


def open_split(data_dirs: list[str], split: str) -> ShardDataset | MixtureDataset:
    """The split `split` of one sift-prep directory, or of several as a mixture."""
    if len(data_dirs) == 1:
        return ShardDataset(data_dirs[0], split)
    return MixtureDataset([(name, ShardDataset(d, split))
                           for name, d in zip(source_names(data_dirs), data_dirs)])


def token_counts(dataset: ShardDataset, max_rows: int = 65536) -> np.ndarray:
    """Token frequencies (vocab_size,) int64 of a split, special tokens zeroed.

    Counts up to `max_rows` rows spread evenly over the split (all rows of a smaller one), so
    it stays a fraction of a second on a huge corpus and is identical on every rank."""
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    n, vocab = len(dataset), dataset.vocab_size
    counts = np.zeros(vocab, dtype=np.int64)
    if n == 0:
        return counts
    rows = np.unique(np.linspace(0, n - 1, num=min(n, max_rows)).round().astype(np.int64))
    for chunk in np.array_split(rows, -(-rows.size // 4096)):
        counts += np.bincount(dataset.rows(chunk).ravel(), minlength=vocab)[:vocab]
    counts[list(dataset.special_ids.values())] = 0
    return counts


@dataclass(frozen=True)
class MaskingConfig:
    """Dynamic masked-LM corruption, BERT style."""

    rate: float = 0.15
    """Share of the non-special tokens of a row that become prediction targets (at least one)."""
    mask_prob: float = 0.8
    """Of the targets, the share replaced by [MASK]."""
    random_prob: float = 0.1
    """Of the targets, the share replaced by a random non-special token (the rest stay as they are)."""
    whole_word: bool = False
    """Mask whole words: every WordPiece of a word ("##" continuations with the piece before them)
    is a target together or not at all, words drawn at random until they cover about `rate` of
    the row's tokens (the same expected share). Needs a WordPiece tokenizer. As deterministic as
    token masking: a function of (seed, epoch, index) on any rank, world size or resume."""

    def __post_init__(self):
        if not 0.0 < self.rate < 1.0:
            raise ValueError(f"masking.rate must be in (0, 1), got {self.rate}")
        if not (self.mask_prob >= 0 and self.random_prob >= 0 and self.mask_prob + self.random_prob <= 1):
            raise ValueError("masking.mask_prob and masking.random_prob must be >= 0 and sum to <= 1,"
                             f" got {self.mask_prob} and {self.random_prob}")


# Counter-based randomness: every random number of a sample's masking is a hash of
# (seed, epoch, global index, stream, position), so a whole batch is masked with a few vectorized
# numpy operations (no per-row generator, no Python loop: the per-row version cost ~0.3 ms a row,
# 40-80 ms of every step on the critical path) and any rank or resume reproduces it exactly.
_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_STREAM_TARGETS, _STREAM_KIND, _STREAM_TOKEN, _STREAM_WORDS = 1, 2, 3, 4


def mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function (Steele, Lea & Flood 2014): a bijective 64-bit avalanche mix."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = x + _GAMMA
        x = (x ^ (x >> np.uint64(30))) * _MIX1
        x = (x ^ (x >> np.uint64(27))) * _MIX2
    return x ^ (x >> np.uint64(31))


def derive_key(*parts: int | np.ndarray) -> np.ndarray:
    """64-bit keys from integers or int arrays (seed, stream, epoch, ...): chained SplitMix64,
    element-wise over the broadcast of the parts (the masks' and the sample order's keys)."""
    k = np.uint64(0)
    for part in parts:
        k = mix64(k ^ np.asarray(part).astype(np.uint64))  # seeds and counters are >= 0
    return k


def sample_keys(seed: int, epochs: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """(B,) uint64 masking keys: a function of (seed, epoch, global index) only."""
    return derive_key(seed, epochs, np.asarray(indices, dtype=np.int64))


def _bits(keys: np.ndarray, stream: int, length: int) -> np.ndarray:
    """(B, length) uint64 random bits of `stream` at every position of every sample."""
    counters = (np.uint64(stream) << np.uint64(32)) + np.arange(length, dtype=np.uint64)  # (L,)
    return mix64(keys[:, None] ^ mix64(counters)[None, :])


def _uniform(keys: np.ndarray, stream: int, length: int) -> np.ndarray:
    """(B, length) float64 uniform on [0, 1), 53 random bits each."""
    return (_bits(keys, stream, length) >> np.uint64(11)).astype(np.float64) * 2.0**-53


def mask_rows(rows: np.ndarray, keys: np.ndarray, cfg: MaskingConfig, special_ids: np.ndarray,
              mask_id: int, vocab_size: int,
              continues_word: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Corrupt a batch of rows (B, L); return (input_ids, labels) as int64 (B, L) arrays.

    Row b is masked by keys[b] alone. Its targets are a uniform random subset of its non-special
    tokens of size round(rate * candidates), at least one when the row has any (a Bernoulli draw
    would leave some samples without a loss); with `cfg.whole_word`, whole words instead
    (`whole_word_targets`; `continues_word` (V,) bool marks the "##" pieces). Of the targets,
    mask_prob become [MASK], random_prob a uniform non-special token, the rest stay.
    """
    rows = np.asarray(rows)
    b, length = rows.shape
    inputs = rows.astype(np.int64, copy=True)
    candidate = ~np.isin(rows, special_ids)  # (B, L)
    n_candidates = candidate.sum(axis=1)  # (B,)
    n_targets = np.where(n_candidates > 0,
                         np.maximum(1, np.round(cfg.rate * n_candidates)), 0).astype(np.int64)
    if cfg.whole_word:
        if continues_word is None:
            raise ValueError("masking.whole_word needs the tokenizer's word-continuation table")
        targets = whole_word_targets(candidate, continues_word[rows], n_targets,
                                     _uniform(keys, _STREAM_WORDS, length))
    else:
        # A uniform subset of size n: the n candidates with the smallest random keys.
        u = np.where(candidate, _uniform(keys, _STREAM_TARGETS, length), 2.0)  # non-candidates last
        order = np.argsort(u, axis=1, kind="stable")  # (B, L)
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.broadcast_to(np.arange(length), (b, length)), axis=1)
        targets = rank < n_targets[:, None]  # (B, L)
    labels = np.where(targets, inputs, IGNORE_INDEX)
    kind = _uniform(keys, _STREAM_KIND, length)  # (B, L)
    to_mask = targets & (kind < cfg.mask_prob)
    to_random = targets & (kind >= cfg.mask_prob) & (kind < cfg.mask_prob + cfg.random_prob)
    inputs[to_mask] = mask_id
    if to_random.any():
        random_ids = _non_special_ids(_bits(keys, _STREAM_TOKEN, length), special_ids, vocab_size)
        inputs[to_random] = random_ids[to_random]
    return inputs, labels


def whole_word_targets(candidate: np.ndarray, continuation: np.ndarray, n_targets: np.ndarray,
                       u: np.ndarray) -> np.ndarray:
    """(B, L) bool: whole words of each row, in a random order (word w's key: `u` at its first
    piece), taken while they cover about n_targets tokens.

    A word is a candidate token that does not continue a word, with the "##" pieces right after
    it (a continuation after a special token or at the row's start begins a word of its own: the
    row was cut mid-word). Words are taken in key order while the middle of the next word still
    falls within n_targets (so the covered count is n_targets rounded to whole words, unbiased),
    and always at least one word when the row has any. Vectorized over (B, L), no Python loop.
    """
    b, length = candidate.shape
    prev_candidate = np.zeros_like(candidate)
    prev_candidate[:, 1:] = candidate[:, :-1]
    starts = candidate & ~(continuation & prev_candidate)  # (B, L) first piece of each word
    word = np.cumsum(starts, axis=1) - 1  # (B, L) index of the word within its row
    flat = (np.arange(b)[:, None] * length + word)  # (B, L) word slot in a (B, L) table
    sizes = np.bincount(flat[candidate], minlength=b * length).reshape(b, length)  # pieces per word
    word_u = np.full(b * length, 2.0)  # empty slots sort last
    word_u[flat[starts]] = u[starts]
    order = np.argsort(word_u.reshape(b, length), axis=1, kind="stable")  # (B, W) by key
    size_sorted = np.take_along_axis(sizes, order, axis=1)
    after = np.cumsum(size_sorted, axis=1)
    take_sorted = (2 * after - size_sorted) < 2 * n_targets[:, None]  # middle within the target
    take_sorted[:, 0] |= size_sorted[:, 0] > 0  # at least one word
    take = np.zeros_like(take_sorted)
    np.put_along_axis(take, order, take_sorted, axis=1)  # (B, W) by word index
    return candidate & np.take_along_axis(take, np.maximum(word, 0), axis=1)


def word_continuation_table(tokenizer_json: dict[str, Any], vocab_size: int) -> np.ndarray:
    """(V,) bool: which ids continue a word ("##" pieces) in a WordPiece tokenizer.json;
    ValueError for another kind of tokenizer (BPE and Unigram mark word starts instead)."""
    model = tokenizer_json.get("model") or {}
    if model.get("type") != "WordPiece":
        raise ValueError(f"masking.whole_word needs a WordPiece tokenizer (BERT's), this data's is "
                         f"{model.get('type') or 'of unknown type'}")
    prefix = model.get("continuing_subword_prefix") or "##"
    table = np.zeros(vocab_size, dtype=bool)
    for token, i in model.get("vocab", {}).items():
        if token.startswith(prefix) and len(token) > len(prefix) and 0 <= i < vocab_size:
            table[i] = True
    return table


def _non_special_ids(bits: np.ndarray, special_ids: np.ndarray, vocab_size: int) -> np.ndarray:
    """Token ids uniform over the vocabulary minus the special ids, one per uint64 of `bits`."""
    specials = np.unique(np.asarray(special_ids, dtype=np.int64))
    specials = specials[(specials >= 0) & (specials < vocab_size)]
    allowed = vocab_size - specials.size
    if allowed < 1:
        raise ValueError(f"a vocabulary of {vocab_size} ids has no non-special token")
    ids = (bits % np.uint64(allowed)).astype(np.int64)  # modulo bias ~vocab / 2^64: none to see
    for s in specials:  # ascending: step over each special id in turn
        ids += ids >= s
    return ids


def make_batch(dataset: ShardDataset, indices: np.ndarray, epochs: np.ndarray, seed: int,
               masking: MaskingConfig) -> dict[str, torch.Tensor]:
    """Read and mask the rows `indices` (sample i masked by (seed, epochs[i], indices[i]))."""
    import torch
    special = dataset.special_ids
    special_arr = np.array(sorted(set(special.values())), dtype=np.int64)
    rows = dataset.rows(indices)  # (B, L)
    input_ids, labels = mask_rows(rows, sample_keys(seed, epochs, indices), masking, special_arr,
                                  special["mask"], dataset.vocab_size,
                                  dataset.continues_word if masking.whole_word else None)
    return {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "attention_mask": torch.from_numpy((rows != special["pad"]).astype(np.int64)),
        "sample_index": torch.from_numpy(np.asarray(indices, dtype=np.int64).copy()),
    }


def train_batch(dataset: ShardDataset, sampler: SampleOrder, masking: MaskingConfig,
                position: int, per_rank: int, rank: int, world_size: int) -> dict[str, torch.Tensor]:
    """This rank's masked micro-batch of `per_rank` samples of the global batch at `position`.

    The caller advances its position by per_rank * world_size after each global micro-batch.
    """
    indices, epochs = sampler.rank_indices(position, per_rank, rank, world_size)
    return make_batch(dataset, indices, epochs, sampler.seed, masking)


def iter_train_batches(dataset: ShardDataset, sampler: SampleOrder, masking: MaskingConfig,
                       start_position: int, per_rank: int, rank: int,
                       world_size: int) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """Endless (position after this batch, batch) pairs from `start_position` on."""
    position = start_position
    while True:
        batch = train_batch(dataset, sampler, masking, position, per_rank, rank, world_size)
        position += per_rank * world_size
        yield position, batch


def validation_indices(num_samples: int, rank: int, world_size: int,
                       max_samples: int | None = None) -> np.ndarray:
    """This rank's contiguous share of the first `max_samples` validation rows (all by default).

    Shares differ by at most one row; together they cover every row once.
    """
    n = num_samples if max_samples is None else min(max_samples, num_samples)
    lo, hi = (n * rank) // world_size, (n * (rank + 1)) // world_size
    return np.arange(lo, hi, dtype=np.int64)


def validation_batches(dataset: ShardDataset, batch_size: int, masking: MaskingConfig,
                       rank: int = 0, world_size: int = 1, max_samples: int | None = None,
                       mask_seed: int = VALID_MASK_SEED) -> Iterator[dict[str, torch.Tensor]]:
    """The validation rows of this rank in batches, under the one fixed validation masking
    (`mask_seed`: another fixed masking of the same rows, e.g. RETEST_MASK_SEED)."""
    indices = validation_indices(len(dataset), rank, world_size, max_samples)
    for start in range(0, indices.size, batch_size):
        chunk = indices[start:start + batch_size]
        yield make_batch(dataset, chunk, np.zeros_like(chunk), mask_seed, masking)


def num_validation_batches(num_samples: int, batch_size: int, rank: int, world_size: int,
                           max_samples: int | None = None) -> int:
    """How many batches `validation_batches` yields on this rank (for progress bars)."""
    return math.ceil(validation_indices(num_samples, rank, world_size, max_samples).size / batch_size)
