"""The data-prep run: sources -> (tokenizer) -> shards + manifest, resumable and idempotent.

Owns `PrepConfig` and `prepare()`: the order of the two passes, the train/valid split, batching
documents into the tokenizer, the resume state and cleanup on failure. Reading is sources.py,
the tokenizer is tokenizer.py, rows and shard files are shards.py, JSON is manifest.py.

Passes over the inputs. Pass 1 validates every input (so a bad file fails before anything is
written), counts documents for the split and collects the characters; when training, a second
read streams the text into the WordPiece trainer (reading is cheap next to tokenizing). Pass 2
tokenizes with `encode_batch_fast` (Rust threads, `--workers` of them) in batches of about
`batch_chars` characters and packs; after each shard the stream position is appended to a
journal, so a killed run resumes at the first missing shard and produces the same bytes.

A part (--num-shards N --shard-index i, parts.py) scans every document like a whole run, so the
split, the tokenizer sample and the --dedup decisions (dedup.py) are the global ones, and in
pass 2 tokenizes only the documents d with d % N == i; `sift-prep merge` (merge.py) joins parts.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import queue
import shutil
import signal
import stat
import sys
import tempfile
import threading
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from data_prep import dedup as dd
from data_prep import manifest as mf
from data_prep import parts as pt
from data_prep import shards as sh
from data_prep import sources as src
from data_prep import tokenizer as tk
from data_prep.errors import PrepError
from data_prep.io_util import write_atomic, write_json_atomic

# For the tests of a kill mid-run (tests/e2e/test_prep.py): the run SIGKILLs itself after writing
# this many shard files in this process, before the last one's journal record. A kill point that
# does not depend on how fast the machine is; unset, nothing happens.
KILL_AT_SHARD_ENV = "SIFT_PREP_KILL_AT_SHARD"


def _kill_at_shard() -> int | None:
    text = os.environ.get(KILL_AT_SHARD_ENV)
    return int(text) if text else None


# Sizes beyond these are typos or misunderstandings, refused before any work.
MAX_SEQ_LEN = 65536
MAX_VOCAB_SIZE = 1_000_000
MAX_WORKERS = 256
WORKERS_PER_CORE = 4
# One shard is held in memory (ids as uint32 while packing, then the rows and their .npy bytes).
MAX_SHARD_BYTES = 1 << 30


def max_workers() -> int:
    """The most --workers accepted: 4 threads a CPU core, and never more than 256."""
    return min(MAX_WORKERS, WORKERS_PER_CORE * (os.cpu_count() or 1))


@dataclass(frozen=True)
class PrepConfig:
    """Everything a data-prep run needs; CLI flags map one to one."""

    output: Path
    """Output directory (created; an existing sift-prep output is resumed or reused)."""
    inputs: tuple[str, ...] = ()
    """Input specs; empty = the embedded State of the Union corpus."""
    valid_inputs: tuple[str, ...] = ()
    """Inputs whose documents all go to the valid split."""
    tokenizer: str | None = None
    """Existing tokenizer (tokenizer.json, local dir or hub name); None = train WordPiece."""
    vocab_size: int = 8192
    """WordPiece vocabulary size when training."""
    seq_len: int = 128
    """Tokens per row, [CLS] and [SEP] included."""
    valid_fraction: float | None = None
    """Share of documents sent to valid; None = 0.005, or 0 when valid_inputs are given."""
    lowercase: bool | None = None
    """Lowercase (and strip accents); None = True when training, the tokenizer's own otherwise."""
    read: src.ReadOptions = field(default_factory=src.ReadOptions)
    """Decoding and document boundaries."""
    workers: int = 0
    """Tokenizer threads; 0 = min(cores, 8)."""
    shard_rows: int = 16384
    """Rows per shard (the last shard of a split may have fewer)."""
    batch_chars: int = 1 << 20
    """Characters of text per encode_batch call (bounds memory; large enough to keep threads busy)."""
    progress: bool | None = None
    """tqdm bars on stderr; None = only when stderr is a terminal."""
    part: pt.Part = field(default_factory=pt.Part)
    """The slice of the documents this run tokenizes (--num-shards/--shard-index); 1 of 1 = all."""
    tokenizer_sample: pt.Sample | None = None
    """Train the tokenizer on a hash-chosen sample of this size; None = on every document."""
    dedup: str | None = None
    """"exact": drop documents whose normalized text an earlier document has; None = keep all."""

    def __post_init__(self) -> None:
        if self.seq_len < 8:
            raise PrepError("--seq-len", f"must be at least 8, got {self.seq_len}")
        if self.seq_len > MAX_SEQ_LEN:
            raise PrepError("--seq-len", f"must be at most {MAX_SEQ_LEN}, got {self.seq_len}")
        if self.vocab_size < 16:
            raise PrepError("--vocab-size", f"must be at least 16, got {self.vocab_size}")
        if self.vocab_size > MAX_VOCAB_SIZE:
            raise PrepError("--vocab-size", f"must be at most {MAX_VOCAB_SIZE}, got {self.vocab_size}")
        f = self.valid_fraction
        if f is not None and not 0.0 <= f < 1.0:
            raise PrepError("--valid-fraction", f"must be in [0, 1), got {f}")
        if self.shard_rows < 1:
            raise PrepError("--shard-rows", f"must be at least 1, got {self.shard_rows}")
        shard_bytes = self.shard_rows * self.seq_len * 4
        if shard_bytes > MAX_SHARD_BYTES:
            raise PrepError("--shard-rows", f"{self.shard_rows} rows x {self.seq_len} tokens x 4 bytes "
                                            f"= {shard_bytes / 2**30:.1f} GiB, a shard held in memory; "
                                            f"must be at most 1 GiB (at most "
                                            f"{MAX_SHARD_BYTES // (self.seq_len * 4)} rows at --seq-len "
                                            f"{self.seq_len}), got {self.shard_rows}")
        if self.workers < 0:
            raise PrepError("--workers", f"must be >= 1 (or 0 for the default), got {self.workers}")
        if self.workers > max_workers():
            raise PrepError("--workers", f"must be at most {max_workers()} ({WORKERS_PER_CORE} x the "
                                         f"{os.cpu_count() or 1} CPU cores, never above {MAX_WORKERS}), "
                                         f"got {self.workers}")
        if self.batch_chars < 1:
            raise ValueError("batch_chars must be >= 1")
        if self.tokenizer_sample is not None and self.tokenizer:
            raise PrepError("--tokenizer-sample", "samples text to train a tokenizer; with --tokenizer "
                                                  "there is none to train, drop one of the two")
        if self.dedup not in (None, "exact"):
            raise PrepError("--dedup", f"must be exact, got {self.dedup!r}")

    @property
    def effective_valid_fraction(self) -> float:
        if self.valid_fraction is not None:
            return self.valid_fraction
        return 0.0 if self.valid_inputs else 0.005

    @property
    def effective_workers(self) -> int:
        return self.workers or min(os.cpu_count() or 1, 8)

    def settings(self) -> dict:
        """What decides the output bytes (workers, progress and batch size do not)."""
        return {
            "tokenizer": self.tokenizer or "trained-wordpiece",
            "vocab_size": None if self.tokenizer else self.vocab_size,
            # For a loaded tokenizer prepare() replaces this with what its normalizer does.
            "lowercase": self.lowercase if self.tokenizer else self.lowercase is not False,
            "seq_len": self.seq_len,
            "valid_fraction": self.effective_valid_fraction,
            "doc_boundary": self.read.doc_boundary,
            "text_field": self.read.text_field,
            "encoding_errors": self.read.encoding_errors,
            "shard_rows": self.shard_rows,
            # Only when set: outputs made before these options existed still compare equal.
            **({"tokenizer_sample": str(self.tokenizer_sample)} if self.tokenizer_sample else {}),
            **({"dedup": self.dedup} if self.dedup else {}),
        }


