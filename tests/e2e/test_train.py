"""End to end: the real entry point under the real DeepSpeed launcher on 2 gloo ranks.

Every job is its own subprocess with a fresh port; data is the embedded corpus prepared by the real
sift-prep (small vocabulary, short rows, so bert-tiny learns something in a minute). Runs are
shared between assertions: the 6-step ZeRO-2/ZeRO-3 runs give both the step-1 losses of the stage
comparison and the references of the exact-resume checks.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch

from tests._dist import run_distributed
from tests.conftest import free_port
from tests.training import (BIN, REPO, checkpoint_at_step_3, fp32_weights, job_env, read_metrics,
                            run_train, summary, train_losses, zero_run)

pytestmark = [pytest.mark.e2e, pytest.mark.dist]


def most_frequent_token_accuracy(data_dir: Path, max_samples: int, rate: float) -> float:
    """Accuracy of always predicting the most frequent validation target (the unigram floor)."""
    from pipeline.data import MaskingConfig, ShardDataset, validation_batches

    ds = ShardDataset(data_dir, "valid")
    n = min(max_samples, len(ds))
    labels = torch.cat([b["labels"][b["labels"] != -100]
                        for b in validation_batches(ds, 64, MaskingConfig(rate=rate), max_samples=n - n % 2)])
    return float(torch.bincount(labels).max()) / labels.numel()


def test_sift_zero2_two_ranks_learns_logs_and_exports(runs, data_dir, tmp_path):
    out = runs("learn", 2, "budget.steps=100", "eval.every_steps=50", "eval.at_start=true",
               "eval.at_end=true", "checkpoint.every_steps=0", "logging.every_steps=5")
    s = summary(out)
    baseline = most_frequent_token_accuracy(data_dir, 256, rate=0.25)
    assert s["steps"] == 100 and s["stop_reason"] == "steps" and s["world_size"] == 2
    assert s["zero_stage"] == 2 and s["policy"] == "sift-loss"
    assert s["accuracy_after"] > 5 * s["accuracy_before"], s
    assert s["accuracy_after"] > baseline + 0.01, (s["accuracy_after"], baseline)
    assert s["samples_backpropagated"] == 100 * 2 * 16  # expand: B=16 trained per rank per step
    assert s["global_sample_position"] == 100 * 2 * 32  # ... from 2B candidates per rank
    losses = [r["train/loss"] for r in read_metrics(out)]
    assert sum(losses[-3:]) < sum(losses[:3])
    evals = read_metrics(out, "eval")
    assert [e["step"] for e in evals] == [0, 50, 100]
    assert all(0.5 < e["eval/spearman_exit_vs_full"] <= 1.0 for e in evals)

    # TensorBoard: the listed scalars, read back with tensorboard's own reader.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pipeline.metrics import EVAL_SCALARS

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    expected = {"train/loss", "train/lr", "train/grad_norm", "train/exit_score",
                "train/samples_backpropagated", "select/fraction", "select/score_selected",
                "select/score_all", "select/bytes_moved", "select/samples_moved", "perf/samples_per_s",
                "perf/tokens_per_s", "time/data_s", "time/score_s", "time/select_s",
                "time/forward_backward_s", "time/optimizer_s", *EVAL_SCALARS}
    assert expected <= tags, sorted(expected - tags)
    assert [e.step for e in acc.Scalars("eval/accuracy")] == [0, 50, 100]
    assert acc.Scalars("select/fraction")[-1].value == pytest.approx(0.5)
    sel = acc.Scalars("select/score_selected")[-1].value
    assert sel > acc.Scalars("select/score_all")[-1].value  # the top half scores above the mean

    # sift-export -> a Hugging Face directory that transformers loads and fills masks with.
    export = tmp_path / "export"
    proc = subprocess.run([str(BIN / "sift-export"), str(out / "checkpoints"), str(export)],
                          cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline

    model = AutoModelForMaskedLM.from_pretrained(str(export))
    tok = AutoTokenizer.from_pretrained(str(export))
    fill = pipeline("fill-mask", model=model, tokenizer=tok)
    preds = fill(f"the president of the united {tok.mask_token} .")
    assert len(preds) == 5 and all(0 <= p["score"] <= 1 for p in preds)


def test_zero_stages_agree_on_the_first_loss(runs):
    first = {stage: train_losses(zero_run(runs, stage))[1] for stage in (0, 1, 2, 3)}
    for stage in (0, 1, 3):
        assert first[stage] == pytest.approx(first[2], rel=1e-5), first
    assert all(summary(zero_run(runs, s))["zero_stage"] == s for s in (0, 1, 2, 3))


@pytest.mark.parametrize("stage", [2, 3])
def test_exact_resume(runs, recipe, data_dir, tmp_path, stage):
    """Steps 1-3, a fresh process resumes from the step-3 checkpoint to step 6: identical losses
    and identical final weights to the uninterrupted 6-step run."""
    full = zero_run(runs, stage)
    ckpt = checkpoint_at_step_3(full, tmp_path)
    out = tmp_path / "resumed"
    proc = run_train(2, recipe, data_dir, out, f"run.ds_config=ds_configs/cpu_zero{stage}_fp32.json",
                     f"checkpoint.dir={ckpt}", resume="auto")
    assert "resumed from" in proc.stdout + proc.stderr
    ref, got = train_losses(full), train_losses(out)
    assert sorted(got) == [4, 5, 6]
    assert [got[s] for s in (4, 5, 6)] == [ref[s] for s in (4, 5, 6)]
    a = fp32_weights(full / "checkpoints", "step_00000006")
    b = fp32_weights(ckpt, "step_00000006")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    assert summary(out)["global_sample_position"] == summary(full)["global_sample_position"]
    if stage == 2:
        # The finished run resumed once more trains nothing and keeps its summary as written.
        before = (out / "summary.json").read_bytes()
        again = run_train(2, recipe, data_dir, out, f"run.ds_config=ds_configs/cpu_zero{stage}_fp32.json",
                          f"checkpoint.dir={ckpt}", resume="auto")
        assert "nothing left to train at step 6" in again.stdout + again.stderr
        assert (out / "summary.json").read_bytes() == before


def test_whole_word_masking_trains_and_resumes_exactly(runs, recipe, data_dir, tmp_path):
    """masking.whole_word on 2 ranks: steps 4-6 after a resume from step 3 repeat the
    uninterrupted run's losses exactly (the word masks are a function of seed, epoch and index)."""
    sets = ("run.ds_config=ds_configs/cpu_zero2_fp32.json", "masking.whole_word=true")
    full = runs("whole_word", 2, *sets)
    assert train_losses(full) != train_losses(zero_run(runs, 2))  # other targets than token masking
    out = tmp_path / "resumed"
    run_train(2, recipe, data_dir, out, *sets, f"checkpoint.dir={checkpoint_at_step_3(full, tmp_path)}",
              resume="auto")
    ref, got = train_losses(full), train_losses(out)
    assert sorted(got) == [4, 5, 6] and [got[s] for s in (4, 5, 6)] == [ref[s] for s in (4, 5, 6)]


