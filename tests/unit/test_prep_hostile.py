"""sift-prep against bad input, table-driven: every case ends in exactly one line on stderr,
`sift-prep: error: <subject>: <problem>`, the right exit code, no traceback, and the output
directory not created (or, when it existed, unchanged).

The cases run `data_prep.cli.main(argv)` in this process on real files (a few addresses of the
embedded corpus and damaged copies of them); every one fails before any tokenizer is trained, so
the whole table takes a few seconds. Cases that need another user, a second process or a kill
are in tests/e2e/test_prep.py.
"""
from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
from pathlib import Path

import pytest

from data_prep import build, cli, sources


def _write_tokenizer_without_specials(path: Path) -> None:
    """A real, loadable tokenizers JSON file that lacks [PAD]/[CLS]/[SEP]."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab={"[UNK]": 0, "the": 1, "union": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Every input file of the table: good ones (real text) and damaged ones."""
    r = tmp_path_factory.mktemp("hostile")
    with lzma.open(sources.EMBEDDED_CORPUS, "rt", encoding="utf-8") as f:
        texts = [json.loads(next(f))["text"] for _ in range(3)]
    text = texts[0]
    (r / "good.txt").write_text(text, encoding="utf-8")
    corpus = r / "corpus"
    corpus.mkdir()
    for i, t in enumerate(texts):
        (corpus / f"{i}.txt").write_text(t, encoding="utf-8")

    (r / "empty.txt").write_bytes(b"")
    (r / "spaces.txt").write_text(" \n\t\n  \n")
    (r / "nul.txt").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0" + bytes(range(256)) * 4)
    (r / "late_nul.txt").write_bytes(text.encode()[:20000] + b"\0" + b"more text\n")
    (r / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me br\u00fbl\u00e9e\n".encode("latin-1"))
    (r / "cut_utf8.txt").write_bytes("words and a caf\u00e9".encode()[:-1])
    (r / "bom.txt").write_bytes("\ufeff \n".encode())

    (r / "notjson.jsonl").write_text('{"text": "fine"}\n{"text": unquoted}\n')
    (r / "nofield.jsonl").write_text(json.dumps({"body": text[:200]}) + "\n")
    (r / "number.jsonl").write_text(json.dumps({"text": 42}) + "\n")
    (r / "array.jsonl").write_text(json.dumps([text[:100]]) + "\n")
    (r / "deep.jsonl").write_text("[" * 100_000 + "]" * 100_000 + "\n")
    (r / "bigint.jsonl").write_text('{"text": "x", "n": ' + "7" * 5000 + "}\n")
    (r / "allempty.jsonl").write_text('{"text": ""}\n{"text": "   "}\n{"text": null}\n')

    (r / "notgzip.txt.gz").write_bytes(text.encode()[:3000])
    gz = gzip.compress(text.encode())
    # A valid gzip header and then garbage where the deflate stream should be.
    (r / "baddeflate.txt.gz").write_bytes(gz[:10] + bytes(range(200, 256)) * 40)
    (r / "truncated.txt.gz").write_bytes(gz[: len(gz) // 2])
    (r / "empty.txt.gz").write_bytes(b"")
    (r / "nothing.txt.gz").write_bytes(gzip.compress(b""))
    (r / "corrupt.txt.xz").write_bytes(lzma.compress(text.encode())[:40] + b"\xff" * 500)
    (r / "corrupt.txt.bz2").write_bytes(b"BZh9" + b"\x00\xff" * 300)
    (r / "truncated.txt.bz2").write_bytes(bz2.compress(text.encode())[:-50])

    (r / "corrupt.parquet").write_bytes(b"PAR1" + text.encode()[:2000])
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": [text[:500]]}), r / "nocolumn.parquet")
    pq.write_table(pa.table({"text": [1, 2, 3]}), r / "ints.parquet")

    (r / "nodocs").mkdir()
    (r / "nodocs" / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (r / "globdirs" / "a").mkdir(parents=True)
    (r / "globdirs" / "a" / "notes.csv").write_text("a,b\n")
    os.mkfifo(r / "fifo.txt")
    os.symlink(r / "gone.txt", r / "dangling.txt")
    os.symlink(r / "loop.txt", r / "loop.txt")
    for sub, make in (("danglingdir", lambda d: os.symlink(d / "gone.txt", d / "b.txt")),
                      ("fifodir", lambda d: os.mkfifo(d / "b.txt"))):
        d = r / sub
        d.mkdir()
        (d / "a.txt").write_text(text)
        make(d)

    (r / "garbage.json").write_bytes(b"\x00\x01 not a tokenizer at all")
    (r / "empty.json").write_bytes(b"")
    (r / "other.json").write_text(json.dumps({"model": {"type": "Nope"}, "version": "1.0"}))
    (r / "tokdir").mkdir()
    (r / "tokdir" / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    _write_tokenizer_without_specials(r / "nospecials.json")
    return r


def _out_file(out: Path) -> None:
    out.write_text("not a directory\n")


def _out_foreign(out: Path) -> None:
    out.mkdir()
    (out / "notes.txt").write_text("somebody's notes\n")


def _out_bad_manifest(out: Path) -> None:
    out.mkdir()
    (out / "manifest.json").write_text('{"format": "sift-shards", ')


def _out_other_manifest(out: Path) -> None:
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"format": "something-else"}))


def _out_bad_state(out: Path) -> None:
    out.mkdir()
    (out / ".sift-prep-state.json").write_bytes(b"\xff\xfe not json")


def _out_list_manifest(out: Path) -> None:
    out.mkdir()
    (out / "manifest.json").write_text("[]")


def _out_list_state(out: Path) -> None:
    out.mkdir()
    (out / ".sift-prep-state.json").write_text("[1, 2]")


OUT_SETUPS = {"file": _out_file, "foreign": _out_foreign, "bad-manifest": _out_bad_manifest,
              "other-manifest": _out_other_manifest, "bad-state": _out_bad_state,
              "list-manifest": _out_list_manifest, "list-state": _out_list_state}

GOOD = "{root}/good.txt"

# (id, argv with {root} and {out}, expected exit code, words the one line must hold, output setup)
CASES = [
    # Paths
    ("missing-file", ["{root}/nope.txt"], 2, ["{root}/nope.txt", "no such file or directory"], None),
    ("missing-dir", ["{root}/nope/"], 2, ["nope", "no such file or directory"], None),
    ("file-as-dir", ["{root}/good.txt/x.txt"], 2, ["good.txt/x.txt", "no such file"], None),
    ("file-with-slash", ["{root}/good.txt/"], 2, ["good.txt/", "not a directory"], None),
    ("empty-spec", [""], 2, ["empty input path"], None),
    ("glob-nothing", ["{root}/*.nothing"], 2, ["*.nothing", "no file matches"], None),
    ("glob-only-dirs", ["{root}/globdirs/*"], 2, ["globdirs/*", "only directories"], None),
    ("dir-no-text", ["{root}/nodocs"], 2, ["nodocs", "no text, JSONL or Parquet"], None),
    ("fifo", ["{root}/fifo.txt"], 2, ["fifo.txt", "not a regular file"], None),
    ("dev-null", ["/dev/null"], 2, ["/dev/null", "not a regular file"], None),
    ("dangling-link", ["{root}/dangling.txt"], 2, ["dangling.txt", "broken symbolic link"], None),
    ("link-loop", ["{root}/loop.txt"], 2, ["loop.txt", "symbolic links"], None),
    ("dangling-in-dir", ["{root}/danglingdir"], 2, ["danglingdir/b.txt", "broken symbolic link"], None),
    ("fifo-in-dir", ["{root}/fifodir"], 2, ["fifodir/b.txt", "not a regular file"], None),
    ("newline-in-name", ["{root}/bad\nname.txt"], 2, ["bad\\nname.txt", "no such file"], None),
    ("name-too-long", ["{root}/" + "n" * 300 + ".txt"], 2, ["File name too long"], None),
    ("hf-empty", ["hf:"], 2, ["hf:", "expected hf:NAME"], None),
    ("valid-input-missing", [GOOD, "--valid-input", "{root}/nope.txt"], 2, ["nope.txt", "no such file"], None),
    ("all-inputs-valid", [GOOD, "--valid-input", GOOD], 2, ["--valid-input", "no training documents"], None),
    # Contents
    ("empty-file", ["{root}/empty.txt"], 2, ["empty.txt", "empty file"], None),
    ("whitespace-only", ["{root}/spaces.txt"], 2, ["spaces.txt", "no text"], None),
    ("byte-order-mark-only", ["{root}/bom.txt"], 2, ["bom.txt", "no text"], None),
    ("binary", ["{root}/nul.txt"], 2, ["nul.txt", "binary file"], None),
    ("nul-after-8k", [GOOD, "{root}/late_nul.txt"], 2, ["late_nul.txt", "binary file"], None),
    ("invalid-utf8", ["{root}/latin1.txt"], 2, ["latin1.txt", "invalid UTF-8 at byte 3"], None),
    ("truncated-utf8", ["{root}/cut_utf8.txt"], 2, ["cut_utf8.txt", "truncated character"], None),
    ("jsonl-not-json", ["{root}/notjson.jsonl"], 2, ["notjson.jsonl", "line 2", "not valid JSON"], None),
    ("jsonl-no-field", ["{root}/nofield.jsonl"], 2, ["nofield.jsonl", "no 'text' field", "body"], None),
    ("jsonl-other-field", ["{root}/nofield.jsonl", "--text-field", "content"], 2, ["no 'content' field"], None),
    ("jsonl-number", ["{root}/number.jsonl"], 2, ["number.jsonl", "is int, not text"], None),
    ("jsonl-array", ["{root}/array.jsonl"], 2, ["array.jsonl", "expected a JSON object"], None),
    ("jsonl-too-deep", ["{root}/deep.jsonl"], 2, ["deep.jsonl", "line 1", "not usable JSON"], None),
    ("jsonl-huge-int", ["{root}/bigint.jsonl"], 2, ["bigint.jsonl", "line 1", "not usable JSON"], None),
    ("jsonl-all-empty", ["{root}/allempty.jsonl"], 2, ["allempty.jsonl", "no text"], None),
    ("gz-not-gzip", ["{root}/notgzip.txt.gz"], 2, ["notgzip.txt.gz", "cannot read"], None),
    ("gz-bad-deflate", ["{root}/baddeflate.txt.gz"], 2, ["baddeflate.txt.gz", "cannot read"], None),
    ("gz-truncated", ["{root}/truncated.txt.gz"], 2, ["truncated.txt.gz", "cannot read"], None),
    ("gz-zero-bytes", ["{root}/empty.txt.gz"], 2, ["empty.txt.gz", "empty file"], None),
    ("gz-of-nothing", ["{root}/nothing.txt.gz"], 2, ["nothing.txt.gz", "no text"], None),
    ("xz-corrupt", ["{root}/corrupt.txt.xz"], 2, ["corrupt.txt.xz", "cannot read"], None),
    ("bz2-corrupt", ["{root}/corrupt.txt.bz2"], 2, ["corrupt.txt.bz2", "cannot read"], None),
    ("bz2-truncated", ["{root}/truncated.txt.bz2"], 2, ["truncated.txt.bz2", "cannot read"], None),
    ("parquet-corrupt", ["{root}/corrupt.parquet"], 2, ["corrupt.parquet", "cannot read Parquet"], None),
    ("parquet-no-column", ["{root}/nocolumn.parquet"], 2, ["nocolumn.parquet", "no 'text' column", "body"], None),
    ("parquet-ints", ["{root}/ints.parquet"], 2, ["ints.parquet", "holds int, not text"], None),
    # The output directory
    ("output-is-file", [GOOD], 2, ["{out}", "not a directory"], "file"),
    ("output-parent-is-file", [GOOD, "--output", "{root}/good.txt/out"], 2, ["good.txt", "not a directory"], None),
    ("output-is-input-dir", ["{root}/corpus", "--output", "{root}/corpus"], 2, ["is the input directory"], None),
    ("output-inside-input", ["{root}/corpus", "--output", "{root}/corpus/prep"], 2, ["corpus/prep", "inside the input directory"], None),
    ("input-inside-output", ["{out}/notes.txt"], 2, ["{out}", "holds the input"], "foreign"),
    ("output-foreign", [GOOD], 2, ["{out}", "not empty", "no sift-prep output"], "foreign"),
    ("output-bad-manifest", [GOOD], 2, ["manifest.json", "unreadable JSON"], "bad-manifest"),
    ("output-other-manifest", [GOOD], 2, ["not a sift-shards manifest"], "other-manifest"),
    ("output-bad-state", [GOOD], 2, [".sift-prep-state.json", "unreadable JSON"], "bad-state"),
    ("output-list-manifest", [GOOD], 2, ["manifest.json", "not a JSON object (a list)"], "list-manifest"),
    ("output-list-state", [GOOD], 2, [".sift-prep-state.json", "not a JSON object (a list)"], "list-state"),
    ("output-empty", [GOOD, "--output", ""], 2, ["--output", "must not be empty"], None),
    ("output-missing", [GOOD, "--no-output"], 2, ["--output"], None),
    # The tokenizer
    ("tokenizer-garbage", [GOOD, "--tokenizer", "{root}/garbage.json"], 2, ["garbage.json", "not a tokenizers JSON file"], None),
    ("tokenizer-empty", [GOOD, "--tokenizer", "{root}/empty.json"], 2, ["empty.json", "not a tokenizers JSON file"], None),
    ("tokenizer-not-one", [GOOD, "--tokenizer", "{root}/other.json"], 2, ["other.json", "not a tokenizers JSON file"], None),
    ("tokenizer-missing", [GOOD, "--tokenizer", "{root}/nope/tokenizer.json"], 2, ["nope/tokenizer.json", "no such file"], None),
    ("tokenizer-dir", [GOOD, "--tokenizer", "{root}/tokdir"], 2, ["tokdir", "has no tokenizer.json"], None),
    ("tokenizer-no-specials", [GOOD, "--tokenizer", "{root}/nospecials.json"], 2, ["--tokenizer", "lacks the special tokens"], None),
    # Flags
    ("tokenizer-and-vocab", [GOOD, "--tokenizer", "x", "--vocab-size", "100"], 2, ["not allowed with"], None),
    ("lowercase-and-cased", [GOOD, "--lowercase", "--cased"], 2, ["not allowed with"], None),
    ("seq-len-7", [GOOD, "--seq-len", "7"], 2, ["--seq-len", "at least 8"], None),
    ("seq-len-huge", [GOOD, "--seq-len", "100000"], 2, ["--seq-len", "at most 65536"], None),
    ("seq-len-text", [GOOD, "--seq-len", "long"], 2, ["--seq-len", "invalid int"], None),
    ("vocab-0", [GOOD, "--vocab-size", "0"], 2, ["--vocab-size", "at least 16", "got 0"], None),
    ("vocab-negative", [GOOD, "--vocab-size", "-5"], 2, ["--vocab-size", "at least 16"], None),
    ("vocab-huge", [GOOD, "--vocab-size", "2000000"], 2, ["--vocab-size", "at most 1000000"], None),
    ("workers-negative", [GOOD, "--workers", "-1"], 2, ["--workers", "got -1"], None),
    ("workers-huge", [GOOD, "--workers", "100000"], 2, ["--workers", f"at most {build.max_workers()}"], None),
    ("shard-rows-0", [GOOD, "--shard-rows", "0"], 2, ["--shard-rows", "at least 1"], None),
    ("shard-rows-huge", [GOOD, "--shard-rows", "1000000000"], 2, ["--shard-rows", "at most 1 GiB", "2097152 rows"], None),
    ("shard-rows-long-seq", [GOOD, "--shard-rows", "20000", "--seq-len", "16384"], 2, ["--shard-rows", "at most 1 GiB"], None),
    ("valid-fraction-1", [GOOD, "--valid-fraction", "1"], 2, ["--valid-fraction", "[0, 1)"], None),
    ("valid-fraction-negative", [GOOD, "--valid-fraction", "-0.5"], 2, ["--valid-fraction", "[0, 1)"], None),
    ("valid-fraction-nan", [GOOD, "--valid-fraction", "nan"], 2, ["--valid-fraction", "got nan"], None),
    ("text-field-empty", ["{root}/nofield.jsonl", "--text-field", ""], 2, ["--text-field", "must not be empty"], None),
    ("encoding-errors-bogus", [GOOD, "--encoding-errors", "ignore"], 2, ["--encoding-errors", "invalid choice"], None),
    ("doc-boundary-bogus", [GOOD, "--doc-boundary", "page"], 2, ["--doc-boundary", "invalid choice"], None),
    ("unknown-flag", [GOOD, "--vocab", "100", "--frobnicate"], 2, ["unrecognized arguments", "--frobnicate"], None),
    # Prep across nodes, deduplication
    ("num-shards-alone", [GOOD, "--num-shards", "2"], 2, ["--num-shards", "go together"], None),
    ("shard-index-alone", [GOOD, "--shard-index", "1"], 2, ["--shard-index", "go together"], None),
    ("shard-index-too-big", [GOOD, "--num-shards", "2", "--shard-index", "2"], 2, ["--shard-index", "[0, 1]", "got 2"], None),
    ("shard-index-negative", [GOOD, "--num-shards", "2", "--shard-index", "-1"], 2, ["--shard-index", "got -1"], None),
    ("num-shards-0", [GOOD, "--num-shards", "0", "--shard-index", "0"], 2, ["--num-shards", "got 0"], None),
    ("shard-from-env-and-flags", [GOOD, "--shard-from-env", "--num-shards", "2", "--shard-index", "0"], 2,
     ["--shard-from-env", "drop --num-shards"], None),
    ("tokenizer-sample-bare", [GOOD, "--tokenizer-sample", "100"], 2, ["--tokenizer-sample", "like 100MB"], None),
    ("tokenizer-sample-unit", [GOOD, "--tokenizer-sample", "10XB"], 2, ["--tokenizer-sample", "'10XB'"], None),
    ("tokenizer-sample-zero", [GOOD, "--tokenizer-sample", "0docs"], 2, ["--tokenizer-sample", "at least 1"], None),
    ("tokenizer-sample-loaded", [GOOD, "--tokenizer", "{root}/nospecials.json", "--tokenizer-sample", "1MB"], 2,
     ["--tokenizer-sample", "drop one of the two"], None),
    ("dedup-minhash", [GOOD, "--dedup", "minhash"], 2, ["--dedup", "invalid choice"], None),
    ("merge-no-parts", ["merge"], 2, ["merge", "no part directories given"], None),
    ("merge-no-such-part", ["merge", "{root}/nope"], 2, ["{root}/nope", "no such directory"], None),
    ("merge-file-as-part", ["merge", "{root}/good.txt"], 2, ["good.txt", "not a directory"], None),
    ("merge-not-an-output", ["merge", "{root}/corpus"], 2, ["{root}/corpus", "not a sift-prep output"], None),
    ("merge-empty-part-name", ["merge", ""], 2, ["PART_DIR", "must not be empty"], None),
    ("merge-unknown-flag", ["merge", "{root}/corpus", "--dedup", "exact"], 2, ["unrecognized arguments"], None),
]


def tree(path: Path) -> dict[str, bytes] | str | None:
    """What is at `path`: None, a file's bytes, or every file below a directory."""
    if not os.path.lexists(path):
        return None
    if not path.is_dir():
        return path.read_bytes().decode("latin-1")
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else b"<dir>")
            for p in sorted(path.rglob("*"))}


