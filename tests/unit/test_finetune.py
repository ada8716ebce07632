"""sift-finetune's pure parts: readers on real files, label ids, the stratified split, the scores,
the interval, and the CLI's one-line errors for bad input (no model is trained here)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.finetune import (FinetuneError, FinetuneSettings, accuracy, check_model_dir,
                               encode_labels, macro_f1, parse_seeds, read_dataset,
                               stratified_split, t_interval)
from pipeline.finetune_cli import main

REPO = Path(__file__).resolve().parents[2]


# --- readers -------------------------------------------------------------------------------------

def test_csv_with_quotes_commas_and_newlines_in_the_text(tmp_path):
    f = tmp_path / "d.csv"
    f.write_text('id,text,label\n1,"good, really ""good""",pos\n2,"bad\nacross lines",neg\n\n', encoding="utf-8")
    d = read_dataset(f)
    assert d.texts == ['good, really "good"', "bad\nacross lines"] and d.labels == ["pos", "neg"]


def test_csv_with_a_byte_order_mark_and_custom_columns(tmp_path):
    f = tmp_path / "d.csv"
    f.write_text("\ufeffreview,stars\nfine,5\nmeh,2\n", encoding="utf-8")
    d = read_dataset(f, text_column="review", label_column="stars")
    assert d.texts == ["fine", "meh"] and d.labels == ["5", "2"]


def test_glue_style_tsv_keeps_quote_characters(tmp_path):
    """SST-2's train.tsv: `sentence<TAB>label`, sentences with unbalanced quotes."""
    f = tmp_path / "train.tsv"
    f.write_text('sentence\tlabel\nit \'s a " charming journey \t1\nunfunny "\t0\n', encoding="utf-8")
    d = read_dataset(f, text_column="sentence")
    assert d.texts == ['it \'s a " charming journey ', 'unfunny "'] and d.labels == ["1", "0"]


def test_jsonl_with_int_and_string_labels(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "a", "label": 1}\n\n{"text": "b", "label": 0, "extra": true}\n')
    assert read_dataset(f).labels == [1, 0]
    f.write_text('{"body": "a", "y": "spam"}\n{"body": "b", "y": "ham"}\n')
    d = read_dataset(f, "body", "y")
    assert d.texts == ["a", "b"] and d.labels == ["spam", "ham"]


def test_class_directories_one_file_per_example(tmp_path):
    for cls, texts in {"pos": ["great", "fine"], "neg": ["awful"]}.items():
        (tmp_path / cls).mkdir()
        for i, t in enumerate(texts):
            (tmp_path / cls / f"cv{i}.txt").write_text(t)
    (tmp_path / "README").write_text("not an example")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "pos" / ".DS_Store").write_text("x")
    d = read_dataset(tmp_path)
    assert d.texts == ["awful", "great", "fine"] and d.labels == ["neg", "pos", "pos"]


@pytest.mark.parametrize("name,content,text_col,problem", [
    ("d.csv", "", "text", "empty file"),
    ("d.csv", "text,label\n", "text", "no examples"),
    ("d.tsv", "sentence\tlabel\nx\t1\n", "text", "no column 'text' (columns: sentence, label)"),
    ("d.csv", "text,label\nx,\n", "text", "d.csv:2: empty 'label'"),
    ("d.csv", "text,label\nx\n", "text", "d.csv:2: 1 fields"),
    ("d.jsonl", '{"text": "x"}\n', "text", "d.jsonl:1: no field 'label'"),
    ("d.jsonl", '{"text": "x", "label": null}\n', "text", "must be a non-empty string or an integer"),
    ("d.jsonl", "[1, 2]\n", "text", "a JSON object per line"),
    ("d.jsonl", "{oops\n", "text", "d.jsonl:1: invalid JSON"),
    ("d.parquet", "x", "text", "unknown extension '.parquet'"),
    ("d.txt", "x", "text", "unknown extension '.txt'"),
])
def test_bad_files_fail_with_the_file_and_the_problem(tmp_path, name, content, text_col, problem):
    f = tmp_path / name
    f.write_text(content)
    with pytest.raises(FinetuneError, match=None) as info:
        read_dataset(f, text_column=text_col)
    assert problem in str(info.value) and name in str(info.value)