def test_resume_on_another_world_size_continues_the_global_position(runs, recipe, data_dir, tmp_path):
    """A 2-rank ZeRO-0 checkpoint at step 3, resumed by 1 process: the data position carries on."""
    two = zero_run(runs, 0)
    ckpt = checkpoint_at_step_3(two, tmp_path)
    saved = json.loads((ckpt / "step_00000003" / "sift_state.json").read_text())
    assert saved["train_state"]["position"] == 3 * 2 * 32 and saved["world_size"] == 2
    out = tmp_path / "one_rank"
    proc = run_train(1, recipe, data_dir, out, "run.ds_config=ds_configs/cpu_zero0_fp32.json",
                     f"checkpoint.dir={ckpt}", resume="auto")
    assert "saved by 2 ranks, now 1" in proc.stdout + proc.stderr
    s = summary(out)
    assert s["steps"] == 6 and s["world_size"] == 1
    assert s["global_sample_position"] == 3 * 2 * 32 + 3 * 1 * 32
    assert sorted(train_losses(out)) == [4, 5, 6]


def load_universal_worker(rank: int, world_size: int, ckpt_dir: Path, tag: str, ds_config: str):
    """Build the engine as the trainer does for a resume on another world size, load `tag`
    through its universal conversion, and return the module's weights before and right after the
    load, and Adam's state per group (numpy: a tensor's shared memory would not outlive this
    process on the result queue)."""
    os.environ.update(DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=str(REPO / ".torch_extensions"))
    from pipeline import checkpoint
    from pipeline.config import OptimConfig
    from pipeline.ds_config import load_ds_config
    from pipeline.engine import build_engine
    from pipeline.model import ModelConfig, build_model

    state = json.loads((ckpt_dir / tag / "sift_state.json").read_text())
    meta = state["model"]
    torch.manual_seed(state["config"]["run"]["seed"])  # the trainer's initial weights
    model = build_model(ModelConfig(**state["config"]["model"]), meta["vocab_size"],
                        meta["max_seq_len"], meta["pad_token_id"])
    initial = {k: v.detach().float().numpy().copy() for k, v in model.state_dict().items()}
    engine, facts = build_engine(model, OptimConfig(), checkpoint.with_universal_load(
        load_ds_config(REPO / ds_config, world_size)))
    assert checkpoint.needs_universal(ckpt_dir, tag, world_size) and facts.zero_stage == 2
    universal = checkpoint.convert_to_universal(ckpt_dir, tag)  # the trainer's conversion, reused
    client = checkpoint.load(engine, ckpt_dir, tag, rank, engine_tag=universal)
    weights = {k: v.detach().float().numpy().copy() for k, v in engine.module.state_dict().items()}
    adam = engine.optimizer.optimizer.state  # ZeRO-2: keyed by each group's flat fp32 partition
    moments = [{"step": float(adam[flat]["step"]), **{k: adam[flat][k].numpy().copy()
                                                      for k in ("exp_avg", "exp_avg_sq")}}
               for flat in engine.optimizer.single_partition_of_fp32_groups]
    return universal, client["train_state"]["position"], initial, weights, moments


