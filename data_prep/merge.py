"""`sift-prep merge`: one manifest over the parts of a sliced run (--num-shards), nothing copied.

Owns the checks that the parts belong together (complete, same tokenizer, same settings and
inputs, every slice exactly once, no document in two parts) and writing the merged output:
manifest.json whose shard paths point into the part directories ("../part-0/train/..."), and a
copy of the tokenizer (a few hundred KB), which is all `pipeline.data` reads besides the shards.

Why nothing needs deduplicating here: with --dedup exact every node hashes every document and
keeps the first occurrence in the global input order, so a duplicate is dropped by the node
that holds it whichever node holds the first copy; the parts' hash lists are checked to be
disjoint, which fails for parts made without the same --dedup, inputs or settings.
"""
from __future__ import annotations

import errno
import fcntl
import os
import shutil
from pathlib import Path

import numpy as np

from data_prep import build
from data_prep import dedup as dd
from data_prep import manifest as mf
from data_prep import tokenizer as tk
from data_prep.errors import PrepError
from data_prep.io_util import write_json_atomic

# What must be equal in every part's manifest, beyond the tokenizer.
SAME_KEYS = ("format_version", "seq_len", "dtype", "vocab_size", "lowercase", "special_tokens")
# What a merge output holds (a rerun of the merge may overwrite exactly these).
MERGE_ENTRIES = {mf.MANIFEST, "tokenizer"}


def _resume_hint(state: dict) -> str:
    part = state.get("part")
    flags = f" --num-shards {part['count']} --shard-index {part['index']}" if part else ""
    return f"rerun that node's sift-prep command (…{flags}), it resumes where it stopped"


def lock_part(d: Path) -> int | None:
    """An exclusive flock on a part directory for the merge: a sift-prep still writing it is
    named, and none can start on it until the merge ends. Returns the fd (None: no locks here)."""
    try:
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        raise PrepError(str(d), "no such directory (a part of the run)") from None
    except NotADirectoryError:
        raise PrepError(str(d), "not a directory (a part is sift-prep's output directory)") from None
    except OSError as e:
        raise PrepError(str(d), f"cannot access ({e.strerror or e})") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise PrepError(str(d), "a sift-prep is writing this part right now; merge once it has "
                                "finished") from None
    except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            os.close(fd)
            raise
    return fd


def read_part(d: Path) -> dict:
    """The manifest of a finished part; a half-written, foreign or whole (unsliced) one is refused."""
    manifest = mf.read_json(d / mf.MANIFEST)
    if manifest is None:
        state = mf.read_json(d / mf.STATE)
        if state is not None:
            raise PrepError(str(d), f"half-written part (no manifest.json: its run was killed or "
                                    f"failed); {_resume_hint(state)}, then merge again")
        raise PrepError(str(d), "not a sift-prep output (no manifest.json)")
    if manifest.get("format") != mf.FORMAT:
        raise PrepError(str(d), f"{mf.MANIFEST} is not a {mf.FORMAT} manifest")
    if not isinstance(manifest.get("part"), dict):
        raise PrepError(str(d), "not a part: made without --num-shards, or with --num-shards 1, "
                                "which is a whole run already (merge joins the parts of one run "
                                "made with --num-shards N --shard-index 0..N-1)")
    index, count = manifest["part"].get("index"), manifest["part"].get("count")
    if not (type(index) is int and type(count) is int and 0 <= index < count) \
            or not isinstance(manifest.get("splits"), dict):
        raise PrepError(str(d), f"{mf.MANIFEST} is damaged (part {manifest['part']!r:.60}, splits "
                                "not a table); rerun that node's sift-prep command into a new directory")
    return manifest


