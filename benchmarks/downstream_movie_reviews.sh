#!/usr/bin/env bash
# Downstream accuracy on the NLTK movie reviews (sift-finetune) of exported models and their
# random twins (the same config and tokenizer, BertForMaskedLM(config) weights, torch seed 0).
#   bash benchmarks/downstream_movie_reviews.sh OUT CHECKPOINT_DIR...     e.g.
#   bash benchmarks/downstream_movie_reviews.sh runs/downstream runs/pc_warm/checkpoints
# Writes OUT/<name>.json and OUT/<name>_random.json (<name>: the checkpoint's run directory).
set -euo pipefail
out=$1; shift
mkdir -p "$out"
reviews=${REVIEWS:-../shared/data/nltk/movie_reviews}
flags=(--max-length 64 --truncation left --seeds 1,2,3 --no-progress)
for ckpt in "$@"; do
    name=$(basename "$(dirname "$(realpath "$ckpt")")")
    sift-export "$ckpt" "$out/$name" --overwrite
    python -m benchmarks.random_twin "$out/$name" "$out/${name}_random"
    for m in "$name" "${name}_random"; do
        sift-finetune "$out/$m" "$reviews" "${flags[@]}" --output "$out/$m.json"
    done
done
