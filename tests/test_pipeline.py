"""The tracked pipeline: params.yaml is what conf/ composes to, and `dvc repro` runs every stage on
the tiny default in a temporary copy of the project, then reruns nothing, then reruns only the
stages downstream of a changed parameter (through `dvc exp run -S`, DVC's Hydra composition)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from ip2p.config import compose

REPO = Path(__file__).resolve().parents[1]
STAGES = ["captions", "instructions", "synthesize", "filter", "train", "evaluate", "register", "world_judge",
          "world_eval"]
# The miniature world's stages come first; their outputs are on the remote (dvc.lock), so `dvc pull`
# gets them and `dvc repro` does not retrain them.
WORLD_STAGES = ["world_captions", "pretrain_vae", "refine_vae", "pretrain_clip", "pretrain_t2i", "pretrain_llm",
                "pretrain_report"]
WORLD_PULL = ["world_captions", "pretrain_vae", "refine_vae", "pretrain_clip", "pretrain_t2i", "pretrain_llm"]


def _plain(value):
    """A parameter as DVC compares it: PyYAML reads dvc.lock's `1e-05` as a string, params.yaml's as a float."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def test_world_stages_are_up_to_date_in_dvc_lock():
    """The world's pretraining stages take hours; their outputs come from the remote only while every code
    file and parameter they depend on still has the hash dvc.lock recorded. A refactor of, say,
    world/pretrain/t2i.py would make `dvc repro` retrain the base (the end-to-end test then times out)."""
    import hashlib

    lock = yaml.safe_load((REPO / "dvc.lock").read_text())["stages"]
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    stale = []
    for name in WORLD_STAGES:
        for dep in lock[name]["deps"]:
            path = REPO / dep["path"]
            if dep["md5"].endswith(".dir") or not path.is_file():
                continue  # pulled artifacts; their hashes are DVC's business
            if hashlib.md5(path.read_bytes()).hexdigest() != dep["md5"]:
                stale.append(f"{name}: {dep['path']} changed")
        for key, value in lock[name].get("params", {}).get("params.yaml", {}).items():
            node = params
            for part in key.split("."):
                node = node[part]
            if _plain(node) != _plain(value):
                stale.append(f"{name}: parameter {key} changed")
    assert not stale, "a world stage would retrain: " + "; ".join(stale) + " (revert, or retrain and push)"


