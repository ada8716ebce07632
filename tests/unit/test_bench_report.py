"""sift-bench's pure parts: the arm list and the time-to-target arithmetic (no training)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from benchmarks.sift_bench.cli import Arm, arms_for
from benchmarks.sift_bench.report import (across_seeds, analyze, first_crossing, markdown_table,
                                   median_or_none, points, seeds_table, speedup, target_from,
                                   value_at)
from pipeline.config import load_config


def curve(*pairs):
    """Evaluations (time, accuracy); loss falls as accuracy rises."""
    return [{"elapsed_s": t, "accuracy": v, "loss": 8.0 - 10.0 * v, "samples_backpropagated": 10 * t}
            for t, v in pairs]


def test_value_at_interpolates_and_clamps():
    pts = [(0.0, 0.0), (10.0, 0.2), (20.0, 0.3)]
    assert value_at(pts, 5.0) == pytest.approx(0.1)
    assert value_at(pts, 16.0) == pytest.approx(0.26)
    assert value_at(pts, -1.0) == 0.0 and value_at(pts, 99.0) == 0.3
    with pytest.raises(ValueError):
        value_at([], 1.0)


def test_first_crossing_is_the_first_interpolated_crossing():
    pts = [(0.0, 0.0), (10.0, 0.2), (20.0, 0.1), (30.0, 0.4)]
    assert first_crossing(pts, 0.1) == pytest.approx(5.0)  # not the later dip back to 0.1
    assert first_crossing(pts, 0.3) == pytest.approx(20.0 + 10.0 * (0.3 - 0.1) / (0.4 - 0.1))
    assert first_crossing(pts, 0.5) is None
    assert first_crossing(pts, 0.0) == 0.0
    loss = [(0.0, 8.0), (10.0, 6.0), (20.0, 5.0)]
    assert first_crossing(loss, 5.5, higher_is_better=False) == pytest.approx(15.0)


def test_points_drop_non_finite_and_sort():
    c = [{"elapsed_s": 2.0, "accuracy": 0.2}, {"elapsed_s": 1.0, "accuracy": float("nan")},
         {"elapsed_s": 0.0, "accuracy": 0.1}, {"elapsed_s": 3.0, "accuracy": None}]
    assert points(c, "elapsed_s", "accuracy") == [(0.0, 0.1), (2.0, 0.2)]


def test_target_is_vanillas_value_at_80_percent_and_vanilla_reaches_it():
    vanilla = curve((0, 0.0), (50, 0.10), (100, 0.14))
    assert target_from(vanilla, 100.0) == pytest.approx(0.10 + 0.04 * 30 / 50)
    fast = curve((0, 0.0), (25, 0.10), (50, 0.14), (100, 0.16))
    slow = curve((0, 0.0), (100, 0.05))
    arms = {"vanilla": {"evals": vanilla}, "fast": {"evals": fast}, "slow": {"evals": slow},
            "random": {"evals": vanilla}}
    a = analyze(arms, 100.0, controls={"fast": "random"})
    t_van = a["arms"]["vanilla"]["time_to_target_s"]
    assert t_van == pytest.approx(80.0)
    assert a["arms"]["vanilla"]["speedup_vs_vanilla"] == pytest.approx(1.0)
    t_fast = 25 + 25 * (a["target_accuracy"] - 0.10) / 0.04
    assert a["arms"]["fast"]["time_to_target_s"] == pytest.approx(t_fast)
    assert a["arms"]["fast"]["speedup_vs_vanilla"] == pytest.approx(80.0 / t_fast)
    assert a["arms"]["fast"]["speedup_vs_control"] == pytest.approx(80.0 / t_fast)
    assert a["arms"]["slow"]["time_to_target_s"] is None
    assert a["arms"]["slow"]["speedup_vs_vanilla"] is None
    assert a["arms"]["fast"]["samples_to_target"] == pytest.approx(10 * t_fast)
    assert a["target_loss"] == pytest.approx(8.0 - 10.0 * a["target_accuracy"])
    assert a["arms"]["fast"]["time_to_target_loss_s"] == pytest.approx(t_fast)
    table = markdown_table(a, {n: {} for n in arms})
    rows = [line for line in table.splitlines() if line.startswith("| ")][1:]
    assert [r.split("|")[1].strip() for r in rows] == list(arms)
    assert "not reached" in next(r for r in rows if r.startswith("| slow "))
    with pytest.raises(ValueError, match="reference"):
        analyze({"fast": {"evals": fast}}, 100.0)


def test_median_counts_a_missed_target_as_the_slowest():
    assert median_or_none([2.0, 1.0, 3.0]) == 2.0
    assert median_or_none([2.0, None, 3.0]) == 2.0  # the miss ranks lowest, the middle is 2.0
    assert median_or_none([None, None, 3.0]) is None
    assert median_or_none([1.0, 3.0]) == 2.0
    assert median_or_none([None, 3.0]) is None  # an even count needs both middle values
    assert median_or_none([]) is None
    assert median_or_none([None, 1.8, 2.0], none_is_high=True) == 2.0  # a time ratio: a miss is slowest


def test_across_seeds_gives_each_seeds_ratios_and_their_medians():
    vanilla = curve((0, 0.0), (50, 0.10), (100, 0.14))
    fast = curve((0, 0.0), (25, 0.10), (50, 0.14), (100, 0.16))
    slow = curve((0, 0.0), (100, 0.05))
    seed1 = analyze({"vanilla": {"evals": vanilla}, "sift": {"evals": fast},
                     "random": {"evals": vanilla}}, 100.0, controls={"sift": "random"})
    seed2 = analyze({"vanilla": {"evals": vanilla}, "sift": {"evals": slow},
                     "random": {"evals": fast}}, 100.0, controls={"sift": "random"})
    seed3 = analyze({"vanilla": {"evals": vanilla}, "sift": {"evals": vanilla},
                     "random": {"evals": vanilla}, "extra": {"evals": fast}}, 100.0,
                    controls={"sift": "random"})
    seed4 = analyze({"vanilla": {"evals": vanilla}, "sift": {"evals": vanilla},
                     "random": {"evals": slow}}, 100.0, controls={"sift": "random"})
    agg = across_seeds({1: seed1, 2: seed2, 3: seed3})
    assert agg["seeds"] == [1, 2, 3] and list(agg["arms"]) == ["vanilla", "sift", "random"]
    sift = agg["arms"]["sift"]["speedup_vs_vanilla"]
    fast_ratio = seed1["arms"]["sift"]["speedup_vs_vanilla"]
    assert fast_ratio > 1.0
    assert sift["by_seed"] == {1: fast_ratio, 2: None, 3: pytest.approx(1.0)}
    assert sift["median"] == pytest.approx(1.0) and sift["reached"] == 2
    assert sift["min"] == pytest.approx(1.0) and sift["max"] == fast_ratio
    assert agg["arms"]["sift"]["control"] == "random"
    assert agg["arms"]["sift"]["speedup_vs_control_at_least"]["by_seed"][2] is None  # SIFT missed
    # the control missed and SIFT reached the target at 80 s: at least budget / 80 = 1.25x, a win
    control = across_seeds({4: seed4})["arms"]["sift"]["speedup_vs_control_at_least"]
    assert control["by_seed"][4] == pytest.approx(1.25) and control["reached"] == 1
    assert agg["arms"]["vanilla"]["speedup_vs_vanilla"]["median"] == pytest.approx(1.0)
    table = seeds_table(agg)
    row = next(line for line in table.splitlines() if line.startswith("| sift "))
    assert "n/a" in row and "2/3" in row
    with pytest.raises(ValueError):
        across_seeds({})


def test_speedup_edge_cases():
    assert speedup(10.0, 5.0) == 2.0
    assert speedup(None, 5.0) is None and speedup(10.0, None) is None
    assert math.isinf(speedup(10.0, 0.0))


def test_arms_cover_the_sweeps_with_a_random_control_per_batch_size():
    arms = arms_for(["sift-loss", "sift-entropy", "random", "full-loss"], [0.25, 0.5, 0.75],
                    ["expand", "shrink"], [1, 2], ["shared", "separate"])
    names = [a.name for a in arms]
    assert names[0] == "vanilla" and len(names) == len(set(names))
    for pool in ("expand", "shrink"):
        for f in (0.25, 0.5, 0.75):
            assert f"sift-loss-{pool}-f{f:g}" in names
            assert f"random-{pool}-f{f:g}" in names
    assert {"sift-entropy-expand-f0.5", "full-loss-expand-f0.5", "sift-loss-expand-f0.5-L2",
            "sift-loss-expand-f0.5-separate"} <= set(names)
    for a in arms:
        if a.control() is not None:
            assert a.control().name in names
    assert len(arms) == 17


def test_arm_overrides_give_the_arm_config():
    """Every arm's overrides must load into exactly its settings (vanilla really is policy none)."""
    for arm in (Arm("none"), Arm("sift-entropy", 0.25, "shrink", 2, "separate"), Arm("random", 0.75)):
        cfg = load_config(None, ["data.data_dir=x", *arm.overrides()])
        assert cfg.selection.policy == arm.policy
        assert cfg.model.exit_layer == arm.exit_layer and cfg.model.exit_head == arm.exit_head
        if arm.policy != "none":
            assert cfg.selection.fraction == arm.fraction and cfg.selection.pool == arm.pool
    with pytest.raises(ValueError, match="policy"):
        Arm("bogus")
    with pytest.raises(ValueError, match="policy"):
        arms_for(["bogus"], [0.5], ["expand"], [1], ["shared"])


