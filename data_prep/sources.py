"""Input discovery and decoding: user input specs -> `Source`s -> documents as text pieces.

Owns: resolving paths, directories (recursive), globs and `hf:NAME[:CONFIG]`; decompression
(.gz/.bz2/.xz, orthogonal to the format); formats (plain text, JSONL, Parquet, Hugging Face
`datasets`); decoding with strict/replace error handling; document boundaries; input validation
(missing path, empty file, binary file, undecodable bytes, missing text field).

Memory stays bounded: files are read in 1 MiB chunks and a long document is cut into pieces of
at most `max_piece_chars` characters at line ends. Cutting at a line end changes no token for a
BERT-style pre-tokenizer (a newline is whitespace, and whitespace always splits words), so the
pieces of a document tokenize to exactly the tokens of the whole document. A line longer than a
piece (a plain-text file with no line break for hundreds of MB) is cut before the last whitespace
within the piece, which changes no token either, or, with no whitespace in reach, at the piece
size (the only cut that can split a word). JSONL records and `--doc-boundary blank-line` lines
are read a line at a time: a line over `MAX_LINE_CHARS` is refused, naming the file and the line,
rather than allocated.
"""
from __future__ import annotations

import bz2
import codecs
import glob
import gzip
import hashlib
import json
import lzma
import os
import re
import stat
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

from data_prep.errors import PrepError

COMPRESSIONS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
JSONL_SUFFIXES = {".jsonl", ".ndjson", ".json"}
PARQUET_SUFFIXES = {".parquet"}
# What a directory walk picks up (explicitly named files are read whatever their suffix).
DIRECTORY_SUFFIXES = {".txt", ".text", ".md", ".rst", ".jsonl", ".ndjson", ".parquet"}
EMBEDDED_CORPUS = Path(__file__).resolve().parent / "corpus" / "state_union.jsonl.xz"
EMBEDDED_NAME = "embedded:state_union.jsonl.xz"

_CHUNK_BYTES = 1 << 20
# JSONL records and blank-line mode read whole lines: a longer one is refused (a plain-text file
# in the default --doc-boundary file mode has no such limit: its lines are cut into pieces).
MAX_LINE_CHARS = 64 << 20
# Where an over-long line may be cut (before the character): whitespace to Python, to Rust's
# char::is_whitespace (BertNormalizer, BertPreTokenizer, Whitespace) and to byte-level regexes
# alike. Not "\x1f" & co.: BertNormalizer deletes those as control characters, gluing words.
# Line breaks are "\n" by the time pieces are cut, and "\n" is looked for first.
_CUT_SPACES = " \t\u3000\xa0\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u202f\u205f\u1680"
_SNIFF_BYTES = 8192
# Line breaks Python's str.splitlines knows but a plain "\n" split does not. BertNormalizer
# deletes control characters such as NEL (U+0085) instead of treating them as spaces, which would
# glue the words on either side together (webtext/wine.txt uses NEL line ends).
_BREAK_CHARS = "\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
_LINE_BREAKS = re.compile(f"[{_BREAK_CHARS}]")


def _unify_line_breaks(text: str) -> str:
    # `c in text` is a fast memchr-like scan; most text has none of these, so skip the regex
    # (str.translate with a dict costs ~30 ns a character, the regex ~15).
    if any(c in text for c in _BREAK_CHARS):
        text = _LINE_BREAKS.sub("\n", text.replace("\r\n", "\n"))
    return text


