"""End to end: `sift-bench --quick` (through benchmarks/time_to_accuracy.py) on a real corpus.

One run of the real harness: the real trainer in every arm (bert-tiny, 6 s of training each, one
variant arm with unigram-normalized scores), the Hugging Face Trainer baseline with its DeepSpeed
integration when accelerate is installed, and the real report; then the same command with
`--resume`, which must keep every arm and only rewrite the report. Asserts on what it writes: JSON keys and finite values, curves that start at 0 and
evaluate on the training-time grid, PNGs, a table row per arm. Speedups themselves are not
asserted: at this size they are noise, and benchmarks measure, tests do not.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
QUICK_ARMS = ["vanilla", "sift-loss-expand-f0.5", "sift-entropy-expand-f0.5",
              "full-loss-expand-f0.5", "sift-loss-expand-f0.5-uni", "random-expand-f0.5"]
VARIANT = ["--variant", "uni", 'selection.normalize="unigram"']
BUDGET_S, INTERVAL_S = 6.0, 1.5

pytestmark = [pytest.mark.e2e, pytest.mark.slow]  # about 2 minutes on 2 shared cores


def bench_env() -> dict[str, str]:
    """A benchmark job's environment: no inherited rank variables, CPU DeepSpeed, one thread."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
               TORCH_EXTENSIONS_DIR=env.get("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions")))
    return env


def finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@pytest.fixture(scope="module")
def quick_run(state_union_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    has_hf = importlib.util.find_spec("accelerate") is not None
    cmd = [sys.executable, str(REPO / "benchmarks" / "time_to_accuracy.py"), "--quick",
           "--data", str(state_union_shards), "--out", str(out / "results"),
           "--work-dir", str(out / "work"), *VARIANT, *([] if has_hf else ["--no-hf-baseline"])]
    env = bench_env()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"sift-bench --quick failed ({proc.returncode}):\n"
                             f"{(proc.stdout + proc.stderr)[-6000:]}")
    results = out / "results"
    report = json.loads((results / "time_to_accuracy_quick.json").read_text())
    resumed = subprocess.run([*cmd, "--resume"], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=600)
    if resumed.returncode != 0:
        raise AssertionError(f"sift-bench --quick --resume failed ({resumed.returncode}):\n"
                             f"{(resumed.stdout + resumed.stderr)[-6000:]}")
    again = json.loads((results / "time_to_accuracy_quick.json").read_text())
    return results, report, has_hf, resumed.stdout, again


def test_the_variant_arm_ran_with_its_overrides(quick_run):
    results, r, _, _, _ = quick_run
    arm = r["arms"]["sift-loss-expand-f0.5-uni"]
    assert arm["variant"] == 'selection.normalize="unigram"' and arm["policy"] == "sift-loss"
    arms = Path(r["settings"]["work_dir"], "arms")
    config = json.loads((arms / "sift-loss-expand-f0.5-uni" / "config.json").read_text())
    assert config["train"]["selection"]["normalize"] == "unigram"

    def mean_candidate_score(name):
        records = [json.loads(line) for line in (arms / name / "metrics.jsonl").read_text().splitlines()]
        values = [x["select/score_all"] for x in records if x.get("kind") == "train"]
        return sum(values) / len(values)

    # a normalized score is the exit loss minus the tokens' unigram surprisal (several nats at
    # vocab 600), so the candidates' mean score sits far below the raw exit loss of the plain arm
    assert mean_candidate_score("sift-loss-expand-f0.5-uni") < mean_candidate_score("sift-loss-expand-f0.5") - 1.0


def test_resume_keeps_every_finished_arm(quick_run):
    _, r, has_hf, stdout, again = quick_run
    lines = [line.strip() for line in stdout.splitlines()]
    kept = sorted(line.split()[2] for line in lines
                  if line.startswith("sift-bench: arm ") and line.endswith("settings: kept"))
    assert kept == sorted(QUICK_ARMS)
    assert ("hf-trainer finished earlier" in stdout) == has_hf
    assert "eval step" not in stdout  # nothing trained again
    assert sorted(again["arms"]) == sorted(r["arms"])
    for name, arm in r["arms"].items():
        assert again["arms"][name]["evals"] == arm["evals"], name


