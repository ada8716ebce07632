"""Corpus -> WordPiece tokenizer -> packed fixed-length token shards + manifest."""

__version__ = "0.1.0"