def run_main(argv: list[str]) -> int:
    try:
        return cli.main(argv)
    except SystemExit as e:  # argparse's errors
        return e.code


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(case, root, tmp_path, capsys):
    check_one_line(case, {"root": str(root)}, [root], tmp_path, capsys)


def check_one_line(case, fill: dict, inputs: list[Path], tmp_path: Path, capsys) -> None:
    """Run the case; one line, its words, the exit code; the output and `inputs` unchanged."""
    _, argv, code, words, setup = case
    out = tmp_path / "out"
    if setup:
        OUT_SETUPS[setup](out)
    fill = {**fill, "out": str(out)}
    argv = [a.format(**fill) for a in argv]
    if "--output" not in argv and "--no-output" not in argv:
        argv += ["--output", str(out)]
    argv = [a for a in argv if a != "--no-output"]
    named = argv[argv.index("--output") + 1] if "--output" in argv else str(out)
    watched = [Path(named)] if named else []  # "" is refused before anything is looked at
    before = {p: tree(p) for p in [*watched, *inputs]}

    got = run_main(argv)

    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert got == code, err
    assert len(lines) == 1 and err.endswith("\n"), err
    assert lines[0].startswith("sift-prep: error: ") and "Traceback" not in err, err
    for w in words:
        assert w.format(**fill) in lines[0], (w, lines[0])
    assert {p: tree(p) for p in [*watched, *inputs]} == before, "the output or an input changed"
    left = [*tmp_path.glob("**/.*.tmp*"), *tmp_path.glob("**/.sift-prep-probe-*"),
            *(p for r in inputs for p in r.glob("**/.*.tmp*"))]
    assert not left, f"temporary files left: {left}"


