"""Shared fixtures: where the real corpora live, and free TCP ports for process groups."""
from __future__ import annotations

from pathlib import Path

import pytest

from data_prep.io_util import free_port  # noqa: F401 (re-exported: tests import it from here)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data` beside the repo; tests that need it skip, saying why, when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared corpora not found at {SHARED_DATA} (clone the repo beside ../shared)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """The embedded State of the Union corpus through the real sift-prep (vocab 600, 64 tokens):
    small enough that bert-tiny learns in a minute; shared by the shard-reader, prefetch, trainer
    and multi-node tests."""
    from tests.prepared import run_prep

    out = tmp_path_factory.mktemp("tiny_corpus") / "data"
    return run_prep([], out, "--vocab-size", "600", "--seq-len", "64", "--valid-fraction", "0.05",
                    "--no-progress")


@pytest.fixture(scope="session")
def state_union_shards(shared_data, tmp_path_factory) -> Path:
    """The State of the Union addresses prepared by the real sift-prep (vocab 2000, seq 64)."""
    from tests.prepared import run_prep

    out = tmp_path_factory.mktemp("state_union") / "data"
    return run_prep([shared_data / "nltk" / "state_union"], out, "--vocab-size", "2000",
                    "--seq-len", "64", "--valid-fraction", "0.1",
                    "--encoding-errors", "replace")


@pytest.fixture(scope="session")
def rural_shards(tiny_corpus, shared_data, tmp_path_factory) -> Path:
    """ABC rural news prepared with tiny_corpus's tokenizer (seq 64): the second source of a
    mixture."""
    from tests.prepared import run_prep

    out = tmp_path_factory.mktemp("rural") / "rural"
    return run_prep([shared_data / "nltk" / "abc" / "rural.txt"], out, "--tokenizer",
                    str(tiny_corpus / "tokenizer"), "--seq-len", "64", "--doc-boundary",
                    "blank-line", "--valid-fraction", "0.05", "--no-progress")


@pytest.fixture(scope="session")
def data_dir(tiny_corpus) -> Path:
    """The embedded corpus, prepared once per session: what e2e and multinode jobs train on."""
    return tiny_corpus


@pytest.fixture(scope="session")
def recipe(tmp_path_factory) -> Path:
    """The tiny SIFT recipe every e2e and multinode job shares (tests/training.py)."""
    path = tmp_path_factory.mktemp("recipe") / "tiny.toml"
    from tests.training import BASE_RECIPE

    path.write_text(BASE_RECIPE)
    return path