def test_zero2_checkpoint_resumes_on_another_world_size(runs, recipe, data_dir, tmp_path):
    """A 2-rank ZeRO-2 checkpoint at step 3, resumed by 1 process to step 6 through DeepSpeed's
    universal checkpoint: the global sample position carries on, the run trains, and the weights
    right after the load are the 2-rank checkpoint's consolidated fp32 weights and Adam moments, bit
    for bit."""
    two = zero_run(runs, 2)
    ckpt = checkpoint_at_step_3(two, tmp_path)
    out = tmp_path / "one_rank"
    proc = run_train(1, recipe, data_dir, out, "run.ds_config=ds_configs/cpu_zero2_fp32.json",
                     f"checkpoint.dir={ckpt}", resume="auto")
    log = proc.stdout + proc.stderr
    assert "holds ZeRO partitions of 2 ranks: loading its universal checkpoint on 1" in log
    assert "resumed from" in log and "saved by 2 ranks, now 1" in log
    s = summary(out)
    assert s["steps"] == 6 and s["world_size"] == 1 and s["zero_stage"] == 2
    assert s["global_sample_position"] == 3 * 2 * 32 + 3 * 1 * 32
    assert s["samples_backpropagated"] == 3 * 2 * 16 + 3 * 1 * 16
    losses = train_losses(out)
    assert sorted(losses) == [4, 5, 6] and all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    assert json.loads((out / "config.json").read_text())["deepspeed"]["checkpoint"]["load_universal"]
    # The conversion sits beside the tag, complete (renamed into place), with no temp left over.
    universal_dir = ckpt / "step_00000003_universal"
    assert (universal_dir / "zero").is_dir() and not list(ckpt.glob(".*tmp*"))
    assert not (ckpt / "latest_universal").exists() and (ckpt / "latest").read_text().strip() == "step_00000006"
    saved = json.loads((ckpt / "step_00000006" / "sift_state.json").read_text())
    assert saved["world_size"] == 1 and saved["train_state"]["position"] == s["global_sample_position"]

    # Right after the load: the same weights as the 2-rank checkpoint consolidated (the existing
    # conversion is reused, not redone).
    before = universal_dir.stat().st_mtime_ns
    (tag, position, initial, weights, moments), = run_distributed(load_universal_worker, 1, ckpt, "step_00000003",
                                                "ds_configs/cpu_zero2_fp32.json", timeout=180)
    assert tag == "step_00000003_universal" and universal_dir.stat().st_mtime_ns == before
    assert position == 3 * 2 * 32
    ref = fp32_weights(two / "checkpoints", "step_00000003")
    initial = {k: torch.from_numpy(v) for k, v in initial.items()}
    weights = {k: torch.from_numpy(v) for k, v in weights.items()}
    assert ref.keys() <= weights.keys()
    assert all(torch.equal(ref[k], weights[k]) for k in ref), [k for k in ref if not torch.equal(ref[k], weights[k])]
    # ... which are not the initial weights the engine started from: the load moved them.
    assert any(not torch.equal(ref[k], initial[k]) for k in ref)
    # Adam's moments: each group's flat moments are the 2 ranks' partitions end to end (the same
    # parameter order on any world size), up to the padding each world size adds at the end.
    parts = [torch.load(ckpt / "step_00000003" / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt",
                        map_location="cpu", weights_only=False)["optimizer_state_dict"] for r in (0, 1)]
    for g, got in enumerate(moments):
        assert got["step"] == 3.0
        for key in ("exp_avg", "exp_avg_sq"):
            saved = torch.cat([p["base_optimizer_state"]["state"][g][key] for p in parts])
            n = saved.numel() - sum(p["group_paddings"][g] for p in parts)  # real elements
            assert torch.equal(torch.from_numpy(got[key])[:n], saved[:n]), (g, key)
            assert saved[:n].abs().sum() > 0  # moments that 3 steps filled, not zeros


