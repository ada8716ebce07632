"""manifest.json (the finished output's contract) and the resume state of a run in progress.

Owns: the manifest's layout (format "sift-shards", format_version 1), atomic JSON writes, reading
an existing output directory to say what it is (fresh, complete, in progress, or foreign), and
the comparison that decides whether an existing output may be reused.
Reads no corpus.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path

from data_prep import __version__
from data_prep.errors import PrepError
from data_prep.io_util import write_text_atomic

FORMAT = "sift-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STATE = ".sift-prep-state.json"  # a run in progress: settings, sources, tokenizer fingerprint
JOURNAL = ".sift-prep-journal.jsonl"  # one line per finished shard, appended (O(1) per shard)
DOC_HASHES = "doc_hashes.npy"  # a --dedup part's document hashes, for `sift-prep merge`
SPLITS = ("train", "valid")
# Settings that decide the trained tokenizer: a change there means "another tokenizer".
TOKENIZER_SETTINGS = ("tokenizer", "vocab_size", "lowercase", "tokenizer_sample")


def empty_split() -> dict:
    """Progress of one split: shards written, non-pad tokens, where the next shard starts."""
    return {"shards": [], "num_tokens": 0, "next": [0, 0], "complete": False}


def append_journal(out: Path, record: dict) -> None:
    """Append one shard record and fsync: after this returns, a resumed run skips that shard."""
    with open(out / JOURNAL, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def replay_journal(out: Path) -> dict:
    """Per-split progress from the journal; a torn last line (killed mid-append) is dropped and
    the journal rewritten without it, so later appends start on a clean line."""
    splits = {name: empty_split() for name in SPLITS}
    good = []
    try:
        lines = (out / JOURNAL).read_text().splitlines()
    except FileNotFoundError:
        lines = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break
        s = splits[record["split"]]
        if record["shard"] is not None:
            if record["shard"]["path"] != f"{record['split']}/shard_{len(s['shards']):06d}.npy":
                break  # out of order: trust nothing after it
            s["shards"].append(record["shard"])
        s["num_tokens"] += record["num_tokens"]
        s["next"] = record["next"]
        s["complete"] = record["complete"]
        good.append(line)
    if len(good) != len(lines):
        write_text_atomic(out / JOURNAL, "".join(g + "\n" for g in good))
    return splits


def read_json(path: Path) -> dict | None:
    """The object in `path`, or None when the file is absent."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PrepError(str(path), f"unreadable JSON ({e}); remove the output directory") from e
    if not isinstance(obj, dict):
        raise PrepError(str(path), f"not a JSON object (a {type(obj).__name__}); remove the output "
                                   "directory")
    return obj


def inspect_output(out: Path) -> tuple[str, dict | None]:
    """("fresh", None) | ("complete", manifest) | ("partial", state); foreign dirs are an error."""
    if not out.exists():
        return "fresh", None
    if not out.is_dir():
        raise PrepError(str(out), "output exists and is not a directory")
    manifest = read_json(out / MANIFEST)
    if manifest is not None:
        if manifest.get("format") != FORMAT:
            raise PrepError(str(out), f"{MANIFEST} is not a {FORMAT} manifest; refusing to write here")
        return "complete", manifest
    state = read_json(out / STATE)
    if state is not None:
        return "partial", state
    if any(out.iterdir()):
        raise PrepError(str(out), "output directory is not empty and holds no sift-prep output; "
                                  "refusing to write into it")
    return "fresh", None


def describe_part(part: dict | None) -> str:
    """"part 2 of 4" for a manifest's "part" entry; a whole run has none."""
    return "all documents (no --num-shards)" if part is None else f"part {part['index']} of {part['count']}"


def mismatch(existing: dict, settings: dict, sources: list[dict], part: dict | None = None) -> str | None:
    """Why an existing output (manifest or state) cannot be reused for this run, or None."""
    if existing.get("part") != part:
        return f"holds {describe_part(existing.get('part'))}, this run is {describe_part(part)}"
    old = existing.get("settings", {})
    tok_diff = [k for k in TOKENIZER_SETTINGS if old.get(k) != settings.get(k)]
    if tok_diff:
        what = ", ".join(f"{k} {old.get(k)!r} != {settings.get(k)!r}" for k in tok_diff)
        return f"holds shards made with another tokenizer ({what})"
    diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
    if diff:
        return f"holds shards made with other settings ({', '.join(diff)})"
    if existing.get("sources") != sources:
        return "holds shards made from other inputs (paths, sizes or sha256 differ)"
    return None


def build_manifest(*, seq_len: int, dtype: str, vocab_size: int, lowercase: bool,
                   special_tokens: dict, tokenizer_fingerprint: str, splits: dict,
                   sources: list[dict], settings: dict, documents: dict | None = None,
                   part: dict | None = None, doc_hashes: dict | None = None,
                   parts: list[dict] | None = None) -> dict:
    """The manifest object; `created` is the only field that differs between identical runs.

    Keys added since format_version 1 are optional (readers of version 1 ignore them):
    `documents` {seen, duplicates, train, valid}: counts of documents (of this part);
    `part` {index, count}: a slice made with --num-shards; `doc_hashes` {path, count, sha256}:
    a --dedup part's document hashes; `parts`: the parts a `sift-prep merge` output lists."""
    optional = {"documents": documents, "part": part, "doc_hashes": doc_hashes, "parts": parts}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tool_version": __version__,
        "seq_len": seq_len,
        "dtype": dtype,
        "vocab_size": vocab_size,
        "lowercase": lowercase,
        "special_tokens": special_tokens,
        "tokenizer_fingerprint": tokenizer_fingerprint,
        "splits": splits,
        "sources": sources,
        "settings": settings,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **{k: v for k, v in optional.items() if v is not None},
    }
