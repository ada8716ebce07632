"""Downstream evaluation: fine-tune a Hugging Face BERT directory on labeled text, score the test set.

Owns the logic behind `sift-finetune` (pipeline/finetune_cli.py owns flags, errors and output):
- readers: a CSV / TSV / JSONL file with a text and a label column, or a directory with one
  subdirectory per class holding one text file per example (`read_dataset`);
- labels -> ids in sorted order (numeric order when every label is an integer) (`encode_labels`);
- a fixed, seeded, stratified train/test split (`stratified_split`): its seed is not a fine-tuning
  seed, so every seed and every model is scored on the same test examples;
- the scores: accuracy, macro-F1 and a Student-t interval over seeds (`accuracy`, `macro_f1`,
  `t_interval`), plain numpy/scipy functions;
- one fine-tuning run per seed with transformers' own `AutoModelForSequenceClassification` and
  `Trainer` (`finetune_seed`), and the whole evaluation (`evaluate`).

Pure parts import only numpy/scipy; torch and transformers are imported inside the functions that
train, so the CLI's --help and its argument errors answer at once. Nothing here imports the
pretraining stack (DeepSpeed, pipeline.model): any BERT checkpoint on disk is judged the same way.
"""
from __future__ import annotations

import csv
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

FILE_KINDS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl"}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")
MAX_UNK_SHARE = 0.5
MAX_EPOCHS = 1000


class FinetuneError(ValueError):
    """Bad input (data, model, settings): the CLI prints `sift-finetune: error: <message>`, exit 2."""


@dataclass
class LabeledTexts:
    """Examples as read, labels still raw (str, or int from JSONL)."""

    texts: list[str]
    labels: list[Any]
    source: str


# ---------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------

def read_dataset(path: str | Path, text_column: str = "text", label_column: str = "label") -> LabeledTexts:
    """A labeled set from a .csv / .tsv / .jsonl file or a directory of class subdirectories."""
    path = Path(path)
    if not path.exists():
        raise FinetuneError(f"{path}: no such file or directory")
    if path.is_dir():
        data = read_class_dirs(path)
    elif not path.is_file():  # a FIFO or a device: reading would wait forever or never end
        raise FinetuneError(f"{path}: not a regular file")
    else:
        kind = FILE_KINDS.get(path.suffix.lower())
        if kind is None:
            raise FinetuneError(f"{path}: unknown extension {path.suffix!r}; expected one of "
                                f"{', '.join(FILE_KINDS)} or a directory with one subdirectory per class")
        data = (read_jsonl if kind == "jsonl" else read_delimited)(path, text_column, label_column)
    if not data.texts:
        raise FinetuneError(f"{path}: no examples")
    return data


