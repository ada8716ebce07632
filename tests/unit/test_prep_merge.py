"""Prep across nodes and deduplication: slices, the tokenizer sample, exact dedup, merge.

The "nodes" are concurrent `sift-prep` subprocesses on one machine (the real CLI, the real
tokenizer); the corpus is the embedded State of the Union addresses cut into lines (real text,
~1500 documents), with duplicates planted at known places. Documents are compared as token
sequences read back through pipeline.data.ShardDataset (the training side's reader): rows are
unpacked into the split's token stream and cut at each document's [SEP].
"""
from __future__ import annotations

import json
import lzma
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from data_prep import build, cli, dedup, parts, sources
from data_prep.errors import PrepError

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
for _var in ("SLURM_PROCID", "SLURM_NTASKS", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
             "PMI_RANK", "PMI_SIZE"):
    ENV.pop(_var, None)
# Every run of this module: a sampled tokenizer (what nodes share), several shards per part.
FLAGS = ["--vocab-size", "800", "--seq-len", "64", "--tokenizer-sample", "200KB",
         "--valid-fraction", "0.05", "--shard-rows", "200", "--workers", "1", "--no-progress"]
PLANTED = 80  # exact and whitespace-variant copies planted in the corpus


# ---------------------------------------------------------------------------------------------
# Pure parts


def test_slices_are_disjoint_and_cover_every_document():
    for count in (1, 2, 3, 4, 7):
        owners = [[i for i in range(count) if parts.Part(i, count).holds(d)] for d in range(1000)]
        assert all(len(o) == 1 for o in owners)
        sizes = Counter(o[0] for o in owners)
        assert max(sizes.values()) - min(sizes.values()) <= 1  # balanced by count
    with pytest.raises(PrepError, match="--shard-index"):
        parts.Part(4, 4)
    with pytest.raises(PrepError, match="--num-shards"):
        parts.Part(0, 0)


def test_the_part_comes_from_the_launcher_environment():
    assert parts.part_from_env({"SLURM_PROCID": "2", "SLURM_NTASKS": "4"}) == parts.Part(2, 4)
    assert parts.part_from_env({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "3"}) == parts.Part(1, 3)
    assert parts.part_from_env({"PMI_RANK": "0", "PMI_SIZE": "2"}) == parts.Part(0, 2)
    # SLURM first: srun under an MPI-aware setup may set both.
    both = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "PMI_RANK": "5", "PMI_SIZE": "8"}
    assert parts.part_from_env(both) == parts.Part(1, 2)
    with pytest.raises(PrepError, match="none of SLURM_PROCID/SLURM_NTASKS"):
        parts.part_from_env({})
    with pytest.raises(PrepError, match="not two integers"):
        parts.part_from_env({"SLURM_PROCID": "1"})
    with pytest.raises(PrepError, match="--shard-index"):
        parts.part_from_env({"SLURM_PROCID": "4", "SLURM_NTASKS": "4"})
    # Without --shard-from-env the environment is not read, whatever it holds.
    args = cli.build_parser().parse_args(["--output", "o"])
    assert cli.part_from_args(args, environ={"SLURM_PROCID": "1", "SLURM_NTASKS": "2"}) == parts.Part(0, 1)


def test_tokenizer_sample_sizes():
    assert parts.parse_sample("100MB") == parts.Sample(100 * 10**6, "bytes")
    assert parts.parse_sample("2GiB") == parts.Sample(2 * 2**30, "bytes")
    assert parts.parse_sample("1.5kb") == parts.Sample(1500, "bytes")
    assert parts.parse_sample("500000docs") == parts.Sample(500000, "docs")
    assert str(parts.parse_sample("64KiB")) == "65536B"
    for bad in ("100", "10XB", "-5MB", "0docs", "1.5docs", ""):
        with pytest.raises(PrepError, match="--tokenizer-sample"):
            parts.parse_sample(bad)


def test_document_hash_ignores_cuts_and_whitespace_runs_but_not_words_or_case():
    text = "The state of the  Union\nis strong.\n\n  We  will\tcarry on "
    h = dedup.text_hash(text)
    for cut in range(1, len(text)):  # every cut, inside words too
        hasher = dedup.DocHasher()
        hasher.update(text[:cut])
        hasher.update(text[cut:])
        assert hasher.digest() == h, cut
    assert dedup.text_hash(" ".join(text.split())) == h
    for other in ("The state of the Union is strong. We will carry", "the state of the Union is "
                  "strong. We will carry on", "The state of the Union is strong. We willcarry on"):
        assert dedup.text_hash(other) != h, other


