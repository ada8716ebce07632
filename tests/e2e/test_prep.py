"""sift-prep end to end: the real CLI in subprocesses on the real shared corpora."""
from __future__ import annotations

import ctypes
import hashlib
import json
import lzma
import os
import signal
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from data_prep import build, sources
from data_prep import tokenizer as tk

pytestmark = pytest.mark.e2e

# Offline mode: this machine has no network, and the hub client would otherwise retry for ~50 s
# before failing; the error path tested is the same.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def prep(*args, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "data_prep", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=ENV)
    if check and proc.returncode != 0:
        raise AssertionError(f"sift-prep {args} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def without_created(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k != "created"}


def tree_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# One run over all shared corpora, shared by the checks below


@pytest.fixture(scope="module")
def full(shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "out"
    prep(shared_data, "--output", out, "--encoding-errors", "replace", "--valid-fraction", "0.02",
         "--shard-rows", "8192")
    return out, json.loads((out / "manifest.json").read_text())


def test_manifest_counts_and_hashes_match_files(full):
    out, m = full
    assert (m["format"], m["format_version"], m["seq_len"], m["dtype"]) == ("sift-shards", 1, 128, "uint16")
    assert m["special_tokens"] == {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    assert m["tokenizer_fingerprint"] == sha256(out / "tokenizer" / "tokenizer.json")
    assert len(m["sources"]) > 2000 and all(len(s["sha256"]) == 64 for s in m["sources"])
    on_disk = sorted(str(p.relative_to(out)) for p in out.glob("*/shard_*.npy"))
    listed = sorted(s["path"] for sp in m["splits"].values() for s in sp["shards"])
    assert on_disk == listed
    for split in m["splits"].values():
        rows = 0
        tokens = 0
        for s in split["shards"]:
            a = np.load(out / s["path"], mmap_mode="r")
            assert a.dtype == np.uint16 and a.ndim == 2 and a.shape[1] == 128
            assert a.shape[0] == s["num_sequences"] and sha256(out / s["path"]) == s["sha256"]
            rows += a.shape[0]
            tokens += int(np.count_nonzero(a != 0))
        assert (rows, tokens) == (split["num_sequences"], split["num_tokens"])
    assert m["splits"]["train"]["num_sequences"] > 30000 and m["splits"]["valid"]["num_sequences"] > 100
    assert len(m["splits"]["train"]["shards"]) >= 4  # 8192 rows a shard


def test_rows_are_well_formed_and_ids_below_vocab(full):
    out, m = full
    for split in m["splits"].values():
        for i, s in enumerate(split["shards"]):
            a = np.load(out / s["path"])
            assert int(a.max()) < m["vocab_size"]
            assert (a[:, 0] == 2).all()
            last_sep = (a.shape[1] - 1) - np.argmax(a[:, ::-1] == 3, axis=1)  # (R,)
            body_pad = a[:, 1:] == 0
            # Only the very last row of a split is padded, and only after its closing [SEP].
            padded = np.flatnonzero(body_pad.any(axis=1))
            is_last_shard = i == len(split["shards"]) - 1
            assert padded.tolist() in ([], [a.shape[0] - 1] if is_last_shard else [])
            assert (last_sep[:-1] == a.shape[1] - 1).all()
            assert (a[-1, last_sep[-1] + 1:] == 0).all()
            assert not ((a[:, 1:] == 2).any() or (a == 4).any())


def _normalized_corpus(shared_data, tok) -> str:
    from data_prep import sources

    parts = []
    for s in sources.resolve_inputs([str(shared_data)]):
        for text, _ in sources.iter_pieces(s, sources.ReadOptions(encoding_errors="replace")):
            parts.append("".join(tok.normalizer.normalize_str(text).split()))
    return "".join(parts)


def test_decoded_rows_reproduce_source_text(full, shared_data):
    from tokenizers import Tokenizer

    out, m = full
    tok = Tokenizer.from_file(str(out / "tokenizer" / "tokenizer.json"))
    corpus = _normalized_corpus(shared_data, tok)
    rng = np.random.default_rng(0)
    a = np.load(out / m["splits"]["train"]["shards"][0]["path"])
    checked = 0
    for r in rng.choice(a.shape[0], size=40, replace=False):
        row = a[r, 1:-1].astype(int)
        # A row holds pieces of documents separated by [SEP]; each piece is contiguous source text.
        segments = np.split(row, np.flatnonzero(row == 3))
        for seg in segments:
            seg = [int(i) for i in seg if i not in (0, 3)]
            if len(seg) < 8 or 1 in seg:  # [UNK] hides the original characters
                continue
            # A row may start inside a word: the decoder then leaves the "##" of its first piece.
            text = "".join(tok.decode(seg).split()).removeprefix("##")
            assert text in corpus, text[:200]
            checked += 1
    assert checked >= 30


def test_auto_tokenizer_encodes_like_tokenizers(full, shared_data):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    out, m = full
    hf = AutoTokenizer.from_pretrained(out / "tokenizer")
    tok = Tokenizer.from_file(str(out / "tokenizer" / "tokenizer.json"))
    assert (hf.pad_token_id, hf.unk_token_id, hf.cls_token_id, hf.sep_token_id, hf.mask_token_id) == (0, 1, 2, 3, 4)
    assert hf.model_max_length == 128 and len(hf) == m["vocab_size"]
    samples = [(shared_data / "nltk" / "webtext" / "wine.txt").read_text("utf-8", "replace")[:3000],
               (shared_data / "wikitext-2" / "test.txt").read_text()[5000:8000],
               "Ünïcödé Résumé, CAFÉ! naïve 3.14 e-mail (test)"]
    for text in samples:
        assert hf(text)["input_ids"] == tok.encode(text).ids
        assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text, add_special_tokens=False).ids
    assert hf("hello")["input_ids"][0] == 2 and hf("hello")["input_ids"][-1] == 3


def test_rerun_on_finished_output_changes_nothing(full, shared_data):
    out, _ = full
    before = tree_bytes(out)
    proc = prep(shared_data, "--output", out, "--encoding-errors", "replace", "--valid-fraction", "0.02",
                "--shard-rows", "8192")
    assert "up to date" in proc.stderr and tree_bytes(out) == before


def test_other_tokenizer_is_refused(full, tmp_path):
    """An output made with one tokenizer is never extended or overwritten with another."""
    out, _ = full
    before = tree_bytes(out)
    other = tmp_path / "other"
    prep("--output", other, "--vocab-size", "500", "--seq-len", "32")
    for args in (["--tokenizer", other / "tokenizer"], ["--vocab-size", "1000"]):
        proc = prep("--output", out, *args, check=False)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count("\n") == 1 and "another tokenizer" in proc.stderr
        assert str(out) in proc.stderr and "Traceback" not in proc.stderr
    assert tree_bytes(out) == before


# ---------------------------------------------------------------------------------------------
# Embedded corpus, determinism, loaded tokenizers, valid inputs


def test_embedded_corpus_default_and_determinism(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    prep("--output", a, "--seq-len", "64")
    prep("--output", b, "--seq-len", "64")
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    assert without_created(ma) == without_created(mb)
    assert ma["sources"][0]["path"] == "embedded:state_union.jsonl.xz"
    assert ma["splits"]["train"]["num_sequences"] > 5000 and ma["splits"]["valid"]["num_sequences"] > 0
    assert tree_bytes(a / "train") == tree_bytes(b / "train")


def test_loaded_tokenizer_and_valid_input(shared_data, tmp_path):
    first = tmp_path / "first"
    prep(shared_data / "nltk" / "abc" / "rural.txt", "--output", first, "--vocab-size", "2000", "--cased")
    out = tmp_path / "out"
    prep(shared_data / "nltk" / "state_union" / "19[45]*.txt", "--output", out, "--encoding-errors",
         "replace", "--tokenizer", first / "tokenizer", "--valid-input", shared_data / "wikitext-2" / "test.txt")
    m = json.loads((out / "manifest.json").read_text())
    assert m["tokenizer_fingerprint"] == sha256(first / "tokenizer" / "tokenizer.json")
    assert m["lowercase"] is False and m["vocab_size"] == 2000
    assert [s["split"] for s in m["sources"]].count("valid") == 1
    # wikitext test is ~240 k words: the whole valid split, nothing of it in train.
    assert m["splits"]["valid"]["num_sequences"] > 1000
    assert all("wikitext" not in s["path"] for s in m["sources"] if s["split"] == "auto")
    # Casing comes with a loaded tokenizer: asking for the other one is an error.
    proc = prep(shared_data / "nltk" / "abc" / "rural.txt", "--output", tmp_path / "x", "--tokenizer",
                first / "tokenizer", "--lowercase", check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("sift-prep: error: --lowercase: ")
    assert proc.stderr.count("\n") == 1 and not (tmp_path / "x").exists()


def test_a_valid_input_inside_a_training_directory_is_held_out(shared_data, tmp_path):
    held = shared_data / "wikitext-2" / "test.txt"
    out = tmp_path / "out"
    prep(shared_data / "wikitext-2", "--output", out, "--vocab-size", "1000", "--valid-input", held)
    m = json.loads((out / "manifest.json").read_text())
    by_split = {(s["split"], Path(s["path"]).name) for s in m["sources"]}
    assert by_split == {("auto", "valid.txt"), ("valid", "test.txt")}  # test.txt not trained on
    assert m["splits"]["valid"]["num_sequences"] > 1000


# ---------------------------------------------------------------------------------------------
# Crash safety


def test_sigkill_midway_then_rerun_is_byte_identical(tmp_path):
    args = ["--seq-len", "32", "--shard-rows", "128", "--vocab-size", "1000"]  # ~100 shards
    ref = tmp_path / "ref"
    prep("--output", ref, *args)
    out = tmp_path / "out"
    # The run kills itself once its 5th shard file is on disk and before the journal names it
    # (the worst moment): a kill point that does not depend on the machine's speed.
    killed = subprocess.run([sys.executable, "-m", "data_prep", "--output", str(out), *args],
                            capture_output=True, text=True, timeout=600,
                            env={**ENV, build.KILL_AT_SHARD_ENV: "5"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (out / "manifest.json").exists()
    assert (out / ".sift-prep-state.json").exists() and (out / ".sift-prep-journal.jsonl").exists()
    done = len(list((out / "train").glob("shard_*.npy"))) + len(list((out / "valid").glob("shard_*.npy")))
    total = len(list((ref / "train").glob("shard_*.npy")))
    assert done == 5 and total > 5
    rerun = prep("--output", out, *args)
    assert "(4 shards already written)" in rerun.stderr  # the 5th is rewritten
    assert tree_bytes(out).keys() == tree_bytes(ref).keys()
    assert {k: v for k, v in tree_bytes(out).items() if k != "manifest.json"} == \
           {k: v for k, v in tree_bytes(ref).items() if k != "manifest.json"}
    ma, mr = (json.loads((d / "manifest.json").read_text()) for d in (out, ref))
    assert without_created(ma) == without_created(mr)


def _embedded_texts(n: int) -> list[str]:
    with lzma.open(sources.EMBEDDED_CORPUS, "rt", encoding="utf-8") as f:
        return [json.loads(next(f))["text"] for _ in range(n)]


def _locked_by(out: Path) -> set[int]:
    """Pids holding a flock on the directory `out` (from /proc/locks)."""
    ino = os.stat(out).st_ino
    pids = set()
    for line in Path("/proc/locks").read_text().splitlines():
        f = line.split()  # "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF" (pid, dev:inode)
        if "FLOCK" in f and f[f.index("FLOCK") + 4].split(":")[-1] == str(ino):
            pids.add(int(f[f.index("FLOCK") + 3]))
    return pids


def _wait_for_lock(proc: subprocess.Popen, out: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"sift-prep ended before taking its lock: {proc.stderr.read()}")
        if out.is_dir() and proc.pid in _locked_by(out):
            return
        time.sleep(0.02)
    raise AssertionError("sift-prep never locked its output")


def test_a_second_run_into_the_same_output_is_refused_while_the_first_runs(tmp_path):
    out = tmp_path / "out"
    args = ["--output", str(out), "--vocab-size", "1000", "--seq-len", "64"]
    first = subprocess.Popen([sys.executable, "-m", "data_prep", *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        _wait_for_lock(first, out)
        os.kill(first.pid, signal.SIGSTOP)  # holds the lock for as long as the check takes
        before = tree_bytes(out)
        second = prep(*args, check=False, timeout=120)
        assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr
        assert second.stderr.startswith(f"sift-prep: error: {out}: another sift-prep is writing")
        assert tree_bytes(out) == before
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert first.wait(timeout=600) == 0, first.stderr.read()
    assert (out / "manifest.json").is_file()
    assert "up to date" in prep(*args).stderr  # the lock went with the first process


def test_sigkill_during_the_first_pass_then_rerun_is_byte_identical(tmp_path):
    """Killed while reading and training (before any shard): the rerun starts afresh."""
    args = ["--vocab-size", "1000", "--seq-len", "64"]
    ref = tmp_path / "ref"
    prep("--output", ref, *args)
    out = tmp_path / "out"
    killed = subprocess.Popen([sys.executable, "-m", "data_prep", "--output", str(out), *args],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    _wait_for_lock(killed, out)
    killed.kill()
    assert killed.wait(timeout=60) == -signal.SIGKILL
    assert not (out / "manifest.json").exists()
    prep("--output", out, *args)
    assert {k: v for k, v in tree_bytes(out).items() if k != "manifest.json"} == \
           {k: v for k, v in tree_bytes(ref).items() if k != "manifest.json"}
    ma, mr = (json.loads((d / "manifest.json").read_text()) for d in (out, ref))
    assert without_created(ma) == without_created(mr)


# ---------------------------------------------------------------------------------------------
# Files this process may not read


_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH, _PR_CAPBSET_DROP = 1, 2, 24


def _bound_by_file_modes() -> None:
    """preexec_fn: the child (and sift-prep it execs) obeys file permission bits.

    Root ignores them through two capabilities; they are dropped from the bounding set, so the
    exec'd process has them nowhere. Why not setuid(nobody): the interpreter may live where only
    root can reach it (here /root/.pyenv, under a 0700 /root); uid 0 without the two
    capabilities meets a mode-000 directory exactly as `nobody` would. Not root: nothing to do."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH):
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def unprivileged_prep(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data_prep", *map(str, args), "--no-progress"],
                          capture_output=True, text=True, timeout=timeout, env=ENV,
                          preexec_fn=_bound_by_file_modes)


@pytest.fixture
def locked_tree(tmp_path):
    """corpus/{a.txt, b/ (mode 000) holding c.txt, d.txt}, secret.txt (mode 000), and a
    read-only directory; skipped when this process cannot give up its right to read them."""
    texts = _embedded_texts(4)
    corpus = tmp_path / "corpus"
    (corpus / "b").mkdir(parents=True)
    (corpus / "a.txt").write_text(texts[0])
    (corpus / "b" / "c.txt").write_text(texts[1])
    (corpus / "d.txt").write_text(texts[2])
    secret = tmp_path / "secret.txt"
    secret.write_text(texts[3])
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    for p in (corpus / "b", secret):
        p.chmod(0)
    readonly.chmod(0o555)
    probe = subprocess.run([sys.executable, "-c", "import os, sys; os.listdir(sys.argv[1])", corpus / "b"],
                           capture_output=True, text=True, preexec_fn=_bound_by_file_modes)
    if probe.returncode == 0 or "PermissionError" not in probe.stderr:
        for p in (corpus / "b", secret, readonly):
            p.chmod(0o755)
        pytest.skip("cannot drop the right to read a mode-000 directory (no CAP_SETPCAP here?): "
                    f"{probe.stderr.strip()[-200:]}")
    yield tmp_path
    for p in (corpus / "b", secret, corpus / "e.txt", readonly):
        if p.exists():
            p.chmod(0o755)


def _one_line(proc: subprocess.CompletedProcess, code: int = 2) -> str:
    assert proc.returncode == code, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("sift-prep: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return proc.stderr.strip()


def test_unreadable_inputs_and_outputs_stop_the_run_naming_them(locked_tree):
    t = locked_tree
    out = t / "out"
    small = ["--vocab-size", "300", "--seq-len", "32"]
    # A directory in the walk that may not be read: once, sift-prep went on without its files.
    line = _one_line(unprivileged_prep(t / "corpus", "--output", out, *small))
    assert line == f"sift-prep: error: {t / 'corpus' / 'b'}: cannot read directory (Permission denied)"
    # The same directory named, a file named, a file found in a walk.
    line = _one_line(unprivileged_prep(t / "corpus" / "b", "--output", out, *small))
    assert line == f"sift-prep: error: {t / 'corpus' / 'b'}: cannot read directory (Permission denied)"
    line = _one_line(unprivileged_prep(t / "secret.txt", "--output", out, *small))
    assert line == f"sift-prep: error: {t / 'secret.txt'}: cannot read (Permission denied)"
    (t / "secret.txt").rename(t / "corpus" / "e.txt")
    (t / "corpus" / "b").chmod(0o755)
    line = _one_line(unprivileged_prep(t / "corpus", "--output", out, *small))
    assert line == f"sift-prep: error: {t / 'corpus' / 'e.txt'}: cannot read (Permission denied)"
    (t / "corpus" / "e.txt").chmod(0o644)
    assert not out.exists()
    # Outputs that may not be written: told before any reading or training.
    line = _one_line(unprivileged_prep(t / "corpus", "--output", t / "readonly" / "out", *small))
    assert line == f"sift-prep: error: {t / 'readonly' / 'out'}: cannot create the output directory (Permission denied)"
    line = _one_line(unprivileged_prep(t / "corpus", "--output", t / "readonly", *small))
    assert line == f"sift-prep: error: {t / 'readonly'}: cannot write into the output directory (Permission denied)"
    assert not any((t / "readonly").iterdir())
    # The control: everything readable, the same process runs through and reads all four files.
    proc = unprivileged_prep(t / "corpus", "--output", out, *small)
    assert proc.returncode == 0, proc.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert [Path(s["path"]).name for s in m["sources"]] == ["a.txt", "d.txt", "e.txt", "c.txt"]


# ---------------------------------------------------------------------------------------------
# Bounded memory on a line of hundreds of MB


# Runs its arguments as a child and prints that child's exit code and peak RSS.
_MEASURE = """
import json, os, subprocess, sys
child = subprocess.Popen(sys.argv[1:])
_, status, usage = os.wait4(child.pid, 0)
print(json.dumps({"rc": os.waitstatus_to_exitcode(status), "maxrss_kb": usage.ru_maxrss}))
"""


def _run_measured(args: list, timeout: float) -> tuple[subprocess.CompletedProcess, float, float]:
    """(finished sift-prep, its peak RSS in MiB, wall seconds).

    Why a go-between process: Linux carries a parent's peak RSS into its child's ru_maxrss across
    fork and exec, so a direct child of pytest (hundreds of MiB by now) would report at least
    that; the child of a fresh, small interpreter reports its own peak."""
    t0 = time.monotonic()
    go = subprocess.Popen([sys.executable, "-c", _MEASURE, sys.executable, "-m", "data_prep",
                           *map(str, args), "--no-progress"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=ENV, start_new_session=True)
    try:
        out, err = go.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(go.pid, signal.SIGKILL)
        go.communicate()
        raise AssertionError(f"sift-prep ran over {timeout} s") from None
    result = json.loads(out.splitlines()[-1])
    return subprocess.CompletedProcess(args, result["rc"], "", err), result["maxrss_kb"] / 1024, \
        time.monotonic() - t0


def _word_level_tokenizer(path: Path) -> None:
    """A real tokenizers tokenizer, one token per whitespace-separated word (unknown ones
    [UNK]): ten times faster than WordPiece, so the test spends its time reading, and the token
    count says exactly whether a cut split a word."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate([*tk.SPECIAL_TOKENS, "the", "union", "of", "states"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path))


def test_a_huge_single_line_is_read_in_bounded_memory(tmp_path_factory):
    """A 256 MiB plain-text file without a line break: cut into pieces before spaces, never held
    whole (the old reader kept the line, copying it once a MiB read). As JSONL or a blank-line
    document that line is refused, by number, instead of allocated."""
    work = tmp_path_factory.mktemp("huge")
    try:
        tok_path = work / "tokenizer.json"
        _word_level_tokenizer(tok_path)
        # 1 MiB blocks of 150-character "words" and ordinary ones; spaces between, no line break.
        words = ("u" * 150 + " the union of states ").encode()
        block = (words * (2**20 // len(words) + 1))[: 2**20 - 1] + b" "
        huge = work / "huge.txt"
        with open(huge, "wb") as f:
            for _ in range(256):
                f.write(block)
        size_mib = huge.stat().st_size / 2**20

        proc, rss, wall = _run_measured([huge, "--output", work / "out", "--tokenizer", tok_path,
                                         "--valid-fraction", "0"], timeout=900)
        assert proc.returncode == 0, proc.stderr
        print(f"\n{size_mib:.0f} MiB single line: sift-prep peak RSS {rss:.0f} MiB, {wall:.1f} s")
        assert rss < size_mib / 2, f"peak RSS {rss:.0f} MiB for a {size_mib:.0f} MiB line"
        train = json.loads((work / "out" / "manifest.json").read_text())["splits"]["train"]
        # Every word whole, none lost: non-pad tokens = the words + the document's [SEP] + a
        # [CLS] and a closing [SEP] a row.
        assert train["num_tokens"] - 2 * train["num_sequences"] - 1 == 256 * len(block.split())
        shutil.rmtree(work / "out")

        proc, rss, _ = _run_measured([huge, "--output", work / "out", "--tokenizer", tok_path,
                                      "--doc-boundary", "blank-line"], timeout=300)
        limit = sources.MAX_LINE_CHARS
        assert _one_line(proc) == f"sift-prep: error: {huge}: line 1: longer than {limit} characters, " \
            "the most sift-prep reads as a line (--doc-boundary blank-line); refusing to hold it in memory"
        assert rss < size_mib / 2 and not (work / "out").exists()
        print(f"the same line in blank-line mode: refused, peak RSS {rss:.0f} MiB")

        jsonl = work / "huge.jsonl"
        with open(jsonl, "wb") as f:
            f.write(b'{"text": "short"}\n{"text": "')
            for _ in range(80):
                f.write(block)
            f.write(b'"}\n')
        proc, rss, _ = _run_measured([jsonl, "--output", work / "out", "--tokenizer", tok_path], timeout=300)
        assert _one_line(proc).startswith(f"sift-prep: error: {jsonl}: line 2: longer than {limit} characters")
        assert rss < size_mib / 2 and not (work / "out").exists()
        print(f"an 80 MiB JSONL record: refused, peak RSS {rss:.0f} MiB")
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Bad input: exit 2, one line naming the input, no traceback, no partial output


def _bad_cases(shared_data: Path, tmp: Path):
    empty = tmp / "empty.txt"
    empty.write_bytes(b"")
    nodir = tmp / "nodocs"
    nodir.mkdir()
    (nodir / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0")
    binary = tmp / "blob.txt"
    binary.write_bytes(bytes(range(256)) * 4)
    jsonl = tmp / "records.jsonl"
    jsonl.write_text(json.dumps({"body": "some text"}) + "\n")
    pirates = shared_data / "nltk" / "webtext" / "pirates.txt"
    return {
        "missing": ([tmp / "nope.txt"], [], tmp / "nope.txt"),
        "empty": ([empty], [], empty),
        "no-text-files": ([nodir], [], nodir),
        "binary": ([binary], [], binary),
        "invalid-utf8": ([pirates], [], pirates),
        "jsonl-field": ([jsonl], [], jsonl),
        "seq-len": ([pirates], ["--seq-len", "7"], "--seq-len"),
        "tokenizer-and-vocab": ([pirates], ["--tokenizer", "bert-base-uncased", "--vocab-size", "100"], "--vocab-size"),
        "unknown-tokenizer": ([pirates], ["--tokenizer", "no-such-org/no-such-tokenizer"], "no-such-org/no-such-tokenizer"),
        "hf-offline": (["hf:no-such-org/no-such-dataset"], [], "hf:no-such-org/no-such-dataset"),
    }


CASES = ["missing", "empty", "no-text-files", "binary", "invalid-utf8", "jsonl-field", "seq-len",
         "tokenizer-and-vocab", "unknown-tokenizer", "hf-offline"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_clear_line(case, shared_data, tmp_path):
    inputs, extra, named = _bad_cases(shared_data, tmp_path)[case]
    out = tmp_path / "out"
    proc = prep(*inputs, "--output", out, *extra, check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("sift-prep: error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert str(named) in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists() or not any(out.iterdir())


def test_replace_accepts_iso_8859_1(shared_data, tmp_path):
    out = tmp_path / "out"
    prep(shared_data / "nltk" / "webtext" / "pirates.txt", shared_data / "nltk" / "webtext" / "firefox.txt",
         "--output", out, "--encoding-errors", "replace", "--vocab-size", "1000")
    assert json.loads((out / "manifest.json").read_text())["splits"]["train"]["num_sequences"] > 100


def test_failure_after_a_fresh_start_leaves_no_output(shared_data, tmp_path):
    """A bad file after good ones: the error comes before anything is written."""
    out = tmp_path / "out"
    good = shared_data / "nltk" / "abc" / "rural.txt"
    proc = prep(good, shared_data / "nltk" / "webtext" / "pirates.txt", "--output", out, check=False)
    assert proc.returncode == 2 and "pirates.txt" in proc.stderr and "byte" in proc.stderr
    assert not out.exists()


def test_debug_shows_the_traceback(tmp_path):
    proc = prep(tmp_path / "nope.txt", "--output", tmp_path / "out", "--debug", check=False)
    assert proc.returncode == 2 and "Traceback" in proc.stderr


def test_rerun_with_the_tokenizer_gone_is_not_up_to_date(full, shared_data, tmp_path):
    """The up-to-date check covers the tokenizer: a copy without tokenizer/ is named, not trained on."""
    out, _ = full
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    shutil.rmtree(broken / "tokenizer")
    proc = prep(shared_data, "--output", broken, "--encoding-errors", "replace", "--valid-fraction",
                "0.02", "--shard-rows", "8192", check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "tokenizer/ is missing" in proc.stderr and "Traceback" not in proc.stderr
