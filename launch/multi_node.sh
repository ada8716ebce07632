#!/usr/bin/env bash
# Several nodes from a DeepSpeed hostfile ("host slots=N" per line; passwordless ssh between them,
# the repo and venv at the same path on each):
#   bash launch/multi_node.sh HOSTFILE --config FILE [--set k=v ...]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
hostfile=${1:?usage: multi_node.sh HOSTFILE --config FILE [--set k=v ...]}
shift
master=${MASTER_ADDR:-$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$hostfile")}
exec deepspeed --hostfile "$hostfile" --master_addr "$master" --master_port "${MASTER_PORT:-29500}" \
    --module pipeline.train "$@"
