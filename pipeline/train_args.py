"""The command line of `sift-train`: flags, and the dotted overrides they stand for.

Imports nothing heavy (torch, deepspeed and transformers take seconds; --help does not).
"""
from __future__ import annotations

import argparse
import json
from typing import Sequence

from pipeline import __version__
from pipeline.cli_util import OneLineParser

DESCRIPTION = "Entry point: `deepspeed --module pipeline.train --config FILE [--set key=value ...]`."
CONFIG_DOCS = ("every key with its type, default and meaning: sift-train --print-config --all "
               "(with --config and --set: their resolved values)")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = OneLineParser(prog="sift-train", description=DESCRIPTION,
                                epilog=f"Settings: {CONFIG_DOCS}.")
    p.add_argument("--config", help="TOML training recipe (e.g. launch/recipes/quickstart.toml)")
    p.add_argument("--set", dest="overrides", action="append", nargs="+", default=[],
                   metavar="SECTION.KEY=VALUE", help="override one setting (repeatable; beats the file)")
    p.add_argument("--resume", help="'auto' (the checkpoint `latest` names, if any) or a checkpoint path")
    p.add_argument("--overwrite", action="store_true",
                   help="start fresh even where an earlier run left checkpoints or logs "
                        "(run.overwrite = true): they are replaced")
    p.add_argument("--deepspeed_config", "--deepspeed-config", metavar="FILE",
                   help="the DeepSpeed JSON (same as --set run.ds_config=FILE)")
    p.add_argument("--deepspeed", action="store_true",
                   help=argparse.SUPPRESS)  # DeepSpeed's add_config_arguments flag: always on here
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved configuration (TOML) and exit")
    p.add_argument("--all", action="store_true",
                   help="with --print-config: every key's type and meaning as comments")
    p.add_argument("--version", action="version", version=f"sift-train {__version__}")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help=argparse.SUPPRESS)  # added by the deepspeed launcher; LOCAL_RANK is in the env
    return p.parse_args(argv)


def overrides_from(args: argparse.Namespace) -> list[str]:
    """Every `--set` plus the dotted settings that the other flags stand for (CLI > file)."""
    overrides = [o for group in args.overrides for o in group]
    if args.resume:
        overrides.append(f"checkpoint.resume={json.dumps(args.resume)}")
    if args.overwrite:
        overrides.append("run.overwrite=true")
    if args.deepspeed_config:
        overrides.append(f"run.ds_config={json.dumps(args.deepspeed_config)}")  # TOML-escaped
    return overrides