def check_together(dirs: list[Path], manifests: list[dict]) -> None:
    """Every part made with the same tokenizer, settings and inputs as the first one."""
    d0, m0 = dirs[0], manifests[0]
    for d, m in zip(dirs[1:], manifests[1:]):
        if m.get("tokenizer_fingerprint") != m0.get("tokenizer_fingerprint"):
            raise PrepError(str(d), f"made with another tokenizer than {d0} (tokenizer_fingerprint "
                                    f"{str(m.get('tokenizer_fingerprint'))[:12]} != "
                                    f"{str(m0.get('tokenizer_fingerprint'))[:12]}); every part needs "
                                    "the same --tokenizer, or the same --tokenizer-sample and inputs")
        if m["part"]["count"] != m0["part"]["count"]:
            raise PrepError(str(d), f"is {mf.describe_part(m['part'])}, {d0} is "
                                    f"{mf.describe_part(m0['part'])}: parts of different runs")
        diff = [k for k in SAME_KEYS if m.get(k) != m0.get(k)]
        old, new = m0.get("settings", {}), m.get("settings", {})
        diff += sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if diff:
            raise PrepError(str(d), f"made with other settings than {d0} ({', '.join(diff)})")
        if m.get("sources") != m0.get("sources"):
            raise PrepError(str(d), f"made from other inputs than {d0} (paths, sizes or sha256 differ)")


def check_slices(dirs: list[Path], manifests: list[dict]) -> list[int]:
    """The order of the parts by index (0..N-1); a slice given twice or missing is an error."""
    count = manifests[0]["part"]["count"]
    by_index: dict[int, int] = {}
    for i, m in enumerate(manifests):
        index = m["part"]["index"]
        if index in by_index:
            other = dirs[by_index[index]]
            raise PrepError(str(dirs[i]), f"claims part {index} of {count}, and so does {other}: "
                                          "two parts with the same --shard-index; keep one of them")
        by_index[index] = i
    missing = [i for i in range(count) if i not in by_index]
    if missing:
        got = ", ".join(map(str, sorted(by_index)))
        raise PrepError(f"part {missing[0]} of {count}", f"missing ({len(missing)} of {count} parts "
                                                         f"missing; given: {got}); run sift-prep with "
                                                         f"--num-shards {count} --shard-index "
                                                         f"{missing[0]} and merge again")
    return [by_index[i] for i in range(count)]


def check_output(out: Path, dirs: list[Path]) -> None:
    """The output is new, empty or an earlier merge output; never a part nor inside one."""
    real = out.resolve()
    for d in dirs:
        r = d.resolve()
        if real == r or r in real.parents:
            raise PrepError(str(out), f"is {'' if real == r else 'inside '}the part {d}; choose "
                                      "another --output")
    if not os.path.lexists(out):
        return
    if not out.is_dir():
        raise PrepError(str(out), "output exists and is not a directory")
    manifest = mf.read_json(out / mf.MANIFEST)
    if manifest is not None and "parts" not in manifest:
        raise PrepError(str(out), "holds a sift-prep output that is not a merge; choose another --output")
    others = sorted(p.name for p in out.iterdir()
                    if p.name not in MERGE_ENTRIES and not p.name.startswith("."))
    if others:
        raise PrepError(str(out), f"output directory holds other files ({others[0]}, ...); "
                                  "refusing to write into it")


def check_disjoint(dirs: list[Path], manifests: list[dict]) -> None:
    """With --dedup: no document hash in two parts (each part's list checked against its sha256)."""
    lists = []
    for d, m in zip(dirs, manifests):
        entry = m.get("doc_hashes")
        if entry is None:
            raise PrepError(str(d), f"made with --dedup but lists no document hashes; remove it and "
                                    "rerun that node's command")
        path = d / entry["path"]
        if build.file_sha256(path) != entry["sha256"]:
            raise PrepError(str(d), f"{entry['path']} is missing or does not match its sha256 in "
                                    "manifest.json; remove the part and rerun that node's command")
        lists.append(np.load(path))
    shared = dd.shared_hashes(lists)
    if shared is not None:
        h, a, b = shared
        raise PrepError(str(dirs[b]), f"holds a document that {dirs[a]} holds too (hash {h:016x}): "
                                      "the parts were not made from the same inputs with --dedup exact")


