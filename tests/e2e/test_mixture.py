"""Training on a weighted mixture of two sift-prep outputs (data.sources), end to end on 2 gloo
ranks: per-source samples, kept shares and validation in the logs, an exact resume, and sources
that do not fit together refused in one line."""
from __future__ import annotations

import shutil

import pytest

from pipeline.order import MixtureOrder
from tests.training import read_metrics, run_train, summary, train_losses

pytestmark = [pytest.mark.e2e, pytest.mark.dist]


def mixture_sets(*dirs) -> tuple[str, ...]:
    return ("data.sources=[" + ", ".join(f'"{d}"' for d in dirs) + "]", "data.weights=[3, 1]",
            "eval.at_end=true")


def test_a_mixture_trains_logs_each_source_and_resumes_exactly(recipe, data_dir, rural_shards,
                                                                tmp_path):
    out = tmp_path / "mix"
    sets = mixture_sets(data_dir, rural_shards)
    run_train(2, recipe, None, out, *sets)
    s = summary(out)
    assert s["steps"] == 6
    # the samples drawn from each source are the order's, at every logged position
    from pipeline.data import ShardDataset
    sizes = [len(ShardDataset(data_dir)), len(ShardDataset(rural_shards))]
    order = MixtureOrder(sizes, [3, 1], seed=7)
    last = read_metrics(out)[-1]
    drawn = order.consumed(s["global_sample_position"])
    assert [last["data/samples/data"], last["data/samples/rural"]] == drawn.tolist()
    assert sum(drawn) == s["global_sample_position"]
    assert last["data/epochs/rural"] == pytest.approx(drawn[1] / sizes[1])
    # selection's kept rows by source, shares of all kept rows
    assert last["select/kept_share/data"] + last["select/kept_share/rural"] == pytest.approx(1.0)
    final = read_metrics(out, "eval")[-1]
    for name in ("data", "rural"):
        assert 0 <= final[f"eval/{name}/accuracy"] <= 1 and final[f"eval/{name}/loss"] > 0
    assert min(final["eval/data/accuracy"], final["eval/rural/accuracy"]) <= final["eval/accuracy"] \
        <= max(final["eval/data/accuracy"], final["eval/rural/accuracy"])

    # killed after step 3: resumed from that checkpoint, steps 4-6 are the same to the bit
    resumed = tmp_path / "resumed"
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    shutil.copytree(out / "checkpoints" / "step_00000003", ckpt / "step_00000003")
    shutil.copytree(out / "checkpoints" / "tokenizer", ckpt / "tokenizer")
    (ckpt / "latest").write_text("step_00000003\n")
    proc = run_train(2, recipe, None, resumed, *sets, f"checkpoint.dir={ckpt}", resume="auto")
    assert "resumed from" in proc.stdout + proc.stderr
    before, after = train_losses(out), train_losses(resumed)
    assert sorted(after) == [4, 5, 6]
    assert all(after[k] == before[k] for k in after)
    assert summary(resumed)["global_sample_position"] == s["global_sample_position"]


def test_sources_that_do_not_fit_together_are_refused_in_one_line(recipe, data_dir,
                                                                  state_union_shards, tmp_path):
    proc = run_train(2, recipe, None, tmp_path / "run", *mixture_sets(data_dir, state_union_shards),
                     expect_ok=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("sift-train:")]
    assert len(errors) == 1 and "prepared with another tokenizer than source" in errors[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
