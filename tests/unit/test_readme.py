"""The documentation's commands and settings against the code, so the docs cannot drift from it.

- Every command of the ```bash blocks of the README and the other hand-written guides (docs/,
  benchmarks/README.md, benchmarks/results/README.md) names files that exist and flags its program
  accepts (parsed by the program's own parser; a benchmark script's flags must be in its --help),
  and every `--set` / `--variant` setting of a sift-train or sift-bench command loads as a
  configuration (the key exists, the value is valid).
- Every `section.key` the guides name in inline code is a real setting.
- The README's `[selection]` table lists every SelectionConfig setting with its true default and
  every value of its choices.
The commands that fit in the suite also run (the quickstart and the tests run in CI by `.ci/run`
itself; the `--print-config` and `--help` forms run here)."""
from __future__ import annotations

import dataclasses
import functools
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROGRAMS = ("sift-train", "sift-prep", "sift-export", "sift-bench")
PLACEHOLDER_DATA = 'data.data_dir="(docs)"'


def guides() -> list[Path]:
    """The hand-written Markdown guides: the README, docs/, and the READMEs under benchmarks/
    (the generated result tables beside them are not guides)."""
    return [REPO / "README.md", *sorted((REPO / "docs").glob("**/*.md")),
            *sorted((REPO / "benchmarks").glob("**/README.md"))]


def bash_commands(path: Path) -> list[list[str]]:
    """Every command line of a Markdown file's ```bash blocks: continuations joined, comments and
    environment assignments dropped, split as the shell would."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0] if not line.lstrip().startswith("#") else ""
            words = shlex.split(line, comments=False)
            while words and re.match(r"^[A-Z_]+=", words[0]):
                words = words[1:]
            if words and words[0] not in ("source", "cd"):
                out.append(words)
    return out


def readme_commands() -> list[list[str]]:
    return bash_commands(REPO / "README.md")


def _train_args(words: list[str]) -> list[str]:
    """The sift-train arguments of a launcher command (after `--module pipeline.train`, or what a
    launch script passes through)."""
    if "--module" in words:
        return words[words.index("--module") + 2:]
    script = next(w for w in words if w.startswith("launch/"))
    rest = words[words.index(script) + 1:]
    return rest[1:] if script.endswith("multi_node.sh") else rest  # its first argument: a hostfile


def _values(args: list[str], flag: str) -> list[list[str]]:
    """The words after each `flag`, up to the next option: `--set a=1 b=2` -> [['a=1', 'b=2']]."""
    groups = []
    for i, w in enumerate(args):
        if w == flag:
            group = []
            for v in args[i + 1:]:
                if v.startswith("--"):
                    break
                group.append(v)
            groups.append(group)
    return groups


def _single(args: list[str], *flags: str) -> str | None:
    for i, w in enumerate(args):
        if w in flags and i + 1 < len(args):
            return args[i + 1]
    return None


def check_settings(config: str | None, overrides: list[str], where: str) -> None:
    """The recipe plus the overrides load as a configuration: every key exists, every value is
    valid (the sift-train loader; a missing data.data_dir is given a placeholder first)."""
    from pipeline.config import ConfigError, load_config

    recipe = REPO / config if config else None
    if recipe is not None and not recipe.is_file():
        return  # a user's own recipe (MY.toml); repository files are checked for existence apart
    if not any(o.startswith("data.data_dir=") for o in overrides):
        overrides = [PLACEHOLDER_DATA, *overrides]
    try:
        load_config(recipe, overrides)
    except ConfigError as exc:
        pytest.fail(f"{where}: {exc}")


def parse(program: str, args: list[str], where: str = "") -> None:
    """Parse `args` with `program`'s own parser (SystemExit: the docs name a flag it lacks), then
    load the settings a sift-train or sift-bench command makes."""
    if program == "sift-train":
        from pipeline.train import parse_args

        parse_args(args)
        overrides = [o for group in _values(args, "--set") for o in group]
        if (resume := _single(args, "--resume")) is not None:
            overrides.append(f"checkpoint.resume={resume}")
        if "--overwrite" in args:
            overrides.append("run.overwrite=true")
        if (ds := _single(args, "--deepspeed_config", "--deepspeed-config")) is not None:
            overrides.append(f'run.ds_config="{ds}"')
        check_settings(_single(args, "--config"), overrides, where)
    elif program == "sift-prep":
        from data_prep.cli import build_merge_parser, build_parser

        if args[:1] == ["merge"]:
            build_merge_parser().parse_args(args[1:])
        else:
            build_parser().parse_args(args)
    elif program == "sift-export":
        from pipeline.export_cli import build_parser

        build_parser().parse_args(args)
    else:
        from benchmarks.sift_bench.cli import build_parser

        build_parser().parse_args(args)
        common = [o for group in _values(args, "--set") for o in group]
        recipe = _single(args, "--recipe")
        check_settings(recipe, common, where)
        for variant in _values(args, "--variant"):
            check_settings(recipe, [*common, *variant[1:]], f"{where} (--variant {variant[0]})")


@functools.lru_cache(maxsize=None)
def script_help(script: str) -> str:
    """A benchmark script's --help text (its flags, whatever parser builds them)."""
    proc = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, (script, proc.stderr[-2000:])
    return proc.stdout