def test_params_file_equals_composed_config(monkeypatch):
    monkeypatch.delenv("IP2P_CACHE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    composed = OmegaConf.to_container(compose([]), resolve=True)
    committed = yaml.safe_load((REPO / "params.yaml").read_text())
    assert committed == composed, "params.yaml is stale: run `ip2p params` and commit it"


def test_dvc_hydra_composition_writes_the_same_params(monkeypatch, tmp_path):
    """What `dvc exp run -S ...` writes (DVC's own Hydra composition) equals the committed file, and
    group overrides such as experiment=small reach it."""
    from dvc.utils.hydra import compose_and_dump

    monkeypatch.delenv("IP2P_CACHE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    committed = yaml.safe_load((REPO / "params.yaml").read_text())
    plain, small = tmp_path / "plain.yaml", tmp_path / "small.yaml"
    compose_and_dump(plain, str(REPO / "conf"), None, "config", str(REPO), [])
    compose_and_dump(small, str(REPO / "conf"), None, "config", str(REPO), ["experiment=small", "filter.top_k=3"])
    assert yaml.safe_load(plain.read_text()) == committed
    small_params = yaml.safe_load(small.read_text())
    assert small_params["model"]["name"] == "sd15" and small_params["filter"]["top_k"] == 3


def _missing_dvc_params(params: dict) -> list[str]:
    pipeline = yaml.safe_load((REPO / "dvc.yaml").read_text())
    missing = []
    for name, stage in pipeline["stages"].items():
        for key in stage.get("params", []):
            node = params
            for part in key.split("."):
                if not isinstance(node, dict) or part not in node:
                    missing.append(f"{name}: {key}")
                    break
                node = node[part]
    return missing


def test_dvc_yaml_params_exist_in_params_file():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    pipeline = yaml.safe_load((REPO / "dvc.yaml").read_text())
    assert list(pipeline["stages"]) == WORLD_STAGES + STAGES
    for name, stage in pipeline["stages"].items():
        assert stage["cmd"] == f"ip2p {name.replace('_', '-')} --params params.yaml"
    assert _missing_dvc_params(params) == []


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml")))
def test_every_experiment_gives_dvc_every_param(experiment, monkeypatch):
    """`ip2p params experiment=X && dvc repro` (scripts/main.sh does it for mini) stops at the first stage
    whose declared parameter the composed file lacks, so every preset must carry every key dvc.yaml names."""
    monkeypatch.delenv("IP2P_CACHE", raising=False)
    params = OmegaConf.to_container(compose([f"experiment={experiment}"]), resolve=True)
    assert _missing_dvc_params(params) == []


def _project_copy(dest: Path) -> Path:
    """The files git would have in a fresh clone (tracked + new, not ignored), committed in `dest`."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.splitlines()
    for name in files:
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    # params.yaml as conf/ composes it by default, whatever this checkout's file holds (an older main job
    # left experiment=mini's there, and the chain then ran the mini experiment)
    env = {k: v for k, v in os.environ.items() if k not in ("IP2P_CACHE", "MLFLOW_TRACKING_URI")}
    subprocess.run([str(Path(sys.executable).with_name("ip2p")), "params", "-o", str(dest / "params.yaml")], cwd=dest,
                   env=env, check=True, capture_output=True)
    git = ["git", "-c", "user.name=ip2p-test", "-c", "user.email=test@ip2p.invalid"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-qm", "copy"], cwd=dest, check=True)
    return dest


def _dvc(cwd: Path, env: dict, *args: str) -> str:
    dvc = str(Path(sys.executable).with_name("dvc"))
    result = subprocess.run([dvc, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, f"dvc {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


def _ran(output: str) -> list[str]:
    return re.findall(r"Running stage '([\w-]+)'", output)


@pytest.mark.slow
def test_dvc_repro_end_to_end(tmp_path, cache_dir):
    project = _project_copy(tmp_path / "project")
    env = {**os.environ, "IP2P_CACHE": str(cache_dir), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "DVC_NO_ANALYTICS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    _dvc(project, env, "pull", "-q", "data.dvc", *WORLD_PULL)  # raw data and the world's models: nothing retrains
    assert (project / "data" / "captions.jsonl").is_file()
    assert (project / "artifacts" / "world" / "base" / "model_index.json").is_file()

    first = _dvc(project, env, "repro")
    ran = _ran(first)
    assert sorted(ran) == sorted(STAGES)
    for before, after in [("captions", "instructions"), ("instructions", "synthesize"), ("synthesize", "filter"),
                          ("filter", "train"), ("train", "evaluate"), ("evaluate", "register"),
                          ("filter", "world_judge"), ("train", "world_eval")]:
        assert ran.index(before) < ran.index(after), (before, after, ran)
    assert (project / "artifacts" / "model" / "model_index.json").is_file()
    for report in ["captions.json", "instructions.json", "synthesize.json", "filter.json", "train.json",
                   "eval.json", "register.json", "guidance_grid.csv", "guidance_grid.png", "clip_scores.png",
                   "world_judge.json", "world_eval.json", "world_eval.png"]:
        assert (project / "reports" / report).is_file(), report
    judge = json.loads((project / "reports" / "world_judge.json").read_text())["filter"]
    assert sorted(judge["by_score"]) == ["sim_0", "sim_1", "sim_dir", "sim_image", "sim_rest"]
    for entry in judge["by_score"].values():  # its lowest threshold keeps all the filter's rows, and top-k cut some
        assert entry["sweep"][0]["kept"] >= judge["kept"]
    evaluation = json.loads((project / "reports" / "eval.json").read_text())
    assert evaluation["num_samples"] >= 1 and -1 <= evaluation["clip_sim_dir"] <= 1
    assert json.loads((project / "reports" / "register.json").read_text())["alias"] == "candidate"

    second = _dvc(project, env, "repro")
    assert _ran(second) == []
    assert all(f"Stage '{s}' didn't change" in second for s in WORLD_STAGES + STAGES)

    subprocess.run(["git", "add", "-A"], cwd=project, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@ip2p.invalid", "commit", "-qm", "repro"],
                   cwd=project, check=True)
    # A filter parameter that changes the kept rows: filter and everything after it rerun, nothing before.
    third = _dvc(project, env, "exp", "run", "-S", "filter.top_k=1")
    assert sorted(_ran(third)) == sorted(["filter", "train", "evaluate", "register", "world_judge", "world_eval"])
    assert yaml.safe_load((project / "params.yaml").read_text())["filter"]["top_k"] == 1
    shown = subprocess.run([str(Path(sys.executable).with_name("dvc")), "metrics", "show", "--json"], cwd=project,
                           env=env, capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr[-2000:]
    metrics = json.loads(shown.stdout)  # stderr warns of the reference pipeline's metrics, never made here
    assert "reports/eval.json" in json.dumps(metrics)


def test_the_main_job_leaves_the_shipped_params_and_lock(tmp_path):
    """scripts/main.sh runs on experiment=mini's params.yaml, and `dvc repro` (core.autostage) stages its
    dvc.lock: the README's `bash scripts/test.sh` after it found both changed (3 tests failed, the
    end-to-end one ran the mini chain and timed out). Its helper restores both files and their index
    entries at exit, success or failure, and gives the next run its own lock back. Checked here on a
    throw-away repository, with the lock write and `git add` standing in for `dvc repro`."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    (repo / ".dvc").mkdir()
    for name in ("scripts/experiment_params.sh", "params.yaml", "dvc.lock", ".dvc/.gitignore"):
        shutil.copy2(REPO / name, repo / name)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@ip2p.invalid"]
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "shipped"], cwd=repo, check=True)
    shipped = {name: (repo / name).read_bytes() for name in ("params.yaml", "dvc.lock")}
    (repo / "job.sh").write_text("""set -euo pipefail
. scripts/experiment_params.sh
use_experiment mini
grep -q "^  name: mini$" params.yaml                      # the experiment's parameters while it runs
if [ "${SECOND:-0}" = 1 ]; then grep -q "^  train:$" dvc.lock; fi   # the last run's stages are back
python -c "
import yaml
lock = yaml.safe_load(open('dvc.lock'))
lock['stages']['train'] = {'cmd': 'ip2p train --params params.yaml'}
yaml.safe_dump(lock, open('dvc.lock', 'w'))"
git add dvc.lock                                          # what DVC's autostage does
exit "${FAIL:-0}"
""")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    for extra, code in (({"FAIL": "3"}, 3), ({"SECOND": "1"}, 0)):
        done = subprocess.run(["bash", "job.sh"], cwd=repo, env={**env, **extra}, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == code, done.stderr
        assert {name: (repo / name).read_bytes() for name in shipped} == shipped
        status = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True).stdout
        assert status.splitlines() == ["?? job.sh"], status
        assert "train:" in (repo / ".dvc" / "tmp" / "experiments" / "mini" / "dvc.lock").read_text()