# ---------------------------------------------------------------------------------------------
# Pure helpers


def valid_key(doc: int) -> float:
    """A uniform number in [0, 1) fixed by the document's position alone (no RNG)."""
    digest = hashlib.sha256(b"sift-prep-valid:%d" % doc).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_of(doc: int, valid_only: bool, fraction: float, fallback: int | None) -> str:
    """"valid" for --valid-input documents, a `fraction` of the rest by key, and the fallback."""
    if valid_only or doc == fallback or valid_key(doc) < fraction:
        return "valid"
    return "train"


def sample_key(doc: int) -> float:
    """Like valid_key, independent of it: which documents train the tokenizer (--tokenizer-sample)."""
    digest = hashlib.sha256(b"sift-prep-sample:%d" % doc).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def fallback_among(keys: np.ndarray, fraction: float) -> int | None:
    """FallbackPicker's answer over the documents whose valid key is in `keys` ((n,) float64,
    2.0 for a document the fraction may not pick): for --dedup, where duplicates are known only
    after the whole scan."""
    eligible = keys < 2.0
    if fraction <= 0 or int(eligible.sum()) < 2 or bool((keys < fraction).any()):
        return None
    return int(np.argmin(keys))


class FallbackPicker:
    """Streams over the documents the fraction may pick; with fraction > 0 and >= 2 of them but
    none picked, `fallback` is the lowest-key one (valid is then never empty by accident)."""

    def __init__(self, fraction: float) -> None:
        self.fraction = fraction
        self.count = 0
        self.picked = False
        self.lowest = (2.0, -1)  # (key, doc)

    def see(self, doc: int) -> None:
        key = valid_key(doc)
        self.count += 1
        self.picked |= key < self.fraction
        self.lowest = min(self.lowest, (key, doc))

    @property
    def fallback(self) -> int | None:
        if self.fraction <= 0 or self.count < 2 or self.picked:
            return None
        return self.lowest[1]


