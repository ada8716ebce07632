"""Fixtures of the end-to-end tests: the prepared embedded corpus and the base recipe."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.training import BASE_RECIPE


@pytest.fixture(scope="module")
def data_dir(tiny_corpus) -> Path:
    """The embedded corpus, prepared once per session (tests/conftest.py)."""
    return tiny_corpus


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "tiny.toml"
    path.write_text(BASE_RECIPE)
    return path
