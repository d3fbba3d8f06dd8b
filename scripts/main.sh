#!/usr/bin/env bash
# The project's main job on the embedded tiny default (random weights, CPU, no network): install,
# then `dvc repro` through every stage: captions -> instructions -> synthesize -> filter -> train ->
# evaluate -> register. Then edit the example image with the model the pipeline registered.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 DVC_NO_ANALYTICS=1 WANDB_MODE=${WANDB_MODE:-offline}
dvc repro
ip2p promote --alias champion
ip2p edit examples/landscape.png "make it snowy" -o outputs/demo/edited.png \
  --model models:/instruct-pix2pix@champion --steps 20 --resolution 128 --seed 0 --no-progress
echo "Reports: reports/ (eval.json, guidance_grid.png, clip_scores.png); edited example: outputs/demo/edited.png"
