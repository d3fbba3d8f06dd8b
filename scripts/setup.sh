#!/usr/bin/env bash
# Create .venv and install ip2p with its test extras. Idempotent; works offline except for PyPI.
# torch is installed first, pinned to 2.13.0 (a CPU build on the project's machines): the package
# declares a range that 2.13.0 satisfies, so pip never fetches a multi-GB CUDA build here.
# On a GPU machine, install the CUDA torch you want first (or set IP2P_TORCH to its spec).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
# pip byte-compiles every module it installs (about a minute of the install on 2 cores, most of them never
# imported). IP2P_PIP_COMPILE=0 skips that (scripts/main.sh sets it): Python then compiles what a process
# imports, on first use, and keeps it, unless PYTHONDONTWRITEBYTECODE is set (then every process recompiles).
no_compile=""
if [ "${IP2P_PIP_COMPILE:-1}" = 0 ]; then no_compile=--no-compile; fi
python -m pip install -q --upgrade pip
python -m pip install -q $no_compile "${IP2P_TORCH:-torch==2.13.0}"
python -m pip install -q $no_compile -e ".[dev]"
# The web editor's browser test drives a real Chromium (Debian's; browser downloads are not possible).
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "setup: installing Debian's chromium for the browser test"
  (DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 ||
   { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; })
fi
# Raw inputs (data/, tracked by data.dvc) come from the DVC remote folder inside the repo: no network.
if [ ! -f data/captions.jsonl ] || [ ! -f data/human_edits.jsonl ]; then
  DVC_NO_ANALYTICS=1 dvc pull -q data.dvc
fi
# The miniature world's foundation models (docs/miniature-world.md), trained once by the pretrain_* and refine_vae
# stages and stored on the same remote: pulled, not retrained (`dvc repro -f pretrain_vae` retrains).
if [ ! -f artifacts/world/base/model_index.json ] || [ ! -f artifacts/world/llm/config.json ] ||
   [ ! -f artifacts/world/vae_refined/config.json ]; then
  DVC_NO_ANALYTICS=1 dvc pull -q world_captions pretrain_vae refine_vae pretrain_clip pretrain_t2i pretrain_llm
fi
# The reference run's editor (pipelines/mini_reference, docs/miniature.md "The reference run"): EMA weights in the
# diffusers layout with its model card, ready for `ip2p edit --model artifacts/reference/editor` and for the next
# sitting of that run to continue on any machine.
if [ ! -f artifacts/reference/editor/model_index.json ]; then
  DVC_NO_ANALYTICS=1 dvc pull -q pipelines/mini_reference/dvc.yaml:train
fi