def read_delimited(path: Path, text_column: str, label_column: str) -> LabeledTexts:
    """CSV (RFC 4180 quoting) or TSV with a header row. TSV fields are taken verbatim (no quote
    handling), as GLUE's TSVs need: SST-2 sentences hold unbalanced quote characters."""
    tsv = path.suffix.lower() == ".tsv"
    csv.field_size_limit(sys.maxsize)  # long documents in one cell
    texts, labels = [], []
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: Excel's byte order mark
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if tsv else csv.reader(f)
        try:
            header = next(reader, None)
            if header is None:
                raise FinetuneError(f"{path}: empty file")
            ti, li = _column_index(path, header, text_column), _column_index(path, header, label_column)
            for line, row in enumerate(reader, start=2):
                if not row:  # a blank line
                    continue
                if len(row) <= max(ti, li):
                    raise FinetuneError(f"{path}:{line}: {len(row)} fields, the header has {len(header)}")
                label = row[li].strip()
                if not label:
                    raise FinetuneError(f"{path}:{line}: empty {label_column!r}")
                texts.append(row[ti])
                labels.append(label)
        except csv.Error as exc:
            raise FinetuneError(f"{path}:{reader.line_num}: malformed {'TSV' if tsv else 'CSV'} ({exc})") from None
        except UnicodeDecodeError as exc:
            raise FinetuneError(f"{path}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    return LabeledTexts(texts, labels, str(path))


def _column_index(path: Path, header: list[str], name: str) -> int:
    names = [h.strip() for h in header]
    if name not in names:
        raise FinetuneError(f"{path}: no column {name!r} (columns: {', '.join(names)})")
    return names.index(name)


def read_jsonl(path: Path, text_column: str, label_column: str) -> LabeledTexts:
    """One JSON object per line; blank lines are skipped."""
    texts, labels = [], []
    try:
        with open(path, encoding="utf-8") as f:
            for line, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    rec = json.loads(raw)
                except json.JSONDecodeError as exc:
                    raise FinetuneError(f"{path}:{line}: invalid JSON ({exc.msg})") from None
                if not isinstance(rec, dict):
                    raise FinetuneError(f"{path}:{line}: a JSON object per line expected")
                for col in (text_column, label_column):
                    if col not in rec:
                        raise FinetuneError(f"{path}:{line}: no field {col!r} (fields: {', '.join(rec)})")
                text, label = rec[text_column], rec[label_column]
                if not isinstance(text, str):
                    raise FinetuneError(f"{path}:{line}: {text_column!r} is not a string")
                if isinstance(label, bool) or not isinstance(label, (str, int)) or label == "":
                    raise FinetuneError(f"{path}:{line}: {label_column!r} must be a non-empty string "
                                        f"or an integer, got {label!r}")
                texts.append(text)
                labels.append(label)
    except UnicodeDecodeError as exc:
        raise FinetuneError(f"{path}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    return LabeledTexts(texts, labels, str(path))


def read_class_dirs(root: Path) -> LabeledTexts:
    """`root/<class>/<file>`: one example per file, the label is the subdirectory's name. Files in
    `root` itself (a README) and hidden entries are ignored; files are read in sorted order."""
    texts, labels = [], []
    classes = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise FinetuneError(f"{root}: a directory of examples needs one subdirectory per class; "
                            "found none")
    for d in classes:
        for f in sorted(p for p in d.iterdir() if p.is_file() and not p.name.startswith(".")):
            try:
                texts.append(f.read_text(encoding="utf-8"))
            except UnicodeDecodeError as exc:
                raise FinetuneError(f"{f}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
            labels.append(d.name)
    return LabeledTexts(texts, labels, str(root))


def encode_labels(raw: Sequence[Any], names: Sequence[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """(ids, names): names sorted (numerically when every label is an integer, "2" before "10"),
    ids index into names. With `names` given (a test file), its mapping is used and a label
    outside it is an error."""
    keys = [str(x).strip() for x in raw]
    if names is None:
        distinct = set(keys)
        numeric = all(_is_int(k) for k in distinct)
        names = sorted(distinct, key=(lambda k: (int(k), k)) if numeric else None)
    index = {n: i for i, n in enumerate(names)}
    unknown = sorted(set(keys) - index.keys())
    if unknown:
        raise FinetuneError(f"labels {unknown[:5]} are not among the training labels {list(names)[:10]}")
    return np.array([index[k] for k in keys], dtype=np.int64), list(names)


def _is_int(s: str) -> bool:
    try:
        int(s)
        return True
    except ValueError:
        return False


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices), both sorted: round(n_c * test_fraction) examples of each
    class c (at least 1, at most n_c - 1) go to test, chosen by a generator seeded with `seed`
    alone. The same labels in the same order give the same split on any machine."""
    if not 0.0 < test_fraction < 1.0:
        raise FinetuneError(f"test fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):  # sorted: the draws do not depend on the order classes appear in
        idx = np.flatnonzero(labels == c)
        if idx.size < 2:
            raise FinetuneError(f"class {int(c)} has {idx.size} example; a split needs at least 2 per class")
        n_test = min(max(round(idx.size * test_fraction), 1), idx.size - 1)
        perm = rng.permutation(idx)
        test.append(perm[:n_test])
        train.append(perm[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


# ---------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------

def accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.size == 0 or y_true.shape != y_pred.shape:
        raise ValueError(f"accuracy needs two equal, non-empty label arrays, got {y_true.shape}, {y_pred.shape}")
    return float(np.mean(y_true == y_pred))


def macro_f1(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Unweighted mean over the classes present in y_true or y_pred of F1 = 2TP / (2TP + FP + FN)
    (scikit-learn's `f1_score(average="macro")`; a class absent from both has no F1 to average)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.size == 0 or y_true.shape != y_pred.shape:
        raise ValueError(f"macro_f1 needs two equal, non-empty label arrays, got {y_true.shape}, {y_pred.shape}")
    scores = []
    for c in np.union1d(y_true, y_pred):
        tp = np.sum((y_pred == c) & (y_true == c))
        fp = np.sum((y_pred == c) & (y_true != c))
        fn = np.sum((y_pred != c) & (y_true == c))
        scores.append(2 * tp / (2 * tp + fp + fn))  # > 0 denominator: c occurs in one of them
    return float(np.mean(scores))


def t_interval(values: Sequence[float], confidence: float = 0.95) -> dict[str, Any]:
    """{"mean", "std" (ddof 1), "ci95": [low, high]}: mean +- t_{(1+confidence)/2, n-1} * std / sqrt(n),
    the interval for the mean over seeds. One value: std and ci95 are None (no spread to measure)."""
    from scipy import stats

    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("t_interval needs at least one value")
    mean = float(x.mean())
    if x.size == 1:
        return {"mean": mean, "std": None, "ci95": None}
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf((1 + confidence) / 2, df=x.size - 1)) * std / math.sqrt(x.size)
    return {"mean": mean, "std": std, "ci95": [mean - half, mean + half]}


# ---------------------------------------------------------------------------------------------
# Model checks and fine-tuning
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FinetuneSettings:
    """What a fine-tuning run does; the same for every seed."""

    epochs: float = 3.0
    """Passes over the training set."""
    lr: float = 1e-4
    """Peak AdamW learning rate (linear warmup, then linear decay to zero)."""
    batch_size: int = 32
    """Examples per optimizer step."""
    max_length: int | None = None
    """Tokens per example incl. [CLS]/[SEP]; None: min(512, the model's max_position_embeddings)."""
    weight_decay: float = 0.01
    """AdamW weight decay (transformers' Trainer exempts biases and LayerNorm weights)."""
    warmup: float = 0.1
    """Share of the optimizer steps spent warming up."""
    truncation: str = "right"
    """Which end of a text longer than max_length is cut: "right" keeps its beginning (the usual),
    "left" keeps its end (where a review's verdict tends to be)."""

    def __post_init__(self):
        if not (self.epochs > 0 and math.isfinite(self.epochs)):
            raise FinetuneError(f"epochs must be a finite number > 0, got {self.epochs}")
        if self.epochs > MAX_EPOCHS:  # a typo, not a fine-tuning: it would run for days
            raise FinetuneError(f"epochs must be at most {MAX_EPOCHS}, got {self.epochs:g}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise FinetuneError(f"lr must be a finite number > 0, got {self.lr}")
        if self.batch_size < 1:
            raise FinetuneError(f"batch size must be >= 1, got {self.batch_size}")
        if self.max_length is not None and self.max_length < 2:
            raise FinetuneError(f"max length must be >= 2 ([CLS] and [SEP]), got {self.max_length}")
        if not 0 <= self.warmup < 1:
            raise FinetuneError(f"warmup must be a fraction in [0, 1), got {self.warmup}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise FinetuneError(f"weight decay must be a finite number >= 0, got {self.weight_decay}")
        if self.truncation not in ("right", "left"):
            raise FinetuneError(f"truncation must be 'right' or 'left', got {self.truncation!r}")


def check_model_dir(model_dir: Path) -> dict[str, Any]:
    """The directory's config.json as a dict, after the checks that fail fast and clearly: a
    directory, a BERT config, a weights file whose header reads (a truncated or foreign file
    fails here instead of deep inside from_pretrained)."""
    if not model_dir.exists():
        raise FinetuneError(f"{model_dir}: no such model directory")
    if not model_dir.is_dir():
        raise FinetuneError(f"{model_dir}: not a directory (a Hugging Face model directory expected)")
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise FinetuneError(f"{model_dir}: no config.json; not a Hugging Face model directory "
                            "(sift-export turns a training checkpoint into one)")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise FinetuneError(f"{cfg_path}: unreadable ({exc})") from None
    if not isinstance(config, dict) or config.get("model_type") != "bert":
        found = config.get("model_type") if isinstance(config, dict) else None
        raise FinetuneError(f"{model_dir}: model_type {found!r}; sift-finetune fine-tunes BERT models "
                            "(model_type 'bert')")
    for key in ("max_position_embeddings", "vocab_size"):
        if key in config and (type(config[key]) is not int or config[key] < 1):
            raise FinetuneError(f"{cfg_path}: {key} {config[key]!r} is not a positive integer")
    weights = [model_dir / w for w in WEIGHT_FILES if (model_dir / w).is_file()]
    if not weights:
        raise FinetuneError(f"{model_dir}: no weights ({' or '.join(WEIGHT_FILES)})")
    _check_weights(weights[0])
    return config


def _check_weights(path: Path) -> None:
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:  # validates header and data length
                names = list(f.keys())
        else:
            import torch

            names = list(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
    except Exception as exc:  # safetensors/torch raise several types for a damaged file
        msg = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise FinetuneError(f"{path}: damaged weights file ({msg})") from None
    if not names:
        raise FinetuneError(f"{path}: holds no tensors")


def default_max_length(config: dict[str, Any]) -> int:
    return min(512, int(config.get("max_position_embeddings", 512)))


def load_tokenizer(tokenizer_dir: Path, model_dir: Path, vocab_size: int):
    from transformers import AutoTokenizer

    hint = "" if tokenizer_dir != model_dir else "; pass --tokenizer DIR"
    if not tokenizer_dir.is_dir():
        raise FinetuneError(f"{tokenizer_dir}: no such tokenizer directory")
    # transformers 5 builds an empty BertTokenizer (every word [UNK]) from a directory without
    # vocabulary files rather than failing: look for one first.
    if not any((tokenizer_dir / f).is_file() for f in TOKENIZER_FILES):
        raise FinetuneError(f"{tokenizer_dir}: no tokenizer ({' or '.join(TOKENIZER_FILES)}){hint}")
    try:
        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    except Exception as exc:  # transformers raises OSError, ValueError or its own types
        msg = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise FinetuneError(f"{tokenizer_dir}: no usable tokenizer ({msg}){hint}") from None
    if len(tok) > vocab_size:
        raise FinetuneError(f"{tokenizer_dir}: tokenizer has {len(tok)} tokens, the model's "
                            f"vocabulary {vocab_size}: they do not belong together")
    lacking = [name for name in ("pad_token", "cls_token", "sep_token") if getattr(tok, name) is None]
    if lacking:  # batches are padded and framed with them
        raise FinetuneError(f"{tokenizer_dir}: the tokenizer names no {', '.join(lacking)} (a BERT "
                            f"tokenizer has [PAD], [CLS] and [SEP]){hint}")
    return tok


class EncodedTexts:
    """Token ids (truncated, unpadded) and label ids: a map-style dataset for Trainer; the
    collator pads each batch to its longest example."""

    def __init__(self, input_ids: list[list[int]], labels: np.ndarray):
        self.input_ids, self.labels = input_ids, labels

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.input_ids[i], "labels": int(self.labels[i])}


def encode(tokenizer, texts: Sequence[str], labels: np.ndarray, max_length: int,
           truncation: str = "right") -> EncodedTexts:
    tokenizer.truncation_side = truncation  # the fast tokenizer reads it on every call
    ids = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    return EncodedTexts(ids, labels)


def unk_share(tokenizer, data: EncodedTexts) -> float:
    """Share of the non-special tokens that are the unknown token."""
    special = set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}
    ids = [t for row in data.input_ids for t in row if t not in special]
    return sum(t == tokenizer.unk_token_id for t in ids) / max(1, len(ids))


def finetune_seed(model_dir: Path, tokenizer, train: EncodedTexts, test: EncodedTexts,
                  label_names: list[str], settings: FinetuneSettings, max_length: int, seed: int,
                  progress: bool) -> dict[str, Any]:
    """Fine-tune a fresh copy of the model with `seed` (classifier init, data order, dropout) and
    score it on `test`: {"seed", "accuracy", "macro_f1", "train_loss", "train_s"}."""
    import tempfile

    import torch
    from transformers import (AutoModelForSequenceClassification, DataCollatorWithPadding,
                              PrinterCallback, Trainer, TrainingArguments, set_seed)

    set_seed(seed)  # before loading: the new classifier (and pooler) weights are drawn now
    model = AutoModelForSequenceClassification.from_pretrained(
        str(model_dir), num_labels=len(label_names),
        id2label=dict(enumerate(label_names)), label2id={n: i for i, n in enumerate(label_names)})
    # Trainer's own output directory is scratch: save_strategy "no" and logging "no" leave it
    # empty, and a temporary one keeps the caller's working directory clean.
    with tempfile.TemporaryDirectory(prefix="sift-finetune-") as scratch:
        args = TrainingArguments(
            output_dir=scratch, num_train_epochs=settings.epochs, learning_rate=settings.lr,
            per_device_train_batch_size=settings.batch_size,
            per_device_eval_batch_size=2 * settings.batch_size, weight_decay=settings.weight_decay,
            warmup_steps=settings.warmup, lr_scheduler_type="linear", seed=seed,
            save_strategy="no", eval_strategy="no", logging_strategy="no", report_to="none",
            disable_tqdm=not progress, log_level="error", use_cpu=not torch.cuda.is_available(),
            dataloader_num_workers=0)
        trainer = Trainer(model=model, args=args, train_dataset=train,
                          data_collator=DataCollatorWithPadding(tokenizer))
        trainer.remove_callback(PrinterCallback)  # it prints the final log dict
        t0 = time.perf_counter()
        result = trainer.train()
        train_s = time.perf_counter() - t0
        logits = trainer.predict(test).predictions  # (N, num_labels)
    if isinstance(logits, tuple):
        logits = logits[0]
    pred = np.asarray(logits).argmax(-1)
    return {"seed": seed, "accuracy": accuracy(test.labels, pred), "macro_f1": macro_f1(test.labels, pred),
            "train_loss": float(result.training_loss), "train_s": round(train_s, 2)}


# The task head a sequence classifier adds to a BERT: new weights, expected to start from random.
# The pooler is among them when the directory holds a BertForMaskedLM (it has none).
NEW_HEAD_PREFIXES = ("classifier.", "bert.pooler.")


def new_weights_of(model_dir: Path) -> list[str]:
    """The weights a sequence classifier built from `model_dir` starts from random, sorted; a
    FinetuneError when any lies outside the new task head (`started_from_random`). One load of
    the model, before any text is read."""
    from transformers import AutoModelForSequenceClassification

    try:
        _, loading = AutoModelForSequenceClassification.from_pretrained(
            str(model_dir), num_labels=2, output_loading_info=True)
    except Exception as exc:  # shapes that do not match the config, an unknown class, ...
        msg = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise FinetuneError(f"{model_dir}: the weights do not load into a BERT classifier ({msg})") from None
    fresh = started_from_random(loading["missing_keys"])
    if fresh:
        raise FinetuneError(f"{model_dir}: {len(fresh)} weight(s) of the model its config.json "
                            f"describes are not in its weights file (e.g. {fresh[0]}); fine-tuning "
                            "would start them from random. Do config.json and the weights belong "
                            "together?")
    return sorted(loading["missing_keys"])


def started_from_random(missing_keys) -> list[str]:
    """The missing weights outside the new task head, sorted: encoder weights that the weights
    file lacks (a config.json of another model beside it, a file saved with other names), which
    transformers would silently initialize at random."""
    return sorted(k for k in missing_keys if not k.startswith(NEW_HEAD_PREFIXES))


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise FinetuneError(f"seeds must be comma-separated integers, got {text!r}") from None
    if not seeds:
        raise FinetuneError("at least one seed is needed")
    if len(set(seeds)) != len(seeds):
        raise FinetuneError(f"seeds repeat: {text!r}")
    if not all(0 <= s < 2**32 for s in seeds):  # numpy's seeds: transformers' set_seed seeds it
        raise FinetuneError(f"seeds must be in [0, 2**32), got {text!r}")
    return seeds


def labeled_split(data: str | Path, test_file: str | Path | None, text_column: str, label_column: str,
                  test_fraction: float, split_seed: int
                  ) -> tuple[list[str], np.ndarray, list[str], np.ndarray, list[str], dict[str, Any]]:
    """The training and test examples (texts, label ids), the label names and how they were
    split: DATA and a --test-file, or a stratified split of DATA. FinetuneError for data that
    cannot be fine-tuned on (unreadable, one class, too few examples to split)."""
    data_set = read_dataset(data, text_column, label_column)
    labels, names = encode_labels(data_set.labels)
    if len(names) < 2:
        raise FinetuneError(f"{data}: one class ({names[0]!r}); classification needs at least two")
    if test_file is not None:
        test_set = read_dataset(test_file, text_column, label_column)
        test_labels, _ = encode_labels(test_set.labels, names)
        return (data_set.texts, labels, test_set.texts, test_labels, names,
                {"kind": "test-file", "test_file": str(test_file)})
    train_idx, test_idx = stratified_split(labels, test_fraction, split_seed)
    return ([data_set.texts[i] for i in train_idx], labels[train_idx],
            [data_set.texts[i] for i in test_idx], labels[test_idx], names,
            {"kind": "stratified", "test_fraction": test_fraction, "split_seed": split_seed})


def evaluate(model: str | Path, data: str | Path, *, test_file: str | Path | None = None,
             tokenizer: str | Path | None = None, text_column: str = "text", label_column: str = "label",
             test_fraction: float = 0.2, split_seed: int = 0, seeds: Sequence[int] = (1, 2, 3),
             settings: FinetuneSettings = FinetuneSettings(), progress: bool = False,
             log: Callable[[str], None] = lambda msg: None) -> dict[str, Any]:
    """The whole evaluation: checks, data, split, one fine-tuning per seed, the report (a dict
    that json.dumps writes as it is)."""
    t_start = time.perf_counter()
    if not 0 <= split_seed < 2**63:  # numpy's generators take no negative seed
        raise FinetuneError(f"split seed must be in [0, 2**63), got {split_seed}")
    model_dir = Path(model)
    config = check_model_dir(model_dir)  # cheap checks first: nothing is tokenized for a bad model
    max_length = settings.max_length or default_max_length(config)
    if max_length > int(config.get("max_position_embeddings", max_length)):
        raise FinetuneError(f"max length {max_length} exceeds the model's max_position_embeddings "
                            f"{config['max_position_embeddings']}")

    new_weights = new_weights_of(model_dir)

    train_texts, train_labels, test_texts, test_labels, names, split = labeled_split(
        data, test_file, text_column, label_column, test_fraction, split_seed)

    tok_dir = Path(tokenizer) if tokenizer is not None else model_dir
    tok = load_tokenizer(tok_dir, model_dir, int(config.get("vocab_size", 0)) or 10**9)
    train = encode(tok, train_texts, train_labels, max_length, settings.truncation)
    test = encode(tok, test_texts, test_labels, max_length, settings.truncation)
    unk = unk_share(tok, train)
    if unk > MAX_UNK_SHARE:
        raise FinetuneError(f"{tok_dir}: the tokenizer maps {unk:.0%} of the training tokens to "
                            f"{tok.unk_token}; it does not belong to this model or this text")
    counts = lambda y: {names[c]: int(n) for c, n in zip(*np.unique(y, return_counts=True))}  # noqa: E731
    majority = int(np.bincount(train_labels, minlength=len(names)).argmax())
    log(f"{len(train)} train / {len(test)} test examples, {len(names)} labels, max length {max_length}, "
        f"{len(seeds)} seed(s)")

    runs = []
    for seed in seeds:
        r = finetune_seed(model_dir, tok, train, test, names, settings, max_length, seed, progress)
        log(f"seed {seed}: accuracy {r['accuracy']:.4f}, macro-F1 {r['macro_f1']:.4f} "
            f"({r['train_s']:.0f} s)")
        runs.append(r)

    import torch
    import transformers

    return {
        "model": str(model_dir.resolve()),
        "tokenizer": str(tok_dir.resolve()),
        "dataset": {"path": str(Path(data).resolve()), "text_column": text_column,
                    "label_column": label_column, **split,
                    "num_train": len(train), "num_test": len(test), "labels": names,
                    "train_counts": counts(train_labels), "test_counts": counts(test_labels),
                    "truncated_test_share": float(np.mean([len(x) >= max_length for x in test.input_ids])),
                    "unk_share": unk},
        "settings": {**asdict(settings), "max_length": max_length, "seeds": list(seeds),
                     "device": "cuda" if torch.cuda.is_available() else "cpu",
                     "transformers": transformers.__version__},
        "runs": runs,
        # What started from random: the task head (and the pooler, for a masked-LM checkpoint).
        "new_weights": new_weights,
        "accuracy": t_interval([r["accuracy"] for r in runs]),
        "macro_f1": t_interval([r["macro_f1"] for r in runs]),
        # What always answering the most frequent training label scores on this test set: the
        # floor a fine-tuned model must clear to have learned anything.
        "majority_accuracy": accuracy(test_labels, np.full_like(test_labels, majority)),
        "elapsed_s": round(time.perf_counter() - t_start, 1),
    }