def test_full_run_recipe_loads_for_every_arm(tmp_path):
    """benchmarks/time_to_accuracy.toml, with the harness's settings, is a valid config per arm."""
    from benchmarks.sift_bench.cli import REPO
    from benchmarks.sift_bench.job import arm_config

    arms = arms_for(["sift-loss", "sift-entropy", "random", "full-loss"], [0.25, 0.5, 0.75],
                    ["expand", "shrink"], [1, 2], ["shared", "separate"])
    plan = {"recipe": str(REPO / "benchmarks" / "time_to_accuracy.toml"),
            "overrides": [f"data.data_dir={tmp_path}"], "out_dir": str(tmp_path), "budget_s": 300.0,
            "eval_interval_s": 30.0}
    for arm in arms:
        cfg = arm_config(plan, {"name": arm.name, "overrides": arm.overrides()})
        assert cfg.selection.policy == arm.policy and cfg.model.preset == "bert-mini"
        assert cfg.budget.wall_time_s == 300.0 and cfg.budget.steps is None
        assert cfg.eval.every_steps == 0 and cfg.eval.every_s == 30.0 and not cfg.checkpoint.at_end
        assert cfg.run.output_dir == str(tmp_path / "arms" / arm.name)


def test_variants_are_the_base_sift_arm_plus_their_overrides(tmp_path):
    from benchmarks.sift_bench.job import arm_config

    arms = arms_for(["sift-loss", "random"], [0.25, 0.5], ["expand"], [1], ["shared"],
                    variants=[["start50", "selection.start_step=50"],
                              ["uni", 'selection.normalize="unigram"', "optim.lr=2e-3"]])
    by_name = {a.name: a for a in arms}
    assert {"sift-loss-expand-f0.5-start50", "sift-loss-expand-f0.5-uni"} <= set(by_name)
    uni = by_name["sift-loss-expand-f0.5-uni"]
    assert uni.control().name == "random-expand-f0.5" and uni.describe()["variant"]
    plan = {"recipe": None, "overrides": [f"data.data_dir={tmp_path}", "optim.decay=constant"],
            "out_dir": str(tmp_path),
            "budget_s": 10.0, "eval_interval_s": 1.0}
    cfg = arm_config(plan, {"name": uni.name, "overrides": uni.overrides()})
    assert (cfg.selection.policy, cfg.selection.fraction, cfg.selection.normalize, cfg.optim.lr) \
        == ("sift-loss", 0.5, "unigram", 2e-3)
    start = by_name["sift-loss-expand-f0.5-start50"]
    assert arm_config(plan, {"name": start.name, "overrides": start.overrides()}).selection.start_step == 50
    with pytest.raises(ValueError, match="SIFT policy"):
        arms_for(["random"], [0.5], ["expand"], [1], ["shared"], variants=[["x", "optim.lr=1"]])
    with pytest.raises(ValueError, match="tag"):
        Arm("sift-loss", tag="a b", extra=("optim.lr=1",))
    with pytest.raises(ValueError, match="override"):
        Arm("sift-loss", tag="nothing")
    with pytest.raises(ValueError, match="own fields"):  # would be mislabelled and mis-controlled
        Arm("sift-loss", tag="f25", extra=("selection.fraction=0.25",))
    with pytest.raises(ValueError, match="another arm"):  # a tag that repeats an arm's name
        arms_for(["sift-loss"], [0.5], ["expand"], [1, 2], ["shared"],
                 variants=[["L2", "optim.lr=1e-4"]])
    with pytest.raises(ValueError, match="another arm"):
        arms_for(["sift-loss"], [0.5], ["expand"], [1], ["shared"],
                 variants=[["x", "optim.lr=1e-4"], ["x", "optim.lr=2e-4"]])


