#!/usr/bin/env bash
# One sitting of the reference run (pipelines/mini_reference, docs/miniature.md "The reference run").
# The run is longer than a sitting: its editor is trained up to train.max_steps of
# conf/experiment/mini_reference.yaml, raised from sitting to sitting. Each sitting:
#   1. installs, pulls the world's models and what the reference run shipped (kept dataset, editor);
#   2. makes the data: continues it when this machine holds the candidates (synthesis tops the caption pairs
#      up to synthesis.samples_per_pair, DVC skips what is up to date), makes it when there is no kept
#      dataset, else uses the pulled one (captions -> instructions -> synthesis -> filter -> world-judge);
#   3. trains: resumes its own last checkpoint exactly when this machine holds it (IP2P_RUNS, outside the
#      work tree), else continues the shipped editor's weights (EMA, with a fresh optimizer) for the steps
#      left, else starts from the base;
#   4. judges the editor on held-out scenes, draws the demo, writes the measured numbers into its model card,
#      records the stages in pipelines/mini_reference/dvc.lock and pushes the editor to the DVC remote.
# Stopped at any point, the next run of this script carries on. Commit pipelines/ and reports/reference/ after.
set -euo pipefail
cd "$(dirname "$0")/.."
phase() { echo "== $1 (${SECONDS} s since the start)"; }
phase "install and pull"
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 DVC_NO_ANALYTICS=1 WANDB_MODE=${WANDB_MODE:-offline}
P=pipelines/mini_reference
ip2p params -o "$P/params.yaml" experiment=mini_reference > /dev/null
stage() { dvc repro -s "$P/dvc.yaml:$1"; }
if grep -q "^  filter:" "$P/dvc.lock" && [ ! -d artifacts/reference/dataset ]; then
  dvc pull -q "$P/dvc.yaml:filter" || true
fi

phase "data (the pulled dataset is used when this machine has no candidates)"
if [ -d artifacts/reference/candidates ] || [ ! -d artifacts/reference/dataset ]; then
  for s in captions instructions synthesize filter judge; do stage "$s"; done
fi

phase "train"
target=$(python -c "import yaml; print(yaml.safe_load(open('$P/params.yaml'))['train']['max_steps'])")
runs=$(python -c "import yaml, os; print(os.path.expanduser(yaml.safe_load(open('$P/params.yaml'))['train']['checkpoint_dir']))")
done_steps=$(python -c "
from ip2p.models.model_card import read_card
card = read_card('artifacts/reference/editor')
print(card.training.get('steps', 0) if card else 0)")
if [ -f "$runs/last.ckpt" ] || [ "$done_steps" = 0 ]; then
  stage train                                   # exact resume (or the first sitting, from the base)
elif [ "$done_steps" -lt "$target" ]; then
  # another machine trained the shipped editor: continue its weights for the steps left
  rm -rf artifacts/reference/editor_before && cp -r artifacts/reference/editor artifacts/reference/editor_before
  ip2p train --params "$P/params.yaml" train.init=editor model.editor=artifacts/reference/editor_before \
    "train.max_steps=$((target - done_steps))" train.warmup_steps=0 "train.checkpoint_dir=$runs-continued-from-$done_steps"
  rm -rf artifacts/reference/editor_before
  dvc commit -f -q "$P/dvc.yaml:train"
fi

phase "judge, demo, model card"
stage eval
ip2p world-demo --params "$P/params.yaml"
ip2p export artifacts/reference/editor --model artifacts/reference/editor \
  --metrics reports/reference/world_eval.json reports/reference/train.json > /dev/null
dvc commit -f -q "$P/dvc.yaml:train" "$P/dvc.yaml:eval"   # the card changed, not the weights
dvc push -q "$P/dvc.yaml:filter" "$P/dvc.yaml:train"
phase "done"
echo "Reports: reports/reference/ (world_eval.json, world_demo.png, world_judge.json, train.json)"
echo "Commit: git add $P reports/reference .dvc-storage && git commit"