def test_missing_path_and_directory_without_classes(tmp_path):
    with pytest.raises(FinetuneError, match="no such file or directory"):
        read_dataset(tmp_path / "nope.csv")
    (tmp_path / "flat.txt").write_text("x")
    with pytest.raises(FinetuneError, match="one subdirectory per class"):
        read_dataset(tmp_path)


def test_non_utf8_is_one_error_naming_the_file(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.txt").write_bytes(b"caf\xe9")
    with pytest.raises(FinetuneError, match=r"x\.txt: not UTF-8"):
        read_dataset(tmp_path)


# --- labels ------------------------------------------------------------------------------------

def test_labels_sorted_numerically_when_all_are_integers():
    ids, names = encode_labels(["10", "2", "1", "2"])
    assert names == ["1", "2", "10"] and ids.tolist() == [2, 1, 0, 1]
    ids, names = encode_labels([1, 0, 1])  # JSONL ints
    assert names == ["0", "1"] and ids.tolist() == [1, 0, 1]


def test_string_labels_sorted_and_a_test_set_reuses_the_training_mapping():
    ids, names = encode_labels(["pos", "neg", "neutral"])
    assert names == ["neg", "neutral", "pos"] and ids.tolist() == [2, 0, 1]
    assert encode_labels(["pos", "pos"], names)[0].tolist() == [2, 2]
    with pytest.raises(FinetuneError, match="not among the training labels"):
        encode_labels(["mixed"], names)


# --- split -------------------------------------------------------------------------------------

@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.5])
def test_split_is_stratified_disjoint_and_complete(fraction):
    labels = np.array([0] * 100 + [1] * 30 + [2] * 7)
    np.random.default_rng(5).shuffle(labels)
    train, test = stratified_split(labels, fraction, seed=0)
    assert np.intersect1d(train, test).size == 0
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(labels.size))
    for c, n in ((0, 100), (1, 30), (2, 7)):
        expected = min(max(round(n * fraction), 1), n - 1)
        assert np.sum(labels[test] == c) == expected, (c, fraction)


def test_split_depends_on_its_seed_only():
    labels = np.array([0, 1] * 50)
    a, b = stratified_split(labels, 0.2, seed=0), stratified_split(labels.copy(), 0.2, seed=0)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    c = stratified_split(labels, 0.2, seed=1)
    assert not np.array_equal(a[1], c[1])
    # Fine-tuning seeds set global RNGs: the split must not read them.
    np.random.seed(123)
    assert np.array_equal(stratified_split(labels, 0.2, seed=0)[1], a[1])


def test_split_needs_two_examples_per_class_and_a_fraction_in_0_1():
    with pytest.raises(FinetuneError, match="at least 2 per class"):
        stratified_split(np.array([0, 0, 0, 1]), 0.2)
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(FinetuneError, match=r"\(0, 1\)"):
            stratified_split(np.array([0, 0, 1, 1]), bad)


# --- scores ------------------------------------------------------------------------------------

def test_accuracy_and_macro_f1_on_a_worked_example():
    y_true = [0, 0, 0, 1, 1, 2]
    y_pred = [0, 0, 1, 1, 2, 2]
    assert accuracy(y_true, y_pred) == pytest.approx(4 / 6)
    # class 0: tp 2 fp 0 fn 1 -> 4/5; class 1: tp 1 fp 1 fn 1 -> 1/2; class 2: tp 1 fp 1 fn 0 -> 2/3
    assert macro_f1(y_true, y_pred) == pytest.approx((4 / 5 + 1 / 2 + 2 / 3) / 3)