@dataclass(frozen=True)
class ReadOptions:
    """How sources are decoded and cut into documents."""

    text_field: str = "text"
    """JSONL / Parquet / HF field holding the document text."""
    encoding_errors: str = "strict"
    """"strict": undecodable UTF-8 is an error naming the byte offset; "replace": U+FFFD."""
    doc_boundary: str = "file"
    """Plain text: "file" (one file = one document) or "blank-line" (blank-line separated blocks)."""
    max_piece_chars: int = 65536
    """Longest piece of a document handed to the tokenizer at once (cut at line ends)."""

    def __post_init__(self) -> None:
        if self.encoding_errors not in ("strict", "replace"):
            raise ValueError(f"encoding_errors must be strict or replace, not {self.encoding_errors!r}")
        if self.doc_boundary not in ("file", "blank-line"):
            raise ValueError(f"doc_boundary must be file or blank-line, not {self.doc_boundary!r}")
        if not self.text_field:
            raise ValueError("text_field must not be empty")
        if self.max_piece_chars < 1:
            raise ValueError("max_piece_chars must be >= 1")


@dataclass(frozen=True)
class Source:
    """One input: a file (any format, maybe compressed) or a Hugging Face dataset."""

    name: str
    """What messages and the manifest call it: the path as found, or `hf:NAME[:CONFIG]`."""
    kind: str
    """"text", "jsonl", "parquet" or "hf"."""
    path: Path | None = None
    """The file (None for "hf")."""
    compression: str | None = None
    """".gz", ".bz2", ".xz" or None."""
    valid_only: bool = False
    """Given with --valid-input: every document goes to the valid split."""

    def fingerprint(self) -> dict:
        """Manifest entry: name, kind, size in bytes and sha256 of the raw file."""
        entry = {"path": self.name, "kind": self.kind, "split": "valid" if self.valid_only else "auto"}
        if self.path is not None:
            try:
                with open(self.path, "rb") as f:
                    entry["bytes"] = os.fstat(f.fileno()).st_size
                    entry["sha256"] = hashlib.file_digest(f, "sha256").hexdigest()
            except OSError as e:
                raise PrepError(self.name, f"cannot read ({_why(e)})") from e
        return entry


def classify(path: Path) -> tuple[str, str | None]:
    """(kind, compression) from a file name: the format suffix sits before the compression one."""
    suffixes = [s.lower() for s in path.suffixes]
    compression = suffixes.pop() if suffixes and suffixes[-1] in COMPRESSIONS else None
    fmt = suffixes[-1] if suffixes else ""
    if fmt in JSONL_SUFFIXES:
        return "jsonl", compression
    if fmt in PARQUET_SUFFIXES:
        return "parquet", compression
    return "text", compression


def _wanted_in_directory(path: Path) -> bool:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes.pop()
    return bool(suffixes) and suffixes[-1] in DIRECTORY_SUFFIXES


def _why(e: OSError) -> str:
    """An OSError's reason without the path it repeats ("Permission denied")."""
    return e.strerror or str(e) or type(e).__name__


def _stat(path: Path, name: str) -> os.stat_result | None:
    """stat() following links; None when nothing is there; a PrepError when it cannot be known.

    Why not Path.exists()/is_file(): they answer False for a path they may not look at (a
    parent without search permission), which would read as "no such file" or be skipped."""
    try:
        return path.stat()
    except FileNotFoundError:
        if path.is_symlink():
            raise PrepError(name, "broken symbolic link") from None
        return None
    except NotADirectoryError:
        return None
    except OSError as e:
        raise PrepError(name, f"cannot access ({_why(e)})") from e


def _check_readable(path: Path, name: str) -> None:
    """Open the file once: an unreadable input stops the run before anything is written."""
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise PrepError(name, f"cannot read ({_why(e)})") from e


