"""The README's commands against the code: every command of its bash blocks names files that
exist and flags its program accepts (parsed by the program's own parser), so the README cannot
drift from the code. The commands that fit in the suite also run (the quickstart and the tests
run in CI by `.ci/run` itself; the `--print-config` and `--help` forms run here)."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROGRAMS = ("sift-train", "sift-prep", "sift-export", "sift-bench")


def readme_commands() -> list[list[str]]:
    """Every command line of the README's ```bash blocks: continuations joined, comments and
    environment assignments dropped, split as the shell would."""
    text = (REPO / "README.md").read_text()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0] if not line.lstrip().startswith("#") else ""
            words = shlex.split(line, comments=False)
            while words and re.match(r"^[A-Z_]+=", words[0]):
                words = words[1:]
            if words and words[0] not in ("source", "cd"):
                out.append(words)
    return out


def _train_args(words: list[str]) -> list[str]:
    """The sift-train arguments of a launcher command (after `--module pipeline.train`, or what a
    launch script passes through)."""
    if "--module" in words:
        return words[words.index("--module") + 2:]
    script = next(w for w in words if w.startswith("launch/"))
    rest = words[words.index(script) + 1:]
    return rest[1:] if script.endswith("multi_node.sh") else rest  # its first argument: a hostfile


def parse(program: str, args: list[str]) -> None:
    """Parse `args` with `program`'s own parser (SystemExit: the README names a flag it lacks)."""
    if program == "sift-train":
        from pipeline.train import parse_args

        parse_args(args)
    elif program == "sift-prep":
        from data_prep.cli import build_parser

        build_parser().parse_args(args)
    elif program == "sift-export":
        from pipeline.export_cli import build_parser

        build_parser().parse_args(args)
    else:
        from benchmarks.sift_bench.cli import build_parser

        build_parser().parse_args(args)


COMMANDS = readme_commands()


def test_the_readme_has_commands_for_every_program():
    firsts = {w[0] for w in COMMANDS}
    assert set(PROGRAMS) <= firsts and "bash" in firsts and "deepspeed" in firsts, firsts


@pytest.mark.parametrize("words", COMMANDS, ids=[" ".join(w)[:70] for w in COMMANDS])
def test_each_readme_command_names_real_files_and_flags(words):
    for w in words:  # repository files the command names must exist
        path = w.split("=", 1)[-1]
        if re.match(r"^(launch|ds_configs|benchmarks|tests|data_prep|pipeline)/\S+\.(sh|toml|json|py|sbatch)$", path):
            assert (REPO / path).is_file(), f"{path} (in: {' '.join(words)})"
    program = words[0]
    if program in PROGRAMS:
        parse(program, words[1:])
    elif program == "deepspeed" or (program in ("bash", "sbatch") and any(
            w.startswith("launch/") and w != "launch/quickstart.sh" for w in words)):
        if "--module" in words and words[words.index("--module") + 1] != "pipeline.train":
            return
        parse("sift-train", _train_args(words))


def test_the_readme_commands_that_fit_in_the_suite_run_as_written():
    """Those that need no prepared corpus and no hours: --print-config, --help, --version."""
    quick = [w for w in COMMANDS if w[0] in PROGRAMS and
             any(f in w for f in ("--print-config", "--help", "--version"))]
    assert quick, "the README shows no command that fits in the suite"
    for words in quick:
        module = {"sift-train": "pipeline.train", "sift-prep": "data_prep.cli",
                  "sift-export": "pipeline.export_cli", "sift-bench": "benchmarks.sift_bench.cli"}[words[0]]
        proc = subprocess.run([sys.executable, "-m", module, *words[1:]], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, (words, proc.stderr[-2000:])


def test_print_config_of_the_shipped_recipes_runs():
    for recipe in sorted((REPO / "launch" / "recipes").glob("*.toml")):
        proc = subprocess.run([sys.executable, "-m", "pipeline.train", "--config", str(recipe),
                               "--print-config"], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and "[selection]" in proc.stdout, (recipe, proc.stderr[-2000:])
