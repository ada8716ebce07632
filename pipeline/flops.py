"""Model FLOPs of a BERT masked-LM step, and model FLOPs utilization (MFU).

Counted as the model's arithmetic (multiply-add = 2 FLOPs), not what the hardware happened to run
(no recomputation, no padding waste removed), the convention of PaLM's MFU:

  encoder layer, forward, per token:  2 * (4 H^2 + 2 H I) + 4 S H
      (Q, K, V and output projections: 4 H^2 multiply-adds; the MLP: 2 H I; attention scores and
       the weighted sum of values: 2 S H, with S the sequence length: every token attends to S)
  MLM head, forward, per *masked* token:  2 * (H^2 + H V)   (transform, then the decoder; the head
      runs only where there is a target: our sparse head)
  training = 3 x forward (the backward pass costs two forwards);
  scoring (the SIFT exit pass, no grad) = 1 x forward of layers 1..k and the head.

Embedding lookups, LayerNorms, softmaxes and biases are left out (well under 1% at these sizes).
MFU = model FLOPs per second / the device's dense peak: 989e12 for H100 SXM/H200 bf16 (tensor
cores, no sparsity), 756e12 H100 PCIe, 835e12 H100 NVL, 312e12 A100. Unknown devices and CPUs have
no MFU. A separate exit head's auxiliary training pass is not counted (~4% at bert-base, V 30522).

A leaf module: pure functions of shapes, nothing imported from the rest of the pipeline.
"""
from __future__ import annotations

import torch

PEAK_FLOPS_BF16: dict[str, float] = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12,
                                     "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12}
"""Dense bf16/fp16 tensor-core peak by the name the CUDA device reports, matched as a substring in
this order (the PCIe and NVL H100s before the SXM one)."""


def layer_flops_per_token(hidden: int, intermediate: int, seq_len: int) -> float:
    """Forward FLOPs of one encoder layer for one token."""
    return 2.0 * (4 * hidden * hidden + 2 * hidden * intermediate) + 4.0 * seq_len * hidden


def head_flops_per_token(hidden: int, vocab: int) -> float:
    """Forward FLOPs of the MLM head (transform + decoder) for one masked token."""
    return 2.0 * (hidden * hidden + hidden * vocab)


def forward_flops(config, rows: float, seq_len: int, masked: float, layers: int | None = None) -> float:
    """Forward FLOPs over `rows` sequences of `seq_len` tokens with `masked` tokens predicted.

    config: a BertConfig (hidden_size, intermediate_size, num_hidden_layers, vocab_size);
    layers: how many encoder layers run (all when None; the exit layer k for the SIFT score).
    """
    n = config.num_hidden_layers if layers is None else layers
    per_token = n * layer_flops_per_token(config.hidden_size, config.intermediate_size, seq_len)
    return (rows * seq_len * per_token
            + masked * head_flops_per_token(config.hidden_size, config.vocab_size))


def train_flops(config, rows: float, seq_len: int, masked: float) -> float:
    """Forward + backward FLOPs of a training pass."""
    return 3.0 * forward_flops(config, rows, seq_len, masked)


def peak_flops(device: torch.device, precision: str) -> float | None:
    """The device's dense peak FLOP/s for `precision` ('bf16'/'fp16', '-autocast' or not), or
    None when unknown (other precisions, CPUs, GPUs not in the table)."""
    if device.type != "cuda" or precision.split("-")[0] not in ("bf16", "fp16"):
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_FLOPS_BF16.items():
        if key in name:
            return peak
    return None


def mfu(flops: float, seconds: float, peak: float, world_size: int = 1) -> float:
    """Model FLOPs utilization: achieved FLOP/s over the peak of `world_size` devices."""
    return flops / seconds / (peak * world_size)
