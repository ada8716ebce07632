#!/usr/bin/env bash
# The main job on a fresh machine: set up the virtualenv, then prepare the embedded default corpus
# (US State of the Union addresses 1945-2006, shipped compressed in data_prep/corpus/).
# Leaves runs/quickstart/data/ (tokenizer, train/valid shards, manifest.json).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash launch/setup_env.sh
venv=${SIFT_VENV:-$root/.venv}
out=${QUICKSTART_DIR:-runs/quickstart}
"$venv/bin/sift-prep" --output "$out/data"
echo "quickstart: corpus prepared in $out/data (manifest: $out/data/manifest.json)"