def _walk(directory: Path) -> list[Path]:
    """Wanted files under `directory`, sorted, symbolic links followed (each directory once).

    Every directory must be readable and every wanted name a readable regular file: a corpus
    read in part without a word is the worst outcome, so those are errors, not skips."""

    def fail(e: OSError) -> None:
        raise PrepError(str(e.filename or directory), f"cannot read directory ({_why(e)})") from e

    found = []
    visited: set[tuple[int, int]] = set()
    for root, dirs, files in os.walk(directory, onerror=fail, followlinks=True):
        st = _stat(Path(root), root)
        if st is None or (st.st_dev, st.st_ino) in visited:  # a link back up the tree
            dirs[:] = []
            continue
        visited.add((st.st_dev, st.st_ino))
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            p = Path(root) / name
            if name.startswith(".") or not _wanted_in_directory(p):
                continue
            fst = _stat(p, str(p))
            if fst is None:
                raise PrepError(str(p), "vanished while the directory was read")
            if stat.S_ISDIR(fst.st_mode):
                continue  # a link to a directory os.walk did not list as one: walked elsewhere
            if not stat.S_ISREG(fst.st_mode):
                raise PrepError(str(p), "not a regular file (named like an input)")
            _check_readable(p, str(p))
            found.append(p)
    return found


def _file_source(path: Path, valid_only: bool) -> Source:
    kind, compression = classify(path)
    return Source(name=str(path), kind=kind, path=path, compression=compression, valid_only=valid_only)


def resolve_inputs(specs: Iterable[str], valid_only: bool = False) -> list[Source]:
    """Input specs (files, directories, globs, `hf:NAME[:CONFIG]`) -> sources in a fixed order.

    Directories are walked recursively in sorted order (hidden entries and files without a text,
    JSONL or Parquet suffix skipped); globs are expanded sorted. A file found twice is read once.
    """
    sources: list[Source] = []
    seen: set[Path] = set()

    def add(path: Path) -> None:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            sources.append(_file_source(path, valid_only))

    for spec in specs:
        if not spec:
            raise PrepError('""', "empty input path (would mean the current directory)")
        if spec.startswith("hf:"):
            if len(spec) <= 3:
                raise PrepError(spec, "expected hf:NAME or hf:NAME:CONFIG")
            sources.append(Source(name=spec, kind="hf", valid_only=valid_only))
            continue
        path = Path(spec)
        st = _stat(path, spec)
        if st is not None and stat.S_ISDIR(st.st_mode):
            files = _walk(path)
            if not files:
                raise PrepError(spec, "directory holds no text, JSONL or Parquet files "
                                      f"(looked for {', '.join(sorted(DIRECTORY_SUFFIXES))})")
            for f in files:
                add(f)
        elif st is not None and stat.S_ISREG(st.st_mode):
            if spec.endswith("/"):  # Path() drops the slash; the shell would say ENOTDIR
                raise PrepError(spec, "not a directory (a file named with a trailing /)")
            _check_readable(path, spec)
            add(path)
        elif st is not None:
            raise PrepError(spec, "not a regular file or directory")
        elif glob.has_magic(spec):
            matches = sorted(glob.glob(spec, recursive=True))
            if not matches:
                raise PrepError(spec, "no file matches this pattern")
            found_any = False
            for m in matches:
                mp = Path(m)
                mst = _stat(mp, m)
                if mst is None:
                    raise PrepError(m, "vanished while the pattern was expanded")
                if stat.S_ISDIR(mst.st_mode):
                    files = _walk(mp)
                elif stat.S_ISREG(mst.st_mode):
                    _check_readable(mp, m)
                    files = [mp]
                else:
                    raise PrepError(m, "not a regular file or directory")
                found_any |= bool(files)
                for f in files:
                    add(f)
            if not found_any:
                raise PrepError(spec, "the pattern matches only directories without text, JSONL "
                                      "or Parquet files")
        else:
            raise PrepError(spec, "no such file or directory")
    return sources


def input_directories(specs: Iterable[str]) -> list[Path]:
    """The directories that `resolve_inputs` walks for these specs (for the output-overlap check)."""
    dirs = []
    for spec in specs:
        if not spec or spec.startswith("hf:"):
            continue
        if os.path.isdir(spec):
            dirs.append(Path(spec))
        elif not os.path.exists(spec) and glob.has_magic(spec):
            dirs.extend(Path(m) for m in sorted(glob.glob(spec, recursive=True)) if os.path.isdir(m))
    return dirs