# ---------------------------------------------------------------------------------------------
# Document stream


@dataclass(frozen=True)
class Piece:
    doc: int
    text: str
    ends: bool
    valid_only: bool


def iter_corpus(sources: list[src.Source], opts: src.ReadOptions) -> Iterator[Piece]:
    """Every piece of every source, with a global document index (the order of the inputs)."""
    doc = 0
    for source in sources:
        for text, ends in src.iter_pieces(source, opts):
            yield Piece(doc, text, ends, source.valid_only)
            if ends:
                doc += 1


def prefetch(items: Iterator, depth: int) -> Iterator:
    """`items` produced by a background thread, up to `depth` ahead (bounded memory).

    Why: the main thread spends most of pass 2 inside encode_batch_fast, which releases the GIL,
    so reading and decoding the next batch in a thread hides the read time. Exceptions raised
    by `items` (a bad input) come out of this iterator in the main thread.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def work() -> None:
        try:
            for item in items:
                q.put((True, item))
            q.put((True, done))
        except BaseException as e:  # handed to the consumer, raised there
            q.put((False, e))

    # A daemon thread: if the consumer stops early (an error), the process can still exit.
    threading.Thread(target=work, name="sift-prep-reader", daemon=True).start()
    while True:
        ok, item = q.get()
        if not ok:
            raise item
        if item is done:
            return
        yield item


def _bar(progress: bool, **kw):
    from tqdm import tqdm

    return tqdm(disable=not progress, file=sys.stderr, dynamic_ncols=True, **kw)


# ---------------------------------------------------------------------------------------------
# The run


@dataclass
class ScanResult:
    """What pass 1 learns about the corpus."""

    num_docs: int
    fallback: int | None
    """The document sent to valid when the fraction picked none (see fallback_doc)."""
    chars: set[str]
    """Every character of the corpus (the WordPiece trainer needs them up front)."""
    text_bytes: int = 0
    """UTF-8 bytes of all text (counted only for --tokenizer-sample in bytes)."""
    hashes: np.ndarray | None = None
    """(num_docs,) uint64 normalized-text hash of every document (only with --dedup)."""
    keep: np.ndarray | None = None
    """(num_docs,) bool: the first document with its hash (only with --dedup)."""


def scan(cfg: PrepConfig, sources: list[src.Source], progress: bool, collect_chars: bool) -> ScanResult:
    """Pass 1: read and validate every input, count documents, collect characters if asked,
    hash every document for --dedup. Every node of a sliced run scans all documents, so the
    split and the duplicate decisions are the same on every node and in a single-node run."""
    result = ScanResult(0, None, set())
    fraction = cfg.effective_valid_fraction
    picker = FallbackPicker(fraction)
    dedup = cfg.dedup == "exact"
    hashes, keys = array("Q"), array("d")  # 8 + 8 bytes a document, only with --dedup
    hasher = dd.DocHasher()
    count_bytes = cfg.tokenizer_sample is not None and cfg.tokenizer_sample.unit == "bytes"
    with _bar(progress, desc="scan", unit="doc") as bar:
        for p in iter_corpus(sources, cfg.read):
            if collect_chars:
                result.chars.update(p.text)
            if count_bytes:
                result.text_bytes += len(p.text.encode("utf-8", "surrogatepass"))
            if dedup:
                hasher.update(p.text)
            if p.ends:
                result.num_docs += 1
                if dedup:
                    hashes.append(hasher.digest())
                    hasher = dd.DocHasher()
                    keys.append(2.0 if p.valid_only else valid_key(p.doc))
                elif not p.valid_only:
                    picker.see(p.doc)
                bar.update(1)
    if dedup:
        result.hashes = np.frombuffer(hashes, dtype=np.uint64)
        result.keep = dd.first_occurrences(result.hashes)
        # The fallback is chosen among the documents kept (a dropped one would leave valid empty).
        result.fallback = fallback_among(np.where(result.keep, np.frombuffer(keys), 2.0), fraction)
    else:
        result.fallback = picker.fallback
    return result


def training_texts(cfg: PrepConfig, sources: list[src.Source], counter: ScanResult) -> Iterator[str]:
    """What the tokenizer trains on: every kept document, or with --tokenizer-sample a share of
    them chosen by a hash of their position (spread over all inputs, the same on every node),
    stopped once the sample size is reached."""
    keep, sample = counter.keep, cfg.tokenizer_sample
    if sample is not None:
        total = counter.text_bytes if sample.unit == "bytes" else counter.num_docs
        fraction = sample.amount / max(total, 1)
    taken, doc, chosen = 0, -1, True
    for p in iter_corpus(sources, cfg.read):
        if keep is not None and not keep[p.doc]:
            continue
        if sample is not None:
            if p.doc != doc:
                doc, chosen = p.doc, sample_key(p.doc) < fraction
            if not chosen:
                continue
            if taken >= sample.amount:
                return
            taken += len(p.text.encode("utf-8", "surrogatepass")) if sample.unit == "bytes" else p.ends
        yield p.text


def train(cfg: PrepConfig, sources: list[src.Source], counter: ScanResult, progress: bool):
    """Train WordPiece on a second streaming read of the inputs (already validated by scan)."""
    return tk.train_wordpiece(training_texts(cfg, sources, counter), cfg.vocab_size,
                              cfg.lowercase is not False, counter.chars, show_progress=progress)


def file_sha256(path: Path) -> str | None:
    """sha256 hex of a file, or None when it is not there."""
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except (FileNotFoundError, IsADirectoryError):
        return None


def _verify(out: Path, manifest: dict, fix: str = "remove the directory to rebuild it") -> None:
    """A complete output is up to date only with its tokenizer and every shard intact."""
    tok_dir = out / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file() or \
            tk.fingerprint(tok_dir) != manifest.get("tokenizer_fingerprint"):
        raise PrepError(str(out), "tokenizer/ is missing or is not the tokenizer the shards were "
                                  f"encoded with (manifest.json's tokenizer_fingerprint); {fix}")
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            if file_sha256(out / shard["path"]) != shard["sha256"]:
                raise PrepError(str(out), f"{shard['path']} is missing or does not match its sha256 "
                                          f"in manifest.json; {fix}")


def _clear_temp_files(out: Path) -> None:
    for sub in (out, out / "train", out / "valid"):
        if sub.is_dir():
            for p in sub.iterdir():
                if p.name.startswith(".") and p.name.endswith(".tmp"):
                    if p.is_dir():
                        shutil.rmtree(p)
                    else:
                        p.unlink()


def held_out(train_sources: list, valid_sources: list) -> list:
    """The training sources minus the files named for validation.

    `sift-prep corpus/ --valid-input corpus/test.txt` must not train on the held-out file too.
    """
    held = {s.path.resolve() for s in valid_sources if s.path is not None}
    return [s for s in train_sources if s.path is None or s.path.resolve() not in held]


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def check_output_placement(out: Path, input_specs: list[str], sources: list[src.Source]) -> None:
    """The output may not be an input directory, lie inside one, or hold an input file.

    Why: the output's files would become inputs of a rerun, and a failed fresh run removes what
    it wrote, which must never include an input."""
    real_out = out.resolve()
    for d in src.input_directories(input_specs):
        if _inside(real_out, d.resolve()):
            where = "is" if real_out == d.resolve() else "is inside"
            raise PrepError(str(out), f"{where} the input directory {d}; choose an --output "
                                      "outside the inputs")
    for s in sources:
        if s.path is not None and _inside(s.path.resolve(), real_out):
            raise PrepError(str(out), f"holds the input {s.name}; choose an --output outside the inputs")


class OutputLock:
    """Creates the output directory if needed and holds an exclusive flock on it for the run.

    A second sift-prep into the same output is refused at once instead of writing the same
    shards and journal. The kernel drops the lock when the process dies (kill -9 included), so a
    rerun is never locked out. `release(failed=True)` removes the directories this run created
    while they are still empty (a failure before any output: nothing is left behind)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.fd: int | None = None
        self.created: Path | None = None  # the topmost directory this run created
        missing = [p for p in (out, *out.parents) if not os.path.lexists(p)]
        try:
            if missing:
                try:
                    out.mkdir(parents=True)
                    self.created = missing[-1]
                except FileExistsError:  # made by a concurrent run meanwhile: not ours to remove
                    pass
            self.fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
        except NotADirectoryError as e:
            bad = next((p for p in (*reversed(out.parents), out) if p.exists() and not p.is_dir()), out)
            raise PrepError(str(out), f"cannot create the output: {bad} is not a directory") from e
        except OSError as e:
            raise PrepError(str(out), f"cannot create the output directory ({e.strerror or e})") from e
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            self.fd = None
            raise PrepError(str(out), "another sift-prep is writing into this output right now; wait "
                                      "for it to finish or choose another --output") from None
        except OSError as e:  # a filesystem without locks (some network mounts): go on unlocked
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                raise
        if os.fstat(self.fd).st_ino != os.stat(out).st_ino:  # removed and remade meanwhile
            self.release(failed=False)
            raise PrepError(str(out), "was replaced while this run started; rerun")

    def check_writable(self) -> None:
        """Write permission and space for a file, checked before hours of tokenizing."""
        try:
            with tempfile.TemporaryFile(dir=self.out, prefix=".sift-prep-probe-"):
                pass
        except OSError as e:
            raise PrepError(str(self.out), f"cannot write into the output directory "
                                           f"({e.strerror or e})") from e

    def remove_created(self) -> None:
        """Remove everything this run created (a fresh output that failed)."""
        if self.created is not None:
            shutil.rmtree(self.created, ignore_errors=True)
            self.created = None

    def release(self, failed: bool) -> None:
        if failed and self.created is not None:
            # Only directories still empty: whatever else is there was written on purpose.
            p = self.out
            while True:
                try:
                    os.rmdir(p)
                except OSError:
                    break
                if p == self.created:
                    break
                p = p.parent
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def prepare(cfg: PrepConfig, log=print) -> dict:
    """Run (or resume, or confirm) data prep into cfg.output; returns the manifest."""
    progress = sys.stderr.isatty() if cfg.progress is None else cfg.progress
    tk.set_threads(cfg.effective_workers)
    out = cfg.output
    sources = src.resolve_inputs(cfg.inputs) if cfg.inputs else [src.embedded_source()]
    valid_sources = src.resolve_inputs(cfg.valid_inputs, valid_only=True)
    train_sources = held_out(sources, valid_sources)
    if not train_sources:
        raise PrepError("--valid-input", "every input is also a --valid-input: no training documents")
    sources = train_sources + valid_sources
    check_output_placement(out, [*cfg.inputs, *cfg.valid_inputs], sources)
    try:
        out_st = os.stat(out)
    except (FileNotFoundError, NotADirectoryError):  # the latter: OutputLock names the file
        out_st = None
    except OSError as e:
        raise PrepError(str(out), f"cannot access ({e.strerror or e})") from e
    if out_st is not None and not stat.S_ISDIR(out_st.st_mode):
        raise PrepError(str(out), "output exists and is not a directory")
    settings = cfg.settings()
    source_entries = [s.fingerprint() for s in sources]

    lock = OutputLock(out)
    failed = True
    try:
        manifest = _prepare_locked(cfg, out, lock, sources, settings, source_entries, progress, log)
        failed = False
        return manifest
    finally:
        lock.release(failed)


