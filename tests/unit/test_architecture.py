"""The layering rules, read from the imports of every module (function-level imports included):
what a module may not import is enforced here, not promised in its docstring."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def imports_of(path: Path) -> set[str]:
    """Every module `path` imports, as dotted names (`from a import b` gives a and a.b)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{alias.name}" for alias in node.names)
    return out


def modules(package: str) -> dict[str, set[str]]:
    return {f"{package}.{p.stem}": imports_of(p) for p in sorted((REPO / package).rglob("*.py"))}


def hits(imported: set[str], forbidden: tuple[str, ...]) -> list[str]:
    return sorted(i for i in imported if any(i == f or i.startswith(f + ".") for f in forbidden))


PIPELINE = modules("pipeline")
RULES = [
    # (modules the rule covers, what they must not import, why)
    ([m for m in PIPELINE if m != "pipeline.comm"], ("torch.distributed", "deepspeed.comm"),
     "collectives go through pipeline.comm"),
    (["pipeline.data", "pipeline.model", "pipeline.selection", "pipeline.scoring"], ("pipeline.comm",),
     "data, model and selection are per-rank and pure of communication"),
    (["pipeline.selection", "pipeline.selector"], ("pipeline.model", "pipeline.scoring", "transformers"),
     "selection decides from scores, it knows no model"),
    (["pipeline.checkpoint", "pipeline.metrics", "pipeline.export", "pipeline.export_cli",
      "pipeline.rundir", "pipeline.faults"], ("pipeline.trainer", "pipeline.train"),
     "the trainer uses them, not the other way round"),
    (list(PIPELINE), ("benchmarks",), "the library knows nothing of its benchmarks"),
    (["pipeline.rundir", "pipeline.faults"], ("pipeline.comm", "torch"),
     "the run-dir guard and fault forensics work when the process group is broken"),
    (["pipeline.engine"], ("pipeline.trainer", "pipeline.run", "pipeline.train"),
     "engine setup knows no trainer"),
    (["pipeline.selection_step", "pipeline.schedule", "pipeline.step_metrics"],
     ("pipeline.trainer", "pipeline.run", "pipeline.train", "pipeline.checkpoint", "deepspeed"),
     "the trainer's components know no trainer, no checkpoint and no engine"),
    ([m for m in PIPELINE if m not in ("pipeline.selection_step",)],
     ("pipeline.selector",),
     "the selection step is one unit: only it plans and exchanges"),
    (["pipeline.trainer"], ("pipeline.scoring", "pipeline.selector", "pipeline.run",
                            "pipeline.train", "pipeline.rundir"),
     "the trainer loops: scoring is the selection step's, launch is pipeline.run's"),
    ([m for m in PIPELINE if m not in ("pipeline.train",)], ("pipeline.run",),
     "only the entry point launches a run"),
]


@pytest.mark.parametrize("covered,forbidden,why", RULES, ids=[r[2] for r in RULES])
def test_pipeline_layering(covered, forbidden, why):
    broken = {m: hits(PIPELINE[m], forbidden) for m in covered}
    assert not {m: h for m, h in broken.items() if h}, why


DATA_PREP = modules("data_prep")
DATA_PREP_RULES = [
    (list(DATA_PREP), ("pipeline", "benchmarks", "torch"), "data_prep is the lowest layer"),
    (["data_prep.sources"], ("tokenizers", "numpy", "data_prep.shards", "data_prep.manifest"),
     "reading text writes nothing and encodes nothing"),
    (["data_prep.tokenizer"], ("numpy", "data_prep.shards"), "the tokenizer knows no shard"),
    (["data_prep.shards", "data_prep.manifest", "data_prep.io_util"], ("tokenizers",),
     "writers know no tokenizer"),
]


@pytest.mark.parametrize("covered,forbidden,why", DATA_PREP_RULES, ids=[r[2] for r in DATA_PREP_RULES])
def test_data_prep_layering(covered, forbidden, why):
    broken = {m: hits(DATA_PREP[m], forbidden) for m in covered}
    assert not {m: h for m, h in broken.items() if h}, why


def test_the_rules_can_fail(tmp_path):
    """The reader sees imports inside functions too (lazy imports are imports)."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from pipeline import comm\n    import torch.distributed as dist\n")
    got = imports_of(probe)
    assert hits(got, ("pipeline.comm",)) == ["pipeline.comm"]
    assert hits(got, ("torch.distributed",)) == ["torch.distributed"]


def test_no_script_shadows_a_top_level_package():
    # `python benchmarks/x.py` puts benchmarks/ first on sys.path: a benchmarks/data_prep.py there
    # hid the data_prep package whenever the repository came later on the path (the GPU machine)
    packages = {p.parent.name for p in REPO.glob("*/__init__.py")}
    shadows = [f"{d}/{p.name}" for d in ("benchmarks", "launch", "tests")
               for p in (REPO / d).rglob("*.py") if p.stem in packages]
    assert packages >= {"pipeline", "data_prep", "benchmarks"} and not shadows, shadows


def test_reading_a_configuration_imports_no_torch():
    """--print-config and every configuration error answer before torch, transformers or
    deepspeed load (seconds): the config, its sections and the DeepSpeed JSON check are free of
    them (lazy imports where batches and models are built)."""
    import subprocess
    import sys

    code = ("import sys, pipeline.config, pipeline.ds_config, pipeline.train_args, pipeline.train;"
            "print(sorted(m for m in ('torch', 'transformers', 'deepspeed') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout
