"""The typed training configuration: a TOML recipe plus dotted `--set` overrides.

Owns the tree `TrainConfig` of small frozen sections and the loader (CLI > file > defaults).
Sections are owned by the component that reads them: `masking` is `pipeline.data.MaskingConfig`,
`model` is `pipeline.model.ModelConfig`, `selection` is `pipeline.selection.SelectionConfig`; the
trainer's own sections (data, optim, budget, eval, checkpoint, logging, run) live here.
Constructors get their own section, never the whole tree.

What the DeepSpeed JSON owns (precision, ZeRO stage, gradient clipping, the batch-size triplet) is
deliberately absent: `pipeline.engine` reads those back from the engine.

Unknown sections or keys, wrong types and inconsistent values are `ConfigError`s naming the key.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from pipeline.data import MaskingConfig
from pipeline.model_config import ModelConfig
from pipeline.selection import SelectionConfig


def resolve_path(path: str) -> str:
    """`path` as given when it exists, else relative to the repository (for installed scripts:
    `run.ds_config = "ds_configs/..."` works from any directory)."""
    p = Path(path)
    if p.exists() or p.is_absolute():
        return str(p)
    repo = Path(__file__).resolve().parents[1] / p
    return str(repo) if repo.exists() else str(p)


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key and the problem."""


ADDED_SINCE_CHECKPOINTS = {("data", "sources"): (), ("data", "weights"): (),
                           ("selection", "history_rescore_every"): 1,
                           ("selection", "percentile_window"): 0}
"""Settings added after checkpoints were written, with the value every earlier run had: left out
of the config fingerprint at that value, so resuming those checkpoints warns of no change."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass(frozen=True)
class DataConfig:
    """Where the prepared shards are: one `sift-prep` output directory (data_dir), or several
    trained on as one weighted mixture (sources and weights)."""

    data_dir: str = ""
    """sift-prep output directory (manifest.json, tokenizer/, train/, valid/). Required unless
    `sources` is set."""
    sources: tuple[str, ...] = ()
    """Several sift-prep output directories, trained on as one mixture (instead of data_dir). They
    must share one tokenizer and sequence length (prepare the later ones with
    `sift-prep --tokenizer FIRST_DIR`). Validation reports each source and all together;
    eval.max_samples applies to each source."""
    weights: tuple[float, ...] = ()
    """One weight per source (relative: [3, 1] = [0.75, 0.25]): its share of the training
    positions, whatever its size. Each source's epochs are counted on its own (a small source
    with a large weight is read many times). Empty: in proportion to the sources' train rows."""
    train_split: str = "train"
    """Split trained on."""
    valid_split: str = "valid"
    """Split evaluated on."""
    verify: str = "size"
    """Before training: 'size' checks the tokenizer against the manifest and every shard's
    presence, shape and size (cheap); 'sha256' also hashes every shard (reads all the data)."""
    prefetch: int = 2
    """Micro-batches read and masked ahead in a background thread while the current one computes
    (0: each is built when needed). Changes only when a batch is built, never what it holds."""

    def __post_init__(self):
        _check(bool(self.data_dir) != bool(self.sources),
               "data.data_dir is required (the sift-prep output directory)" if not self.sources
               else "set data.data_dir or data.sources, not both")
        _check(all(self.sources), "data.sources: an entry is empty")
        _check(not self.weights or len(self.weights) == len(self.sources),
               f"data.weights has {len(self.weights)} entries, data.sources {len(self.sources)}"
               if self.sources else "data.weights needs data.sources (one weight per source)")
        _check(all(math.isfinite(w) and w > 0 for w in self.weights) and math.isfinite(sum(self.weights)),
               f"data.weights must be positive and finite, got {list(self.weights)}")
        _check(0 <= self.prefetch <= 64, f"data.prefetch must be in [0, 64] (batches held ahead), got {self.prefetch}")
        _check(self.verify in ("size", "sha256"), f"data.verify must be size or sha256, got {self.verify!r}")

    @property
    def data_dirs(self) -> list[str]:
        """The sift-prep directories trained on: [data_dir], or the sources of a mixture."""
        return list(self.sources) if self.sources else [self.data_dir]