def merged_manifest(out: Path, dirs: list[Path], manifests: list[dict]) -> dict:
    """The parts' splits in part order, shard paths relative to `out`; counts summed."""
    m0 = manifests[0]
    splits = {}
    for name in mf.SPLITS:
        shards = []
        for d, m in zip(dirs, manifests):
            for s in m["splits"][name]["shards"]:
                rel = os.path.relpath((d / s["path"]).resolve(), out.resolve())
                shards.append({**s, "path": rel})
        splits[name] = {"num_sequences": sum(s["num_sequences"] for s in shards),
                        "num_tokens": sum(m["splits"][name]["num_tokens"] for m in manifests),
                        "shards": shards}
    documents = None
    if all("documents" in m for m in manifests):
        documents = {k: sum(m["documents"][k] for m in manifests) for k in m0["documents"]}
    parts = [{"index": m["part"]["index"], "path": os.path.relpath(d.resolve(), out.resolve()),
              "manifest_sha256": build.file_sha256(d / mf.MANIFEST)} for d, m in zip(dirs, manifests)]
    return mf.build_manifest(
        seq_len=m0["seq_len"], dtype=m0["dtype"], vocab_size=m0["vocab_size"],
        lowercase=m0["lowercase"], special_tokens=m0["special_tokens"],
        tokenizer_fingerprint=m0["tokenizer_fingerprint"], splits=splits, sources=m0["sources"],
        settings=m0["settings"], documents=documents, parts=parts)


def write_merged(out: Path, tokenizer_dir: Path, manifest: dict) -> None:
    """The tokenizer, then manifest.json last (atomically): a reader never sees a manifest
    without its tokenizer; a killed merge is simply run again."""
    (out / mf.MANIFEST).unlink(missing_ok=True)
    tmp = out / ".tokenizer.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(tokenizer_dir, tmp)
    if tk.fingerprint(tmp) != manifest["tokenizer_fingerprint"]:  # changed under us
        raise PrepError(str(tokenizer_dir), "changed during the merge; merge again")
    shutil.rmtree(out / "tokenizer", ignore_errors=True)
    os.replace(tmp, out / "tokenizer")
    write_json_atomic(out / mf.MANIFEST, manifest)


def merge(out: Path, part_dirs: list[Path], log=print) -> dict:
    """Check the parts, then write OUT/manifest.json over them; returns the merged manifest."""
    if not part_dirs:
        raise PrepError("merge", "no part directories given")
    seen = set()
    for d in part_dirs:
        if d.resolve() in seen:
            raise PrepError(str(d), "given twice")
        seen.add(d.resolve())
    fds = []
    try:
        manifests = []
        for d in part_dirs:
            fds.append(lock_part(d))
            manifests.append(read_part(d))
        check_together(part_dirs, manifests)
        order = check_slices(part_dirs, manifests)
        dirs, manifests = [part_dirs[i] for i in order], [manifests[i] for i in order]
        check_output(out, dirs)
        for d, m in zip(dirs, manifests):  # every byte read once: the checksums
            build._verify(d, m, fix="remove that part and rerun that node's command")
        if manifests[0]["settings"].get("dedup"):
            check_disjoint(dirs, manifests)
        manifest = merged_manifest(out, dirs, manifests)
        if not manifest["splits"]["train"]["shards"]:
            raise PrepError("merge", "no training documents in any part")
        lock = build.OutputLock(out)
        failed = True
        try:
            write_merged(out, dirs[0] / "tokenizer", manifest)
            failed = False
        finally:
            lock.release(failed)
    finally:
        for fd in fds:
            if fd is not None:
                os.close(fd)
    t, v, docs = manifest["splits"]["train"], manifest["splits"]["valid"], manifest.get("documents")
    dropped = f", {docs['duplicates']} duplicate documents dropped" if docs and docs.get("duplicates") else ""
    log(f"sift-prep: merged {len(dirs)} parts into {out}: train {t['num_sequences']} x "
        f"{manifest['seq_len']} ({len(t['shards'])} shards), valid {v['num_sequences']} x "
        f"{manifest['seq_len']}{dropped}")
    return manifest
