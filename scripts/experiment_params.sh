# Sourced by scripts/main.sh: run the rest of a script on an experiment's params.yaml without leaving
# the checkout changed, so `bash scripts/test.sh` after it sees the shipped files (the README runs both).
#
# use_experiment NAME: keeps params.yaml and dvc.lock (their files and their staged versions), composes
# params.yaml for NAME, and puts back the stages this experiment ran last time (.dvc/tmp/experiments/
# NAME/dvc.lock) beside the shipped lock's, so `dvc repro` skips what is done. At exit, success or
# failure, the run's dvc.lock is kept there and both files and git's index are as they were.
use_experiment() {
  _exp_keep=".dvc/tmp/experiments/$1"
  _exp_saved=$(mktemp -d)
  mkdir -p "$_exp_keep"
  local file
  for file in params.yaml dvc.lock; do
    cp "$file" "$_exp_saved/$file"
    git show ":$file" > "$_exp_saved/$file.index" 2>/dev/null || rm -f "$_exp_saved/$file.index"
  done
  trap _restore_experiment EXIT
  ip2p params "experiment=$1" > /dev/null
  if [ -f "$_exp_keep/dvc.lock" ]; then
    # the shipped lock's stages win (the world's models: a stale copy would retrain them)
    python - "$_exp_keep/dvc.lock" <<'PY'
import sys, yaml
lock = yaml.safe_load(open("dvc.lock")) or {"schema": "2.0", "stages": {}}
kept = yaml.safe_load(open(sys.argv[1])) or {}
for name, entry in (kept.get("stages") or {}).items():
    lock.setdefault("stages", {}).setdefault(name, entry)
yaml.safe_dump(lock, open("dvc.lock", "w"), sort_keys=False)
PY
  fi
}

_restore_experiment() {
  local status=$? file
  cp dvc.lock "$_exp_keep/dvc.lock" 2>/dev/null || true
  for file in params.yaml dvc.lock; do
    cp "$_exp_saved/$file" "$file"
    if [ -f "$_exp_saved/$file.index" ]; then  # DVC's autostage put the run's lock in the index
      git update-index --cacheinfo "100644,$(git hash-object -w "$_exp_saved/$file.index"),$file"
    fi
  done
  rm -rf "$_exp_saved"
  exit "$status"
}