def test_an_arm_is_finished_only_with_its_own_summary_and_settings(tmp_path):
    """--resume keeps an arm only when config.json equals this arm's config and a summary exists."""
    from benchmarks.sift_bench.job import arm_config, arm_finished
    from data_prep.io_util import write_json_atomic

    plan = {"recipe": None, "overrides": [f"data.data_dir={tmp_path}", "optim.decay=constant"],
            "out_dir": str(tmp_path),
            "budget_s": 10.0, "eval_interval_s": 1.0}
    arm = Arm("sift-loss", 0.5)
    cfg = arm_config(plan, {"name": arm.name, "overrides": arm.overrides()})
    out = Path(cfg.run.output_dir)
    out.mkdir(parents=True)
    from pipeline.ds_config import load_ds_config
    from pipeline.config import resolve_path

    assert not arm_finished(cfg, 2)  # nothing there
    ds_config = load_ds_config(resolve_path(cfg.run.ds_config), 2)
    write_json_atomic(out / "config.json", {"train": cfg.to_dict(), "deepspeed": ds_config})
    assert not arm_finished(cfg, 2)  # started, never finished
    write_json_atomic(out / "summary.json", {"eval_interval_s": 1.0, "world_size": 2, "steps": 3})
    assert arm_finished(cfg, 2)
    assert not arm_finished(cfg, 4)
    other_interval = arm_config({**plan, "eval_interval_s": 2.0},
                                {"name": arm.name, "overrides": arm.overrides()})
    assert not arm_finished(other_interval, 2)  # another evaluation grid is another arm
    # the same path, other DeepSpeed settings (the file was edited since)
    write_json_atomic(out / "config.json", {"train": cfg.to_dict(),
                                            "deepspeed": {**ds_config, "gradient_clipping": 123.0}})
    assert not arm_finished(cfg, 2)
    write_json_atomic(out / "config.json", {"train": cfg.to_dict(), "deepspeed": ds_config})
    assert arm_finished(cfg, 2)
    (out / "config.json").write_text("[1, 2]")  # JSON, but not a config
    assert not arm_finished(cfg, 2)
    write_json_atomic(out / "config.json", {"train": cfg.to_dict(), "deepspeed": ds_config})
    longer = arm_config({**plan, "budget_s": 20.0}, {"name": arm.name, "overrides": arm.overrides()})
    assert not arm_finished(longer, 2)  # another budget is another arm
    # an arm run before a setting existed (its config.json lacks the key): kept, since the new
    # setting's default is the behaviour it ran with; a setting since removed: not kept
    older = cfg.to_dict()
    del older["selection"]["percentile_window"], older["data"]["sources"]
    write_json_atomic(out / "config.json", {"train": older, "deepspeed": ds_config})
    assert arm_finished(cfg, 2)
    older["selection"]["percentile_window"] = 8  # ... but not one that ran with another value
    write_json_atomic(out / "config.json", {"train": older, "deepspeed": ds_config})
    assert not arm_finished(cfg, 2)
    write_json_atomic(out / "config.json", {"train": {**cfg.to_dict(), "gone": {"x": 1}},
                                            "deepspeed": ds_config})
    assert not arm_finished(cfg, 2)
    write_json_atomic(out / "config.json", {"train": cfg.to_dict(), "deepspeed": ds_config})
    (out / "summary.json").write_text("{not json")
    assert not arm_finished(cfg, 2)