LAUNCHER_VARS = ("SLURM_PROCID", "SLURM_NTASKS", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
                 "PMI_RANK", "PMI_SIZE")
ENV_CASES = [
    ("no-launcher", {}, [GOOD, "--shard-from-env"], ["--shard-from-env", "none of SLURM_PROCID/SLURM_NTASKS"]),
    ("garbled", {"SLURM_PROCID": "one", "SLURM_NTASKS": "2"}, [GOOD, "--shard-from-env"],
     ["--shard-from-env", "SLURM_PROCID='one'", "not two integers"]),
    ("rank-past-size", {"PMI_RANK": "3", "PMI_SIZE": "3"}, [GOOD, "--shard-from-env"], ["--shard-index", "got 3"]),
    # Every task of srun gets the same command line: one --output would be written by all.
    ("no-index-in-output", {"SLURM_PROCID": "1", "SLURM_NTASKS": "2"}, [GOOD, "--shard-from-env"],
     ["--output", "put {{index}} in it"]),
]


@pytest.mark.parametrize("case", ENV_CASES, ids=[c[0] for c in ENV_CASES])
def test_the_slice_from_a_bad_launcher_environment_is_one_line(case, root, tmp_path, capsys, monkeypatch):
    name, env, argv, words = case
    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    check_one_line((name, argv, 2, words, None), {"root": str(root)}, [root], tmp_path, capsys)