def test_macro_f1_edge_cases():
    assert macro_f1([0, 1, 1], [0, 1, 1]) == 1.0
    assert macro_f1([0, 0, 1, 1], [1, 1, 1, 1]) == pytest.approx((0 + 2 / 3) / 2)  # class 0 never predicted
    assert macro_f1([1, 1], [1, 1]) == 1.0  # a class absent from both has no F1 to average
    with pytest.raises(ValueError):
        macro_f1([], [])
    with pytest.raises(ValueError):
        accuracy([0, 1], [0])


def test_macro_f1_matches_a_brute_force_per_class_count():
    rng = np.random.default_rng(0)
    for _ in range(20):
        k = int(rng.integers(2, 5))
        y, p = rng.integers(0, k, 50), rng.integers(0, k, 50)
        f1s = []
        for c in sorted(set(y) | set(p)):
            prec = sum(1 for a, b in zip(y, p) if a == b == c) / max(1, sum(1 for b in p if b == c))
            rec = sum(1 for a, b in zip(y, p) if a == b == c) / max(1, sum(1 for a in y if a == c))
            f1s.append(0.0 if prec + rec == 0 else 2 * prec * rec / (prec + rec))
        assert macro_f1(y, p) == pytest.approx(np.mean(f1s))


def test_t_interval_against_the_textbook_value():
    s = t_interval([0.80, 0.82, 0.84])
    # mean 0.82, std 0.02, t_{0.975, 2} = 4.302653
    half = 4.302653 * 0.02 / math.sqrt(3)
    assert s["mean"] == pytest.approx(0.82) and s["std"] == pytest.approx(0.02)
    assert s["ci95"] == pytest.approx([0.82 - half, 0.82 + half], abs=1e-6)


def test_t_interval_with_one_seed_has_no_interval_and_equal_values_a_zero_width_one():
    assert t_interval([0.7]) == {"mean": 0.7, "std": None, "ci95": None}
    s = t_interval([0.5, 0.5])
    assert s["ci95"] == [0.5, 0.5]
    json.dumps(s)  # plain floats


def test_settings_and_seeds_are_checked():
    assert parse_seeds("1, 2,3") == [1, 2, 3]
    for bad in ("", "1,x", "1,1"):
        with pytest.raises(FinetuneError):
            parse_seeds(bad)
    for kw in ({"epochs": 0}, {"lr": -1.0}, {"batch_size": 0}, {"max_length": 1}, {"warmup": 1.0},
               {"epochs": math.inf}, {"lr": math.inf}, {"lr": math.nan}, {"weight_decay": math.nan},
               {"weight_decay": math.inf}):
        with pytest.raises(FinetuneError):
            FinetuneSettings(**kw)


# --- model directory checks and the CLI's error contract ---------------------------------------

def bert_dir(tmp_path: Path, model_type: str = "bert") -> Path:
    """A real, tiny BertForMaskedLM saved by transformers (config and weights; no tokenizer)."""
    from transformers import BertConfig, BertForMaskedLM

    d = tmp_path / f"model_{model_type}"
    BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=16, max_position_embeddings=32)).save_pretrained(d)
    if model_type != "bert":
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, "model_type": model_type}))
    return d


def test_model_checks(tmp_path):
    d = bert_dir(tmp_path)
    assert check_model_dir(d)["max_position_embeddings"] == 32
    with pytest.raises(FinetuneError, match="model_type 'gpt2'"):
        check_model_dir(bert_dir(tmp_path, "gpt2"))
    with pytest.raises(FinetuneError, match="no such model directory"):
        check_model_dir(tmp_path / "nope")
    with pytest.raises(FinetuneError, match="no config.json"):
        check_model_dir(tmp_path)
    odd = bert_dir(tmp_path / "odd")
    (odd / "config.json").write_text(json.dumps({**json.loads((odd / "config.json").read_text()),
                                                 "max_position_embeddings": "abc"}))
    with pytest.raises(FinetuneError, match="max_position_embeddings 'abc' is not a positive integer"):
        check_model_dir(odd)
    weights = d / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated, as by a full disk
    with pytest.raises(FinetuneError, match="damaged weights file"):
        check_model_dir(d)
    weights.unlink()
    with pytest.raises(FinetuneError, match="no weights"):
        check_model_dir(d)


