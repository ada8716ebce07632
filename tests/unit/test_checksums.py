"""Checkpoint checksums: written with the files, the sampled check and the full one."""
from __future__ import annotations

import json
import os

import pytest

from pipeline import checksums


@pytest.fixture
def tag_dir(tmp_path):
    d = tmp_path / "step_00000010"
    (d / "sub").mkdir(parents=True)
    (d / "big.pt").write_bytes(os.urandom(8 * 1024 * 1024))  # sampled in 64 blocks of 64 KiB
    (d / "small.json").write_text('{"step": 10}')  # small: hashed whole even when sampled
    (d / "sub" / "part.pt").write_bytes(os.urandom(1000))
    checksums.write_manifest(d)
    return d


def overwrite(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_an_intact_checkpoint_passes_both_checks(tag_dir):
    listed = json.loads((tag_dir / checksums.MANIFEST).read_text())["files"]
    assert sorted(listed) == ["big.pt", "small.json", "sub/part.pt"]
    assert checksums.damaged(tag_dir) == [] and checksums.damaged(tag_dir, full=True) == []


def test_truncation_a_missing_file_and_a_sampled_block_are_found(tag_dir):
    overwrite(tag_dir / "big.pt", 0, b"\0" * 16)  # inside the first sampled block
    (tag_dir / "sub" / "part.pt").unlink()
    (tag_dir / "small.json").write_text('{"step": 1}')  # same size? no: 11 bytes vs 12
    assert checksums.damaged(tag_dir) == ["big.pt (checksum)", "small.json (size 11, written 12)",
                                          "sub/part.pt (missing)"]


def test_a_small_change_between_sampled_blocks_needs_the_full_check(tag_dir, monkeypatch):
    """What the default sample can miss in a large file (a few bytes between its blocks, same
    size): the full check finds it. The resume then also checks the loaded weights for NaN/Inf.
    (8 MiB stands in for a file over FULL_HASH_BELOW.)"""
    monkeypatch.setattr(checksums, "FULL_HASH_BELOW", 1024 * 1024)
    offsets = checksums.sample_offsets(8 * 1024 * 1024)
    between = offsets[10] + checksums.SAMPLE_BYTES + 100  # after block 10, before block 11
    assert between + 8 < offsets[11]
    overwrite(tag_dir / "big.pt", between, b"\xff" * 8)
    assert checksums.damaged(tag_dir) == []
    assert checksums.damaged(tag_dir, full=True) == ["big.pt (checksum)"]


def test_a_file_below_64_mib_is_hashed_whole_by_the_default_check(tag_dir):
    """The same change in a file the size of a small model's checkpoint (a hostile pass zeroed
    4 KiB in the middle of an 18 MB one, and it resumed): the default check finds it."""
    offsets = checksums.sample_offsets(8 * 1024 * 1024)
    overwrite(tag_dir / "big.pt", offsets[10] + checksums.SAMPLE_BYTES + 100, b"\xff" * 8)
    assert checksums.damaged(tag_dir) == ["big.pt (checksum)"]


def test_a_small_file_is_hashed_whole_by_the_sample(tag_dir):
    data = (tag_dir / "sub" / "part.pt").read_bytes()
    overwrite(tag_dir / "sub" / "part.pt", 500, bytes([data[500] ^ 1]))  # one bit
    assert checksums.damaged(tag_dir) == ["sub/part.pt (checksum)"]


def test_no_manifest_is_none_and_a_broken_one_is_named(tmp_path, tag_dir):
    assert checksums.damaged(tmp_path) is None  # older checkpoints: the zip check takes over
    (tag_dir / checksums.MANIFEST).write_text("{not json")
    assert checksums.damaged(tag_dir) == [checksums.MANIFEST]
