"""The typed training config: TOML + dotted overrides, CLI > file > defaults, clear errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import ConfigError, TrainConfig, load_config, parse_override
from pipeline.ds_config import check_batch_triplet, load_ds_config
from pipeline.schedule import lr_at, time_progress
from pipeline.config import OptimConfig

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "recipe.toml"
    p.write_text(text)
    return p


def test_cli_beats_file_beats_defaults(tmp_path):
    path = write(tmp_path, '[data]\ndata_dir = "d"\n[optim]\nlr = 0.002\nwarmup_steps = 7\n'
                           '[selection]\npolicy = "random"\n')
    cfg = load_config(path, ["optim.lr=3e-3", "selection.fraction=0.25", "model.preset=bert-tiny"])
    assert cfg.optim.lr == 0.003              # CLI over file
    assert cfg.optim.warmup_steps == 7        # file over default
    assert cfg.selection.policy == "random"   # file
    assert cfg.selection.fraction == 0.25     # CLI over default
    assert cfg.model.preset == "bert-tiny"    # bare word parsed as a string
    assert cfg.eval.batch_size == 32          # default
    assert isinstance(cfg, TrainConfig)


def test_override_values_are_toml():
    assert parse_override("budget.steps=10") == (["budget", "steps"], 10)
    assert parse_override("optim.betas=[0.9, 0.95]") == (["optim", "betas"], [0.9, 0.95])
    assert parse_override("eval.max_samples=none") == (["eval", "max_samples"], "none")
    assert parse_override("run.output_dir=runs/x") == (["run", "output_dir"], "runs/x")
    cfg = load_config(None, ["data.data_dir=d", "optim.betas=[0.9, 0.95]", "eval.max_samples=none"])
    assert cfg.optim.betas == (0.9, 0.95)
    assert cfg.eval.max_samples is None


def test_none_clears_optional_fields_but_is_a_policy_name():
    # "none" is vanilla training for selection.policy (a plain string field), not "the default"
    cfg = load_config(None, ["data.data_dir=d", "selection.policy=none", "budget.samples=NULL"])
    assert cfg.selection.policy == "none"
    assert cfg.budget.samples is None
    with pytest.raises(ConfigError, match="budget.steps: expected an integer"):
        load_config(None, ["data.data_dir=d", "budget.steps=nothing"])


@pytest.mark.parametrize("overrides, message", [
    (["optim.lrr=1"], "unknown key 'optim.lrr'"),
    (["optimizer.lr=1"], "unknown section [optimizer]"),
    (["optim.lr=fast"], "optim.lr: expected a number"),
    (["budget.steps=1.5"], "budget.steps: expected an integer"),
    (["logging.tensorboard=1"], "logging.tensorboard: expected true or false"),
    (["selection.policy=best"], "selection.policy must be one of"),
    (["selection.fraction=1.5"], "selection.fraction must be in (0, 1]"),
    (["model.exit_head=middle"], "model.exit_head must be one of"),
    (["masking.rate=0"], "masking.rate must be in (0, 1)"),
    (["budget.steps=none", "budget.samples=100"], "optim.decay needs a horizon"),
    (["optim.decay_steps=10", "optim.decay_time_s=60"], "both set"),
    (["eval.every_s=0"], "eval.every_s must be > 0"),
    (["budget.steps=none"], "set at least one of steps"),
    (["optim.lr"], "--set expects section.key=value"),
])
def test_bad_settings_are_named(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.data_dir=d", *overrides])
    assert message in str(err.value)


def test_missing_data_dir_and_bad_file(tmp_path):
    with pytest.raises(ConfigError, match="data.data_dir is required"):
        load_config(None, [])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[data\n"))


def test_fingerprint_ignores_budgets_but_not_model():
    a = load_config(None, ["data.data_dir=d", "budget.steps=10"])
    b = load_config(None, ["data.data_dir=d", "budget.steps=20", "logging.every_steps=3"])
    c = load_config(None, ["data.data_dir=d", "budget.steps=10", "model.exit_layer=2"])
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_every_recipe_loads():
    recipes = sorted((REPO / "launch" / "recipes").glob("*.toml"))
    assert recipes, "launch/recipes/ holds no recipe"
    recipes += sorted((REPO / "benchmarks").glob("*.toml"))  # the benchmarks' recipes too
    for recipe in recipes:
        cfg = load_config(recipe, ["data.data_dir=d"])
        assert Path(REPO / cfg.run.ds_config).is_file(), f"{recipe.name}: {cfg.run.ds_config} missing"


def test_ds_configs_are_complete_and_consistent():
    configs = sorted((REPO / "ds_configs").glob("*.json"))
    names = {p.stem for p in configs}
    for stage in range(4):
        assert {f"zero{stage}_bf16", f"zero{stage}_fp16", f"cpu_zero{stage}_fp32"} <= names
    for p in configs:
        cfg = load_ds_config(p, world_size=8)
        assert cfg["zero_optimization"]["stage"] in (0, 1, 2, 3)
        assert "gradient_clipping" in cfg and "train_micro_batch_size_per_gpu" in cfg
        assert not (cfg.get("bf16", {}).get("enabled") and cfg.get("fp16", {}).get("enabled")), p.name


def test_batch_triplet_and_optimizer_block_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="inconsistent batch sizes"):
        check_batch_triplet({"train_batch_size": 30, "train_micro_batch_size_per_gpu": 4,
                             "gradient_accumulation_steps": 2}, world_size=4)
    check_batch_triplet({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4,
                         "gradient_accumulation_steps": 2}, world_size=4)
    p = tmp_path / "ds.json"
    p.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "optimizer": {"type": "Adam"}}))
    with pytest.raises(ConfigError, match="remove the 'optimizer' block"):
        load_ds_config(p, 1)


def test_lr_schedule_warms_up_then_decays():
    cfg = OptimConfig(lr=1.0, warmup_steps=4, decay="linear", min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg, horizon=14) for s in range(16)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))
    assert lrs[14] == pytest.approx(0.1) and lrs[15] == pytest.approx(0.1)
    cos = OptimConfig(lr=1.0, warmup_steps=0, decay="cosine")
    assert lr_at(5, cos, horizon=10) == pytest.approx(0.5)


def test_time_based_decay_ends_at_the_time_horizon():
    cfg = OptimConfig(lr=1.0, warmup_steps=2, decay="linear", min_lr_ratio=0.1)
    assert lr_at(0, cfg, horizon=1, progress=time_progress(0.5, None, 60.0)) == 0.5  # warmup: steps
    # warmup ended at 10 s of training: the decay runs from there to 60 s, whatever the step
    assert lr_at(9, cfg, horizon=1, progress=time_progress(10.0, 10.0, 60.0)) == 1.0
    assert lr_at(99, cfg, horizon=1, progress=time_progress(35.0, 10.0, 60.0)) == pytest.approx(0.55)
    assert lr_at(999, cfg, horizon=1, progress=time_progress(70.0, 10.0, 60.0)) == pytest.approx(0.1)
    # a wall-time budget without a step horizon is the decay's time horizon
    c = load_config(None, ["data.data_dir=x", "budget.steps=none", "budget.wall_time_s=60"])
    assert c.decay_time_s() == 60.0 and c.uses_clock()
    c = load_config(None, ["data.data_dir=x", "budget.wall_time_s=60"])  # steps set: steps rule
    assert c.decay_time_s() is None and c.decay_horizon() == 1000
    c = load_config(None, ["data.data_dir=x", "optim.decay_time_s=30"])
    assert c.decay_time_s() == 30.0 and c.uses_clock()
    assert not load_config(None, ["data.data_dir=x"]).uses_clock()


def test_cli_surface_does_not_grow_unnoticed():
    from pipeline.train import parse_args

    args = parse_args(["--config", "r.toml", "--set", "optim.lr=1", "budget.steps=2", "--set",
                       "run.seed=3", "--resume", "auto", "--local_rank=1"])
    assert vars(args) == {"config": "r.toml", "overrides": [["optim.lr=1", "budget.steps=2"], ["run.seed=3"]],
                          "resume": "auto", "overwrite": False, "deepspeed_config": None,
                          "deepspeed": False, "print_config": False, "all": False, "local_rank": 1}


def test_resume_resolution(tmp_path):
    from pipeline.checkpoint import CheckpointError, resolve_resume, write_latest

    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    assert resolve_resume("none", ckpt) is None
    assert resolve_resume("auto", ckpt) is None  # nothing saved yet: a fresh start
    for step in (2, 4):
        (ckpt / f"step_{step:08d}").mkdir()
        (ckpt / f"step_{step:08d}" / "sift_state.json").write_text("{}")
    write_latest(ckpt, "step_00000002")
    assert resolve_resume("auto", ckpt) == (ckpt, "step_00000002")
    assert resolve_resume(str(ckpt), ckpt) == (ckpt, "step_00000002")
    assert resolve_resume(str(ckpt / "step_00000004"), ckpt) == (ckpt, "step_00000004")
    assert [p.name for p in ckpt.iterdir() if p.name.startswith(".")] == []  # no temp file left
    with pytest.raises(CheckpointError, match="neither a checkpoint directory"):
        resolve_resume(str(tmp_path), ckpt)
    write_latest(ckpt, "step_00000006")  # names a checkpoint that never completed
    with pytest.raises(CheckpointError, match="is missing"):
        resolve_resume("auto", ckpt)


def test_per_sample_mean_and_spearman():
    import torch

    from pipeline.evaluation import spearman, summarize
    from pipeline.scoring import per_sample_mean

    labels = torch.full((3, 4), -100)
    labels[0, 1] = labels[0, 3] = 5
    labels[2, 0] = 7  # row 1 has no target
    values = torch.tensor([1.0, 3.0, 10.0])  # (N,) row-major over the masked positions
    assert per_sample_mean(values, labels.ne(-100)).tolist() == [2.0, 0.0, 10.0]
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    m = summarize(loss_sum=6.0, correct=1, tokens=4, exit_losses=[1, 2, 3], full_losses=[2, 3, 4])
    assert m["accuracy"] == 0.25 and m["loss"] == 1.5 and m["spearman_exit_vs_full"] == pytest.approx(1.0)


def test_speed_settings_leave_the_fingerprint_alone():
    from pipeline.config import load_config

    base = load_config(None, ["data.data_dir=x"])
    fast = load_config(None, ["data.data_dir=x", "data.prefetch=0", "model.compile=true"])
    assert base.fingerprint() == fast.fingerprint()
    assert base.fingerprint() != load_config(None, ["data.data_dir=x", "run.seed=1"]).fingerprint()
    with pytest.raises(ConfigError, match="data.prefetch"):
        load_config(None, ["data.data_dir=x", "data.prefetch=-1"])


def test_printed_config_reads_back_to_the_same_config(tmp_path):
    from pipeline.config import to_toml

    cfg = load_config(None, ['data.data_dir="/d q\\"s"', "optim.betas=[0.8, 0.9]", "budget.steps=none",
                             "budget.wall_time_s=60", "eval.every_s=5.5", 'selection.policy="none"'])
    text = to_toml(cfg)
    assert 'steps = "none"  # unset' in text and 'policy = "none"\n' in text
    path = tmp_path / "printed.toml"
    path.write_text(text)
    assert load_config(path) == cfg


def test_every_setting_is_documented_in_the_reference():
    """`sift-train --print-config --all` is the reference of every key: a key added without a
    docstring under it fails here."""
    import dataclasses

    from pipeline.config import SECTIONS, field_docs, to_toml

    for name, cls in SECTIONS.items():
        assert " ".join((cls.__doc__ or "").split()), name
        docs = field_docs(cls)
        undocumented = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not undocumented, f"[{name}] keys without a docstring: {undocumented}"
    text = to_toml(load_config(None, ["data.data_dir=x"]), explain=True)
    assert "# lr (float): Peak learning rate." in text and "# every_s (float | None):" in text


def test_console_scripts_answer_help_and_version_without_importing_torch():
    import subprocess
    import sys

    code = ("import sys\nfrom {mod} import main\ntry:\n    main([{flag!r}])\nexcept SystemExit:\n"
            "    pass\nprint('TORCH' if 'torch' in sys.modules else 'LIGHT')")
    for mod, prog in (("pipeline.train", "sift-train"), ("pipeline.export_cli", "sift-export"),
                      ("data_prep.cli", "sift-prep"), ("benchmarks.sift_bench.cli", "sift-bench")):
        for flag in ("--help", "--version"):
            proc = subprocess.run([sys.executable, "-c", code.format(mod=mod, flag=flag)],
                                  capture_output=True, text=True, timeout=120)
            assert proc.stdout.strip().endswith("LIGHT"), (mod, flag, proc.stdout[-500:], proc.stderr[-2000:])
            if flag == "--version":
                assert proc.stdout.startswith(f"{prog} 0."), (mod, proc.stdout)


def test_settings_added_since_checkpoints_leave_their_fingerprint_alone():
    """A default recipe's fingerprint as the version before data.sources, data.weights,
    selection.history_rescore_every and selection.percentile_window computed it (commit 3537da1):
    its checkpoints resume with no "changed settings" warning. A new setting must join
    ADDED_SINCE_CHECKPOINTS with its old behaviour's value, or this fails."""
    cfg = load_config(None, ["data.data_dir=x"])
    assert cfg.fingerprint() == "26f19aab2568f47b39e1cde1e1e0d72aeb92770ee1358c745ce15afc99cac277"
    for changed in ('data.weights=[1.0]', "selection.percentile_window=8"):
        sets = ["data.data_dir=x", changed] if "weights" not in changed else \
            ['data.sources=["x"]', changed]
        assert load_config(None, sets).fingerprint() != cfg.fingerprint()
