#!/usr/bin/env bash
# The GPU check: one command, everything under one results folder, each stage with its own time
# limit (a ceiling, not a forecast) so one that hangs cannot eat the rest.
#
#   bash benchmarks/gpu_check.sh [DATA_DIR] [OUT_DIR]
#   SIFT_GPU_ARCHIVE=$OUT/gpu_check.tgz bash benchmarks/gpu_check.sh .gpu_carry/data /tmp/gpu   # device tool
#   SIFT_GPU_CHECK_STAGES="ab" ...                                   # only the stages named
#
# DATA_DIR: a sift-prep output (default .gpu_carry/data; see below). OUT_DIR: default
# benchmarks/results/gpu. SIFT_GPU_CHECK_STAGES picks stages (default "efficiency variants
# profile train bench", ~8 min on one H200; measured run: benchmarks/results/gpu/2026-12-04):
#   efficiency  benchmarks/trainer_efficiency.py --gpu: bert-medium and bert-base at micro batch
#               128 and 256 under zero0_autocast_bf16 (the GPU default) and zero2_bf16, trainer
#               against a plain torch loop, MFU (~150 s)
#   variants    the same for bert-medium B 128 under zero0_bf16 and ZeRO-2 with autocast (~35 s)
#   profile     a torch.profiler table of the default config's step (benchmarks/profile_step.py)
#   train       sift-train: ZeRO-2 and ZeRO-3 bf16 (a checkpoint at step 10, then a resume to 20),
#               and an fp16 run (~100 s)
#   bench       a short sift-bench smoke test: vanilla / sift-loss / random, 25 s per arm (~110 s)
#   compile     model.compile, bert-medium B 128, uncompiled then compiled (~60 s)
#   memory      model.activation_checkpointing off and on: bert-base, 32 x 512 tokens, fp32, peak
#               torch.cuda.max_memory_allocated and step time (benchmarks/activation_checkpointing.py)
#   ab          the post-plateau A/B (~9 min, a call of its own): vanilla trains SIFT_GPU_AB_WARM
#               steps (default 3000: the plain loop at lr 3e-4 left the plateau at ~2400-3000 steps
#               of B 128), then vanilla / sift-loss / random (expand, f 0.5) each train
#               SIFT_GPU_AB_BUDGET_S (default 120) seconds from that checkpoint, lr decaying to its
#               floor over that budget; 2048 validation sequences every 10 s of training.
#               SIFT_GPU_AB_ARGS adds sift-bench arguments, split on spaces (e.g. --variant ema
#               selection.normalize="token-ema"), each arm ~2.3 min more
#   pc          the positive control (issue 28; benchmarks/positive_control.toml): a pool whose
#               training half is copies of 64 rows, vanilla on it for SIFT_GPU_PC_WARM steps
#               (default 4500) so the copies are learned, then vanilla / random / full-loss /
#               sift-loss at exit layers 1 and 2, SIFT_GPU_PC_BUDGET_S (default 40) seconds each;
#               pc_check.log says whether the copies were learned (full-model accuracy) (~8 min;
#               a CPU smoke test with bert-tiny, 20 warm-start steps and 4 s arms: 150 s)
#   rd          the repeated-data A/B (issue 28; benchmarks/repeated_data.toml): the embedded
#               corpus prepared with the data's tokenizer as one small source (~3.3 k rows of 128),
#               vanilla on it for SIFT_GPU_RD_WARM steps (default 250 of B 128, ~10 epochs), then
#               vanilla / random / sift-loss / sift-loss with the loss history (mean, and scored
#               every third visit) for SIFT_GPU_RD_BUDGET_S (default 20) seconds each (~8 min)
# A summary of every stage's exit code goes to OUT_DIR/stages.txt. With SIFT_GPU_ARCHIVE=FILE.tgz
# the results folder (checkpoints left out) is packed into that one file after every stage: the
# device tool brings back only a handful of files, and a run cut short keeps what it finished.
#
# Machines without DeepSpeed (the lent H200 has torch but not DeepSpeed, and no network):
# `bash benchmarks/gpu_carry.sh` builds what follows. It puts wheels in .gpu_carry/wheels (deepspeed
# built here with DS_BUILD_OPS=0 `pip wheel --no-deps --no-build-isolation`, plus hjson, pydantic,
# pydantic-core, annotated-types, typing-inspection, typing-extensions, msgpack, ninja, py-cpuinfo,
# psutil, nvidia-ml-py, einops, packaging, tqdm for the machine's Python) and a prepared corpus in
# .gpu_carry/data, then send .gpu_carry along (`carry` of the device tool). This script installs
# the wheels with --target into a scratch folder when `import deepspeed` fails, and runs the
# checkout from PYTHONPATH (no pip install -e); the benchmarks run as modules (`python -m`).
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
data=$(realpath -m "${1:-.gpu_carry/data}")
out=$(realpath -m "${2:-benchmarks/results/gpu}")
mkdir -p "$out"
py=${PYTHON:-python3}
preset=${SIFT_GPU_CHECK_PRESET:-bert-medium}  # train/bench/ab stages (bert-tiny: a CPU smoke test)
stages=" ${SIFT_GPU_CHECK_STAGES:-efficiency variants profile train bench} "
want() { [[ "$stages" == *" $1 "* ]]; }
for s in $stages; do  # a misspelt stage would otherwise run nothing, silently
    case $s in efficiency|variants|profile|train|bench|compile|memory|ab|pc|rd) ;;
        *) echo "gpu_check: unknown stage '$s' in SIFT_GPU_CHECK_STAGES (efficiency variants profile train bench compile memory ab pc rd)" >&2; exit 2 ;;
    esac