def _prepare_locked(cfg, out, lock, sources, settings, source_entries, progress, log) -> dict:
    status, existing = mf.inspect_output(out)
    if status != "complete":
        lock.check_writable()
    tmp_root = Path(tempfile.mkdtemp(prefix="sift-prep-"))
    tmp_tok_dir = tmp_root / "tokenizer"
    tmp_tok_dir.mkdir()
    try:
        tok, fp = None, None
        if cfg.tokenizer:
            tok = tk.load_tokenizer(cfg.tokenizer)
            tk.special_token_ids(tok)  # [PAD]/[CLS]/[SEP] present: checked before reading inputs
            # Ask the normalizer rather than trusting a config flag.
            lowercase = bool(tok.normalizer and tok.normalizer.normalize_str("A") == "a")
            if cfg.lowercase is not None and cfg.lowercase != lowercase:
                raise PrepError("--lowercase" if cfg.lowercase else "--cased",
                                f"the tokenizer {cfg.tokenizer} is {'un' if lowercase else ''}cased; "
                                "casing comes with a loaded tokenizer, drop the flag")
            settings["lowercase"] = lowercase
            fp = tk.fingerprint_of(tok)
            if existing is not None and existing.get("tokenizer_fingerprint") != fp:
                raise PrepError(str(out), "holds shards made with another tokenizer (fingerprint "
                                          f"{str(existing.get('tokenizer_fingerprint'))[:12]} != {fp[:12]}); "
                                          "choose another --output")
        if existing is not None:
            why = mf.mismatch(existing, settings, source_entries, cfg.part.entry())
            if why:
                raise PrepError(str(out), f"{why}; choose another --output or remove it")
        if status == "complete":
            _verify(out, existing)
            (out / mf.STATE).unlink(missing_ok=True)  # left by a kill between manifest and cleanup
            (out / mf.JOURNAL).unlink(missing_ok=True)
            log(f"sift-prep: {out} is up to date")
            return existing

        # Partial run with its tokenizer in place: reuse it (retraining costs a pass).
        reuse = (status == "partial" and (out / "tokenizer" / "tokenizer.json").is_file()
                 and tk.fingerprint(out / "tokenizer") == existing.get("tokenizer_fingerprint"))
        counter = scan(cfg, sources, progress, collect_chars=not cfg.tokenizer and not reuse)
        if reuse:
            tok = tk.load_tokenizer(str(out / "tokenizer" / "tokenizer.json"))
            fp = existing["tokenizer_fingerprint"]
        elif not cfg.tokenizer:
            tok = train(cfg, sources, counter, progress)
            fp = tk.fingerprint_of(tok)
        hf_files = tk.save_hf_async(tok, tmp_tok_dir, cfg.seq_len, settings["lowercase"])
        return _write(cfg, out, lock, status, existing if reuse else None, sources, settings,
                      source_entries, tok, fp, (tmp_tok_dir, hf_files), counter, progress, log)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)