def embedded_source() -> Source:
    """The embedded default corpus: State of the Union addresses 1945-2006, one JSON line each.

    Made once from nltk's state_union/*.txt (65 files, sorted by name): bytes decoded as UTF-8
    with errors="replace" (six files hold a few Latin-1/CP-1252 bytes), CRLF turned into LF, each
    written as {"text": ..., "source": file name}, xz preset 9 (0.54 MB). Public domain.
    """
    return Source(name=EMBEDDED_NAME, kind="jsonl", path=EMBEDDED_CORPUS, compression=".xz")


# ---------------------------------------------------------------------------------------------
# Reading


def _open_raw(source: Source) -> BinaryIO:
    assert source.path is not None
    opener = COMPRESSIONS.get(source.compression or "", open)
    return opener(source.path, "rb")


def _raw_chunks(source: Source) -> Iterator[bytes]:
    """Decompressed bytes in chunks; a NUL byte in the first 8 KiB means a binary file."""
    try:
        with _open_raw(source) as f:
            first = True
            while chunk := f.read(_CHUNK_BYTES):
                if first and b"\0" in chunk[:_SNIFF_BYTES]:
                    raise PrepError(source.name, "binary file (NUL bytes), not text")
                first = False
                yield chunk
    except _READ_ERRORS as e:
        raise PrepError(source.name, f"cannot read ({_error_name(e)}: {_one_line(e)})") from e


def _error_name(e: BaseException) -> str:
    return "zlib.error" if isinstance(e, zlib.error) else type(e).__name__


# What a damaged or unreadable file raises while read or decompressed (zlib.error: a corrupt
# deflate stream inside a valid .gz header).
_READ_ERRORS = (OSError, EOFError, lzma.LZMAError, zlib.error)


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return (str(e).strip().splitlines() or [""])[0][:300]


def _decoded(source: Source, errors: str) -> Iterator[str]:
    """Decoded text in chunks of about 1 MiB (universal newlines: NEL etc. become "\\n").

    A chunk may end anywhere in a line: nothing here holds more than one chunk, however long
    the line."""
    if source.path is not None and source.path.stat().st_size == 0:
        raise PrepError(source.name, "empty file")
    decoder = codecs.getincrementaldecoder("utf-8-sig")(errors)  # a leading BOM is no text
    offset = 0
    rest = ""
    for chunk in _raw_chunks(source):
        try:
            text = decoder.decode(chunk)
        except UnicodeDecodeError as e:
            raise PrepError(source.name, f"invalid UTF-8 at byte {offset + e.start} "
                                         "(use --encoding-errors replace to substitute U+FFFD)") from e
        offset += len(chunk)
        if "\0" in text:
            raise PrepError(source.name, "binary file (NUL bytes), not text")
        text = rest + text
        # A chunk may end between "\r" and "\n": hold the "\r" back so CRLF stays one line end.
        hold = 1 if text.endswith("\r") else 0
        text, rest = text[: len(text) - hold], text[len(text) - hold:]
        text = _unify_line_breaks(text)
        if text:
            yield text
    try:
        tail = decoder.decode(b"", final=True)
    except UnicodeDecodeError as e:
        raise PrepError(source.name, f"invalid UTF-8 at byte {offset + e.start} (truncated "
                                     "character; use --encoding-errors replace)") from e
    rest = _unify_line_breaks(rest + tail)
    if rest:
        yield rest


def _too_long(source: Source, line: int, max_line_chars: int) -> PrepError:
    what = "a JSON record" if source.kind == "jsonl" else "a line (--doc-boundary blank-line)"
    return PrepError(source.name, f"line {line}: longer than {max_line_chars} characters, the most "
                                  f"sift-prep reads as {what}; refusing to hold it in memory")