def _is_python(word: str) -> bool:
    return Path(word).name in ("python", "python3")


COMMANDS = [(path, words) for path in guides() for words in bash_commands(path)]


def test_the_readme_has_commands_for_every_program():
    firsts = {w[0] for w in readme_commands()}
    assert set(PROGRAMS) <= firsts and "bash" in firsts and "deepspeed" in firsts, firsts


@pytest.mark.parametrize("path,words", COMMANDS,
                         ids=[f"{p.relative_to(REPO)}: {' '.join(w)}"[:90] for p, w in COMMANDS])
def test_each_documented_command_names_real_files_and_flags(path, words):
    where = f"{path.relative_to(REPO)}: {' '.join(words)}"
    for w in words:  # repository files the command names must exist
        file = w.split("=", 1)[-1]
        if re.match(r"^(launch|ds_configs|benchmarks|tests|data_prep|pipeline)/\S+\.(sh|toml|json|py|sbatch)$", file):
            assert (REPO / file).is_file(), f"{file} (in {where})"
    program = words[0]
    if program in PROGRAMS:
        parse(program, words[1:], where)
    elif program == "deepspeed" or (program in ("bash", "sbatch") and any(
            w.startswith("launch/") and w != "launch/quickstart.sh" for w in words)):
        if "--module" in words and words[words.index("--module") + 1] != "pipeline.train":
            return
        parse("sift-train", _train_args(words), where)
    elif _is_python(program) and len(words) > 1 and re.match(r"^benchmarks/\w+\.py$", words[1]):
        helptext = script_help(words[1])
        for flag in (w.split("=", 1)[0] for w in words[2:] if w.startswith("--")):
            assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", helptext), \
                f"{flag} is not an option of {words[1]} (in {where})"


def test_the_readme_commands_that_fit_in_the_suite_run_as_written():
    """Those that need no prepared corpus and no hours: --print-config, --help, --version."""
    quick = [w for w in readme_commands() if w[0] in PROGRAMS and
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


FILE_SUFFIXES = {"json", "jsonl", "toml", "py", "sh", "md", "txt", "npy", "pt", "safetensors", "log"}


def inline_code(text: str) -> list[str]:
    """The inline code spans of a Markdown text (fenced blocks left out)."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return re.findall(r"`([^`\n]+)`", text)


def test_every_setting_the_guides_name_exists():
    """`section.key` in inline code (e.g. `selection.start_accuracy`, `optim.decay_time_s = ...`)
    names a field of that config section."""
    from pipeline.config import SECTIONS

    pattern = re.compile(rf"(?<![\w./-])({'|'.join(SECTIONS)})\.([a-z_][a-z0-9_]*)(?![\w/-]|\.\w)")
    named, unknown = 0, []
    for path in guides():
        for span in inline_code(path.read_text()):
            for section, key in pattern.findall(span):
                if key in FILE_SUFFIXES:
                    continue  # a file name (model.safetensors), not a setting
                named += 1
                fields = {f.name for f in dataclasses.fields(SECTIONS[section])}
                if key not in fields:
                    unknown.append(f"{path.relative_to(REPO)}: `{span}` ({section}.{key})")
    assert named > 20, f"only {named} settings found in the guides: is the pattern still right?"
    assert not unknown, "settings the docs name that the config lacks:\n" + "\n".join(unknown)


def readme_section(title_start: str) -> str:
    text = (REPO / "README.md").read_text()
    start = text.index(f"\n## {title_start}")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else None]


def test_the_readme_selection_table_lists_every_setting_with_its_default():
    from pipeline.selection import DRAWS, NORMALIZATIONS, POLICIES, POOLS, SCOPES, SelectionConfig

    section = readme_section("Selecting samples")
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) >= 3:
            rows[cells[0].strip("`")] = cells[1]
    for f in dataclasses.fields(SelectionConfig):
        assert f.name in rows, f"the README's [selection] table lacks `{f.name}`"
        values = rows[f.name]
        if f.default is None:
            assert values.startswith("unset"), (f.name, values)
        else:
            first = re.match(r"`([^`]+)`", values)
            assert first, (f.name, values)
            shown = first.group(1)
            ok = shown == f.default if isinstance(f.default, str) else float(shown) == f.default
            assert ok, f"README says {f.name} defaults to {shown}, the code says {f.default!r}"
    codes = set(inline_code(section))
    for choices in (POLICIES, POOLS, SCOPES, NORMALIZATIONS, DRAWS):
        missing = [c for c in choices if c not in codes]
        assert not missing, f"the README's [selection] section does not name {missing}"
