"""Checksums of a checkpoint's files, written with it and checked before a resume, fork or export.

`checksums.json` in a tag directory lists every other file with its size, the sha256 of the whole
file, and the sha256 of a sample of it (`SAMPLE_BLOCKS` blocks of `SAMPLE_BYTES`, spread evenly,
first and last included). Two ways to check:
- `sample` (the default): sizes, the whole sha256 of files up to `FULL_HASH_BELOW` (64 MiB: tens
  of milliseconds) and the sampled hashes of larger ones. It reads at most 64 MiB per file, so it
  costs little next to loading; in a large file it finds truncation, a file replaced by another,
  and any damage larger than about 1/64 of the file, but can miss a few flipped bytes between the
  sampled blocks (the loaded weights are then checked for NaN/Inf, which is what such damage
  usually produces).
- `sha256`: every byte (about a second per GB).

Why rank 0 hashes everything it sees after the write barrier: the files are already in the page
cache, and one listing keeps the manifest simple. On node-local disks (multi-node without a shared
file system) the manifest covers only rank 0's node, as the other nodes' files are not visible there.

File-system only: no torch, no process group.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

MANIFEST = "checksums.json"
SAMPLE_BLOCKS = 64
SAMPLE_BYTES = 64 * 1024
FULL_HASH_BELOW = 64 * 1024 * 1024  # smaller files are hashed whole even in `sample` mode
CHUNK = 8 * 1024 * 1024


def sample_offsets(size: int) -> list[int]:
    """Where the sampled blocks start: evenly spread, the first at 0 and the last at the end."""
    if size <= SAMPLE_BLOCKS * SAMPLE_BYTES:
        return [0]  # small file: the one "block" is the whole file
    last = size - SAMPLE_BYTES
    return [round(i * last / (SAMPLE_BLOCKS - 1)) for i in range(SAMPLE_BLOCKS)]


def sample_digest(path: Path, size: int) -> str:
    """sha256 of the size and the sampled blocks of `path`."""
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        for offset in sample_offsets(size):
            f.seek(offset)
            h.update(f.read(size if size <= SAMPLE_BLOCKS * SAMPLE_BYTES else SAMPLE_BYTES))
    return h.hexdigest()


def full_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def files_of(tag_dir: Path) -> list[Path]:
    """Every file under `tag_dir` but the manifest (DeepSpeed writes subdirectories for some
    layouts), in a stable order."""
    out = []
    for dirpath, _, names in os.walk(tag_dir):
        for name in names:
            p = Path(dirpath) / name
            if p.name != MANIFEST or p.parent != Path(tag_dir):
                out.append(p)
    return sorted(out)


def write_manifest(tag_dir: Path) -> Path:
    """Hash every file of `tag_dir` into its checksums.json (written atomically); returns it."""
    from data_prep.io_util import write_json_atomic

    tag_dir = Path(tag_dir)
    files = {}
    for p in files_of(tag_dir):
        size = p.stat().st_size
        files[p.relative_to(tag_dir).as_posix()] = {
            "size": size, "sha256": full_digest(p), "sample_sha256": sample_digest(p, size)}
    path = tag_dir / MANIFEST
    write_json_atomic(path, {"version": 1, "sample_blocks": SAMPLE_BLOCKS,
                             "sample_bytes": SAMPLE_BYTES, "files": files})
    return path


def damaged(tag_dir: Path, full: bool = False) -> list[str] | None:
    """The files of `tag_dir` that differ from its checksums.json (missing, another size, another
    hash: `full` hashes every byte, else the sample); None when there is no manifest (a checkpoint
    written before checksums were)."""
    tag_dir = Path(tag_dir)
    try:
        manifest = json.loads((tag_dir / MANIFEST).read_text())
        listed = manifest["files"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return [MANIFEST]
    if not isinstance(listed, dict) or not all(
            isinstance(w, dict) and isinstance(w.get("size"), int) and isinstance(w.get("sha256"), str)
            and isinstance(w.get("sample_sha256"), str) for w in listed.values()):
        return [MANIFEST]  # damaged: its entries cannot be checked against
    bad = []
    for name, want in sorted(listed.items()):
        p = tag_dir / name
        try:
            size = p.stat().st_size
            if size != want["size"]:
                bad.append(f"{name} (size {size}, written {want['size']})")
            elif full or size <= FULL_HASH_BELOW:
                if full_digest(p) != want["sha256"]:
                    bad.append(f"{name} (checksum)")
            elif sample_digest(p, size) != want["sample_sha256"]:
                bad.append(f"{name} (checksum)")
        except FileNotFoundError:
            bad.append(f"{name} (missing)")
        except OSError as exc:
            bad.append(f"{name} ({exc.strerror or exc})")
    return bad