def _outputs(stage: dict) -> list[str]:
    return [next(iter(o)) if isinstance(o, dict) else o
            for kind in ("outs", "metrics", "plots") for o in stage.get(kind, [])]


def test_reference_pipeline_reads_its_own_params_and_writes_apart(monkeypatch):
    """pipelines/mini_reference (the reference run): its params file is experiment=mini_reference composed;
    every stage runs in the project root on that file and declares only parameters the file has; it writes
    only under artifacts/reference/ and reports/reference/, never what the root pipeline (the main job) writes."""
    for variable in ("IP2P_CACHE", "MLFLOW_TRACKING_URI", "IP2P_RUNS"):
        monkeypatch.delenv(variable, raising=False)
    folder = REPO / "pipelines" / "mini_reference"
    params = yaml.safe_load((folder / "params.yaml").read_text())
    assert params == OmegaConf.to_container(compose(["experiment=mini_reference"]), resolve=True), \
        "stale: run `ip2p params -o pipelines/mini_reference/params.yaml experiment=mini_reference`"
    stages = yaml.safe_load((folder / "dvc.yaml").read_text())["stages"]
    root = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    root_outputs = {path for stage in root.values() for path in _outputs(stage)}
    assert set(stages) == {"captions", "instructions", "synthesize", "filter", "judge", "train", "eval"}
    for name, stage in stages.items():
        assert stage["wdir"] == "../.." and stage["cmd"].endswith(" --params pipelines/mini_reference/params.yaml")
        for entry in stage.get("params", []):
            (file, keys), = entry.items()
            assert file == "pipelines/mini_reference/params.yaml"
            for key in keys:
                node = params
                for part in key.split("."):
                    assert isinstance(node, dict) and part in node, f"{name}: {key} not in the params file"
                    node = node[part]
        for path in _outputs(stage):
            assert path.startswith(("artifacts/reference/", "reports/reference/")) and path not in root_outputs, path
    # where the composed stages write is where the pipeline says they do
    assert params["synthesis"]["out_dir"] == "artifacts/reference/candidates"
    assert params["filter"]["out_dir"] == "artifacts/reference/dataset"
    assert params["train"]["export_dir"] == "artifacts/reference/editor" == params["world"]["eval"]["model"]
    assert params["paths"]["reports"] == "reports/reference"