# ---------------------------------------------------------------------------------------------
# sift-prep merge against parts that do not belong together

PART_FLAGS = ["--vocab-size", "200", "--seq-len", "16", "--shard-rows", "64", "--tokenizer-sample",
              "2docs", "--valid-fraction", "0", "--no-progress"]


def _prep(*argv) -> None:
    assert cli.main([*map(str, argv)]) == 0


@pytest.fixture(scope="module")
def part_sets(root, tmp_path_factory) -> Path:
    """Real parts of the three-address corpus, and parts that do not fit with them."""
    import shutil
    import subprocess
    import sys

    p = tmp_path_factory.mktemp("parts")
    corpus = root / "corpus"
    for i in range(2):
        _prep(corpus, "-o", p / f"p{i}", *PART_FLAGS, "--num-shards", 2, "--shard-index", i)
        _prep(corpus, "-o", p / f"d{i}", *PART_FLAGS, "--num-shards", 2, "--shard-index", i, "--dedup", "exact")
    _prep(corpus, "-o", p / "vocab300", *PART_FLAGS, "--vocab-size", "300", "--num-shards", 2, "--shard-index", 1)
    _prep(corpus, "-o", p / "seq32", *PART_FLAGS, "--seq-len", "32", "--num-shards", 2, "--shard-index", 1)
    _prep(corpus, "-o", p / "of3", *PART_FLAGS, "--num-shards", 3, "--shard-index", 1)
    _prep(corpus, "-o", p / "whole", *PART_FLAGS)
    # Same loaded tokenizer, other inputs: only the inputs differ.
    _prep(corpus, "-o", p / "q0", "--tokenizer", p / "p0" / "tokenizer", "--seq-len", "16", "--num-shards", 2,
          "--shard-index", 0, "--no-progress")
    _prep(corpus, root / "good.txt", "-o", p / "q1", "--tokenizer", p / "p0" / "tokenizer", "--seq-len", "16",
          "--num-shards", 2, "--shard-index", 1, "--no-progress")
    shutil.copytree(p / "p0", p / "p0copy")
    shutil.copytree(p / "p1", p / "damaged")
    shard = p / "damaged" / "train" / "shard_000001.npy"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    shutil.copytree(p / "d1", p / "d1hashes")
    (p / "d1hashes" / "doc_hashes.npy").write_bytes(b"")
    # Part 1 holding part 0's documents: d0's hash list in a copy of d1, its sha256 updated in the
    # manifest, so the copy passes every checksum and only the shared-hash check can refuse it.
    shutil.copytree(p / "d1", p / "d1shared")
    shutil.copyfile(p / "d0" / "doc_hashes.npy", p / "d1shared" / "doc_hashes.npy")
    manifest = json.loads((p / "d1shared" / "manifest.json").read_text())
    d0_hashes = json.loads((p / "d0" / "manifest.json").read_text())["doc_hashes"]
    assert d0_hashes["count"] > 0 and d0_hashes["sha256"] != manifest["doc_hashes"]["sha256"]
    manifest["doc_hashes"] = {**manifest["doc_hashes"], "count": d0_hashes["count"],
                              "sha256": build.file_sha256(p / "d1shared" / "doc_hashes.npy")}
    (p / "d1shared" / "manifest.json").write_text(json.dumps(manifest))
    # A node killed after its first shard file (the kill hook of tests/e2e/test_prep.py).
    killed = subprocess.run([sys.executable, "-m", "data_prep", corpus, "-o", p / "half", *PART_FLAGS,
                             "--num-shards", "2", "--shard-index", "1"], capture_output=True,
                            env={**os.environ, build.KILL_AT_SHARD_ENV: "1"})
    assert killed.returncode == -9, killed.stderr
    (p / "foreign").mkdir()
    (p / "foreign" / "notes.txt").write_text("somebody's notes\n")
    for name, edit in (("listed", lambda m: [m]), ("nokeys", lambda m: {**m, "part": {}}),
                       ("strindex", lambda m: {**m, "part": {"index": "1", "count": 2}}),
                       ("nosplits", lambda m: {**m, "splits": []})):
        shutil.copytree(p / "p1", p / name)
        manifest = p / name / "manifest.json"
        manifest.write_text(json.dumps(edit(json.loads(manifest.read_text()))))
    return p