def test_no_shared_memory_segment_outlives_the_run(recipe, data_dir, tmp_path):
    """DeepSpeed's CPU shm all-reduce gives each rank a ~69 MB /dev/shm segment and never unlinks
    it (a few hundred runs filled this machine's 24 GB); comm.init_distributed unlinks the names
    once every rank has mapped them, and the collectives after that still work."""
    port = free_port()
    out = tmp_path / "run"
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(port),
           "--module", "pipeline.train", "--config", str(recipe), "--set", f"data.data_dir={data_dir}",
           f"run.output_dir={out}", "budget.steps=3", "checkpoint.every_steps=0",
           "checkpoint.at_end=false"]
    proc = subprocess.run(cmd, cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    assert summary(out)["steps"] == 3
    left = sorted(p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert left == []


def test_resume_across_a_masking_change_warns_and_keeps_the_old_order(runs, recipe, data_dir, tmp_path):
    """A checkpoint written before masking version 2 and order version 2 (neither recorded)
    resumes: the user is told that the masks, and so the validation accuracy, are not the earlier
    ones, and the run goes on in the sample order it began in (its data position names rows of
    that order), which its own checkpoints then record."""
    ckpt = checkpoint_at_step_3(zero_run(runs, 2), tmp_path)
    for path in (ckpt / "step_00000003").glob("*model_states.pt"):  # the client state rides here
        state = torch.load(path, weights_only=False)
        del state["sift"]["masking_version"], state["sift"]["order_version"]
        torch.save(state, path)
    (ckpt / "step_00000003" / "checksums.json").unlink()  # such old checkpoints had none either
    resumed = tmp_path / "resumed"
    proc = run_train(2, recipe, data_dir, resumed, "run.ds_config=ds_configs/cpu_zero2_fp32.json",
                     f"checkpoint.dir={ckpt}", resume="auto")
    out = proc.stdout + proc.stderr
    assert "resumed from" in out
    assert "trained with masking version 1, this version masks with 2" in out
    assert "was trained in sample order version 1: this run goes on in that order" in out
    last = (ckpt / "latest").read_text().strip()
    assert last != "step_00000003"
    assert json.loads((ckpt / last / "sift_state.json").read_text())["order_version"] == 1


def test_fork_starts_a_new_run_from_another_runs_weights_and_position(runs, recipe, data_dir, tmp_path):
    """checkpoint.init_from: the source's weights and data position, a new step count and history.
    With an LR of ~0 the forked run's final weights are the source's; the data position goes on
    from the source's, each vanilla step consuming exactly what it trains."""
    source = zero_run(runs, 2)
    saved = json.loads((source / "checkpoints" / "step_00000006" / "sift_state.json").read_text())
    out = tmp_path / "fork"
    proc = run_train(2, recipe, data_dir, out, "run.ds_config=ds_configs/cpu_zero2_fp32.json",
                     f"checkpoint.init_from={source / 'checkpoints'}", 'selection.policy="none"',
                     "optim.lr=1e-12", "budget.steps=2", "checkpoint.every_steps=0")
    assert "started from" in proc.stdout + proc.stderr
    s = summary(out)
    assert s["steps"] == 2 and sorted(train_losses(out)) == [1, 2]
    start = saved["train_state"]["position"]
    assert start > 0 and s["global_sample_position"] - start == s["samples_backpropagated"] > 0
    a = fp32_weights(source / "checkpoints", "step_00000006")
    b = fp32_weights(out / "checkpoints", "step_00000002")
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-7) for k in a)
    fresh = fp32_weights(zero_run(runs, 2) / "checkpoints", "step_00000003")
    assert not all(torch.allclose(a[k], fresh[k], atol=1e-7) for k in a)  # the check can fail
    # a fork that was interrupted resumes itself, not the source: checkpoint.resume wins
    proc = run_train(2, recipe, data_dir, out, "run.ds_config=ds_configs/cpu_zero2_fp32.json",
                     f"checkpoint.init_from={source / 'checkpoints'}", 'selection.policy="none"',
                     "optim.lr=1e-12", "budget.steps=3", "checkpoint.every_steps=0", resume="auto")
    assert "resumed from" in proc.stdout + proc.stderr and summary(out)["steps"] == 3