def test_json_has_targets_speedups_machine_and_versions(quick_run):
    _, r, has_hf, _, _ = quick_run
    assert 0 < r["target_accuracy"] <= 1 and finite(r["target_loss"]) and r["target_loss"] > 0
    expected = QUICK_ARMS + (["hf-trainer"] if has_hf else [])
    assert sorted(r["arms"]) == sorted(expected)
    assert sorted(r["speedup_vs_vanilla"]) == sorted(QUICK_ARMS)  # HF: hf_trainer_* keys
    # vanilla crosses its own target by construction, at or before 80% of its budget
    assert r["speedup_vs_vanilla"]["vanilla"] == pytest.approx(1.0)
    for name, (lo, hi) in r["speedup_vs_vanilla_ci95"].items():
        assert 0 < lo <= r["speedup_vs_vanilla"][name] <= hi, name
    assert sorted(r["speedup_vs_control"]) == sorted(QUICK_ARMS[1:4] + ["sift-loss-expand-f0.5-uni"])
    t_van = r["analysis"]["arms"]["vanilla"]["time_to_target_s"]
    assert 0 <= t_van <= 0.8 * BUDGET_S + 1e-9
    for name, s in r["speedup_vs_vanilla"].items():
        assert s is None or (finite(s) and s > 0), (name, s)
    for sift in ("sift-loss-expand-f0.5", "sift-entropy-expand-f0.5", "full-loss-expand-f0.5",
                 "sift-loss-expand-f0.5-uni"):
        assert r["analysis"]["arms"][sift]["control"] == "random-expand-f0.5"
    if has_hf:
        ratio = r["hf_trainer_time_ratio"]
        assert ratio is None or (finite(ratio) and ratio > 0)
        assert finite(r["hf_trainer_tokens_per_s_ratio"]) and r["hf_trainer_tokens_per_s_ratio"] > 0
        assert r["arms"]["hf-trainer"]["deepspeed"] is True
        floor = r["hf_trainer_time_ratio_at_least"]  # the ratio, or budget/vanilla's time if missed
        assert floor is None or (finite(floor) and (ratio is None or floor == pytest.approx(ratio)))
    else:
        assert r["hf_trainer_time_ratio"] is None
    m = r["machine"]
    assert m["cpu_count"] >= 1
    assert {"python", "torch", "deepspeed", "transformers"} <= set(m["versions"])
    assert r["settings"]["budget_s"] == BUDGET_S and r["settings"]["eval_interval_s"] == INTERVAL_S


def test_each_arm_ran_its_policy_for_the_budget_with_evals_on_the_time_grid(quick_run):
    _, r, _, _, _ = quick_run
    for name, arm in r["arms"].items():
        evals = arm["evals"]
        assert len(evals) >= 3, name
        times = [e["elapsed_s"] for e in evals]
        assert times[0] == pytest.approx(0.0, abs=0.05), name  # the before-training evaluation
        assert times == sorted(times), name
        # the j-th evaluation in between comes at or after j intervals of training time
        for j, t in enumerate(times[1:-1], start=1):
            assert t >= j * INTERVAL_S - 1e-9, (name, j, t)
        assert times[-1] >= BUDGET_S and arm["train_time_s"] >= BUDGET_S, name
        assert arm["eval_time_s"] > 0, name
        for e in evals:
            assert 0 <= e["accuracy"] <= 1 and finite(e["loss"]) and e["loss"] > 0, (name, e)
        backprop = [e["samples_backpropagated"] for e in evals]
        assert backprop[0] == 0 and backprop == sorted(backprop) and backprop[-1] > 0, name
        assert evals[-1]["loss"] < evals[0]["loss"], name  # every arm learns something
        assert finite(arm["tokens_per_s"]) and arm["tokens_per_s"] > 0, name
    assert r["arms"]["vanilla"]["policy"] == "none"
    for name in QUICK_ARMS[1:]:
        arm = r["arms"][name]
        assert arm["policy"] == name.split("-expand")[0]
        # expand mode: the optimizer batch is unchanged, so every step backpropagates a full batch
        assert arm["samples_backpropagated"] == arm["steps"] * arm["micro_batch"] * arm["world_size"]
        if arm["policy"].startswith("sift"):
            rho = [e["spearman_exit_vs_full"] for e in arm["evals"]]
            assert all(x is None or -1 <= x <= 1 for x in rho) and any(finite(x) for x in rho)


