"""Where the numbers go: TensorBoard scalars, metrics.jsonl, a progress bar, summary.json.

Owns `MetricsWriter`. Only rank 0 writes; on other ranks every method is a no-op, so the trainer
calls it unconditionally. DeepSpeed's own TensorBoard monitor logs only the learning rate, hence
our own SummaryWriter. Scalar names (TensorBoard tags; the JSONL keys are the same):

  train/loss, train/exit_score (mean exit-pass score of the candidates), train/exit_loss
  (separate exit head's auxiliary loss), train/lr, train/grad_norm, train/samples_backpropagated,
  train/nonfinite_skipped, select/fraction, select/score_selected, select/score_all,
  select/bytes_moved, select/samples_moved, perf/samples_per_s, perf/tokens_per_s (non-pad
  tokens trained), perf/model_flops_per_s, perf/mfu (CUDA GPUs of known peak; pipeline/flops.py),
  time/data_s, time/score_s, time/select_s, time/forward_backward_s, time/optimizer_s,
  eval/accuracy, eval/loss, eval/spearman_exit_vs_full, eval/samples_backpropagated, eval/elapsed_s.

Train scalars are per-step means over the logging window (time/* in seconds per optimizer step;
host times unless logging.profile synchronizes the device), except select/samples_moved and
select/bytes_moved, which are totals over the window. perf/* are rates over the steps' own time
(evaluation and checkpoints between steps excluded).

DeepSpeed's own monitors (`csv_monitor`, `wandb`, `comet` in the DeepSpeed JSON) receive the same
scalars when enabled (`monitor_sinks`): the trainer hands them the engine's monitor. Its
`tensorboard` monitor is left to DeepSpeed (ours writes TensorBoard already).

Nothing is written before `begin(resumed_at)`, which the trainer calls once the run's start is
settled (after a successful resume): a resumed run first drops what the interrupted run logged
after its checkpoint's step, since it is about to log those steps again (metrics.jsonl and the
TensorBoard event files are rewritten with the records up to that step: TensorBoard's fast loader
ignores SummaryWriter's purge_step, so the events are removed rather than hidden); a fresh run
starts a fresh metrics.jsonl and event directory.
"""
from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any, Callable

from data_prep.io_util import jsonable, write_atomic, write_json_atomic

TRAIN_SCALARS = (
    "train/loss", "train/exit_score", "train/exit_loss", "train/lr", "train/grad_norm", "train/samples_backpropagated",
    "train/nonfinite_skipped", "select/fraction", "select/score_selected", "select/score_all",
    "select/bytes_moved", "select/samples_moved", "perf/samples_per_s", "perf/tokens_per_s",
    "perf/model_flops_per_s", "perf/mfu",
    "time/data_s", "time/score_s", "time/select_s", "time/forward_backward_s", "time/optimizer_s",
)
EVAL_SCALARS = ("eval/accuracy", "eval/loss", "eval/spearman_exit_vs_full",
                "eval/spearman_exit_vs_full_independent", "eval/retest_exit", "eval/retest_full",
                "eval/samples_backpropagated", "eval/elapsed_s")


def trim_jsonl(path: str | Path, keep: Callable[[dict[str, Any]], bool]) -> None:
    """Rewrite the JSONL file at `path` with the records `keep` accepts, atomically. A line that
    does not parse (the torn last line of a killed writer) is dropped; no file: nothing to do."""
    path = Path(path)
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if keep(record):
            kept.append(line + "\n")
    write_atomic(path, "".join(kept).encode())


