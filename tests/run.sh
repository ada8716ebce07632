#!/usr/bin/env bash
# Set up the virtualenv (if needed) and run the whole test suite.
#   bash tests/run.sh [pytest args...]     e.g. bash tests/run.sh tests/unit -x
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
extras=dev
# mpi4py builds against an installed MPI; without one the mpirun test skips and says why.
command -v mpicc >/dev/null && extras=dev,mpi
bash "$root/launch/setup_env.sh" "$extras" || exit 1
venv=${SIFT_VENV:-$root/.venv}
cd "$root"
# One JIT cache for DeepSpeed's ops across runs (the first build takes ~30 s).
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$root/.torch_extensions}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
"$venv/bin/python" -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "tests/run.sh: pytest collected no tests; that is a failure here" >&2
    exit 1
fi
exit "$rc"