def _lines(source: Source, errors: str, max_line_chars: int = MAX_LINE_CHARS) -> Iterator[str]:
    """Decoded lines, each with its "\\n" (the last one may lack it); a line over
    `max_line_chars` characters is a PrepError naming its number, found before it is joined."""
    parts: list[str] = []  # the line being read, over several chunks
    size = 0
    n = 0  # lines yielded
    for text in _decoded(source, errors):
        lines = text.split("\n")  # every line break is "\n" by now
        tail = lines.pop()  # the start of a line that goes on in the next chunk (or "")
        if lines:
            if parts:
                if size + len(lines[0]) > max_line_chars:
                    raise _too_long(source, n + 1, max_line_chars)
                lines[0] = "".join(parts) + lines[0]
                parts, size = [], 0
            for line in lines:
                n += 1
                if len(line) > max_line_chars:
                    raise _too_long(source, n, max_line_chars)
                yield line + "\n"
        if tail:
            parts.append(tail)
            size += len(tail)
            if size > max_line_chars:
                raise _too_long(source, n + 1, max_line_chars)
    if parts:
        yield "".join(parts)


def _cut_at(text: str, pos: int, max_chars: int) -> int:
    """Where the piece starting at `pos` ends: after the last line end in reach, else before the
    last whitespace in reach (it opens the next piece, as byte-level and metaspace pre-tokenizers
    want), else at the size."""
    end = pos + max_chars
    cut = text.rfind("\n", pos, end) + 1
    if cut > pos:
        return cut
    cut = pos
    for c in _CUT_SPACES:  # each search only looks past the best cut so far
        cut = max(cut, text.rfind(c, cut + 1, end))
    return cut if cut > pos else end


def _cut_pieces(blocks: Iterable[str], max_chars: int) -> Iterator[tuple[str, bool]]:
    """One document's text blocks -> (piece, ends_document) with pieces of at most max_chars (see
    `_cut_at`); whitespace-only documents yield nothing. Holds at most a block and a piece."""
    pending = ""
    started = False  # this document already yielded a piece
    for block in blocks:
        pending += block
        pos = 0
        while len(pending) - pos >= max_chars:
            cut = _cut_at(pending, pos, max_chars)
            piece, pos = pending[pos:cut], cut
            if started or not piece.isspace():
                yield piece, False
                started = True
        pending = pending[pos:]
    if started or (pending and not pending.isspace()):
        yield pending, True


def _blank_line_pieces(lines: Iterator[str], max_chars: int) -> Iterator[tuple[str, bool]]:
    """Lines -> (piece, ends_document) with blank (whitespace-only) lines between documents."""
    buf: list[str] = []
    size = 0
    started = False  # this document already yielded a piece
    for line in lines:
        if line.isspace() or not line:
            if buf or started:
                yield "".join(buf), True
            buf, size, started = [], 0, False
            continue
        if len(line) > max_chars:  # an over-long line: cut like plain text, the document goes on
            if buf:
                yield "".join(buf), False
                buf, size = [], 0
            for piece, _ in _cut_pieces([line], max_chars):
                if piece:
                    yield piece, False
                    started = True
            continue
        buf.append(line)
        size += len(line)
        if size >= max_chars:
            yield "".join(buf), False
            buf, size, started = [], 0, True
    if buf or started:
        yield "".join(buf), True


def _split_record(text: str, max_chars: int) -> Iterator[tuple[str, bool]]:
    """One in-memory record -> pieces of at most max_chars (see `_cut_at`)."""
    text = _unify_line_breaks(text)
    if len(text) <= max_chars:
        yield text, True
        return
    yield from _cut_pieces([text], max_chars)


def _record_text(record: object, field: str, where: str, subject: str) -> str | None:
    if not isinstance(record, dict):
        raise PrepError(subject, f"{where}: expected a JSON object, got {type(record).__name__}")
    if field not in record:
        raise PrepError(subject, f"{where}: no {field!r} field (choose one with --text-field; "
                                 f"fields here: {', '.join(map(str, list(record)[:10]))})")
    value = record[field]
    if value is None:
        return None
    if not isinstance(value, str):
        raise PrepError(subject, f"{where}: field {field!r} is {type(value).__name__}, not text")
    return value


