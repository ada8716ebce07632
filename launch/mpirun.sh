#!/usr/bin/env bash
# OpenMPI, no DeepSpeed launcher: ranks are found by DeepSpeed's MPI discovery (mpi4py).
#   NP=4 [HOSTFILE=hosts] bash launch/mpirun.sh --config FILE [--set k=v ...]
# Needs `bash launch/setup_env.sh mpi` (mpi4py) and OpenMPI. MASTER_ADDR overrides the address
# the discovery picks (e.g. 127.0.0.1 on one machine); MPIRUN_ARGS adds mpirun options.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
args=(-np "${NP:-2}" -x PATH -x DS_ACCELERATOR -x OMP_NUM_THREADS -x TORCH_EXTENSIONS_DIR
      -x PYTHONUNBUFFERED)
[ -n "${HOSTFILE:-}" ] && args+=(--hostfile "$HOSTFILE")
[ -n "${MASTER_ADDR:-}" ] && args+=(-x "SIFT_MASTER_ADDR=$MASTER_ADDR")
[ -n "${MASTER_PORT:-}" ] && args+=(-x "MASTER_PORT=$MASTER_PORT")
[ "$(id -u)" = 0 ] && args+=(--allow-run-as-root)
# shellcheck disable=SC2086
exec mpirun "${args[@]}" ${MPIRUN_ARGS:-} python -m pipeline.train "$@"