@dataclass(frozen=True)
class OptimConfig:
    """AdamW and its learning-rate schedule (warmup, then decay). Clipping is DeepSpeed's."""

    lr: float = 5e-4
    """Peak learning rate."""
    warmup_steps: int = 100
    """Optimizer steps of linear warmup from 0 to lr."""
    decay: str = "linear"
    """After warmup: 'linear' or 'cosine' down to min_lr_ratio * lr at decay_steps, or 'constant'."""
    decay_steps: int | None = None
    """Step at which the decay ends; None: budget.steps, else the time horizon (decay_time_s)."""
    decay_time_s: float | None = None
    """Training time (seconds, the trainer's clock: evaluation excluded) at which the decay ends,
    for runs bounded by time, whose step count nobody knows in advance; None: budget.wall_time_s
    when neither decay_steps nor budget.steps is set. Warmup still counts steps. The LR then
    depends on how fast steps run, so a resumed run is no longer bit-exact."""
    min_lr_ratio: float = 0.0
    """Floor of the decay as a fraction of lr."""
    weight_decay: float = 0.01
    """AdamW weight decay (not applied to biases and LayerNorm weights)."""
    betas: tuple[float, float] = (0.9, 0.98)
    """AdamW betas."""
    eps: float = 1e-6
    """AdamW epsilon."""
    max_nonfinite_in_row: int = 5
    """A non-finite loss skips its micro-batch; this many in a row stop the run with an error."""

    def __post_init__(self):
        _check(self.lr > 0 and math.isfinite(self.lr), f"optim.lr must be > 0, got {self.lr}")
        _check(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        _check(self.decay in ("linear", "cosine", "constant"),
               f"optim.decay must be linear, cosine or constant, got {self.decay!r}")
        _check(self.decay_steps is None or self.decay_steps > 0, "optim.decay_steps must be > 0")
        _check(self.decay_time_s is None or 0 < self.decay_time_s < math.inf,
               f"optim.decay_time_s must be > 0 and finite, got {self.decay_time_s}")
        _check(self.decay_steps is None or self.decay_time_s is None,
               "optim.decay_steps and optim.decay_time_s both set: the decay ends at one of them")
        _check(0.0 <= self.min_lr_ratio <= 1.0, "optim.min_lr_ratio must be in [0, 1]")
        _check(0 <= self.weight_decay < math.inf, f"optim.weight_decay must be >= 0 and finite, got {self.weight_decay}")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
               f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        _check(0 < self.eps < math.inf, f"optim.eps must be > 0 and finite, got {self.eps}")
        _check(self.max_nonfinite_in_row >= 1, "optim.max_nonfinite_in_row must be >= 1")


@dataclass(frozen=True)
class BudgetConfig:
    """When to stop: the first budget reached ends the run (at least one must be set)."""

    steps: int | None = 1000
    """Optimizer steps."""
    samples: int | None = None
    """Samples backpropagated, summed over all ranks."""
    wall_time_s: float | None = None
    """Seconds of training: the trainer's clock, which starts at the first step and stops while
    evaluating (checkpoint saves count)."""
    target_accuracy: float | None = None
    """Validation masked-LM accuracy that ends the run when an evaluation reaches it."""

    def __post_init__(self):
        _check(any(v is not None for v in dataclasses.astuple(self)),
               "budget: set at least one of steps, samples, wall_time_s, target_accuracy")
        _check(self.steps is None or self.steps >= 1, "budget.steps must be >= 1")
        _check(self.samples is None or self.samples >= 1, "budget.samples must be >= 1")
        _check(self.wall_time_s is None or 0 < self.wall_time_s < math.inf,
               f"budget.wall_time_s must be > 0 and finite, got {self.wall_time_s}")
        _check(self.target_accuracy is None or 0 < self.target_accuracy <= 1,
               "budget.target_accuracy must be in (0, 1]")


@dataclass(frozen=True)
class EvalConfig:
    """Periodic validation: masked-LM accuracy and loss, Spearman(exit loss, full loss)."""

    every_steps: int = 100
    """Evaluate every this many optimizer steps (0: only at start and end, or by every_s)."""
    every_s: float | None = None
    """Also evaluate every this many seconds of training time (the trainer's clock, evaluation
    excluded; checked after each step on the slowest rank's clock): curves on a time axis that
    runs of different speeds share. None: by steps only."""
    batch_size: int = 32
    """Validation sequences per rank per forward."""
    max_samples: int | None = 512
    """Validation sequences used (the first ones; None: the whole split)."""
    at_start: bool = True
    """Evaluate before the first step (the 'before' accuracy)."""
    at_end: bool = True
    """Evaluate after the last step."""

    def __post_init__(self):
        _check(self.every_steps >= 0, "eval.every_steps must be >= 0")
        _check(self.every_s is None or 0 < self.every_s < math.inf,
               f"eval.every_s must be > 0 and finite, got {self.every_s}")
        _check(self.batch_size >= 1, "eval.batch_size must be >= 1")
        _check(self.max_samples is None or self.max_samples >= 1, "eval.max_samples must be >= 1")


@dataclass(frozen=True)
class CheckpointConfig:
    """DeepSpeed checkpoints plus our client state; `latest` names the last complete one."""

    dir: str | None = None
    """Checkpoint directory; None: <run.output_dir>/checkpoints."""
    every_steps: int = 0
    """Save every this many optimizer steps (0: only at the end)."""
    at_end: bool = True
    """Save when the run ends."""
    keep_last: int = 2
    """Complete checkpoints kept (older ones are deleted after `latest` moves); 0 keeps all."""
    resume: str = "none"
    """'none', 'auto' (the checkpoint `latest` names, if any) or a checkpoint (tag) directory."""
    init_from: str | None = None
    """Start a new run from another run's checkpoint (its checkpoints directory, whose `latest`
    is taken, or one tag directory): weights, optimizer moments and data position come from it;
    step, clock, counters, evaluations and every setting are this run's. For continued
    pretraining and forks (sift-bench --warm-start). A resume of this run's own checkpoints
    (checkpoint.resume) wins over it."""

    verify: str = "sample"
    """Before a resume, fork or export, check the checkpoint's files against the checksums
    written with it: 'sample' (sizes, files up to 64 MiB whole and ~4 MiB of a larger one:
    cheap, finds truncation and most damage) or 'sha256' (every byte, about a second per GB)."""

    def __post_init__(self):
        _check(self.verify in ("sample", "sha256"),
               f"checkpoint.verify must be sample or sha256, got {self.verify!r}")
        _check(self.every_steps >= 0, "checkpoint.every_steps must be >= 0")
        _check(self.keep_last >= 0, "checkpoint.keep_last must be >= 0")
        _check(bool(self.resume), "checkpoint.resume must be 'none', 'auto' or a path")
        _check(self.dir is None or bool(self.dir),
               "checkpoint.dir must not be empty (leave it unset for <run.output_dir>/checkpoints)")


@dataclass(frozen=True)
class LoggingConfig:
    """Where metrics go: TensorBoard, metrics.jsonl, a progress bar (all on rank 0)."""

    every_steps: int = 10
    """Log train scalars every this many optimizer steps."""
    tensorboard: bool = True
    """Write TensorBoard event files under <output_dir>/tensorboard."""
    progress_bar: bool = True
    """Show a tqdm bar on rank 0."""
    plan_digests: bool = False
    """Every rank appends each selection's plan digest and source counts to
    <output_dir>/plans/rank<r>.jsonl: evidence that all ranks computed the same global plan."""
    profile: bool = False
    """Synchronize the device at every phase boundary so time/* (data, score, select,
    forward_backward, optimizer) say where a GPU step's time goes; costs some speed. Off, the
    phases are host times: asynchronous GPU work is billed to whichever phase next waits for it."""

    def __post_init__(self):
        _check(self.every_steps >= 1, "logging.every_steps must be >= 1")


@dataclass(frozen=True)
class RunConfig:
    """The run as a whole."""

    output_dir: str = "runs/default"
    """Everything the run writes goes under here. One run at a time (a lock file, `.lock`); a
    fresh start refuses a directory that holds an earlier run's checkpoints or logs."""
    overwrite: bool = False
    """Start fresh even where an earlier run left checkpoints or logs: they are replaced
    (`--overwrite`). Never needed to resume."""
    seed: int = 42
    """Seeds model init, data order, masking, dropout and random selection."""
    ds_config: str = "ds_configs/cpu_zero2_fp32.json"
    """The DeepSpeed JSON (precision, ZeRO stage, clipping, micro batch, accumulation)."""
    dist_timeout_s: float = 600.0
    """Collective timeout: a dead rank fails the job after at most about this long."""

    def __post_init__(self):
        _check(bool(self.output_dir), "run.output_dir must not be empty")
        _check(0 <= self.seed < 2**63, "run.seed must be in [0, 2**63)")
        _check(0 < self.dist_timeout_s <= 1e9, "run.dist_timeout_s must be > 0 and at most 1e9 "
               f"seconds, got {self.dist_timeout_s}")


SECTIONS: dict[str, type] = {
    "data": DataConfig, "masking": MaskingConfig, "model": ModelConfig,
    "selection": SelectionConfig, "optim": OptimConfig, "budget": BudgetConfig,
    "eval": EvalConfig, "checkpoint": CheckpointConfig, "logging": LoggingConfig,
    "run": RunConfig,
}


@dataclass(frozen=True)
class TrainConfig:
    """The whole training configuration; one section per component."""

    data: DataConfig
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self):
        _check(self.model.init_from is None or self.checkpoint.init_from is None,
               "model.init_from and checkpoint.init_from are both set: a run starts from a "
               "Hugging Face model or from a checkpoint of this trainer, not both")
        _check(self.optim.decay == "constant" or self.decay_time_s() is not None
               or self.optim.decay_steps is not None or self.budget.steps is not None,
               "optim.decay needs a horizon: set optim.decay_steps, optim.decay_time_s, "
               "budget.steps or budget.wall_time_s (or use optim.decay = 'constant')")

    def decay_horizon(self) -> int:
        """The step where the LR decay ends (optim.decay_steps, else budget.steps)."""
        return self.optim.decay_steps or self.budget.steps or 1

    def decay_time_s(self) -> float | None:
        """The training time where the LR decay ends, when the schedule runs on time: optim.
        decay_time_s, else budget.wall_time_s when no step horizon is set. None: on steps."""
        if self.optim.decay_time_s is not None:
            return self.optim.decay_time_s
        if self.optim.decay_steps is None and self.budget.steps is None:
            return self.budget.wall_time_s
        return None

    def uses_clock(self) -> bool:
        """Whether a step's outcome depends on the (synchronized) training clock."""
        return (self.budget.wall_time_s is not None or self.eval.every_s is not None
                or (self.optim.decay != "constant" and self.decay_time_s() is not None))

    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir or Path(self.run.output_dir) / "checkpoints")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """sha256 of the settings that define the training trajectory (not budgets or logging),
        so a resume with a longer budget matches and one with another model or seed does not."""
        d = self.to_dict()
        keep = {k: d[k] for k in ("data", "masking", "model", "selection", "optim")}
        # speed-only settings: the same batches and the same model function either way
        keep["data"] = {k: v for k, v in keep["data"].items() if k not in ("prefetch", "verify")}
        for (section, key), default in ADDED_SINCE_CHECKPOINTS.items():
            if keep[section].get(key) == default:  # as every earlier run had it
                del keep[section][key]
        keep["model"] = {k: v for k, v in keep["model"].items() if k != "compile"}
        keep["seed"] = self.run.seed
        keep["ds_config"] = self.run.ds_config
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()