def test_plots_are_pngs_and_the_table_has_a_row_per_arm(quick_run):
    results, r, _, _, _ = quick_run
    for suffix in ("accuracy_vs_time", "accuracy_vs_samples", "spearman_vs_time"):
        png = results / f"time_to_accuracy_quick_{suffix}.png"
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png
    text = (results / "time_to_accuracy_quick.md").read_text()
    intervals, rest = text.split("First crossings of the raw curves")
    table, diagnostics = rest.split("Where the time went")

    def arm_names(text):
        rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
        return sorted(row.split("|")[1].strip() for row in rows)

    assert arm_names(table) == sorted(r["arms"])
    assert arm_names(diagnostics) == sorted(QUICK_ARMS)  # the HF arm has no step split
    for name in QUICK_ARMS:
        d = r["arms"][name]["diagnostics"]
        assert d["step_s"] > 0 and d["forward_backward_s"] > 0, name
        if name == "vanilla":  # no scoring pass: the share is the cost of deciding not to score
            assert d["score_share"] < 1e-3, d
        elif not name.startswith("random"):
            assert d["score_share"] > 0.01, (name, d)
    assert f"{r['target_accuracy']:.4f}" in intervals
    rows = [line.split("|")[1:3] for line in intervals.splitlines() if line.startswith("| ")][1:]
    # every arm against vanilla, every SIFT arm also against its random control
    assert sorted(name.strip() for name, vs in rows if vs.strip() == "vanilla") == sorted(QUICK_ARMS[1:])
    assert sorted(name.strip() for name, vs in rows if vs.strip().startswith("control")) == \
        sorted(r["speedup_vs_control"])


def test_seeds_run_the_benchmark_once_per_seed_and_report_medians(state_union_shards, tmp_path):
    out, work = tmp_path / "results", tmp_path / "work"
    cmd = [sys.executable, "-m", "benchmarks.sift_bench.cli", "--quick", "--seeds", "1,2",
           "--policies", "sift-loss,random", "--no-hf-baseline", "--data", str(state_union_shards),
           "--out", str(out), "--work-dir", str(work)]
    env = bench_env()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    arms = ["vanilla", "sift-loss-expand-f0.5", "random-expand-f0.5"]
    doc = json.loads((out / "time_to_accuracy_quick.json").read_text())
    assert doc["seeds"] == [1, 2] and sorted(doc["speedup_vs_vanilla"]) == sorted(arms)
    assert doc["speedup_vs_vanilla"]["vanilla"] == pytest.approx(1.0)
    first_losses = {}
    for seed in (1, 2):
        per_seed = json.loads((out / f"time_to_accuracy_quick_seed{seed}.json").read_text())
        assert sorted(per_seed["arms"]) == sorted(arms)
        level = doc["intervals"]["levels"].index(0.75)  # the headline level
        for name in arms:  # the summary quotes each seed's own ratio
            got = doc["intervals"]["arms"][name]["vs_vanilla_accuracy"][level]["by_seed"][str(seed)]
            assert got == pytest.approx(per_seed["speedup_vs_vanilla"][name])
            raw = doc["across_seeds"]["arms"][name]["speedup_vs_vanilla"]["by_seed"][str(seed)]
            assert raw == per_seed["analysis"]["arms"][name]["speedup_vs_vanilla"]
        config = json.loads((work / f"seed{seed}" / "arms" / "vanilla" / "config.json").read_text())
        assert config["train"]["run"]["seed"] == seed
        first_losses[seed] = per_seed["arms"]["vanilla"]["evals"][0]["loss"]
    assert first_losses[1] != first_losses[2]  # other initial weights: the seed took effect
    table = (out / "time_to_accuracy_quick.md").read_text().split("First crossings of the raw curves")[1]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert sorted(row.split("|")[1].strip() for row in rows) == sorted(arms)