def test_step_diagnostics_split_the_step_and_measure_what_selection_kept():
    from benchmarks.sift_bench.report import diagnostics_table, step_diagnostics

    def rec(score, fb, sel=None, all_=None):
        r = {"kind": "train", "time/data_s": 0.01, "time/score_s": score, "time/select_s": 0.01,
             "time/forward_backward_s": fb, "time/optimizer_s": 0.08}
        if sel is not None:
            r.update({"select/score_selected": sel, "select/score_all": all_})
        return r

    d = step_diagnostics([rec(0.2, 0.6, 7.5, 7.0), rec(0.4, 0.8, 8.0, 7.0)])
    assert d["score_s"] == pytest.approx(0.3) and d["forward_backward_s"] == pytest.approx(0.7)
    assert d["step_s"] == pytest.approx(0.01 + 0.3 + 0.01 + 0.7 + 0.08)
    assert d["score_share"] == pytest.approx(0.3 / 1.1) and d["select_share"] == pytest.approx(0.01 / 1.1)
    assert d["score_gap"] == pytest.approx(0.75)
    vanilla = step_diagnostics([rec(0.0, 0.5), {"kind": "train", "time/score_s": float("nan")}])
    assert vanilla["score_share"] == 0.0 and vanilla["score_gap"] is None
    assert step_diagnostics([])["step_s"] is None
    table = diagnostics_table({"sift": {"diagnostics": d}, "hf": {},
                               "random": {"policy": "random", "diagnostics": d}})
    assert "| sift | 1.100 | 0.300 |" in table and "27.3%" in table and "+0.750" in table
    assert "| hf |" not in table
    assert table.count("+0.750") == 1  # uniform random scores have no meaningful gap


