"""Fixtures of the one-process tests."""
import pytest

from tests.unit.test_model_support import VOCAB, train_tokenizer


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """A small WordPiece tokenizer trained once on the embedded corpus (model, scoring, export)."""
    return train_tokenizer(tmp_path_factory.mktemp("tok"), vocab_size=VOCAB)
