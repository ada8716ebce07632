"""`sift-prep` (also `python -m data_prep`): command-line flags -> PrepConfig -> prepare().

Owns argument parsing and the error contract: a PrepError (or a bad flag) prints one line,
`sift-prep: error: <input>: <problem>`, on stderr and exits 2, with no traceback unless --debug.
"""
from __future__ import annotations

import argparse
import re
import sys
import traceback
from pathlib import Path

from data_prep import __version__
from data_prep.errors import PrepError
from data_prep.sources import ReadOptions


# Characters that would break "one line" (a file name may hold a newline): shown escaped.
_LINE_BREAKING = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]")


def one_line(text: str) -> str:
    """`text` with line breaks and other control characters escaped ("\\n"), so it stays one line."""
    return _LINE_BREAKING.sub(lambda m: repr(m.group())[1:-1], str(text))


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not argparse's usage block
        self.exit(2, f"sift-prep: error: {one_line(message)}\n")


def _output_path(text: str) -> Path:
    if not text:  # Path("") is the current directory
        raise argparse.ArgumentTypeError("must not be empty")
    return Path(text)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="sift-prep",
        description="Corpus -> WordPiece tokenizer -> packed fixed-length token shards + manifest. "
                    "Without INPUT, the embedded State of the Union corpus (1945-2006) is used.")
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="files, directories (recursive), globs, .gz/.bz2/.xz, JSONL, Parquet, or hf:NAME[:CONFIG]")
    p.add_argument("--output", "-o", required=True, type=_output_path, help="output directory")
    tok = p.add_mutually_exclusive_group()
    tok.add_argument("--tokenizer", help="existing tokenizer: tokenizer.json, a local directory or a hub name")
    tok.add_argument("--vocab-size", type=int, help="train WordPiece with this vocabulary size (default 8192)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per row incl. [CLS]/[SEP] (default 128)")
    p.add_argument("--valid-fraction", type=float, default=None,
                   help="share of documents for the valid split, chosen by a hash of the document's "
                        "position (default 0.005 with at least one document; 0 with --valid-input)")
    p.add_argument("--valid-input", nargs="+", default=[], metavar="PATH", help="inputs for the valid split")
    p.add_argument("--workers", type=int, default=0, help="tokenizer threads (default min(cores, 8))")
    case = p.add_mutually_exclusive_group()
    case.add_argument("--lowercase", dest="lowercase", action="store_true", default=None,
                      help="lowercase and strip accents (default when training)")
    case.add_argument("--cased", dest="lowercase", action="store_false", help="keep case and accents")
    p.add_argument("--text-field", default="text", help="JSONL / Parquet / HF field with the text (default text)")
    p.add_argument("--encoding-errors", choices=("strict", "replace"), default="strict",
                   help="undecodable UTF-8: strict = error naming the byte, replace = U+FFFD")
    p.add_argument("--doc-boundary", choices=("file", "blank-line"), default="file",
                   help="plain text documents: one per file, or blank-line separated blocks")
    p.add_argument("--shard-rows", type=int, default=16384, help="rows per shard (default 16384)")
    p.add_argument("--progress", dest="progress", action="store_true", default=None,
                   help="force progress bars (default: only when stderr is a terminal)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--version", action="version", version=f"sift-prep {__version__}")
    return p


def config_from_args(args: argparse.Namespace):
    from data_prep.build import PrepConfig

    if not args.text_field:
        raise PrepError("--text-field", "must not be empty")
    return PrepConfig(
        output=args.output, inputs=tuple(args.inputs), valid_inputs=tuple(args.valid_input),
        tokenizer=args.tokenizer, vocab_size=8192 if args.vocab_size is None else args.vocab_size,
        seq_len=args.seq_len,
        valid_fraction=args.valid_fraction, lowercase=args.lowercase,
        read=ReadOptions(text_field=args.text_field, encoding_errors=args.encoding_errors,
                         doc_boundary=args.doc_boundary),
        workers=args.workers, shard_rows=args.shard_rows, progress=args.progress)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from data_prep.build import prepare

        prepare(config_from_args(args), log=lambda msg: print(msg, file=sys.stderr))
        return 0
    except PrepError as e:
        if args.debug:
            traceback.print_exc()
        print(f"sift-prep: error: {one_line(e.subject)}: {one_line(e.problem)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sift-prep: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:  # a bug or an environment problem: still one line unless --debug
        if args.debug:
            traceback.print_exc()
        msg = (str(e).splitlines() or [""])[0]
        print(f"sift-prep: error: {one_line(args.output)}: unexpected {type(e).__name__}: "
              f"{one_line(msg)} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