def test_isotonic_fit_is_the_monotone_least_squares_curve():
    from benchmarks.sift_bench.report import isotonic

    assert isotonic([1, 3, 2, 4]) == [1, 2.5, 2.5, 4]
    assert isotonic([3, 2, 1]) == [2, 2, 2]
    assert isotonic([5, 4, 6, 1], increasing=False) == [5, 5, 5, 1]
    assert isotonic([0.1, 0.2, 0.3]) == [0.1, 0.2, 0.3]


def _noisy_curve(speed: float, seed: int, noise: float, budget: float = 100.0):
    """Accuracy 0.1 -> 0.3 along a saturating curve, `speed` x faster in time, with noise."""
    import random

    rng = random.Random(seed)
    return [(t, 0.1 + 0.2 * (1 - math.exp(-3 * speed * t / budget)) + rng.gauss(0, noise))
            for t in range(0, int(budget) + 1, 5)]


def test_ratio_intervals_tell_a_real_speedup_from_noise():
    from benchmarks.sift_bench.report import ratio_intervals

    per_seed = {s: {"vanilla": _noisy_curve(1.0, 10 * s, 0.004), "fast": _noisy_curve(2.0, 10 * s + 1, 0.004),
                    "same": _noisy_curve(1.0, 10 * s + 2, 0.004)} for s in range(3)}
    fast = ratio_intervals(per_seed, "fast", "vanilla", budget_s=100.0, levels=(0.25, 0.5, 0.75),
                           n_boot=300)
    for row in fast:
        assert 1.5 < row["ratio"] < 2.6 and row["excludes_1"] and row["ci95"][0] > 1.2, row
        assert row["arm_reached"] == 3
    same = ratio_intervals(per_seed, "same", "vanilla", budget_s=100.0, levels=(0.25, 0.5, 0.75),
                           n_boot=300)
    for row in same:
        assert row["ci95"][0] < 1.0 < row["ci95"][1] and not row["excludes_1"], row
        assert 0.7 < row["ratio"] < 1.4


