"""sift-export never writes over a user's files silently, nor exports NaN weights with exit 0."""
from __future__ import annotations

import shutil
import subprocess

import pytest
import torch

from tests.training import BIN, REPO, job_env, zero_run

pytestmark = [pytest.mark.e2e, pytest.mark.dist]


def sift_export(*args) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "sift-export"), *map(str, args)], cwd=REPO, env=job_env(),
                          capture_output=True, text=True, timeout=300)


def one_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and all(n in lines[0] for n in needles), proc.stderr[-3000:]
    return lines[0]


def test_an_export_never_overwrites_silently_and_refuses_the_checkpoint_dir(runs, tmp_path):
    ckpt = zero_run(runs, 0) / "checkpoints"
    target = tmp_path / "export"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    one_line(sift_export(ckpt, target), "not empty (1 entries)", "--overwrite")
    assert (target / "notes.txt").read_text() == "mine" and len(list(target.iterdir())) == 1
    one_line(sift_export(ckpt, ckpt / "export"), "inside (or holding) the checkpoint directory")
    assert not (ckpt / "export").exists()
    # --overwrite replaces an earlier export only, never a directory of other files
    one_line(sift_export(ckpt, target, "--overwrite"), "holds files that are not an exported model (notes.txt)")
    assert (target / "notes.txt").read_text() == "mine" and len(list(target.iterdir())) == 1
    (target / "notes.txt").unlink()
    assert sift_export(ckpt, target).returncode == 0
    (target / "model.safetensors").write_bytes(b"an earlier export")
    proc = sift_export(ckpt, target, "--overwrite")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (target / "model.safetensors").read_bytes() != b"an earlier export"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no leftovers


def test_damaged_or_non_finite_weights_are_refused_naming_an_earlier_checkpoint(runs, tmp_path):
    from pipeline import checksums

    ckpt = tmp_path / "checkpoints"
    shutil.copytree(zero_run(runs, 0) / "checkpoints", ckpt)
    states = ckpt / "step_00000006" / "mp_rank_00_model_states.pt"
    saved = torch.load(states, map_location="cpu", weights_only=False)
    name = "bert.encoder.layer.0.attention.self.query.weight"
    saved["module"][name] = torch.full_like(saved["module"][name], float("nan"))
    torch.save(saved, states)  # the file now differs from the checksums written with it
    one_line(sift_export(ckpt, tmp_path / "export"), "damaged file(s) mp_rank_00_model_states.pt",
             "step_00000003")
    checksums.write_manifest(ckpt / "step_00000006")  # NaN weights the checksums agree with
    line = one_line(sift_export(ckpt, tmp_path / "export"), "non-finite weights in 1 tensor(s)",
                    name, "step_00000003")
    assert not (tmp_path / "export").exists(), line
    proc = sift_export(ckpt / "step_00000003", tmp_path / "export")
    assert proc.returncode == 0, proc.stderr[-3000:]
