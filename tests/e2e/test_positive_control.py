"""The positive control's machinery end to end: the pool tool on a real prepared corpus, the
recipe loading and training on it (1 rank, bert-tiny, a few steps), the per-source share of
kept rows in the metrics, and the `check` of the copies' accuracy from the checkpoint."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from benchmarks.positive_control import check, copies_layout, make_pool, pick_rows
from benchmarks.score_reliability import main as reliability_main
from pipeline.data import ShardDataset, verify_prepared
from pipeline.loss_history import LossHistory
from tests.training import REPO, read_metrics, run_train

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def pool(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("pc") / "pool"
    make_pool(data_dir, out, copies_of=8, seed=3)
    return out


def test_pool_is_the_source_plus_as_many_copies_of_a_few_rows(data_dir, tmp_path):
    out = tmp_path / "again"
    make_pool(data_dir, out, copies_of=8, seed=3)
    verify_prepared(out, full=True)
    src, train = ShardDataset(data_dir, "train"), ShardDataset(out, "train")
    n = len(src)
    assert len(train) == 2 * n and train.row_sources == [("fresh", n), ("copies", n)]
    picked = pick_rows(n, 8, 3)
    assert np.array_equal(train.rows(np.arange(n)), src.rows(np.arange(n)))
    assert np.array_equal(train.rows(np.arange(n, 2 * n)), src.rows(copies_layout(n, picked)))
    assert len(np.unique(train.rows(np.arange(n, 2 * n)), axis=0)) <= 8
    assert np.array_equal(ShardDataset(out, "learned").rows(np.arange(8)), src.rows(picked))
    fresh = ShardDataset(out, "fresh").rows(np.arange(8))
    assert not any((fresh == row).all(axis=1).any() for row in src.rows(picked))
    only = make_pool(data_dir, tmp_path / "only", copies_of=8, seed=3, copies_only=True)
    assert only["splits"]["train"]["row_sources"] == [{"name": "copies", "rows": n}]
    with pytest.raises(FileExistsError):
        make_pool(data_dir, out, copies_of=8)
    with pytest.raises(ValueError, match="copies-of"):
        pick_rows(10, 6, 0)


def test_the_recipe_trains_on_the_pool_and_reports_the_kept_share_of_copies(pool, tmp_path):
    pool_dir, out = pool, tmp_path / "run"
    run_train(2, REPO / "benchmarks" / "positive_control.toml", pool_dir, out,
              "model.preset=bert-tiny", "budget.steps=4", 'selection.policy="sift-loss"',
              "selection.fraction=0.5", "logging.every_steps=1", "eval.every_s=1000",
              "eval.max_samples=128", "checkpoint.every_steps=4",
              'run.ds_config="ds_configs/cpu_zero0_fp32.json"')
    records = read_metrics(out)
    assert len(records) == 4
    for r in records:
        kept, cand = r["select/kept_share/copies"], r["select/candidate_share/copies"]
        assert kept + r["select/kept_share/fresh"] == pytest.approx(1.0)
        assert cand + r["select/candidate_share/fresh"] == pytest.approx(1.0)
        # summed over both ranks: a share of the 2 x 16 kept rows (and 2 x 32 candidates)
        assert kept * 32 == pytest.approx(round(kept * 32)) and 0.0 <= kept <= 1.0
        assert cand * 64 == pytest.approx(round(cand * 64)) and 0.2 < cand < 0.8
    # in this process (a subprocess would pay the imports again): the check and the benchmark
    result = check(out / "checkpoints", pool_dir)
    assert result["checkpoint"]["step"] == 4
    for split in ("learned", "fresh", "valid"):
        assert 0.0 <= result[split]["accuracy"] <= 1.0 and result[split]["masked_tokens"] > 0
    assert reliability_main([str(out / "checkpoints"), str(pool_dir), "--rows", "128", "--draws",
                             "4", "--rates", "0.15", "--out", str(tmp_path / "r.json")]) == 0
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert {(r["normalize"], r["scorer"]) for r in rows} == {(n, s) for n in ("none", "unigram")
                                                             for s in ("exit", "full")}
    assert all(-1.0 <= r["retest"] <= 1.0 and -1.0 <= r["retest_2"] <= 1.0 for r in rows)


@pytest.fixture(scope="module")
def small_corpus(shared_data, data_dir, tmp_path_factory):
    """~60 training rows of wikitext-2 (the embedded corpus's tokenizer): 6 steps of 64
    candidates visit every row several times, as a multi-epoch run does."""
    from tests.prepared import run_prep

    root = tmp_path_factory.mktemp("small")
    text = (shared_data / "wikitext-2" / "valid.txt").read_text(encoding="utf-8")[:8000]
    (root / "small.txt").write_text(text)
    return run_prep([root / "small.txt"], root / "data", "--tokenizer", str(data_dir / "tokenizer"),
                    "--seq-len", "64", "--doc-boundary", "blank-line", "--valid-fraction", "0.2",
                    "--no-progress")


def test_a_run_selecting_by_loss_history_resumes_exactly(small_corpus, recipe, tmp_path):
    """6 steps selecting by the mean over visits on a corpus every step revisits (each row scored
    on every other visit, keyed by its percentile among the last 256 scores), and the same run
    stopped at step 3 and resumed: identical losses, weights, history tables and score windows,
    so both were saved and restored exactly (a history restarted empty would hold fewer visits)."""
    from tests.training import checkpoint_at_step_3, fp32_weights, train_losses

    pool = small_corpus
    assert len(ShardDataset(pool, "train")) < 80

    sets = ('selection.history="mean"', "selection.history_size=4096", "selection.history_visits=4",
            "selection.history_rescore_every=2", "selection.percentile_window=256",
            "run.ds_config=ds_configs/cpu_zero0_fp32.json")
    full = tmp_path / "full"
    run_train(2, recipe, pool, full, *sets)
    saved = json.loads((full / "checkpoints" / "step_00000003" / "sift_state.json").read_text())
    assert saved["selection"]["history"]["capacity"] == 4096
    ckpt = checkpoint_at_step_3(full, tmp_path)
    out = tmp_path / "resumed"
    run_train(2, recipe, pool, out, *sets, f"checkpoint.dir={ckpt}", resume="auto")
    ref, got = train_losses(full), train_losses(out)
    assert sorted(got) == [4, 5, 6] and [got[s] for s in (4, 5, 6)] == [ref[s] for s in (4, 5, 6)]
    a = fp32_weights(full / "checkpoints", "step_00000006")
    b = fp32_weights(ckpt, "step_00000006")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the history itself: the resumed run's table at step 6 is the uninterrupted run's
    tables = [LossHistory(4096, 4) for _ in range(2)]
    states = [json.loads((d / "step_00000006" / "sift_state.json").read_text())["selection"]
              for d in (full / "checkpoints", ckpt)]
    for table, state in zip(tables, states):
        table.load_state_dict(state["history"])
    assert np.array_equal(tables[0].keys, tables[1].keys)
    assert np.array_equal(tables[0].mean, tables[1].mean)
    assert np.array_equal(tables[0].visits, tables[1].visits) and tables[0].visits.max() > 2
    assert np.array_equal(tables[0].stale, tables[1].stale) and tables[0].stale.max() == 1
    assert states[0]["window"] == states[1]["window"] and states[0]["window"]["size"] == 256