def test_a_target_met_at_the_start_gives_a_bounded_ratio():
    from benchmarks.sift_bench.report import ratio_intervals

    # a low target that the noisy first evaluation (t = 0) of either arm may already meet
    per_seed = {s: {"vanilla": _noisy_curve(1.0, 10 * s, 0.03), "same": _noisy_curve(1.0, 10 * s + 2, 0.03)}
                for s in range(3)}
    (row,) = ratio_intervals(per_seed, "same", "vanilla", budget_s=100.0, levels=(0.05,), n_boot=300)
    # times are floored at the first evaluation after the start (5 s), so no ratio exceeds budget / 5
    assert 1 / 20 <= row["ci95"][0] <= row["ci95"][1] <= 20, row


def test_compare_seeds_reports_vanilla_and_control_ratios_with_intervals():
    from benchmarks.sift_bench.report import compare_seeds, intervals_table

    def evals(pts, samples_per_s):
        return {"evals": [{"elapsed_s": t, "accuracy": a, "loss": 8.0 - 10 * a,
                           "samples_backpropagated": samples_per_s * t} for t, a in pts]}

    # sift learns 1.5x faster in time while backpropagating half as many sequences per second:
    # 3x vanilla's learning per sequence; random learns like vanilla per second and per sequence
    per_seed = {s: {"vanilla": evals(_noisy_curve(1.0, s, 0.003), 100.0),
                    "sift": evals(_noisy_curve(1.5, s + 100, 0.003), 50.0),
                    "random": evals(_noisy_curve(1.0, s + 200, 0.003), 100.0)} for s in (42, 43)}
    cmp = compare_seeds(per_seed, 100.0, {"sift": "random"}, n_boot=200)
    assert cmp["seeds"] == ["42", "43"] and len(cmp["targets_accuracy"]["42"]) == 4
    row = cmp["arms"]["sift"]
    assert row["control"] == "random"
    for key in ("vs_vanilla_accuracy", "vs_control_accuracy", "vs_vanilla_loss", "vs_control_loss"):
        assert [r["level"] for r in row[key]] == [0.25, 0.5, 0.75, 1.0]
        assert row[key][1]["ratio"] > 1.2
    efficiency = row["samples_vs_vanilla_accuracy"]
    assert all(2.4 < r["ratio"] < 3.6 and r["excludes_1"] for r in efficiency[:3]), efficiency
    same = cmp["arms"]["random"]["samples_vs_vanilla_accuracy"][1]
    assert same["ci95"][0] < 1.0 < same["ci95"][1], same
    table = intervals_table(cmp)
    assert "| sift | vanilla |" in table and "| sift | control (random) |" in table
    assert "[" in table and "vanilla | vanilla" not in table
    efficiency_rows = table.split("Sample efficiency")[1].splitlines()
    assert [r.split(" | ")[0] for r in efficiency_rows if r.startswith("| ") and "---" not in r] == \
        ["| arm", "| sift", "| random"]


