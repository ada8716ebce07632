"""The multi-rank test harness: `pipeline.local_ranks` (real gloo ranks, a hard timeout)."""
from pipeline.local_ranks import run_on_local_ranks as run_distributed  # noqa: F401