P = "{parts}"
MERGE_CASES = [
    ("missing-part", ["merge", f"{P}/p0"], 2, ["part 1 of 2", "missing", "given: 0", "--shard-index 1"], None),
    ("same-slice-twice", ["merge", f"{P}/p0", f"{P}/p0copy", f"{P}/p1"], 2,
     [f"{P}/p0copy", "claims part 0 of 2", f"so does {P}/p0"], None),
    ("same-dir-twice", ["merge", f"{P}/p0", f"{P}/p0", f"{P}/p1"], 2, [f"{P}/p0", "given twice"], None),
    ("other-tokenizer", ["merge", f"{P}/p0", f"{P}/vocab300"], 2,
     [f"{P}/vocab300", f"another tokenizer than {P}/p0", "tokenizer_fingerprint"], None),
    ("other-settings", ["merge", f"{P}/p0", f"{P}/seq32"], 2, [f"{P}/seq32", "other settings", "seq_len"], None),
    ("other-inputs", ["merge", f"{P}/q0", f"{P}/q1"], 2, [f"{P}/q1", "other inputs"], None),
    ("other-count", ["merge", f"{P}/p0", f"{P}/of3"], 2, [f"{P}/of3", "part 1 of 3", "different runs"], None),
    ("dedup-and-not", ["merge", f"{P}/p0", f"{P}/d1"], 2, [f"{P}/d1", "other settings", "dedup"], None),
    ("half-written", ["merge", f"{P}/p0", f"{P}/half"], 2,
     [f"{P}/half", "half-written part", "--num-shards 2 --shard-index 1", "resumes"], None),
    ("not-a-part", ["merge", f"{P}/whole"], 2, [f"{P}/whole", "not a part", "--num-shards"], None),
    ("manifest-a-list", ["merge", f"{P}/p0", f"{P}/listed"], 2, [f"{P}/listed", "not a JSON object"], None),
    ("part-record-empty", ["merge", f"{P}/p0", f"{P}/nokeys"], 2, [f"{P}/nokeys", "manifest.json is damaged"], None),
    ("part-index-a-string", ["merge", f"{P}/p0", f"{P}/strindex"], 2, [f"{P}/strindex", "is damaged"], None),
    ("splits-a-list", ["merge", f"{P}/p0", f"{P}/nosplits"], 2, [f"{P}/nosplits", "is damaged"], None),
    ("damaged-shard", ["merge", f"{P}/p0", f"{P}/damaged"], 2,
     [f"{P}/damaged", "train/shard_000001.npy", "sha256", "rerun that node's command"], None),
    ("damaged-hashes", ["merge", f"{P}/d0", f"{P}/d1hashes"], 2, [f"{P}/d1hashes", "doc_hashes.npy", "sha256"], None),
    ("document-in-two-parts", ["merge", f"{P}/d0", f"{P}/d1shared"], 2,
     [f"{P}/d1shared", f"holds a document that {P}/d0 holds too (hash ", "--dedup exact"], None),
    ("output-is-a-part", ["merge", f"{P}/p0", f"{P}/p1", "--output", f"{P}/p1"], 2, [f"{P}/p1", "is the part"], None),
    ("output-in-a-part", ["merge", f"{P}/p0", f"{P}/p1", "--output", f"{P}/p0/merged"], 2,
     ["p0/merged", "inside the part"], None),
    ("output-foreign", ["merge", f"{P}/p0", f"{P}/p1", "--output", f"{P}/foreign"], 2,
     [f"{P}/foreign", "holds other files"], None),
    ("output-whole-run", ["merge", f"{P}/p0", f"{P}/p1", "--output", f"{P}/whole"], 2,
     [f"{P}/whole", "not a merge"], None),
    # A node's command run into another node's directory
    ("part-into-another-part", ["{root}/corpus", "--output", f"{P}/p0", *PART_FLAGS, "--num-shards", "2",
                                "--shard-index", "1"], 2, [f"{P}/p0", "holds part 0 of 2, this run is part 1 of 2"], None),
    ("whole-into-a-part", ["{root}/corpus", "--output", f"{P}/p0", *PART_FLAGS], 2,
     [f"{P}/p0", "holds part 0 of 2, this run is all documents"], None),
]


@pytest.mark.parametrize("case", MERGE_CASES, ids=[c[0] for c in MERGE_CASES])
def test_bad_merge_is_one_line(case, root, part_sets, tmp_path, capsys):
    """Each refused merge names the part and what to do; no part and no output changes."""
    check_one_line(case, {"root": str(root), "parts": str(part_sets)}, [part_sets], tmp_path, capsys)


def test_the_parts_of_the_table_do_merge(part_sets, tmp_path):
    """The good parts of the merge table merge (so each refusal above is about its one fault)."""
    for a, b in (("p0", "p1"), ("d0", "d1")):
        assert cli.main(["merge", "--output", str(tmp_path / a), str(part_sets / a), str(part_sets / b)]) == 0


def test_the_table_is_big_enough():
    assert len(CASES) >= 30 and len({c[0] for c in CASES}) == len(CASES)
