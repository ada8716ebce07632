"""Fixtures of the one-process tests."""
import pytest

from tests.unit.test_model_support import VOCAB, train_tokenizer


@pytest.fixture(scope="session")
def tokenizer_dir(shared_data, tmp_path_factory):
    """A small WordPiece tokenizer trained once on a real corpus, shared by model/scoring/export."""
    return train_tokenizer(shared_data, tmp_path_factory.mktemp("tok"), vocab_size=VOCAB)