def trim_tensorboard(log_dir: str | Path, max_step: int) -> None:
    """Rewrite every event file in `log_dir` with the events at steps <= max_step (the file's
    version record, at step 0, stays); a torn last record (a killed writer) is dropped."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.summary.writer.record_writer import RecordWriter

    for path in sorted(Path(log_dir).glob("events.out.tfevents.*")):
        buf = io.BytesIO()
        writer = RecordWriter(buf)  # the framing (length, CRCs) TensorBoard reads
        for raw in RawEventFileLoader(str(path)).Load():
            if Event.FromString(raw).step <= max_step:
                writer.write(raw)
        write_atomic(path, buf.getvalue())


def trim_monitor_csv(log_dir: Path, resumed_at: int | None) -> list[str]:
    """DeepSpeed's csv_monitor appends to one file per tag: a fresh run removes our tags' files,
    a resume drops their rows after its checkpoint's step (it logs those steps again). Returns
    the names (without .csv) of our files left, which already have their header row."""
    ours = {tag.replace("/", "_") for tag in TRAIN_SCALARS + EVAL_SCALARS}
    left = []
    for path in sorted(log_dir.glob("*.csv")) if log_dir.is_dir() else ():
        if path.stem not in ours:
            continue  # DeepSpeed's own (Train_Samples_lr is stepped by samples, not steps)
        if resumed_at is None:
            path.unlink()
            continue
        lines = path.read_text().splitlines(keepends=True)
        keep = lines[:1] + [ln for ln in lines[1:] if int(ln.split(",", 1)[0]) <= resumed_at]
        write_atomic(path, "".join(keep).encode())
        left.append(path.stem)
    return left


def monitor_sinks(monitor: Any) -> list[Any]:
    """The enabled CSV / W&B / Comet monitors of DeepSpeed's MonitorMaster (engine.monitor;
    created on rank 0 only), each with write_events([(tag, value, step), ...])."""
    if monitor is None or not getattr(monitor, "enabled", False):
        return []
    return [m for m in (getattr(monitor, name, None)
                        for name in ("csv_monitor", "wandb_monitor", "comet_monitor")) if m is not None]


class MetricsWriter:
    """TensorBoard + JSONL + tqdm (+ DeepSpeed's enabled monitors) on rank 0; no-ops elsewhere."""

    def __init__(self, output_dir: str | Path, rank: int, tensorboard: bool = True,
                 progress_bar: bool = True, total_steps: int | None = None,
                 monitors: list[Any] | None = None):
        self.active = rank == 0
        self.monitors = list(monitors or [])
        self.output_dir = Path(output_dir)
        self.tensorboard = tensorboard
        self.progress_bar = progress_bar
        self.total_steps = total_steps
        self._tb = None
        self._bar = None
        self._jsonl = None

    def begin(self, resumed_at: int | None) -> None:
        """Open the logs. `resumed_at`: the step of the checkpoint this run resumed from (its
        later records are dropped first); None: a fresh run (earlier logs here are removed)."""
        if not self.active:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        jsonl, tb_dir = self.output_dir / "metrics.jsonl", self.output_dir / "tensorboard"
        if resumed_at is None:
            jsonl.unlink(missing_ok=True)
            for old in tb_dir.glob("events.out.tfevents.*"):
                old.unlink()
        else:
            trim_jsonl(jsonl, lambda r: r.get("step", 0) <= resumed_at)
            trim_tensorboard(tb_dir, resumed_at)
        for monitor in self.monitors:
            if isinstance(getattr(monitor, "filenames", None), list) and getattr(monitor, "log_dir", None):
                # DeepSpeed's csvMonitor: files it finds are continued without a second header
                monitor.filenames.extend(trim_monitor_csv(Path(monitor.log_dir), resumed_at))
        self._jsonl = open(jsonl, "a", buffering=1)
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(tb_dir))
        if self.progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total_steps, initial=resumed_at or 0, desc="train",
                             unit="step", dynamic_ncols=True)

    def flush(self) -> None:
        """Push queued TensorBoard events to disk (before a checkpoint: a resume from it never
        logs its steps again)."""
        if self._tb is not None:
            self._tb.flush()

    def log(self, step: int, scalars: dict[str, float], kind: str = "train") -> None:
        """One record: every scalar to TensorBoard at `step`, one JSON line."""
        if not self.active:
            return
        if self._jsonl is None:
            raise RuntimeError("MetricsWriter.log before begin() (or after close())")
        record = {"kind": kind, "step": step, **{k: jsonable(float(v)) for k, v in scalars.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        finite = [(k, float(v)) for k, v in scalars.items() if v is not None and math.isfinite(float(v))]
        if self._tb is not None:
            for k, v in finite:
                self._tb.add_scalar(k, v, step)
        events = [(k, v, step) for k, v in finite]
        for monitor in self.monitors:
            monitor.write_events(events)

    def text(self, tag: str, text: str) -> None:
        """A text record in TensorBoard (its TEXT tab), e.g. the resolved configuration."""
        if self._tb is not None:
            self._tb.add_text(tag, "```\n" + text + "\n```", 0)

    def progress(self, steps: int = 1, **postfix: float) -> None:
        if self._bar is not None:
            self._bar.update(steps)
            if postfix:
                self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def message(self, text: str) -> None:
        """A line for the user (through tqdm so the bar stays intact)."""
        if not self.active:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def summary(self, obj: dict[str, Any]) -> None:
        if self.active:
            write_json_atomic(self.output_dir / "summary.json", obj)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()
        self._bar = self._tb = self._jsonl = None