# ----------------------------------------------------------------------------- loading

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """`value` (from TOML) as type `tp`, or a ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        # `--set key=none` (TOML has no null) clears an optional field; for a plain string field
        # such as selection.policy, "none" stays the string it is.
        if type(None) in args and (value is None or
                                   (isinstance(value, str) and value.lower() in ("none", "null"))):
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else
                          f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is tuple:
        _check(isinstance(value, (list, tuple)), f"{key}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        _check(len(value) == len(args), f"{key}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        _check(isinstance(value, bool), f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool),
               f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        _check(isinstance(value, (int, float)) and not isinstance(value, bool),
               f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        _check(isinstance(value, str), f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {_type_name(tp)}")


def build_section(cls: type, values: dict[str, Any], name: str) -> Any:
    """One section from a mapping: unknown keys and wrong types are ConfigErrors."""
    _check(isinstance(values, dict), f"[{name}] must be a table, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        _check(key in hints, f"unknown key '{name}.{key}' (known keys of [{name}]: {', '.join(known)})")
        kwargs[key] = _coerce(value, hints[key], f"{name}.{key}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:  # the section's own __post_init__ checks
        raise ConfigError(str(exc)) from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """'optim.lr=1e-3' -> (['optim', 'lr'], 0.001). Values are TOML (bare words become strings)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    _check(bool(sep) and bool(key), f"--set expects section.key=value, got {text!r}")
    parts = key.split(".")
    _check(len(parts) == 2 and all(parts), f"--set key must be section.key, got {key!r}")
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word such as sift-loss, none or a path
    return parts, value


