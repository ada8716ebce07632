"""Fixtures of the end-to-end tests: runs launched once and shared (data_dir and recipe come
from tests/conftest.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.training import run_train


@pytest.fixture(scope="session")
def runs(tmp_path_factory, recipe, data_dir):
    """Lazily launched, cached runs: runs(name, world, *sets) -> output directory."""
    root = tmp_path_factory.mktemp("runs")
    cache: dict[str, Path] = {}

    def get(name: str, world: int, *sets: str) -> Path:
        if name not in cache:
            out = root / name
            run_train(world, recipe, data_dir, out, *sets)
            cache[name] = out
        return cache[name]

    return get
