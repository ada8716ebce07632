"""`sift-finetune MODEL DATA`: judge a BERT model downstream, fine-tuned on labeled text.

Owns flags, the error contract and the output: bad input (a missing path, a model directory that
is not BERT or whose weights are damaged, a dataset with one class, a missing column, an empty
file, an unknown extension, a bad setting) prints one line `sift-finetune: error: <problem>` on
stderr and exits 2, with no traceback unless --debug. The report (JSON) goes to stdout, or to
--output; progress lines go to stderr. The logic is pipeline/finetune.py.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import traceback
from typing import Sequence

from pipeline import __version__
from pipeline.cli_util import OneLineParser

# numpy, torch and transformers are imported in main, after parsing: --help answers at once.


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="sift-finetune",
        description="Fine-tune a Hugging Face BERT directory (sift-export output or any "
                    "save_pretrained BERT) on labeled text with several seeds; report test accuracy "
                    "and macro-F1 per seed, their mean and 95% t-interval, as JSON.")
    p.add_argument("model", help="Hugging Face BERT model directory (config.json, model.safetensors)")
    p.add_argument("data", help="labeled examples: a .csv/.tsv (header row) or .jsonl file, or a "
                                "directory with one subdirectory of text files per class")
    p.add_argument("--test-file", help="a test set in the same format; default: a stratified split of DATA")
    p.add_argument("--test-fraction", type=float, default=0.2,
                   help="share of each class held out for test when there is no --test-file (default 0.2)")
    p.add_argument("--split-seed", type=int, default=0,
                   help="seed of the train/test split, apart from the fine-tuning seeds (default 0)")
    p.add_argument("--text-column", default="text", help="column / field with the text (default text)")
    p.add_argument("--label-column", default="label", help="column / field with the label (default label)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the model directory)")
    p.add_argument("--seeds", default="1,2,3",
                   help="comma-separated fine-tuning seeds, one run each (default 1,2,3)")
    p.add_argument("--epochs", type=float, default=3.0, help="passes over the training set (default 3)")
    p.add_argument("--lr", type=float, default=1e-4,
                   help="peak learning rate, linear warmup and decay (default 1e-4; 2e-5..5e-5 for "
                        "BERT-base and larger)")
    p.add_argument("--batch-size", type=int, default=32, help="examples per step (default 32)")
    p.add_argument("--max-length", type=int, default=None,
                   help="tokens per example, longer ones truncated (default min(512, the model's "
                        "max_position_embeddings))")
    p.add_argument("--truncation", choices=("right", "left"), default="right",
                   help="which end of a long text is cut: right keeps the beginning (default), "
                        "left keeps the end")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (default 0.01)")
    p.add_argument("--warmup", type=float, default=0.1, help="warmup share of the steps (default 0.1)")
    p.add_argument("--output", "-o", help="write the JSON report here (atomically) instead of stdout")
    prog = p.add_mutually_exclusive_group()
    prog.add_argument("--progress", dest="progress", action="store_true", default=None,
                      help="force progress bars (default: only when stderr is a terminal)")
    prog.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--version", action="version", version=f"sift-finetune {__version__}")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log = lambda msg: print(f"sift-finetune: {msg}", file=sys.stderr, flush=True)  # noqa: E731
    try:
        from pipeline.finetune import FinetuneError, evaluate, parse_seeds
    except ImportError as exc:  # an environment problem, not a bug of the caller's
        print(f"sift-finetune: error: {exc}", file=sys.stderr)
        return 1
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    problem = unwritable_output(args.output)
    if problem:  # now, not after an hour of fine-tuning
        print(f"sift-finetune: error: --output {args.output}: {problem}", file=sys.stderr)
        return 2
    try:
        settings = settings_from(args)
        # stdout carries the report: whatever the libraries print meanwhile (a progress bar's
        # last line, say) goes to stderr.
        with contextlib.redirect_stdout(sys.stderr):
            _quiet_libraries(progress)
            report = evaluate(args.model, args.data, test_file=args.test_file, tokenizer=args.tokenizer,
                              text_column=args.text_column, label_column=args.label_column,
                              test_fraction=args.test_fraction, split_seed=args.split_seed,
                              seeds=parse_seeds(args.seeds), settings=settings,
                              progress=progress, log=log)
    except FinetuneError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"sift-finetune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sift-finetune: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug or an environment problem: still one line unless --debug
        if args.debug:
            traceback.print_exc()
        msg = (str(exc).splitlines() or [""])[0]
        print(f"sift-finetune: error: unexpected {type(exc).__name__}: {msg} "
              "(rerun with --debug for the traceback)", file=sys.stderr)
        return 1

    acc, f1 = report["accuracy"], report["macro_f1"]
    log(f"accuracy {_interval(acc)}, macro-F1 {_interval(f1)} over {len(report['runs'])} seed(s) "
        f"(majority class {report['majority_accuracy']:.4f})")
    if args.output:
        from data_prep.io_util import write_json_atomic

        write_json_atomic(args.output, report)
        log(f"wrote {args.output}")
    else:
        print(json.dumps(report, indent=2))
    return 0


def is_report(path: "Path") -> bool:
    """An earlier report of this tool (a JSON object with its keys), which --output may replace."""
    import json

    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and {"model", "dataset", "runs", "accuracy"} <= doc.keys()


def unwritable_output(path: str | None) -> str | None:
    """Why the report could not be written to `path` (None: it can, or there is no --output)."""
    if path is None:
        return None
    import tempfile
    from pathlib import Path

    out = Path(path)
    if out.is_dir():
        return "is a directory; name a file"
    if out.exists() and not out.is_file():  # a device: the atomic write would replace it
        return "exists and is not a regular file; name a file"
    if out.is_file() and not is_report(out):  # the data, the model's config.json, anything
        return "exists and is not a sift-finetune report; name a new file (an earlier report is replaced)"
    if not out.parent.is_dir():
        return f"no such directory {out.parent}"
    try:
        with tempfile.TemporaryFile(dir=out.parent):
            pass
    except OSError as exc:
        return f"cannot write in {out.parent} ({exc.strerror or exc})"
    return None


def _interval(s: dict) -> str:
    if s["ci95"] is None:
        return f"{s['mean']:.4f}"
    return f"{s['mean']:.4f} [{s['ci95'][0]:.4f}, {s['ci95'][1]:.4f}]"


def _quiet_libraries(progress: bool) -> None:
    """Errors only: the load report (a BertForMaskedLM checkpoint has no classifier, which is
    expected here) and Trainer's notices would bury the result lines. Without progress bars, the
    weight-loading bar goes too."""
    import torch
    import transformers

    if not torch.cuda.is_available():  # DeepSpeed (imported by transformers, unused here) would
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # warn that it fell back to the CPU
    transformers.logging.set_verbosity_error()
    if not progress:
        transformers.logging.disable_progress_bar()


def settings_from(args: argparse.Namespace) -> "FinetuneSettings":
    """The fine-tuning settings of parsed arguments (a FinetuneError for values out of range)."""
    from pipeline.finetune import FinetuneSettings

    return FinetuneSettings(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                            max_length=args.max_length, weight_decay=args.weight_decay,
                            warmup=args.warmup, truncation=args.truncation)


if __name__ == "__main__":
    sys.exit(main())