def merge_overrides(tree: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of `tree` with each `section.key=value` applied in order (later wins)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in tree.items()}
    for text in overrides:
        (section, key), value = parse_override(text)
        out.setdefault(section, {})
        _check(isinstance(out[section], dict), f"[{section}] must be a table")
        out[section][key] = value
    return out


def config_from_dict(tree: dict[str, Any]) -> TrainConfig:
    """A TrainConfig from a nested mapping (missing sections and keys take their defaults)."""
    _check(isinstance(tree, dict), "the configuration must be a table of sections")
    for name in tree:
        _check(name in SECTIONS, f"unknown section [{name}] (known: {', '.join(SECTIONS)})")
    sections = {}
    for name, cls in SECTIONS.items():
        values = {k: v for k, v in tree.get(name, {}).items()} if isinstance(tree.get(name, {}), dict) \
            else tree[name]
        # An explicit None means "the default": drop it unless the field is optional.
        if isinstance(values, dict):
            hints = typing.get_type_hints(cls)
            values = {k: v for k, v in values.items()
                      if not (v is None and k in hints and type(None) not in typing.get_args(hints[k]))}
        sections[name] = build_section(cls, values, name)
    try:
        return TrainConfig(**sections)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(str(exc)) from None


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string: JSON's escapes are TOML's
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a config dataclass (read from its source: Python keeps
    attribute docstrings nowhere else), whitespace collapsed."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def to_toml(cfg: TrainConfig, explain: bool = False) -> str:
    """The resolved configuration as a TOML recipe that `load_config` reads back to `cfg`
    (an unset optional key is written as "none", which the loader reads as unset: TOML has no
    null). `explain`: each section and key preceded by its type and meaning as comments (the
    reference of every setting: `sift-train --print-config --all`)."""
    import textwrap

    lines: list[str] = []
    for name, values in cfg.to_dict().items():
        cls = SECTIONS[name]
        if explain:
            lines += ["# " + line for line in textwrap.wrap(" ".join((cls.__doc__ or "").split()), 96)]
        lines.append(f"[{name}]")
        docs, hints = field_docs(cls), typing.get_type_hints(cls)
        for key, value in values.items():
            if explain:
                text = f"{key} ({_type_name(hints[key])}): {docs.get(key, '')}"
                lines += ["# " + line for line in textwrap.wrap(text, 96)]
            lines.append(f'{key} = "none"  # unset' if value is None else f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """CLI > file > defaults: read the TOML recipe at `path` (optional), apply `overrides`."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        _check(p.is_file(), f"config file not found: {p}")
        try:
            tree = tomllib.loads(p.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{p}: not valid TOML ({exc})") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{p}: not UTF-8 text, as TOML must be ({exc.reason} at byte "
                              f"{exc.start})") from None
        except OSError as exc:
            raise ConfigError(f"{p}: cannot read it ({exc.strerror or exc})") from None
    return config_from_dict(merge_overrides(tree, overrides))
