#!/usr/bin/env bash
# The miniature world's foundation models from scratch on the 90-minute recipe (conf/world/fast.yaml):
# captions, VAE, CLIP, instruction LM, text-to-image base, then the oracle's verdict on them. Trains into
# artifacts/world_fast/ and writes reports/world_fast/ (pretrain.json: the verdict; seconds.json: each
# stage's wall-clock time); the shipped models under artifacts/world/ are not touched. Each stage resumes
# from its checkpoint when the script is run again after a stop (the seconds of a resumed stage are
# those of its last part). Extra arguments are Hydra overrides for every stage (e.g. world.vae.seed=7).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv ] || bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 DVC_NO_ANALYTICS=1 WANDB_MODE=${WANDB_MODE:-offline}
reports=reports/world_fast
mkdir -p "$reports"
overrides=(world=fast "paths.reports=$reports" "$@")
seconds="$reports/seconds.json"
[ -f "$seconds" ] || echo '{}' > "$seconds"

timed() {  # timed <stage> <ip2p command>: runs it and records its wall-clock seconds
  local stage=$1 command=$2 start=$SECONDS
  echo "== $stage (${SECONDS} s since the start)"
  ip2p "$command" "${overrides[@]}"
  python - "$seconds" "$stage" "$((SECONDS - start))" <<'RECORD'
import json, os, sys
path, stage, took = sys.argv[1], sys.argv[2], int(sys.argv[3])
times = json.load(open(path))
times[stage] = took
times["training"] = sum(v for k, v in times.items() if k not in ("training", "report"))
with open(path + ".tmp", "w") as f:
    json.dump(times, f, indent=2)
os.replace(path + ".tmp", path)   # never a half-written file
RECORD
}

timed captions world-captions
timed vae pretrain-vae
timed clip pretrain-clip
timed llm pretrain-llm
timed t2i pretrain-t2i
timed report pretrain-report
echo "== done: $reports/pretrain.json (verdict), $reports/seconds.json (minutes: training $(python -c \
  "import json; print(round(json.load(open('$seconds'))['training'] / 60))"))"
