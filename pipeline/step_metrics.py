"""Step metrics: a named phase timer, per-step totals, log windows and the run's throughput.

A step's losses, token counts and FLOPs stay on the device (tensors) until a log window closes;
`LogWindow.scalars` reads them once per window, so logging costs no host sync per step. The
one collective here is the per-source count of kept rows, summed over ranks when a window closes
(every rank closes its windows at the same steps).

Imports pipeline.comm and pipeline.flops only: no trainer, no engine.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from pipeline import comm
from pipeline.flops import mfu
from pipeline.metrics import trim_jsonl

PHASES = ("data", "score", "select", "forward_backward", "optimizer")
# counts that add up over a log window; every other scalar is a per-step mean
WINDOW_SUMS = ("select/samples_moved", "select/bytes_moved")


class PhaseTimer:
    """Seconds per named phase of a micro-step: `lap(name)` bills the time since the last lap."""

    def __init__(self, clock: Callable[[], float]):
        self.clock = clock  # perf_counter, after a device sync when profiling
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self._last = clock()

    def lap(self, phase: str) -> None:
        now = self.clock()
        self.seconds[phase] += now - self._last
        self._last = now


@dataclass
class StepTotals:
    """Per-step sums for the train scalars; losses, tokens and FLOPs may be device tensors."""

    loss: Any = 0.0
    exit_loss: Any = 0.0
    micro: int = 0
    exit_micro: int = 0
    samples: int = 0
    tokens: Any = 0
    flops: Any = 0.0
    """Model FLOPs of the step (training and scoring, all ranks; pipeline.flops)."""
    candidates: int = 0
    selected: int = 0
    score_selected: float = 0.0
    score_all: float = 0.0
    selections: int = 0
    samples_moved: int = 0
    bytes_moved: int = 0
    kept_by_source: Any = None
    candidates_by_source: Any = None
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))

    def add_loss(self, loss: Any, exit_loss: Any | None) -> None:
        self.loss = self.loss + loss
        self.micro += 1
        if exit_loss is not None:
            self.exit_loss = self.exit_loss + exit_loss.detach()
            self.exit_micro += 1

    def add_selection(self, record: Any) -> None:
        """A `pipeline.selection_step.SelectionRecord`."""
        stats = record.stats
        self.candidates += record.candidates
        self.selected += record.selected
        self.score_selected += stats.mean_score_selected
        self.score_all += stats.mean_score_all
        self.selections += 1
        self.samples_moved += stats.samples_moved
        self.bytes_moved += stats.bytes_moved
        self.flops = self.flops + record.flops
        if record.kept_by_source is not None:
            self.kept_by_source = _add(self.kept_by_source, record.kept_by_source)
            self.candidates_by_source = _add(self.candidates_by_source,
                                             record.candidates_by_source)

    def add_time(self, timer: PhaseTimer) -> None:
        for phase, s in timer.seconds.items():
            self.seconds[phase] += s

    def scalars(self) -> dict[str, Any]:
        nan = float("nan")
        s = self.selections
        out = {
            "train/exit_score": self.score_all / s if s else nan,
            "train/exit_loss": self.exit_loss / self.exit_micro if self.exit_micro else nan,
            "select/fraction": self.selected / self.candidates if self.candidates else 1.0,
            "select/score_selected": self.score_selected / s if s else nan,
            "select/score_all": self.score_all / s if s else nan,
            "select/samples_moved": float(self.samples_moved),
            "select/bytes_moved": float(self.bytes_moved),
            "_samples": float(self.samples), "_tokens": self.tokens, "_flops": self.flops,
            **{f"time/{n}_s": t for n, t in self.seconds.items()},
        }
        if self.kept_by_source is not None:
            out["_kept_by_source"] = self.kept_by_source
            out["_candidates_by_source"] = self.candidates_by_source
        return out


def _add(a: Any, b: torch.Tensor) -> torch.Tensor:
    return b.clone() if a is None else a + b


def value(v: Any) -> float:
    """A logged scalar as a float: this is where a device tensor is read (once per window)."""
    return float(v.item()) if isinstance(v, torch.Tensor) else float(v)


class LogWindow:
    """Averages the per-step records between two log lines."""

    def __init__(self):
        self.records: list[dict[str, Any]] = []
        self.tokens = self.flops = self.step_s = 0.0

    def add(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    def scalars(self, counters: dict[str, float], peak_flops: float | None, world_size: int,
                source_names: list[str] | None = None) -> dict[str, float]:
        """The window's scalars; `counters` are run totals logged as they are. Collective when
        the records carry per-source counts (every rank closes the same windows)."""
        n = len(self.records)
        out: dict[str, float] = {}
        for key in self.records[0]:
            if key.startswith("_"):
                continue
            total = value(sum(r[key] for r in self.records))  # one device read per key
            out[key] = total if key in WINDOW_SUMS else total / n
        out["train/lr"] = self.records[-1]["train/lr"]
        out.update(counters)
        out.update(self._source_shares(source_names))
        # throughput over the steps' own time: evaluation and checkpoints between steps excluded
        self.step_s = max(sum(r["_step_s"] for r in self.records), 1e-9)
        self.tokens = value(sum(r["_tokens"] for r in self.records))
        self.flops = value(sum(r["_flops"] for r in self.records))
        out["perf/samples_per_s"] = sum(r["_samples"] for r in self.records) / self.step_s
        out["perf/tokens_per_s"] = self.tokens / self.step_s
        out["perf/model_flops_per_s"] = self.flops / self.step_s
        if peak_flops:
            out["perf/mfu"] = mfu(self.flops, self.step_s, peak_flops, world_size)
        return out

    def _source_shares(self, names: list[str] | None) -> dict[str, float]:
        """select/kept_share/<source> and select/candidate_share/<source> over all ranks."""
        if not names or len(names) < 2:
            return {}
        s = len(names)
        local = torch.zeros(2, s, dtype=torch.float64)
        for r in self.records:
            if "_kept_by_source" in r:
                local[0] += r["_kept_by_source"].detach().double().cpu()
                local[1] += r["_candidates_by_source"].detach().double().cpu()
        both = comm.all_reduce(local, "sum")  # (2, S): every rank, every window
        if both[1].sum() == 0:  # no selection in this window
            return {}
        out = {}
        for i, name in enumerate(names):
            out[f"select/kept_share/{name}"] = float(both[0, i] / max(both[0].sum(), 1.0))
            out[f"select/candidate_share/{name}"] = float(both[1, i] / max(both[1].sum(), 1.0))
        return out


@dataclass
class Throughput:
    """Tokens, model FLOPs and step time of this session's closed log windows (for the summary)."""

    tokens: float = 0.0
    flops: float = 0.0
    step_s: float = 0.0

    def add(self, window: LogWindow) -> None:
        self.tokens += window.tokens
        self.flops += window.flops
        self.step_s += window.step_s

    def tokens_per_s(self) -> float | None:
        return self.tokens / self.step_s if self.step_s else None

    def mfu(self, peak_flops: float | None, world_size: int = 1) -> float | None:
        if not peak_flops or not self.step_s:
            return None
        return mfu(self.flops, self.step_s, peak_flops, world_size)


class PlanLog:
    """logging.plan_digests: one line per selection on every rank (plans/rank<R>.jsonl), so a
    test can hold every rank's plan digests side by side."""

    def __init__(self, output_dir: str | Path, rank: int):
        self.path = Path(output_dir) / "plans" / f"rank{rank}.jsonl"

    def trim(self, micro_index: int) -> None:
        """Drop the plans of micro-batches a resumed run replays (all of them when fresh)."""
        trim_jsonl(self.path, lambda r: r["micro_batch"] < micro_index)

    def append(self, micro_index: int, stats: Any) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps({"micro_batch": micro_index, "digest": stats.plan_digest,
                                "source_counts": stats.source_counts}) + "\n")