done
log() { echo "[gpu_check $(date +%H:%M:%S)] $*" | tee -a "$out/stages.txt"; }

if ! "$py" -c "import deepspeed" 2>/dev/null; then
    deps=${SIFT_PYDEPS:-/tmp/sift_pydeps}
    if ls .gpu_carry/wheels/*.whl >/dev/null 2>&1; then
        log "installing the carried wheels into $deps"
        "$py" -m pip install -q --no-deps --no-index --target "$deps" .gpu_carry/wheels/*.whl \
            > "$out/pip.log" 2>&1 || { log "pip install failed: see $out/pip.log"; exit 1; }
    fi
    export PYTHONPATH="$deps:${PYTHONPATH:-}" PATH="$deps/bin:$PATH"
fi
export PYTHONPATH="$root:${PYTHONPATH:-}"
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/sift_torch_ext}
[ -f "$data/manifest.json" ] || { log "no prepared corpus at $data (manifest.json missing)"; exit 1; }
"$py" - > "$out/environment.txt" 2>&1 <<'EOF'
import torch, deepspeed, transformers
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0))
print("deepspeed", deepspeed.__version__, "transformers", transformers.__version__)
EOF
log "environment: $(tr '\n' ' ' < "$out/environment.txt")"

stage() {  # stage NAME TIMEOUT_S CMD...: run, log its exit code, never abort the script
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    log "$name: exit $rc in $((SECONDS - t0)) s"
    archive
    return 0
}
archive() {
    [ -n "${SIFT_GPU_ARCHIVE:-}" ] || return 0
    tar czf "$SIFT_GPU_ARCHIVE.tmp" --exclude=checkpoints -C "$(dirname "$out")" "$(basename "$out")" \
        && mv "$SIFT_GPU_ARCHIVE.tmp" "$SIFT_GPU_ARCHIVE"
}


# 1. trainer efficiency: the trainer against a plain loop, 4 cases, under the GPU default
#    (zero0_autocast_bf16: fp32 weights, torch.autocast, the client's fused AdamW) and under
#    ZeRO-2 with bf16 weights
want efficiency && stage efficiency 300 "$py" -m benchmarks.trainer_efficiency --gpu --data "$data" \
    --out "$out/trainer_efficiency.json" --ds-config ds_configs/zero0_autocast_bf16.json \
    --ds-config ds_configs/zero2_bf16.json ${SIFT_GPU_EFFICIENCY_ARGS:-}

# 1b. where the rest of the step goes: more DeepSpeed variants side by side, and the profiler's table
want variants && stage efficiency_variants 120 "$py" -m benchmarks.trainer_efficiency --case bert-medium:128 \
    --data "$data" --rounds 3 --out "$out/trainer_efficiency_variants.json" \
    --ds-config ds_configs/zero0_bf16.json --ds-config benchmarks/ds_variants/zero2_autocast_bf16.json
want profile && stage profile 90 "$py" -m benchmarks.profile_step --case bert-medium:128 --data "$data" \
    --ds-config ds_configs/zero0_autocast_bf16.json --out "$out/profile_step.txt"

# the GPU ds_configs of the runs below, at micro batch 128
for f in zero0_autocast_bf16 zero2_bf16 zero3_bf16 zero2_fp16; do
    "$py" - "$root/ds_configs/$f.json" "$out/ds_$f.json" <<'EOF'
import json, sys
cfg = json.load(open(sys.argv[1]))
cfg.update(train_micro_batch_size_per_gpu=128, gradient_accumulation_steps=1)
cfg.pop("train_batch_size", None)
json.dump(cfg, open(sys.argv[2], "w"), indent=1)
EOF
done

if want train; then
# sift-train: ZeRO-2 and ZeRO-3 bf16 with a checkpoint and a resume, and fp16
common=(--set data.data_dir="$data" model.preset=$preset optim.decay=constant
        optim.warmup_steps=5 eval.every_steps=0 eval.max_samples=256 logging.every_steps=5
        logging.progress_bar=false selection.policy=sift-loss run.overwrite=true)
for z in zero2_bf16 zero3_bf16; do
    stage "train_${z}_a" 90 "$py" -m pipeline.train "${common[@]}" \
        run.ds_config="$out/ds_$z.json" run.output_dir="$out/train_$z" budget.steps=10 \
        checkpoint.every_steps=10
    stage "train_${z}_resume" 90 "$py" -m pipeline.train "${common[@]}" \
        run.ds_config="$out/ds_$z.json" run.output_dir="$out/train_$z" budget.steps=20 \
        checkpoint.every_steps=10 --resume auto
done
stage train_zero2_fp16 90 "$py" -m pipeline.train "${common[@]}" \
    run.ds_config="$out/ds_zero2_fp16.json" run.output_dir="$out/train_zero2_fp16" budget.steps=20
fi
# a short sift-bench (last: it is a smoke test that passed before): vanilla / sift-loss / random on bert-medium (lr 3e-4, the GPU note's
#    recipe that leaves the plateau soonest); the step-time split of each arm is in its report
want bench && stage sift_bench 140 "$py" -m benchmarks.sift_bench.cli --data "$data" --world-size 1 \
    --policies sift-loss,random --fractions 0.5 --pools expand --exit-layers 1 --exit-heads shared \
    --no-hf-baseline --budget-s 25 --eval-interval-s 8 --out "$out" --name sift_bench \
    --work-dir "$out/sift_bench_runs" \
    --set model.preset=$preset run.ds_config="$out/ds_zero0_autocast_bf16.json" optim.lr=3e-4 \
          optim.warmup_steps=200 optim.decay=constant eval.max_samples=512

# model.compile, the same case uncompiled then compiled
if want compile; then
    stage efficiency_compile 150 "$py" -m benchmarks.trainer_efficiency --case bert-medium:128 \
        --data "$data" --rounds 3 --compile both --out "$out/trainer_efficiency_compiled.json"
fi
# activation checkpointing: peak GPU memory and step time with and without, bert-base at 512
if want memory; then
    stage activation_checkpointing 120 "$py" -m benchmarks.activation_checkpointing \
        --preset bert-base --seq-len 512 --batch 32 --steps 5 \
        --out "$out/activation_checkpointing.json"
fi
# the post-plateau A/B: every arm forks from one vanilla run past the plateau, lr 3e-4 decaying
# linearly to its floor over each arm's own budget
if want ab; then
    stage sift_ab 580 "$py" -m benchmarks.sift_bench.cli --data "$data" --world-size 1 \
        --policies sift-loss,random --fractions 0.5 --pools expand --exit-layers 1 \
        --exit-heads shared --no-hf-baseline ${SIFT_GPU_AB_ARGS:-} \
        --warm-start "${SIFT_GPU_AB_WARM:-3000}" --budget-s "${SIFT_GPU_AB_BUDGET_S:-120}" \
        --eval-interval-s 10 --out "$out" --name sift_ab --work-dir "$out/sift_ab_runs" \
        --set model.preset=$preset run.ds_config="$out/ds_zero0_autocast_bf16.json" optim.lr=3e-4 \
              optim.warmup_steps=500 'optim.decay="linear"' eval.max_samples=2048
fi
# the positive control and the repeated-data A/B (issue 28) at the GPU's batch, one process each
if want pc; then
    stage pc_pool 120 "$py" -m benchmarks.positive_control pool "$data" "$out/pc_data"
    stage positive_control 580 "$py" -m benchmarks.sift_bench.cli --data "$out/pc_data" \
        --recipe benchmarks/positive_control.toml --world-size 1 --warm-start "${SIFT_GPU_PC_WARM:-4500}" \
        --budget-s "${SIFT_GPU_PC_BUDGET_S:-40}" --eval-interval-s "${SIFT_GPU_PC_EVAL_S:-6}" \
        --policies sift-loss,full-loss,random --fractions 0.5 --pools expand --exit-layers 1,2 \
        --exit-heads shared --no-hf-baseline --name positive_control --out "$out" \
        --work-dir "$out/pc_runs" --set model.preset=$preset run.ds_config="$out/ds_zero0_autocast_bf16.json"
    stage pc_check 120 "$py" -m benchmarks.positive_control check "$out/pc_runs/warm_start/checkpoints" \
        "$out/pc_data"
fi
if want rd; then
    seq_len=$("$py" -c "import json, sys; print(json.load(open(sys.argv[1]))['seq_len'])" "$data/manifest.json")
    stage rd_data 120 "$py" -m data_prep --tokenizer "$data/tokenizer" --seq-len "$seq_len" \
        --valid-fraction 0.1 --output "$out/rd_data" --no-progress
    stage repeated_data 580 "$py" -m benchmarks.sift_bench.cli --data "$out/rd_data" \
        --recipe benchmarks/repeated_data.toml --world-size 1 --warm-start "${SIFT_GPU_RD_WARM:-250}" \
        --budget-s "${SIFT_GPU_RD_BUDGET_S:-20}" --eval-interval-s "${SIFT_GPU_RD_EVAL_S:-2}" \
        --policies sift-loss,random --fractions 0.5 --pools expand --exit-layers 1 --exit-heads shared \
        --no-hf-baseline --variant hist selection.history=mean \
        --variant stale3 selection.history=mean selection.history_rescore_every=3 \
        --name repeated_data --out "$out" --work-dir "$out/rd_runs" \
        --set model.preset=$preset run.ds_config="$out/ds_zero0_autocast_bf16.json"
fi
# checkpoints are large and rebuilt in seconds: keep the logs, summaries and metrics
rm -rf "$out"/train_*/checkpoints "$out"/sift_*_runs/*/arms/*/checkpoints \
    "$out"/pc_runs/warm_start/checkpoints "$out"/rd_runs/warm_start/checkpoints 2>/dev/null
log "done: $out"
archive
