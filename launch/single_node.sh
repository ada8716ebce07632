#!/usr/bin/env bash
# One node, all its GPUs (or NPROC CPU ranks):  bash launch/single_node.sh --config FILE [--set k=v ...]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec deepspeed --num_gpus "$(sift_nproc)" --master_port "${MASTER_PORT:-29500}" \
    --module pipeline.train "$@"
