#!/usr/bin/env bash
# Install from scratch (if needed) and run the whole test suite, slow tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DVC_NO_ANALYTICS=1 WANDB_MODE=disabled
python -m pytest -q --durations=25 "$@"