def _jsonl_records(source: Source, opts: ReadOptions) -> Iterator[str]:
    for n, line in enumerate(_lines(source, opts.encoding_errors), start=1):
        if n == 1:
            line = line.removeprefix("\ufeff")  # a byte order mark (Windows tools write one)
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise PrepError(source.name, f"line {n}: not valid JSON ({e.msg})") from e
        except (ValueError, RecursionError) as e:  # an integer of 4300+ digits, nesting too deep
            raise PrepError(source.name, f"line {n}: not usable JSON ({_one_line(e)})") from e
        text = _record_text(record, opts.text_field, f"line {n}", source.name)
        if text is not None:
            yield text


def _parquet_records(source: Source, opts: ReadOptions) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if source.path.stat().st_size == 0:
        raise PrepError(source.name, "empty file")
    try:
        with _open_raw(source) as f:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            if opts.text_field not in names:
                raise PrepError(source.name, f"no {opts.text_field!r} column (choose one with "
                                             f"--text-field; columns: {', '.join(names[:10])})")
            for batch in pf.iter_batches(batch_size=1024, columns=[opts.text_field]):
                for value in batch.column(0).to_pylist():
                    if value is not None and not isinstance(value, str):
                        raise PrepError(source.name, f"column {opts.text_field!r} holds "
                                                     f"{type(value).__name__}, not text")
                    if value is not None:
                        yield value
    except (pa.ArrowException, *_READ_ERRORS) as e:
        raise PrepError(source.name, f"cannot read Parquet ({_error_name(e)}: {_one_line(e)})") from e


def _hf_records(source: Source, opts: ReadOptions) -> Iterator[str]:
    name, _, config = source.name[3:].partition(":")
    try:
        import datasets

        from data_prep.tokenizer import quiet_hub_logs

        quiet_hub_logs()
        datasets.logging.set_verbosity_error()
        ds = datasets.load_dataset(name, config or None, split="train", streaming=True)
        records = iter(ds)
        first = next(records, None)
    except Exception as e:  # datasets raises many types (network, hub, config): all are "cannot load"
        msg = (str(e).strip().splitlines() or [""])[0][:300]
        raise PrepError(source.name, f"cannot load Hugging Face dataset ({type(e).__name__}: {msg})") from e
    if first is None:
        return
    text = _record_text(first, opts.text_field, "record 0", source.name)
    if text is not None:
        yield text
    for n, record in enumerate(records, start=1):
        text = _record_text(record, opts.text_field, f"record {n}", source.name)
        if text is not None:
            yield text


def iter_pieces(source: Source, opts: ReadOptions) -> Iterator[tuple[str, bool]]:
    """A source's documents as (piece, ends_document) pairs; raises PrepError on bad input.

    A source that yields no document with text (an empty file, only whitespace, every record
    empty) is an error: it almost always means the wrong file or the wrong --text-field.
    """
    if source.kind == "text" and opts.doc_boundary == "blank-line":
        pieces = _blank_line_pieces(_lines(source, opts.encoding_errors), opts.max_piece_chars)
    elif source.kind == "text":
        pieces = _cut_pieces(_decoded(source, opts.encoding_errors), opts.max_piece_chars)
    else:
        records = {"jsonl": _jsonl_records, "parquet": _parquet_records, "hf": _hf_records}[source.kind]
        pieces = (p for text in records(source, opts) if text.strip()
                  for p in _split_record(text, opts.max_piece_chars))
    any_text = False
    for piece in pieces:
        any_text = True
        yield piece
    if not any_text:
        raise PrepError(source.name, "no text (only whitespace or empty records)")