def word_vocab(tmp_path: Path, words: list[str]) -> Path:
    """A BertTokenizer directory whose vocabulary is the special tokens and `words`."""
    from transformers import BertTokenizer

    d = tmp_path / f"tok_{'_'.join(words)}"
    d.mkdir()
    (d / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizer(str(d / "vocab.txt")).save_pretrained(d)
    return d


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.finetune_cli", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def run_in_process(*args: str) -> subprocess.CompletedProcess:
    """sift-finetune's main(argv) in this process (no interpreter start per case), its exit code
    and output as a CompletedProcess."""
    import contextlib
    import io

    from pipeline.finetune_cli import main as finetune_main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = finetune_main([str(a) for a in args])
        except SystemExit as exc:  # argparse's exit (usage errors)
            code = int(exc.code or 0)
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def two_class_csv(tmp_path: Path, classes=("a", "b")) -> Path:
    f = tmp_path / f"d_{''.join(classes)}.csv"
    f.write_text("text,label\n" + "".join(f"x{i},{classes[i % len(classes)]}\n" for i in range(10)))
    return f


def no_pad_tokenizer(tmp_path: Path) -> Path:
    """A real tokenizers file with the x-words and [UNK] but no [PAD]/[CLS]/[SEP]."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    d = tmp_path / "no_pad"
    d.mkdir(exist_ok=True)
    tok = Tokenizer(models.WordLevel(vocab={"[UNK]": 0, **{f"x{i}": i + 1 for i in range(10)}}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(d / "tokenizer.json"))
    return d


def test_cli_errors_are_one_line_exit_2(tmp_path):
    good = bert_dir(tmp_path)
    roberta = bert_dir(tmp_path, "roberta")
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "config.json").write_text((good / "config.json").read_text())
    (damaged / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    # A config.json that promises two layers beside weights of one: layer 1 would start random.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes())
    (foreign / "config.json").write_text(json.dumps({**json.loads((good / "config.json").read_text()),
                                                     "num_hidden_layers": 2}))
    x_words = word_vocab(tmp_path, [f"x{i}" for i in range(10)])
    cases = [
        ((tmp_path / "nope", two_class_csv(tmp_path)), "no such model directory"),
        ((roberta, two_class_csv(tmp_path)), "model_type 'roberta'"),
        ((damaged, two_class_csv(tmp_path)), "damaged weights file"),
        ((good, two_class_csv(tmp_path, ("a",))), "one class ('a')"),
        ((good, tmp_path / "missing.jsonl"), "no such file or directory"),
        ((good, two_class_csv(tmp_path), "--label-column", "y"), "no column 'y'"),
        ((good, two_class_csv(tmp_path), "--max-length", "64"), "exceeds the model's max_position_embeddings 32"),
        ((good, two_class_csv(tmp_path), "--seeds", "1,x"), "seeds must be comma-separated integers"),
        ((good, two_class_csv(tmp_path), "--seeds", "-1"), "seeds must be in [0, 2**32)"),
        ((good, two_class_csv(tmp_path), "--split-seed", "-1"), "split seed must be in [0, 2**63)"),
        ((good, two_class_csv(tmp_path)), "no tokenizer (tokenizer.json or vocab.txt); pass --tokenizer DIR"),
        ((good, two_class_csv(tmp_path), "--tokenizer", word_vocab(tmp_path, ["q"])), "maps 100% of the training tokens to [UNK]"),
        ((good, tmp_path / "d.parquet"), "unknown extension '.parquet'"),
        ((good, two_class_csv(tmp_path), "--output", tmp_path / "no" / "r.json"), "no such directory"),
        ((good, two_class_csv(tmp_path), "--output", tmp_path), "is a directory; name a file"),
        ((foreign, two_class_csv(tmp_path), "--tokenizer", x_words, "--epochs", "1"),
         "weight(s) of the model its config.json describes are not in its weights file "
         "(e.g. bert.encoder.layer.1."),
        # a fresh hostile pass (issue 24): an --output that was the model's config.json or the data
        # was overwritten with the report, a device was replaced by it, a FIFO as data hung, an
        # absurd epoch count ran for days, a tokenizer without [PAD] failed in several lines
        ((good, two_class_csv(tmp_path), "--output", good / "config.json"), "exists and is not a sift-finetune report"),
        ((good, two_class_csv(tmp_path), "--output", two_class_csv(tmp_path)), "exists and is not a sift-finetune report"),
        ((good, two_class_csv(tmp_path), "--output", "/dev/null"), "exists and is not a regular file"),
        ((good, tmp_path / "fifo.csv"), "fifo.csv: not a regular file"),
        ((good, two_class_csv(tmp_path), "--epochs", "1e9"), "epochs must be at most 1000"),
        ((good, two_class_csv(tmp_path), "--tokenizer", no_pad_tokenizer(tmp_path)), "the tokenizer names no pad_token"),
    ]
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    os.mkfifo(tmp_path / "fifo.csv")
    for args, problem in cases:
        proc = run_in_process(*args)
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("sift-finetune: error: ") and problem in lines[0], \
            (args, proc.stderr[-2000:])
        assert proc.stdout == ""


def test_cli_usage_errors_exit_2_and_help_does_not_import_torch():
    assert run_cli("only-one-arg").returncode == 2
    code = ("import sys\nfrom pipeline.finetune_cli import main\ntry:\n    main(['--help'])\n"
            "except SystemExit:\n    pass\nprint('TORCH' if 'torch' in sys.modules else 'LIGHT')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip().endswith("LIGHT") and "--test-file" in proc.stdout
    assert main.__module__ == "pipeline.finetune_cli"


def test_cli_report_on_stdout_is_json_with_every_key(tmp_path):
    """A real (tiny, random) BERT fine-tuned for one step per seed: stdout holds the report alone."""
    model = bert_dir(tmp_path)
    tok = word_vocab(tmp_path, ["good", "bad", "film"])
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"{w} film", "label": int(w == "good")}) + "\n"
                            for w in ["good", "bad"] * 6))
    proc = run_cli(model, data, "--tokenizer", tok, "--seeds", "3,4", "--epochs", "1", "--batch-size", "16",
                   "--test-fraction", "0.5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert set(report) >= {"model", "tokenizer", "dataset", "settings", "runs", "accuracy", "macro_f1",
                           "majority_accuracy"}
    assert report["dataset"]["num_train"] == 6 and report["dataset"]["num_test"] == 6
    assert report["dataset"]["labels"] == ["0", "1"] and report["settings"]["max_length"] == 32
    assert [r["seed"] for r in report["runs"]] == [3, 4]
    # A BertForMaskedLM directory: the classifier and the pooler start from random, nothing else.
    assert report["new_weights"] == ["bert.pooler.dense.bias", "bert.pooler.dense.weight",
                                     "classifier.bias", "classifier.weight"]
    for key in ("accuracy", "macro_f1"):
        assert 0 <= report[key]["mean"] <= 1 and len(report[key]["ci95"]) == 2
    out = tmp_path / "r.json"
    proc = run_cli(model, data, "--tokenizer", tok, "--seeds", "3", "--epochs", "1", "--test-fraction", "0.5",
                   "--output", out)
    assert proc.returncode == 0 and proc.stdout == "", proc.stderr[-3000:]
    assert json.loads(out.read_text())["accuracy"]["ci95"] is None  # one seed: no interval
