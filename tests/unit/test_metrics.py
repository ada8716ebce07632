"""MetricsWriter across sessions: a resumed run replaces what the interrupted one logged after its
checkpoint, in metrics.jsonl and in the TensorBoard event files; a fresh run starts clean."""
from __future__ import annotations

import json

import pytest

from pipeline.metrics import MetricsWriter, trim_jsonl


def jsonl_steps(out, kind="train"):
    return [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == kind]


def tensorboard_points(out, tag="train/loss"):
    """Every (step, value) of `tag` in the event files, read raw: no reader-side purging, so
    what the files hold is what any TensorBoard loader shows."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    points = []
    for path in sorted((out / "tensorboard").glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.tag == tag:
                    points.append((event.step, round(float(value.tensor.float_val[0]), 6)))
    return sorted(points)


def log_session(out, steps, value, resumed_at=None):
    writer = MetricsWriter(out, rank=0, progress_bar=False)
    writer.begin(resumed_at)
    for s in steps:
        writer.log(s, {"train/loss": value})
        if s % 2 == 0:
            writer.log(s, {"eval/accuracy": value}, kind="eval")
    writer.close()


def test_resumed_writer_replaces_the_steps_after_the_checkpoint(tmp_path):
    log_session(tmp_path, range(1, 7), 1.0)  # killed after step 6; last checkpoint at step 4
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"kind": "train", "st')  # torn line of the killed writer
    log_session(tmp_path, range(5, 9), 2.0, resumed_at=4)
    assert jsonl_steps(tmp_path) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert jsonl_steps(tmp_path, "eval") == [2, 4, 6, 8]
    assert tensorboard_points(tmp_path) == [(s, 1.0) for s in range(1, 5)] + [(s, 2.0) for s in range(5, 9)]


def test_fresh_writer_in_a_used_directory_starts_clean(tmp_path):
    log_session(tmp_path, range(1, 7), 1.0)
    log_session(tmp_path, range(1, 3), 3.0)
    assert jsonl_steps(tmp_path) == [1, 2]
    assert tensorboard_points(tmp_path) == [(1, 3.0), (2, 3.0)]


def test_writer_on_other_ranks_touches_nothing(tmp_path):
    log_session(tmp_path, range(1, 3), 1.0)
    before = (tmp_path / "metrics.jsonl").read_text()
    writer = MetricsWriter(tmp_path, rank=1, progress_bar=False)
    writer.begin(None)
    writer.log(3, {"train/loss": 5.0})
    writer.close()
    assert (tmp_path / "metrics.jsonl").read_text() == before


def test_trim_jsonl_keeps_accepted_records_and_ignores_a_missing_file(tmp_path):
    path = tmp_path / "plans.jsonl"
    trim_jsonl(path, lambda r: True)
    assert not path.exists()
    path.write_text("".join(json.dumps({"micro_batch": i}) + "\n" for i in range(5)))
    trim_jsonl(path, lambda r: r["micro_batch"] < 3)
    assert [json.loads(x)["micro_batch"] for x in path.read_text().splitlines()] == [0, 1, 2]


def test_log_before_begin_is_an_error(tmp_path):
    writer = MetricsWriter(tmp_path, rank=0, progress_bar=False)
    with pytest.raises(RuntimeError, match="begin"):
        writer.log(1, {"train/loss": 1.0})
    assert not (tmp_path / "metrics.jsonl").exists()
