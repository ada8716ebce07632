"""`sift-prep` (also `python -m data_prep`): command-line flags -> PrepConfig -> prepare().

Owns argument parsing and the error contract: a PrepError (or a bad flag) prints one line,
`sift-prep: error: <input>: <problem>`, on stderr and exits 2, with no traceback unless --debug.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import traceback
from pathlib import Path

from data_prep import __version__
from data_prep import parts as pt
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


SCALE_HELP = """\
across nodes:
  Each node runs the same command with --num-shards N --shard-index i (or --shard-from-env under
  srun/mpirun, with {index} in --output) and its own --output. Document d (its position in the
  input order) goes to part d % N: every node reads all inputs and tokenizes only its documents.
  One tokenizer for all: --tokenizer DIR, or --tokenizer-sample SIZE, which every node trains
  identically on the same hash-chosen sample. Then
    sift-prep merge --output MERGED PART_DIR...
  checks the parts and writes one manifest over them (nothing is copied). The merged data holds
  exactly the documents, and the train/valid split, of a single-node run with the same flags;
  only the packing of rows differs (each part packs its own documents, its last row padded).

deduplication:
  --dedup exact drops every document whose text, with whitespace runs collapsed, an earlier
  document (in input order, over all inputs) has; sliced runs decide globally, so the merged
  result has no duplicate across parts either. Counts are in manifest.json's "documents".
"""


def _sample(text: str) -> pt.Sample:
    try:
        return pt.parse_sample(text)
    except PrepError as e:  # argparse turns only ArgumentTypeError into its one-line error
        raise argparse.ArgumentTypeError(e.problem) from None


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="sift-prep",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Corpus -> WordPiece tokenizer -> packed fixed-length token shards + manifest. "
                    "Without INPUT, the embedded State of the Union corpus (1945-2006) is used. "
                    "`sift-prep merge --help`: joining the parts of a run across nodes.",
        epilog=SCALE_HELP)
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
    p.add_argument("--tokenizer-sample", type=_sample, metavar="SIZE",
                   help="train the tokenizer on a sample of about SIZE (100MB, 2GiB, 500000docs) "
                        "chosen by a hash of each document's position (default: every document)")
    p.add_argument("--dedup", choices=("exact",), default=None,
                   help="exact: drop documents whose whitespace-normalized text an earlier one has")
    p.add_argument("--num-shards", type=int, metavar="N",
                   help="prepare one of N disjoint slices of the documents (one per node)")
    p.add_argument("--shard-index", type=int, metavar="I", help="which slice, 0..N-1")
    p.add_argument("--shard-from-env", action="store_true",
                   help="take N and I from SLURM_NTASKS/SLURM_PROCID, OMPI_COMM_WORLD_SIZE/RANK or "
                        "PMI_SIZE/PMI_RANK; --output must hold {index}")
    p.add_argument("--progress", dest="progress", action="store_true", default=None,
                   help="force progress bars (default: only when stderr is a terminal)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--version", action="version", version=f"sift-prep {__version__}")
    return p


def part_from_args(args: argparse.Namespace, environ=os.environ) -> pt.Part:
    """The slice this run prepares; only --shard-from-env reads the environment (a plain run
    under srun must not silently prepare a slice)."""
    if args.shard_from_env:
        if args.num_shards is not None or args.shard_index is not None:
            raise PrepError("--shard-from-env", "takes the slice from the launcher; drop "
                                                "--num-shards and --shard-index")
        part = pt.part_from_env(environ)
        if part.sliced and pt.INDEX_PLACEHOLDER not in str(args.output):
            raise PrepError("--output", f"every task needs its own output directory: put "
                                        f"{pt.INDEX_PLACEHOLDER} in it (e.g. prep/part-{pt.INDEX_PLACEHOLDER})")
        return part
    if (args.num_shards is None) != (args.shard_index is None):
        given = "--num-shards" if args.shard_index is None else "--shard-index"
        raise PrepError(given, "--num-shards and --shard-index go together")
    return pt.Part(args.shard_index or 0, 1 if args.num_shards is None else args.num_shards)


def config_from_args(args: argparse.Namespace):
    from data_prep.build import PrepConfig

    if not args.text_field:
        raise PrepError("--text-field", "must not be empty")
    part = part_from_args(args)
    return PrepConfig(
        output=Path(pt.part_output(str(args.output), part)), inputs=tuple(args.inputs), valid_inputs=tuple(args.valid_input),
        tokenizer=args.tokenizer, vocab_size=8192 if args.vocab_size is None else args.vocab_size,
        seq_len=args.seq_len,
        valid_fraction=args.valid_fraction, lowercase=args.lowercase,
        read=ReadOptions(text_field=args.text_field, encoding_errors=args.encoding_errors,
                         doc_boundary=args.doc_boundary),
        workers=args.workers, shard_rows=args.shard_rows, progress=args.progress, part=part,
        tokenizer_sample=args.tokenizer_sample, dedup=args.dedup)


def build_merge_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="sift-prep merge",
        description="One manifest over the parts of a run made with --num-shards N --shard-index "
                    "0..N-1: checks that every part is complete (a half-written one: rerun its "
                    "node's command, it resumes), intact (every shard's sha256), made with the same "
                    "tokenizer, settings and inputs, and that each slice is there exactly once; "
                    "then writes MERGED/manifest.json, with shard paths relative to MERGED "
                    "(../part-0/train/...: keep the parts where they are, or move them together), "
                    "and MERGED/tokenizer/. No shard is copied.")
    p.add_argument("parts", nargs="*", metavar="PART_DIR", type=_output_path,
                   help="the parts' output directories")
    p.add_argument("--output", "-o", required=True, type=_output_path, help="merged directory")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def _merge(args: argparse.Namespace) -> None:
    from data_prep.merge import merge

    merge(args.output, list(args.parts), log=lambda msg: print(msg, file=sys.stderr))


def _prep(args: argparse.Namespace) -> None:
    from data_prep.build import prepare

    prepare(config_from_args(args), log=lambda msg: print(msg, file=sys.stderr))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # "merge" as the first word is the subcommand (an input file named merge: write ./merge).
    if argv[:1] == ["merge"]:
        args, run = build_merge_parser().parse_args(argv[1:]), _merge
    else:
        args, run = build_parser().parse_args(argv), _prep
    try:
        run(args)
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
