"""Activation checkpointing (model.activation_checkpointing): peak memory, step time and losses
with and without, on one model and sequence length (default bert-base at 512 tokens, fp32).

Each setting runs in its own fresh process (peak RSS is a process's high-water mark; on a GPU the
peak of torch.cuda.max_memory_allocated) that builds the model with `pipeline.model.build_model`,
takes `--steps` AdamW steps on the same seeded batch and reports its losses, peak memory and the
time of the steps after the first. Dropout is off, so the two settings compute the same function:
their losses must agree to float tolerance. The inputs are seeded random token ids with 15% of
positions as targets (memory and time depend on shapes and the target count, not on the text).
On a shared CPU, step times are process CPU time at one thread (wall time swings with other load).

    OMP_NUM_THREADS=1 python -m benchmarks.activation_checkpointing \\
        [--preset bert-base] [--seq-len 512] [--batch 4] [--steps 3] \\
        [--out benchmarks/results/activation_checkpointing.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

VOCAB = 30522  # bert-base-uncased's


def measure(preset: str, seq_len: int, batch: int, steps: int, checkpointing: bool) -> dict:
    """One setting in this process: losses, peak memory (MiB), CPU and wall seconds per step."""
    import torch

    from pipeline.model import ModelConfig, build_model

    torch.set_num_threads(1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset=preset, hidden_dropout=0.0, attention_dropout=0.0,
                                    activation_checkpointing=checkpointing), VOCAB, seq_len, 0)
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, VOCAB, (batch, seq_len), generator=g)
    labels = torch.where(torch.rand(batch, seq_len, generator=g) < 0.15, ids, -100)
    ids, labels = ids.to(device), labels.to(device)
    losses, cpu, wall = [], [], []
    for _ in range(steps):
        c0, w0 = time.process_time(), time.perf_counter()
        loss = model(ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))  # syncs the device
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    timed = slice(1, None) if steps > 1 else slice(None)  # the first step allocates
    return {"activation_checkpointing": checkpointing, "losses": losses,
            "peak_memory_mib": round(peak, 1), "memory_kind": "cuda max allocated" if
            device.type == "cuda" else "process peak RSS",
            "cpu_s_per_step": sum(cpu[timed]) / len(cpu[timed]),
            "wall_s_per_step": sum(wall[timed]) / len(wall[timed]), "device": device.type}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="bert-base")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results/activation_checkpointing.json")
    p.add_argument("--one", choices=["on", "off"], help=argparse.SUPPRESS)  # the child process
    args = p.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(measure(args.preset, args.seq_len, args.batch, args.steps,
                                             args.one == "on")), flush=True)
        return 0
    runs = {}
    for setting in ("off", "on"):
        cmd = [sys.executable, "-m", "benchmarks.activation_checkpointing", "--one", setting,
               "--preset", args.preset, "--seq-len", str(args.seq_len), "--batch", str(args.batch),
               "--steps", str(args.steps)]
        print(f"activation_checkpointing={setting}: {args.preset}, {args.batch} x {args.seq_len} "
              f"tokens, {args.steps} steps ...", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        runs[setting] = json.loads(lines[-1][len("RESULT "):])
        print(f"  peak {runs[setting]['peak_memory_mib']:.0f} MiB, "
              f"{runs[setting]['cpu_s_per_step']:.1f} s CPU per step, losses {runs[setting]['losses']}")
    off, on = runs["off"], runs["on"]
    result = {
        "preset": args.preset, "seq_len": args.seq_len, "batch": args.batch, "steps": args.steps,
        "machine": platform.processor() or platform.machine(),
        "memory_ratio_on_over_off": on["peak_memory_mib"] / off["peak_memory_mib"],
        "memory_saved_mib": off["peak_memory_mib"] - on["peak_memory_mib"],
        "step_time_ratio_on_over_off": on["cpu_s_per_step"] / off["cpu_s_per_step"],
        "max_loss_difference": max(abs(a - b) for a, b in zip(on["losses"], off["losses"])),
        "runs": runs,
    }
    print(f"memory on/off {result['memory_ratio_on_over_off']:.2f} (saves "
          f"{result['memory_saved_mib']:.0f} MiB), step time on/off "
          f"{result['step_time_ratio_on_over_off']:.2f}, max loss difference "
          f"{result['max_loss_difference']:.2e}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
