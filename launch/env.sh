# Shared run environment for every launch script: `source launch/env.sh` (sets, never exits).
# The virtualenv's bin first on PATH; CPU-only machines get DeepSpeed's CPU accelerator (gloo);
# one thread per rank unless told otherwise; one JIT cache for DeepSpeed's ops across runs.
SIFT_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export SIFT_ROOT
export PATH="${SIFT_VENV:-$SIFT_ROOT/.venv}/bin:$PATH"
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$SIFT_ROOT/.torch_extensions}
export PYTHONUNBUFFERED=1
# Ranks per node: the GPUs, or on CPU the value of NPROC (default 2).
sift_nproc() {
    if [ "${DS_ACCELERATOR:-}" = "cpu" ]; then echo "${NPROC:-2}"; else nvidia-smi -L | wc -l; fi
}