def test_first_occurrence_is_kept():
    hashes = np.array([5, 3, 5, 9, 3, 5], dtype=np.uint64)
    assert dedup.first_occurrences(hashes).tolist() == [True, True, False, True, False, False]
    assert dedup.shared_hashes([np.array([1, 4], np.uint64), np.array([2, 3], np.uint64)]) is None
    assert dedup.shared_hashes([np.array([1, 4], np.uint64), np.array([2], np.uint64),
                                np.array([4], np.uint64)]) == (4, 0, 2)


def test_the_dedup_fallback_agrees_with_the_streaming_picker():
    docs = list(range(40))
    for fraction in (0.0, 1e-4, 0.01, 0.5):
        for excluded in (set(), {min(docs, key=build.valid_key)}, set(range(0, 40, 2))):
            picker = build.FallbackPicker(fraction)
            for d in docs:
                if d not in excluded:
                    picker.see(d)
            keys = np.array([2.0 if d in excluded else build.valid_key(d) for d in docs])
            assert build.fallback_among(keys, fraction) == picker.fallback, (fraction, excluded)


# ---------------------------------------------------------------------------------------------
# The corpus and reading documents back


def _normalized(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """{"path": JSONL file, "expected": texts a --dedup run keeps}: 1500 distinct lines of the
    addresses, 40 exact copies and 40 whitespace variants planted later in the file, and 30
    near-duplicates (a word's case, a word dropped, a comma) that must all be kept."""
    with lzma.open(sources.EMBEDDED_CORPUS, "rt", encoding="utf-8") as f:
        lines = [line for a in f for line in json.loads(a)["text"].split("\n") if len(line.strip()) > 40]
    base, seen = [], set()
    for line in lines:  # the addresses repeat a few lines themselves: keep the first of each
        if _normalized(line) not in seen:
            seen.add(_normalized(line))
            base.append(line)
    base = base[:1500]
    rng = random.Random(0)
    docs = list(base)
    picks = rng.sample(range(len(base)), 110)
    exact, spaced, near = picks[:40], picks[40:80], picks[80:]
    for i in exact:
        docs.insert(rng.randrange(docs.index(base[i]) + 1, len(docs) + 1), base[i])
    for i in spaced:
        variant = "  " + "\n ".join(base[i].split(" ")) + " \t"
        docs.insert(rng.randrange(docs.index(base[i]) + 1, len(docs) + 1), variant)
    nears = []
    for n, i in enumerate(near):
        words = base[i].split()
        if n % 3 == 0:
            words[0] = words[0].swapcase()
        elif n % 3 == 1:
            del words[len(words) // 2]
        else:
            words[1] += ","
        nears.append(" ".join(words))
        docs.insert(rng.randrange(len(docs) + 1), nears[-1])
    assert len(docs) == len(base) + PLANTED + len(nears)
    path = tmp_path_factory.mktemp("corpus") / "lines.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return {"path": path, "expected": base + nears}


def documents(data_dir: Path, split: str) -> Counter:
    """The split's documents as a multiset of token-id tuples, read with pipeline.data."""
    from pipeline.data import ShardDataset, verify_prepared

    verify_prepared(data_dir, full=True)
    ds = ShardDataset(data_dir, split)
    ids = ds.special_ids
    rows = ds.rows(np.arange(len(ds)))  # (R, L)
    # Each row is [CLS] body [SEP] [PAD]...; only the last row of a part's split is padded.
    stream = np.concatenate([r[r != ids["pad"]][1:-1] for r in rows])
    ends = np.flatnonzero(stream == ids["sep"])
    assert len(ends) and ends[-1] == len(stream) - 1
    return Counter(tuple(d.tolist()) for d in np.split(stream, ends + 1)[:-1])


def manifest(data_dir: Path) -> dict:
    return json.loads((data_dir / "manifest.json").read_text())


def start(args: list, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "data_prep", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env or ENV)


def finish(proc: subprocess.Popen, code: int = 0) -> str:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == code, err
    return err


def run_nodes(corpus_path: Path, outs: list[Path], extra: list[str] = ()) -> list[str]:
    """len(outs) concurrent sift-prep processes, node i preparing part i into outs[i]."""
    procs = [start([corpus_path, "--output", out, *FLAGS, *extra, "--num-shards", len(outs),
                    "--shard-index", i]) for i, out in enumerate(outs)]
    return [finish(p) for p in procs]


def merge(out: Path, part_dirs: list[Path], code: int = 0) -> str:
    proc = subprocess.run([sys.executable, "-m", "data_prep", "merge", "--output", str(out),
                           *map(str, part_dirs)], capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == code, proc.stderr
    return proc.stderr


@pytest.fixture(scope="module")
def single(corpus, tmp_path_factory) -> dict[str, Path]:
    """Single-node references, with and without --dedup, made concurrently."""
    root = tmp_path_factory.mktemp("single")
    runs = {"plain": [], "dedup": ["--dedup", "exact"]}
    procs = {k: start([corpus["path"], "--output", root / k, *FLAGS, *extra]) for k, extra in runs.items()}
    for p in procs.values():
        finish(p)
    return {k: root / k for k in runs}


def assert_same_documents(merged: Path, reference: Path) -> None:
    m, r = manifest(merged), manifest(reference)
    assert m["tokenizer_fingerprint"] == r["tokenizer_fingerprint"]
    assert m["documents"] == r["documents"]
    for split in ("train", "valid"):
        got, want = documents(merged, split), documents(reference, split)
        assert sum(want.values()) == r["documents"][split] > 0
        assert got == want, f"{split}: {sum((got - want).values())} extra, {sum((want - got).values())} missing"


# ---------------------------------------------------------------------------------------------
# Prep across nodes


def test_three_nodes_merged_equal_a_single_node_run_document_for_document(corpus, single, tmp_path):
    outs = [tmp_path / f"part-{i}" for i in range(3)]
    logs = run_nodes(corpus["path"], outs)
    assert all(f"part {i} of 3" in log for i, log in enumerate(logs))
    for i, out in enumerate(outs):
        assert manifest(out)["part"] == {"index": i, "count": 3}
        assert len(manifest(out)["splits"]["train"]["shards"]) >= 2  # resumable shard by shard
    merged = tmp_path / "merged"
    merge(merged, outs[::-1])  # any order on the command line
    m = manifest(merged)
    assert [p["path"] for p in m["parts"]] == ["../part-0", "../part-1", "../part-2"]
    assert m["splits"]["train"]["shards"][0]["path"] == "../part-0/train/shard_000000.npy"
    assert sorted(p.name for p in merged.iterdir()) == ["manifest.json", "tokenizer"]  # nothing copied
    assert_same_documents(merged, single["plain"])
    # Not just the same multiset by luck: a part alone lacks the other parts' documents.
    assert documents(outs[0], "train") != documents(single["plain"], "train")
    # A merge run again rewrites its own output; the result reads the same.
    merge(merged, outs)
    assert_same_documents(merged, single["plain"])


def test_a_killed_node_resumes_and_then_the_merge_is_complete(corpus, single, tmp_path):
    outs = [tmp_path / f"part-{i}" for i in range(2)]
    killed = start([corpus["path"], "--output", outs[1], *FLAGS, "--num-shards", 2, "--shard-index", 1],
                   env={**ENV, build.KILL_AT_SHARD_ENV: "2"})
    ok = start([corpus["path"], "--output", outs[0], *FLAGS, "--num-shards", 2, "--shard-index", 0])
    finish(killed, -signal.SIGKILL)
    finish(ok)
    err = merge(tmp_path / "merged", outs, code=2)
    assert err.count("\n") == 1 and err.startswith(f"sift-prep: error: {outs[1]}: half-written part")
    assert "--num-shards 2 --shard-index 1" in err and "resumes" in err
    assert not (tmp_path / "merged").exists()
    rerun = finish(start([corpus["path"], "--output", outs[1], *FLAGS, "--num-shards", 2, "--shard-index", 1]))
    assert "(1 shards already written)" in rerun
    merge(tmp_path / "merged", outs)
    assert_same_documents(tmp_path / "merged", single["plain"])


# ---------------------------------------------------------------------------------------------
# Deduplication


def test_dedup_drops_the_planted_duplicates_and_nothing_else(corpus, single):
    from tokenizers import Tokenizer

    plain, deduped = manifest(single["plain"]), manifest(single["dedup"])
    assert plain["documents"]["duplicates"] == 0
    assert deduped["documents"]["duplicates"] == PLANTED
    assert deduped["documents"]["seen"] == plain["documents"]["seen"] == len(corpus["expected"]) + PLANTED
    assert deduped["settings"]["dedup"] == "exact" and "dedup" not in plain["settings"]
    # The tokenizer sample is drawn from the kept documents only: encode with the run's own.
    tok = Tokenizer.from_file(str(single["dedup"] / "tokenizer" / "tokenizer.json"))
    sep = deduped["special_tokens"]["sep"]
    want = Counter(tuple(e.ids) + (sep,) for e in tok.encode_batch(corpus["expected"], add_special_tokens=False))
    got = documents(single["dedup"], "train") + documents(single["dedup"], "valid")
    assert got == want
    plain_docs = documents(single["plain"], "train") + documents(single["plain"], "valid")
    assert sum(plain_docs.values()) == sum(want.values()) + PLANTED


def test_dedup_across_inputs_keeps_the_first_in_input_order(corpus, tmp_path):
    """Copies in a second input file and in the --valid-input file are dropped and nothing else:
    the first occurrence in input order is kept (training inputs in command-line order,
    --valid-input files last). A copy encodes like its original, so which one was kept shows
    only for the validation copy, through the split its document lands in."""
    from tokenizers import Tokenizer

    texts, rng = corpus["expected"], random.Random(1)
    first, second, valid = texts[:700], texts[700:1400], texts[1400:1450]
    copied = rng.sample(range(len(first)), 30)
    b_docs = list(second)
    for n, i in enumerate(copied):  # 15 exact copies of a.jsonl's documents, 15 re-wrapped ones
        copy = first[i] if n % 2 else "  " + "\n ".join(first[i].split(" ")) + " \t"
        b_docs.insert(rng.randrange(len(b_docs) + 1), copy)
    v_docs = list(valid)
    v_docs.insert(20, second[123])  # a validation copy of a training document of b.jsonl
    files = {}
    for name, docs in (("a", first), ("b", b_docs), ("v", v_docs)):
        files[name] = tmp_path / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = tmp_path / "out"
    finish(start([files["a"], files["b"], "--valid-input", files["v"], "--output", out, *FLAGS,
                  "--valid-fraction", "0", "--dedup", "exact"]))

    m = manifest(out)
    assert m["documents"] == {"seen": len(first) + len(b_docs) + len(v_docs), "duplicates": len(copied) + 1,
                              "train": len(first) + len(second), "valid": len(valid)}
    tok = Tokenizer.from_file(str(out / "tokenizer" / "tokenizer.json"))
    sep = m["special_tokens"]["sep"]

    def want(docs: list[str]) -> Counter:
        return Counter(tuple(e.ids) + (sep,) for e in tok.encode_batch(docs, add_special_tokens=False))

    # The original of the validation copy stays in train; valid holds only the file's own documents.
    assert documents(out, "train") == want(first + second)
    assert documents(out, "valid") == want(valid)


def test_dedup_across_nodes_from_the_launcher_environment(corpus, single, tmp_path):
    """Four SLURM-style tasks (SLURM_PROCID/SLURM_NTASKS, {index} in --output): planted copies sit
    in other parts than their originals, and the merge holds what the single-node dedup run holds."""
    template = str(tmp_path / "part-{index}")
    procs = [start([corpus["path"], "--output", template, *FLAGS, "--dedup", "exact", "--shard-from-env"],
                   env={**ENV, "SLURM_PROCID": str(i), "SLURM_NTASKS": "4"}) for i in range(4)]
    for p in procs:
        finish(p)
    outs = [tmp_path / f"part-{i}" for i in range(4)]
    per_part = [manifest(o)["documents"]["duplicates"] for o in outs]
    assert sum(per_part) == PLANTED and sum(1 for n in per_part if n) >= 3  # spread over the parts
    assert all(manifest(o)["doc_hashes"]["count"] == sum(manifest(o)["documents"][s] for s in ("train", "valid"))
               for o in outs)
    merged = tmp_path / "merged"
    err = merge(merged, outs)
    assert f"{PLANTED} duplicate documents dropped" in err
    assert_same_documents(merged, single["dedup"])


def test_a_part_still_being_written_is_not_merged(corpus, tmp_path):
    """A node still running holds its output's lock: merge names the part instead of reading it."""
    outs = [tmp_path / "part-1"]
    running = start([corpus["path"], "--output", outs[0], *FLAGS, "--num-shards", 2, "--shard-index", 1])
    try:
        deadline = time.monotonic() + 60
        while not (outs[0] / ".sift-prep-state.json").exists():  # written under the lock
            assert running.poll() is None and time.monotonic() < deadline, running.stderr.read()
            time.sleep(0.02)
        os.kill(running.pid, signal.SIGSTOP)
        err = merge(tmp_path / "merged", outs, code=2)
        assert err.count("\n") == 1
        assert err.startswith(f"sift-prep: error: {outs[0]}: a sift-prep is writing this part right now")
    finally:
        os.kill(running.pid, signal.SIGCONT)
    finish(running)
