"""Unit tests for data_prep's pure parts and readers, on real corpora and a real tokenizer.

The real text is the embedded State of the Union corpus (data_prep/corpus), laid out as files the
way each test needs. A few reader tests keep the raw files in ../shared/data (skipped when it is
absent): they test byte-level traits that the embedded corpus, stored as clean UTF-8 with LF line
ends, does not have (ISO-8859-1 bytes, CRLF and NEL line ends, undecodable UTF-8).
"""
from __future__ import annotations

import bz2
import gzip
import json
import lzma
from pathlib import Path

import numpy as np
import pytest

from data_prep import build, shards, sources
from data_prep import tokenizer as tk
from data_prep.errors import PrepError

LAYOUT = shards.RowLayout(seq_len=10, cls_id=2, sep_id=3, pad_id=0)


# ---------------------------------------------------------------------------------------------
# Row layout and packing


@pytest.mark.parametrize("n", [1, 7, 8, 9, 16, 17, 40])
def test_make_rows_layout(n):
    stream = np.arange(100, 100 + n, dtype=np.uint32)
    rows = shards.make_rows(stream, LAYOUT, np.dtype(np.uint16))
    body = LAYOUT.body
    assert rows.shape == (-(-n // body), 10) and rows.dtype == np.uint16
    assert (rows[:, 0] == 2).all()
    # Every row: [CLS] body [SEP] then only [PAD]; the bodies concatenated give the stream back.
    got = []
    for r in rows:
        sep = int(np.flatnonzero(r == 3)[0])
        assert (r[sep + 1:] == 0).all()
        got.extend(r[1:sep].tolist())
    assert got == stream.tolist()
    assert (rows[:-1, -1] == 3).all()


def test_make_rows_rejects_short_rows():
    with pytest.raises(ValueError):
        shards.RowLayout(seq_len=7, cls_id=2, sep_id=3, pad_id=0)


def _docs(seed: int, num_docs: int) -> list[list[np.ndarray]]:
    """Documents as lists of pieces of random ids (>= 5, so never a special id)."""
    rng = np.random.default_rng(seed)
    return [[rng.integers(5, 1000, size=int(rng.integers(0, 30)), dtype=np.uint32)
             for _ in range(int(rng.integers(1, 4)))] for _ in range(num_docs)]


def _pack(docs, shard_rows, start=shards.Position(0, 0)):
    packer = shards.Packer(LAYOUT, shard_rows, np.dtype(np.uint16), start)
    out = []
    for d, pieces in enumerate(docs):
        if not packer.wants(d):
            continue
        for i, ids in enumerate(pieces):
            packer.add(d, ids, ends_document=i == len(pieces) - 1)
            while packer.ready():
                out.append(packer.take_shard())
    last = packer.finish()
    return out + ([last] if last is not None else [])


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shard_rows", [1, 3])
def test_packer_matches_flat_stream_and_resumes_at_every_shard(seed, shard_rows):
    docs = _docs(seed, 25)
    stream = np.concatenate([np.append(np.concatenate(p), 3) for p in docs]).astype(np.uint32)
    expect = shards.make_rows(stream, LAYOUT, np.dtype(np.uint16))
    got = _pack(docs, shard_rows)
    assert all(len(rows) == shard_rows for rows, _ in got[:-1])
    np.testing.assert_array_equal(np.concatenate([rows for rows, _ in got]), expect)
    # Resuming from the position recorded after shard i reproduces shards i+1.. exactly.
    for i, (_, after) in enumerate(got[:-1]):
        resumed = _pack(docs, shard_rows, start=after)
        assert len(resumed) == len(got) - i - 1
        for (a, _), (b, _) in zip(resumed, got[i + 1:]):
            np.testing.assert_array_equal(a, b)


def test_dtype_for_vocab():
    assert shards.dtype_for(65536) == np.uint16 and shards.dtype_for(65537) == np.uint32


# ---------------------------------------------------------------------------------------------
# Train / valid split


def test_split_is_a_fraction_of_documents_and_deterministic():
    picked = [d for d in range(20000) if build.split_of(d, False, 0.05, None) == "valid"]
    assert 800 < len(picked) < 1200
    assert picked == [d for d in range(20000) if build.valid_key(d) < 0.05]
    assert build.split_of(3, True, 0.0, None) == "valid"


def _fallback(docs, fraction):
    picker = build.FallbackPicker(fraction)
    for d in docs:
        picker.see(d)
    return picker.fallback


def test_fallback_sends_exactly_one_document_to_valid():
    docs = list(range(5))
    f = min(build.valid_key(d) for d in docs) / 2  # small enough that no key is below it
    fb = _fallback(docs, f)
    assert fb in docs and [d for d in docs if build.split_of(d, False, f, fb) == "valid"] == [fb]
    assert fb == min(docs, key=build.valid_key)
    assert _fallback([0], f) is None and _fallback(docs, 0.0) is None
    assert _fallback(docs, 0.9) is None  # the fraction already picked some


# ---------------------------------------------------------------------------------------------
# Sources


@pytest.fixture(scope="module")
def addresses() -> list[dict]:
    """The embedded corpus's records: {"text": one address, "source": its nltk file name}."""
    with lzma.open(sources.EMBEDDED_CORPUS, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def address_dir(addresses, tmp_path_factory) -> Path:
    """The addresses as nltk ships them: one 19xx-Name.txt / 20xx-Name.txt file each, and a README."""
    d = tmp_path_factory.mktemp("state_union")
    for a in addresses:
        (d / a["source"]).write_text(a["text"], encoding="utf-8")
    (d / "README").write_text("State of the Union addresses 1945-2006, from data_prep/corpus.\n")
    return d


@pytest.fixture(scope="module")
def one_file_corpus(addresses, tmp_path_factory) -> Path:
    """Every address in one plain-text file (2 MB), a blank line between two; the addresses hold
    blank and whitespace-only lines of their own between paragraphs."""
    path = tmp_path_factory.mktemp("one_file") / "state_union.txt"
    path.write_text("\n\n".join(a["text"] for a in addresses), encoding="utf-8")
    return path


def _texts(source, **kw):
    opts = sources.ReadOptions(**kw)
    docs, cur = [], []
    for piece, ends in sources.iter_pieces(source, opts):
        cur.append(piece)
        if ends:
            docs.append("".join(cur))
            cur = []
    assert not cur
    return docs


def test_directory_walk_is_sorted_and_skips_files_without_text_suffix(address_dir, addresses):
    found = sources.resolve_inputs([str(address_dir)])
    names = [Path(s.name).name for s in found]
    assert names == sorted(names) and "README" not in names and "1945-Truman.txt" in names
    assert len(names) == len(addresses)
    assert all(s.kind == "text" for s in found)


def test_glob_and_missing_paths(address_dir):
    found = sources.resolve_inputs([str(address_dir / "19[45]*.txt")])
    assert len(found) > 5 and all(Path(s.name).name[:3] in ("194", "195") for s in found)
    with pytest.raises(PrepError, match="no such file"):
        sources.resolve_inputs([str(address_dir / "nope.txt")])
    with pytest.raises(PrepError, match="no file matches"):
        sources.resolve_inputs([str(address_dir / "*.nothing")])


@pytest.mark.parametrize("suffix,opener", [(".gz", gzip.open), (".bz2", bz2.open), (".xz", lzma.open)])
def test_compressed_text_reads_like_plain(shared_data, tmp_path, suffix, opener):
    plain = shared_data / "nltk" / "webtext" / "firefox.txt"  # ISO-8859-1, CRLF line ends
    packed = tmp_path / f"firefox.txt{suffix}"
    with opener(packed, "wb") as f:
        f.write(plain.read_bytes())
    (a,), (b,) = sources.resolve_inputs([str(plain)]), sources.resolve_inputs([str(packed)])
    assert b.kind == "text" and b.compression == suffix
    ta = _texts(a, encoding_errors="replace")
    assert ta == _texts(b, encoding_errors="replace") and "\r" not in ta[0]


def test_strict_decoding_names_the_byte(shared_data):
    (s,) = sources.resolve_inputs([str(shared_data / "nltk" / "webtext" / "pirates.txt")])
    with pytest.raises(PrepError, match=r"invalid UTF-8 at byte \d+"):
        _texts(s)


def test_nel_line_breaks_separate_words(shared_data):
    (s,) = sources.resolve_inputs([str(shared_data / "nltk" / "webtext" / "wine.txt")])
    (text,) = _texts(s, encoding_errors="replace")
    assert "\x85" not in text
    raw = (shared_data / "nltk" / "webtext" / "wine.txt").read_bytes().decode("utf-8", "replace")
    assert text.count("\n") >= raw.count("\n") + raw.count("\x85")


def test_blank_line_documents(one_file_corpus):
    (s,) = sources.resolve_inputs([str(one_file_corpus)])
    docs = _texts(s, doc_boundary="blank-line")
    whole = _texts(s)
    assert len(whole) == 1 and len(docs) > 100
    assert all(d.strip() and "\n\n" not in d for d in docs)
    assert "".join(docs).split() == whole[0].split()


def test_jsonl_and_parquet_records(addresses, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [a["text"] for a in addresses[:20]]
    jl = tmp_path / "reviews.jsonl.gz"
    with gzip.open(jl, "wt") as f:
        for t in texts:
            f.write(json.dumps({"body": t, "id": 1}) + "\n")
    pqf = tmp_path / "reviews.parquet"
    pq.write_table(pa.table({"body": texts}), pqf)
    for path in (jl, pqf):
        (s,) = sources.resolve_inputs([str(path)])
        assert _texts(s, text_field="body") == texts
        with pytest.raises(PrepError, match="'text'"):
            _texts(s)


def test_pieces_tokenize_like_whole_documents(one_file_corpus):
    """Cutting a long document at line ends must not change a single token."""
    (s,) = sources.resolve_inputs([str(one_file_corpus)])
    texts = _texts(s, max_piece_chars=1 << 30)
    tok = tk.train_wordpiece(texts, vocab_size=1000, lowercase=True, raw_chars=set(texts[0]),
                             show_progress=False)
    pieces = list(sources.iter_pieces(s, sources.ReadOptions(max_piece_chars=5000)))
    assert len(pieces) > 10 and [e for _, e in pieces].count(True) == 1
    whole = tok.encode("".join(p for p, _ in pieces), add_special_tokens=False).ids
    cut = [i for e in tok.encode_batch([p for p, _ in pieces], add_special_tokens=False) for i in e.ids]
    assert cut == whole


@pytest.fixture(scope="module")
def one_line_text(addresses) -> str:
    """20 addresses as one 1.5 MB line: words separated by single spaces, a few of them
    ideographic or no-break spaces, no line break anywhere."""
    words = " ".join(a["text"] for a in addresses[:20]).split()
    for i in range(0, len(words), 997):
        words[i] += "\u3000" if i % 2 else "\xa0"
    return " ".join(words)


def test_an_over_long_line_is_cut_before_whitespace_without_changing_a_token(one_line_text, tmp_path):
    """Plain text, a blank-line document and a JSONL record: a line longer than a piece is cut
    into pieces of at most max_piece_chars (it used to stay whole, however long), and the cuts
    change no token: not for BERT's pre-tokenizer, not for a byte-level one."""
    from tokenizers import pre_tokenizers

    text = one_line_text
    (tmp_path / "line.txt").write_text(text)
    (tmp_path / "line.jsonl").write_text(json.dumps({"text": text}) + "\n")
    tok = tk.train_wordpiece([text], vocab_size=1000, lowercase=True, raw_chars=set(text),
                             show_progress=False)
    whole = tok.encode(text, add_special_tokens=False).ids
    byte_level = [pre_tokenizers.ByteLevel(add_prefix_space=prefix) for prefix in (False, True)]
    for name, kw in (("line.txt", {}), ("line.txt", {"doc_boundary": "blank-line"}), ("line.jsonl", {})):
        (s,) = sources.resolve_inputs([str(tmp_path / name)])
        pieces = list(sources.iter_pieces(s, sources.ReadOptions(max_piece_chars=5000, **kw)))
        texts = [p for p, _ in pieces]
        assert len(pieces) > len(text) // 5000 and max(map(len, texts)) <= 5000, (name, kw)
        assert [e for _, e in pieces] == [False] * (len(pieces) - 1) + [True]
        assert "".join(texts) == text
        assert all(t[0].isspace() for t in texts[1:] if t)  # cut before a space: it opens the next piece
        cut = [i for e in tok.encode_batch(texts, add_special_tokens=False) for i in e.ids]
        assert cut == whole, (name, kw)
        for pre in byte_level:
            assert [w for t in texts for w, _ in pre.pre_tokenize_str(t)] == \
                   [w for w, _ in pre.pre_tokenize_str(text)]


def test_a_line_without_whitespace_is_cut_at_the_piece_size(tmp_path):
    path = tmp_path / "one_word.txt"
    path.write_text("x" * 12345)
    (s,) = sources.resolve_inputs([str(path)])
    pieces = list(sources.iter_pieces(s, sources.ReadOptions(max_piece_chars=5000)))
    assert [(len(p), e) for p, e in pieces] == [(5000, False), (5000, False), (2345, True)]


def test_lines_over_the_cap_are_refused_naming_the_line(tmp_path):
    """JSONL and blank-line input are read a line at a time; a line over the cap is refused
    before it is joined, also when it spans many 1 MiB chunks."""
    path = tmp_path / "lines.txt"
    long = "b" * (3 << 20)
    path.write_text("a\n" + long + "\nc\n" + "d" * 1500)
    (s,) = sources.resolve_inputs([str(path)])
    assert list(sources._lines(s, "strict", max_line_chars=4 << 20)) == ["a\n", long + "\n", "c\n", "d" * 1500]
    with pytest.raises(PrepError, match=f"line 2: longer than {2 << 20} characters"):
        list(sources._lines(s, "strict", max_line_chars=2 << 20))
    path.write_text("a\n" + "e" * 1500)  # the last line, without a line end
    with pytest.raises(PrepError, match="line 2: longer than 1000 characters"):
        list(sources._lines(s, "strict", max_line_chars=1000))
    assert sources.MAX_LINE_CHARS == 64 << 20


def test_symbolic_links_in_a_walk_are_followed_once(addresses, tmp_path):
    """A linked directory is read (it used to be skipped without a word); a link back up the
    tree does not loop; a file reached twice is read once."""
    corpus, elsewhere = tmp_path / "corpus", tmp_path / "elsewhere"
    (corpus / "real").mkdir(parents=True)
    elsewhere.mkdir()
    (corpus / "real" / "a.txt").write_text(addresses[0]["text"])
    (elsewhere / "b.txt").write_text(addresses[1]["text"])
    (corpus / "linked").symlink_to(elsewhere)
    (corpus / "real" / "again").symlink_to(corpus / "real")
    (corpus / "up").symlink_to(corpus)
    found = sources.resolve_inputs([str(corpus)])
    assert sorted(Path(s.name).resolve() for s in found) == [corpus / "real" / "a.txt", elsewhere / "b.txt"]


def test_read_options_checks():
    with pytest.raises(ValueError):
        sources.ReadOptions(encoding_errors="ignore")
    with pytest.raises(ValueError):
        sources.ReadOptions(doc_boundary="page")


def test_wordpiece_training_is_reproducible_across_processes(one_file_corpus):
    """tokenizers' trainer alone gives a different vocabulary per process (HashMap order)."""
    import subprocess
    import sys

    code = ("import sys; from pathlib import Path; from data_prep import tokenizer as tk; "
            "t = Path(sys.argv[1]).read_text(); "
            "print(tk.train_wordpiece([t], 2000, True, set(t), show_progress=False).to_str())")
    runs = [subprocess.run([sys.executable, "-c", code, str(one_file_corpus)], capture_output=True, text=True,
                           check=True).stdout for _ in range(3)]
    assert runs[0] == runs[1] == runs[2] and '"##e"' in runs[0]


def test_continuation_alphabet_skips_punctuation_and_follows_case():
    assert tk.continuation_alphabet("aB,é!", lowercase=True) == ["##a", "##b", "##e"]
    assert tk.continuation_alphabet("aB,é!", lowercase=False) == ["##B", "##a", "##é"]