def test_noise_sd_sees_the_noise_not_the_trend():
    import random

    from benchmarks.sift_bench.report import noise_sd

    rng = random.Random(0)
    trend = [(t, 0.001 * t) for t in range(200)]
    assert noise_sd(trend) == pytest.approx(0.0, abs=1e-12)
    noisy = [(t, y + rng.gauss(0, 0.01)) for t, y in trend]
    assert 0.008 < noise_sd(noisy) < 0.012


def test_warm_start_forks_every_arm_from_one_vanilla_run(tmp_path):
    from benchmarks.sift_bench.job import arm_config, warm_start_config

    plan = {"recipe": None, "overrides": [f"data.data_dir={tmp_path}", 'optim.decay="linear"',
                                          "optim.warmup_steps=50"],
            "out_dir": str(tmp_path), "budget_s": 60.0, "eval_interval_s": 6.0, "warm_start": 300}
    warm = warm_start_config(plan)
    assert (warm.selection.policy, warm.budget.steps, warm.optim.decay) == ("none", 300, "constant")
    assert warm.optim.warmup_steps == 50 and warm.checkpoint.at_end and not warm.eval.at_start
    assert warm.run.output_dir == str(tmp_path / "warm_start")
    arm = arm_config(plan, {"name": "sift", "overrides": Arm("sift-loss", 0.5).overrides()})
    assert arm.checkpoint.init_from == str(tmp_path / "warm_start" / "checkpoints")
    assert arm.optim.warmup_steps == 0 and arm.optim.decay == "linear"
    assert arm.decay_time_s() == 60.0  # the arm's own budget is its decay horizon
    own = arm_config({**plan, "warm_start": "/ckpts/mine"}, {"name": "v", "overrides": []})
    assert own.checkpoint.init_from == "/ckpts/mine"
    cold = arm_config({**plan, "warm_start": None}, {"name": "v", "overrides": []})
    assert cold.checkpoint.init_from is None and cold.optim.warmup_steps == 50


def test_an_arm_never_uses_the_recipes_checkpoint_dir(tmp_path):
    """The arms start with run.overwrite: in a user's checkpoint.dir (their warm start, say) that
    would delete the checkpoints there."""
    from benchmarks.sift_bench.job import arm_config

    plan = {"recipe": None, "overrides": [f"data.data_dir={tmp_path}", "checkpoint.dir=/ckpts/mine"],
            "out_dir": str(tmp_path), "budget_s": 60.0, "eval_interval_s": 6.0,
            "warm_start": "/ckpts/mine"}
    arm = arm_config(plan, {"name": "v", "overrides": []})
    assert arm.checkpoint_dir() == tmp_path / "arms" / "v" / "checkpoints"
    assert arm.checkpoint.init_from == "/ckpts/mine" and arm.run.overwrite


def test_an_earlier_benchmark_or_a_bad_warm_start_is_refused_before_any_job(tiny_corpus, tmp_path,
                                                                            capsys):
    from benchmarks.sift_bench.cli import main

    work, out = tmp_path / "work", tmp_path / "out"
    (work / "arms" / "vanilla").mkdir(parents=True)
    base = ["--data", str(tiny_corpus), "--no-hf-baseline", "--name", "mine", "--work-dir", str(work),
            "--out", str(out), "--policies", "random", "--fractions", "0.5", "--pools", "expand"]
    assert main(base) == 2
    err = capsys.readouterr().err
    assert "an earlier benchmark named mine is there" in err and "--resume keeps" in err
    assert (work / "arms" / "vanilla").is_dir()  # nothing touched
    empty = tmp_path / "not_a_checkpoint"
    empty.mkdir()
    assert main([*base, "--work-dir", str(tmp_path / "fresh"), "--warm-start", str(empty)]) == 2
    assert "--warm-start" in capsys.readouterr().err and not (tmp_path / "fresh").exists()