def write_part_hashes(out: Path, counter: ScanResult, part: pt.Part) -> dict:
    """DOC_HASHES: the sorted hashes of the documents this part wrote, so that `sift-prep merge`
    can check that no document is in two parts; returns its manifest entry."""
    mine = counter.hashes[part.index::part.count][counter.keep[part.index::part.count]]
    data = sh.npy_bytes(np.unique(mine))
    write_atomic(out / mf.DOC_HASHES, data)
    return {"path": mf.DOC_HASHES, "count": int(len(mine)), "sha256": hashlib.sha256(data).hexdigest()}


def _write(cfg, out, lock, status, state, sources, settings, source_entries, tok, fp, hf_save,
           counter, progress, log) -> dict:
    """Pass 2 and the manifest; a fresh output is removed again if this fails."""
    fresh = status == "fresh"
    try:
        specials = tk.special_token_ids(tok)
        vocab_size = tok.get_vocab_size(with_added_tokens=True)
        dtype = sh.dtype_for(vocab_size)
        layout = sh.RowLayout(cfg.seq_len, specials["cls"], specials["sep"], specials["pad"])
        fraction = cfg.effective_valid_fraction
        fallback = counter.fallback
        if state is None:
            (out / "train").mkdir(parents=True, exist_ok=True)
            (out / "valid").mkdir(exist_ok=True)
            _clear_temp_files(out)
            (out / mf.JOURNAL).unlink(missing_ok=True)
            write_json_atomic(out / mf.STATE, {"format": "sift-prep-state", "settings": settings,
                                                  "sources": source_entries, "tokenizer_fingerprint": fp,
                                                  **({"part": cfg.part.entry()} if cfg.part.sliced else {})})
            # tokenizer.json now (a resumed run reuses it); the transformers files at the end.
            if (out / "tokenizer").exists():
                shutil.rmtree(out / "tokenizer")
            (out / ".tokenizer.tmp").mkdir()
            (out / ".tokenizer.tmp" / "tokenizer.json").write_bytes(tk.tokenizer_json(tok))
            os.replace(out / ".tokenizer.tmp", out / "tokenizer")
            state = {"splits": {name: mf.empty_split() for name in mf.SPLITS}}
        else:
            _clear_temp_files(out)
            state = {"splits": mf.replay_journal(out)}
            done = sum(len(s["shards"]) for s in state["splits"].values())
            log(f"sift-prep: resuming {out} ({done} shards already written)")

        kill_at, written = _kill_at_shard(), 0  # shard files this process wrote (the test hook)
        packers = {}
        for name in mf.SPLITS:
            s = state["splits"][name]
            packers[name] = sh.Packer(layout, cfg.shard_rows, dtype, sh.Position(*s["next"]))

        def flush(name: str, rows: np.ndarray | None, after: sh.Position | None, complete: bool = False) -> None:
            nonlocal written
            s = state["splits"][name]
            entry = None if rows is None else sh.write_shard(out, name, len(s["shards"]), rows)
            record = {"split": name, "shard": entry, "complete": complete,
                      "num_tokens": 0 if rows is None else sh.count_tokens(rows, layout.pad_id),
                      "next": s["next"] if after is None else [after.doc, after.skip]}
            if entry is not None:
                written += 1
                if written == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)  # the shard is on disk, its record is not
                s["shards"].append(entry)
            s["num_tokens"] += record["num_tokens"]
            s["next"], s["complete"] = record["next"], complete
            # The shard is on disk before the journal names it: a kill in between rewrites it.
            mf.append_journal(out, record)

        def encode(batch: list[tuple[str, Piece]]) -> None:
            encodings = tok.encode_batch_fast([p.text for _, p in batch], add_special_tokens=False)
            for (name, p), enc in zip(batch, encodings):
                packers[name].add(p.doc, np.asarray(enc.ids, dtype=np.uint32), p.ends)
                while packers[name].ready():
                    flush(name, *packers[name].take_shard())

        part, keep = cfg.part, counter.keep
        # Documents of this part: written to each split, dropped as duplicates. Counted over the
        # whole stream (skipped shards of a resumed run too), so a resume counts the same.
        counts = {"train": 0, "valid": 0, "duplicates": 0}

        def batches() -> Iterator[tuple[list[tuple[str, Piece]], int]]:
            """(pieces to encode with their split, documents passed): runs in the reader thread."""
            batch: list[tuple[str, Piece]] = []
            chars = docs = 0
            for p in iter_corpus(sources, cfg.read):
                docs += p.ends
                if not part.holds(p.doc):
                    continue  # another node's document
                if keep is not None and not keep[p.doc]:
                    counts["duplicates"] += p.ends
                    continue
                name = split_of(p.doc, p.valid_only, fraction, fallback)
                counts[name] += p.ends
                if state["splits"][name]["complete"] or not packers[name].wants(p.doc):
                    continue  # already in shards written by an earlier, killed run
                batch.append((name, p))
                chars += len(p.text)
                if chars >= cfg.batch_chars:
                    yield batch, docs
                    batch, chars, docs = [], 0, 0
            yield batch, docs

        with _bar(progress, desc="tokenize", unit="doc", total=counter.num_docs) as bar:
            for batch, docs in prefetch(batches(), depth=2):
                if batch:
                    encode(batch)
                bar.update(docs)
        for name in mf.SPLITS:
            if not state["splits"][name]["complete"]:
                last = packers[name].finish()
                flush(name, *(last or (None, None)), complete=True)
        if not state["splits"]["train"]["shards"] and not part.sliced:  # a part may hold none
            raise PrepError(str(out), "no training documents (every document went to valid)")

        hf_dir, hf_future = hf_save
        hf_future.result()
        for f in sorted(hf_dir.iterdir()):  # our tokenizer.json stays: it is what encoded the shards
            if f.name != "tokenizer.json":
                write_atomic(out / "tokenizer" / f.name, f.read_bytes())

        splits = {}
        for name in mf.SPLITS:
            s = state["splits"][name]
            splits[name] = {"num_sequences": sum(x["num_sequences"] for x in s["shards"]),
                            "num_tokens": s["num_tokens"], "shards": s["shards"]}
        documents = {"seen": sum(counts.values()), **counts}
        hashes_entry = None
        if keep is not None and part.sliced:
            hashes_entry = write_part_hashes(out, counter, part)
        manifest = mf.build_manifest(
            seq_len=cfg.seq_len, dtype=dtype.name, vocab_size=vocab_size,
            lowercase=settings["lowercase"], special_tokens=specials, tokenizer_fingerprint=fp,
            splits=splits, sources=source_entries, settings=settings, documents=documents,
            part=part.entry(), doc_hashes=hashes_entry)
        write_json_atomic(out / mf.MANIFEST, manifest)
        (out / mf.STATE).unlink()
        (out / mf.JOURNAL).unlink()
        t, v = splits["train"], splits["valid"]
        what = f" ({part.name()})" if part.sliced else ""
        dropped = f", {counts['duplicates']} duplicate documents dropped" if keep is not None else ""
        log(f"sift-prep: wrote {out}{what}: train {t['num_sequences']} x {cfg.seq_len} "
            f"({len(t['shards'])} shards), valid {v['num_sequences']} x {cfg.seq_len}, "
            f"vocab {vocab_size}{dropped}")
        return manifest
    except PrepError:
        # Bad input found only now (e.g. a file changed between passes): leave no partial output.
        if fresh:
            if lock.created is not None:
                lock.remove_created()
            else:
                for p in out.iterdir():
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
        raise
