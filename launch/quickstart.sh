#!/usr/bin/env bash
# The main job on a fresh machine, in minutes on 2 CPU cores:
#   1. set up the virtualenv,
#   2. prepare the embedded default corpus (US State of the Union addresses 1945-2006),
#   3. pretrain bert-tiny with SIFT on 2 ranks (DeepSpeed ZeRO-2, gloo on CPU, GPUs if present),
#   4. export the model to a Hugging Face directory and fill a mask with it.
# Leaves runs/quickstart/: data/, tensorboard/, checkpoints/, export/, metrics.jsonl, summary.json.
# Extra arguments go to the trainer, e.g.  bash launch/quickstart.sh --set budget.steps=100
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash launch/setup_env.sh
source launch/env.sh
out=${QUICKSTART_DIR:-runs/quickstart}

sift-prep --output "$out/data"
echo "quickstart: corpus prepared in $out/data (manifest: $out/data/manifest.json)"

rm -rf "$out/checkpoints" "$out/tensorboard" "$out/export" "$out/metrics.jsonl" "$out/summary.json"
NPROC=${NPROC:-2} MASTER_PORT=${MASTER_PORT:-29517} bash launch/single_node.sh \
    --config launch/recipes/quickstart.toml \
    --set "data.data_dir=$out/data" "run.output_dir=$out" "$@"

sift-export "$out/checkpoints" "$out/export"

python - "$out" <<'PY'
import json, sys
from transformers import pipeline

out = sys.argv[1]
s = json.load(open(f"{out}/summary.json"))
print(f"quickstart: validation MLM accuracy {s['accuracy_before']:.4f} before -> "
      f"{s['accuracy_after']:.4f} after {s['steps']} steps "
      f"({s['samples_backpropagated']} samples backpropagated, policy {s['policy']})")
fill = pipeline("fill-mask", model=f"{out}/export", tokenizer=f"{out}/export")
text = f"the president of the united {fill.tokenizer.mask_token} ."
print(f"quickstart: fill-mask '{text}':")
for p in fill(text):
    print(f"  {p['token_str']!r:>14}  {p['score']:.3f}")
print(f"quickstart: TensorBoard: tensorboard --logdir {out}/tensorboard")
PY
