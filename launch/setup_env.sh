#!/usr/bin/env bash
# Create (or reuse) the project's virtualenv; idempotent and fast when already done.
#   bash launch/setup_env.sh [EXTRAS]     e.g. EXTRAS=dev or dev,mpi
# The venv lives at $SIFT_VENV (default: <repo>/.venv). It is rebuilt only when pyproject.toml
# or the requested extras change. torch is pinned first (torch==2.13.0, the CPU wheel on this
# platform) so that no dependency can pull a multi-GB CUDA build.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${SIFT_VENV:-$root/.venv}
extras=${1:-}
python=${PYTHON:-python3}
want="$(sha256sum "$root/pyproject.toml" | cut -c1-16) extras=[$extras]"
stamp="$venv/.sift-installed"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/python" ]; then
    exit 0
fi
echo "[setup] preparing virtualenv at $venv (extras: ${extras:-none})" >&2
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q)
"${pip[@]}" torch==2.13.0
spec="$root"
[ -n "$extras" ] && spec="$root[$extras]"
"${pip[@]}" torch==2.13.0 -e "$spec"
echo "$want" > "$stamp"
echo "[setup] done" >&2