def test_training_clock_evaluates_by_time_and_decays_to_the_floor_at_the_budget(recipe, data_dir, tmp_path):
    """eval.every_s and a wall-time budget with a time-based decay: evaluations on a training-time
    grid that excludes their own time, the LR at its floor when the budget ends."""
    out = tmp_path / "timed"
    run_train(2, recipe, data_dir, out, 'selection.policy="none"', "budget.steps=none",
              "budget.wall_time_s=8", "eval.every_s=2", "eval.at_start=true", "eval.at_end=true",
              "optim.warmup_steps=3", 'optim.decay="linear"', "optim.min_lr_ratio=0.1",
              "checkpoint.every_steps=0", "checkpoint.at_end=false")
    s = summary(out)
    assert s["stop_reason"] == "wall_time" and 8.0 <= s["train_time_s"] < 12.0
    evals = s["evals"]
    times = [e["elapsed_s"] for e in evals]
    assert times[0] < 0.5 and times[-1] >= 8.0
    assert all(b > a for a, b in zip(times, times[1:]))
    # one evaluation per 2 s of training time, however long the evaluations themselves took
    assert [math.floor(t / 2.0) for t in times[1:-1]] == list(range(1, len(times) - 1))
    assert s["eval_time_s"] > 0
    lrs = [r["train/lr"] for r in read_metrics(out)]
    assert lrs[:3] == pytest.approx([2e-3 / 3, 2 * 2e-3 / 3, 2e-3])
    assert all(b <= a for a, b in zip(lrs[2:], lrs[3:]))
    assert lrs[-1] < 0.2e-3 * 1.5  # within the last log window of the floor (0.1 x 2e-3)


