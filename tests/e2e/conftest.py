"""Fixtures of the end-to-end tests: the prepared embedded corpus and the base recipe."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.training import BASE_RECIPE, run_train


@pytest.fixture(scope="session")
def data_dir(tiny_corpus) -> Path:
    """The embedded corpus, prepared once per session (tests/conftest.py)."""
    return tiny_corpus


@pytest.fixture(scope="session")
def recipe(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "tiny.toml"
    path.write_text(BASE_RECIPE)
    return path


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
