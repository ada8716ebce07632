#!/usr/bin/env bash
# Create (or reuse) the project's virtualenv; idempotent and fast when already done.
#   bash launch/setup_env.sh [EXTRAS]     e.g. EXTRAS=dev or dev,mpi
# The venv lives at $SIFT_VENV (default: <repo>/.venv). pip runs again only when pyproject.toml
# changed or an extra is asked for that is not installed yet. torch is pinned first
# (torch==2.13.0) so that no dependency can pull a newer, multi-GB CUDA build.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${SIFT_VENV:-$root/.venv}
extras=${1:-}
python=${PYTHON:-python3}
stamp="$venv/.sift-installed"   # line 1: pyproject hash; line 2: installed extras, comma-separated
hash=$(sha256sum "$root/pyproject.toml" | cut -c1-16)
if [ -f "$stamp" ] && [ -x "$venv/bin/python" ] && [ "$(sed -n 1p "$stamp")" = "$hash" ]; then
    have=",$(sed -n 2p "$stamp"),"
    missing=""
    for e in ${extras//,/ }; do
        [[ "$have" == *",$e,"* ]] || missing="$missing $e"
    done
    [ -z "$missing" ] && exit 0
    # keep what is there and add what is asked for
    extras=$(sed -n 2p "$stamp"),$extras
fi
extras=$(echo "$extras" | tr ',' '\n' | sed '/^$/d' | sort -u | paste -sd, -)
echo "[setup] preparing virtualenv at $venv (extras: ${extras:-none})" >&2
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q)
# SIFT_TORCH_INDEX: an extra index for torch alone, e.g. PyTorch's CPU-wheel index on machines whose
# default index would serve the CUDA build.
torch_index=()
[ -n "${SIFT_TORCH_INDEX:-}" ] && torch_index=(--index-url "$SIFT_TORCH_INDEX")
"${pip[@]}" "${torch_index[@]}" torch==2.13.0
spec="$root"
[ -n "$extras" ] && spec="$root[$extras]"
"${pip[@]}" torch==2.13.0 -e "$spec"
printf '%s\n%s\n' "$hash" "$extras" > "$stamp"
echo "[setup] done" >&2