def test_reference_scores_run_on_every_rank_from_an_exported_model(runs, recipe, data_dir, tmp_path):
    """selection.normalize = reference with a sift-export of another run as the reference
    model: both ranks plan alike, the reference's pass is billed to scoring FLOPs; a missing
    reference directory is a one-line error."""
    ref = tmp_path / "reference"
    proc = subprocess.run([str(BIN / "sift-export"), str(zero_run(runs, 2) / "checkpoints"), str(ref)],
                          cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "rho"
    sets = ('selection.normalize="reference"', "logging.plan_digests=true",
            "checkpoint.every_steps=0", "checkpoint.at_end=false")
    run_train(2, recipe, data_dir, out, *sets, f"selection.reference_model={ref}")
    plans = [[json.loads(x)["digest"] for x in (out / "plans" / f"rank{r}.jsonl").read_text().splitlines()]
             for r in (0, 1)]
    assert len(plans[0]) == 6 and plans[0] == plans[1]
    records = read_metrics(out)
    assert all(math.isfinite(r["select/score_all"]) for r in records)
    plain = zero_run(runs, 2)  # the same run without a reference (checkpoints cost no FLOPs)
    flops = {o: [r["perf/model_flops_per_s"] * r["perf/samples_per_s"] ** -1 for r in read_metrics(o)]
             for o in (out, plain)}
    assert all(a > b for a, b in zip(flops[out], flops[plain]))  # FLOPs per sample: more scored
    bad = run_train(2, recipe, data_dir, tmp_path / "bad", *sets,
                    f"selection.reference_model={tmp_path / 'nowhere'}", expect_ok=False)
    assert bad.returncode != 0 and "selection.reference_model" in bad.stderr + bad.stdout


def test_gated_token_ema_sampling_plans_alike_on_every_rank_and_resumes_exactly(recipe, data_dir, tmp_path):
    """The new selection settings together on 2 ranks: vanilla steps until an evaluation reaches
    selection.start_accuracy, then token-ema scores drawn by draw = sample. Both ranks compute
    the same plans (the gate, the running per-token loss and the softmax normalizer are global),
    the running loss moves and rides in checkpoints, and a resume from step 3 replays steps 4-6
    exactly. Off a terminal the progress is plain lines; the config reaches TensorBoard."""
    sets = ("selection.start_accuracy=0.01", "eval.every_steps=2", "eval.at_start=true",
            "optim.warmup_steps=0", "optim.lr=5e-3", 'selection.normalize="token-ema"',
            "selection.token_ema_rate=0.2", 'selection.draw="sample"', "selection.temperature=0.5",
            "logging.plan_digests=true", "logging.progress_bar=true")
    full = tmp_path / "full"
    proc = run_train(2, recipe, data_dir, full, *sets)
    text = proc.stdout + proc.stderr
    evals = read_metrics(full, "eval")
    opened = next(e["step"] for e in evals if e["eval/accuracy"] >= 0.01)  # the check needs both states
    assert 0 < opened < 6, [(e["step"], e["eval/accuracy"]) for e in evals]
    assert f"step {opened}: validation accuracy reached 0.01: selection starts" in text
    fractions = {r["step"]: r["select/fraction"] for r in read_metrics(full)}
    assert all(fractions[s] == 1.0 for s in range(1, opened + 1)), fractions
    assert all(fractions[s] == 0.5 for s in range(opened + 1, 7)), fractions
    plans = [[json.loads(x)["digest"] for x in (full / "plans" / f"rank{r}.jsonl").read_text().splitlines()]
             for r in (0, 1)]
    assert len(plans[0]) == 6 - opened and plans[0] == plans[1] and len(set(plans[0])) == len(plans[0])
    ema = {s: json.loads((full / "checkpoints" / f"step_0000000{s}" / "sift_state.json").read_text())
           ["selection"]["normalizer"]["token_ema"] for s in (3, 6)}
    vocab = json.loads((data_dir / "manifest.json").read_text())["vocab_size"]
    assert len(ema[6]) == vocab and ema[3] != ema[6]
    # not a terminal: no bar redraws, a plain line per log window instead
    assert "\r" not in text and "step 6/6: loss " in proc.stdout
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(full / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    texts = {tag: acc.Tensors(tag)[0].tensor_proto.string_val[0].decode() for tag in acc.Tags()["tensors"]
             if tag.endswith("text_summary")}
    assert 'draw = "sample"' in texts["config/text_summary"]
    assert '"zero_optimization"' in texts["deepspeed/text_summary"]

    ckpt = checkpoint_at_step_3(full, tmp_path)
    out = tmp_path / "resumed"
    run_train(2, recipe, data_dir, out, *sets, f"checkpoint.dir={ckpt}", resume="auto")
    ref, got = train_losses(full), train_losses(out)
    assert [got[s] for s in (4, 5, 6)] == [ref[s] for s in (4, 5, 6)]
    resumed_ema = json.loads((ckpt / "step_00000006" / "sift_state.json").read_text())[
        "selection"]["normalizer"]["token_ema"]
    assert resumed_ema == ema[6]