def test_warm_start_forks_every_arm_from_one_vanilla_checkpoint(state_union_shards, shared_data, tmp_path):
    """--warm-start STEPS: one vanilla run, then every arm starts from its checkpoint: each arm's
    first evaluation is the warm start's last (same weights, same fixed validation masks).
    With --downstream every arm's final model is exported and fine-tuned (sift-finetune) on 40
    movie reviews, and the report puts its accuracy beside the arm's masked-LM accuracy."""
    out, work = tmp_path / "results", tmp_path / "work"
    reviews = tmp_path / "reviews.jsonl"
    with reviews.open("w") as f:
        for label in ("neg", "pos"):
            for path in sorted((shared_data / "nltk" / "movie_reviews" / label).iterdir())[:20]:
                f.write(json.dumps({"text": path.read_text(), "label": label}) + "\n")
    cmd = [sys.executable, "-m", "benchmarks.sift_bench.cli", "--quick", "--warm-start", "12",
           "--budget-s", "3", "--policies", "sift-loss,random", "--data", str(state_union_shards),
           "--out", str(out), "--work-dir", str(work), "--downstream", str(reviews),
           "--downstream-seeds", "1", "--downstream-args", "--epochs 1 --max-length 32"]
    env = bench_env()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert "no hf-trainer baseline under --warm-start" in proc.stdout
    warm = json.loads((work / "warm_start" / "summary.json").read_text())
    assert warm["steps"] == 12 and warm["policy"] == "none"
    doc = json.loads((out / "time_to_accuracy_quick.json").read_text())
    assert sorted(doc["arms"]) == ["random-expand-f0.5", "sift-loss-expand-f0.5", "vanilla"]
    for name, arm in doc["arms"].items():
        config = json.loads((work / "arms" / name / "config.json").read_text())["train"]
        assert config["checkpoint"]["init_from"] == str(work / "warm_start" / "checkpoints")
        assert config["optim"]["warmup_steps"] == 0
        first = arm["evals"][0]
        assert first["step"] == 0 and first["accuracy"] == warm["accuracy_after"], name
        assert first["loss"] == pytest.approx(warm["loss_after"], rel=1e-9), name
    downstream = doc["downstream"]["arms"]
    assert sorted(downstream) == sorted(doc["arms"])
    for name, d in downstream.items():
        assert d["mlm_accuracy"] == doc["arms"][name]["accuracy_after"]
        assert 0 <= d["accuracy"]["mean"] <= 1 and d["num_test"] == 8 and d["majority_accuracy"] == 0.5
        report = json.loads((work / "arms" / name / "downstream.json").read_text())
        assert report["runs"][0]["seed"] == 1 and report["settings"]["max_length"] == 32
        assert (work / "arms" / name / "export" / "model.safetensors").is_file()
    table = (out / "time_to_accuracy_quick.md").read_text()
    assert "| arm | final MLM accuracy | downstream accuracy | downstream macro-F1 |" in table
    # A warm start (a directory) the arms cannot fork from is refused before any job (each arm's
    # job found it, one after another, with a traceback); nothing of the first benchmark changes.
    before = sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir())
    misfit = [sys.executable, "-m", "benchmarks.sift_bench.cli", "--quick", "--data", str(state_union_shards),
              "--warm-start", str(work / "warm_start" / "checkpoints"), "--out", str(out),
              "--work-dir", str(tmp_path / "work2"), "--name", "misfit", "--set", "model.preset=bert-mini"]
    proc = subprocess.run(misfit, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert "--warm-start: " in lines[0] and "does not fit this run: model num_hidden_layers" in lines[0], lines[0]
    assert sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir()) == before
