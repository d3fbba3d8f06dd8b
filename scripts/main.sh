#!/usr/bin/env bash
# The project's main job on the embedded tiny default (random weights, CPU, no network):
# install, then edit the example image with an instruction.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 DVC_NO_ANALYTICS=1 WANDB_MODE=${WANDB_MODE:-offline}
ip2p edit examples/landscape.png "make it snowy" -o outputs/demo/edited.png --steps 20 --resolution 128 --seed 0
echo "wrote outputs/demo/edited.png"
