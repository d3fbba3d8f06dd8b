"""Experiment tracking: redaction, provenance, W&B mode, a real sqlite MLflow store for a training run,
the non-Lightning run helper, and a Hydra sweep grouped by one tag."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from test_training import compose_train, tiny_overrides, write_parquet_dataset

SECRET = "sk-THIS-MUST-NOT-LEAK-42"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_parquet_dataset(tmp_path_factory.mktemp("dataset"))


def _all_strings(tree) -> list[str]:
    if isinstance(tree, dict):
        return [s for v in tree.values() for s in _all_strings(v)] + [str(k) for k in tree]
    if isinstance(tree, list):
        return [s for v in tree for s in _all_strings(v)]
    return [str(tree)]


def test_redact_secret_keys_at_any_depth_only():
    from ip2p.io.loggers import redact, redact_override

    tree = {"api_key": "a", "llm": {"openai_api_key": "b", "hf-token": "c", "client_secret": "d",
                                    "password": "e", "max_text_tokens": 77, "tokenizer_merges": 400},
            "list": [{"token": "f"}, 3], "name": "ok"}
    out = redact(tree)
    assert out["api_key"] == out["llm"]["openai_api_key"] == out["llm"]["hf-token"] == "***"
    assert out["llm"]["client_secret"] == out["llm"]["password"] == out["list"][0]["token"] == "***"
    assert out["llm"]["max_text_tokens"] == 77 and out["llm"]["tokenizer_merges"] == 400
    assert out["name"] == "ok" and out["list"][1] == 3
    assert redact_override("+train.hf_token=abc") == "+train.hf_token=***"
    assert redact_override("train.lr=1e-4") == "train.lr=1e-4"


def test_run_config_leaves_out_environment_values(cfg, monkeypatch, tmp_path):
    from ip2p.config import compose
    from ip2p.io.loggers import ENV_PLACEHOLDER, flatten, run_config

    secret_path = tmp_path / "private-SENSITIVE-location" / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{secret_path}")
    composed = compose([f"paths.cache={cfg.paths.cache}", f"+train.hf_token={SECRET}"])
    assert composed.logger.mlflow.tracking_uri.endswith("SENSITIVE-location/mlflow.db")  # it is in the config...
    logged = run_config(composed)
    text = json.dumps(logged)
    assert "SENSITIVE" not in text and SECRET not in text  # ...but never in what is logged
    flat = flatten(logged)
    assert flat["logger.mlflow.tracking_uri"] == ENV_PLACEHOLDER
    assert flat["train.hf_token"] == "***"
    assert flat["train.lr"] == 1e-4 and flat["model.name"] == "tiny"
    assert flat["train.data.dir"] == f"{composed.paths.artifacts}/dataset"  # other interpolations resolved


def test_provenance_reads_git_commit_and_dvc_hashes(cfg, tmp_path, monkeypatch):
    from ip2p.io.loggers import provenance

    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=repo, check=True)
    (repo / "README").write_text("x\n")
    subprocess.run([*git, "add", "README"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "init"], cwd=repo, check=True)
    head = (repo / ".git" / "refs" / "heads" / "main").read_text().strip()
    (repo / "data.dvc").write_text("outs:\n- md5: 0123456789abcdef0123456789abcdef.dir\n  size: 10\n  path: data\n")
    (repo / "dvc.lock").write_text("schema: '2.0'\nstages:\n  filter:\n    cmd: ip2p filter\n    outs:\n"
                                   "    - path: artifacts/dataset\n      md5: fedcba9876543210fedcba9876543210.dir\n")
    monkeypatch.chdir(repo)
    local = OmegaConf.merge(cfg, {"paths": {"data": "data", "artifacts": "artifacts"}})
    tags = provenance(local, "train")
    assert tags["git_commit"] == head and tags["mlflow.source.git.commit"] == head
    assert tags["git_dirty"] == "false"
    assert tags["dvc_data_md5"] == "0123456789abcdef0123456789abcdef.dir"
    assert tags["dvc_dataset_md5"] == "fedcba9876543210fedcba9876543210.dir"
    assert tags["stage"] == "train" and "sweep" not in tags  # not a Hydra sweep
    (repo / "README").write_text("changed\n")
    assert provenance(local, "train")["git_dirty"] == "true"


def test_wandb_is_offline_unless_logged_in(cfg, monkeypatch, tmp_path):
    from ip2p.io.loggers import wandb_mode

    netrc = tmp_path / "netrc"
    netrc.write_text("")
    monkeypatch.setenv("NETRC", str(netrc))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert wandb_mode(cfg) == "offline"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    assert wandb_mode(cfg) == "online"
    netrc.write_text("")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode(cfg) == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")  # the environment wins (as in these tests)
    assert wandb_mode(cfg) == "disabled"


def test_make_loggers_picks_backends(cfg, tmp_path, monkeypatch):
    from ip2p.config import compose
    from ip2p.io.loggers import make_loggers

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'm.db'}")
    kinds = {name: [type(x).__name__ for x in make_loggers(compose([f"logger={name}",
                                                                     f"paths.artifacts={tmp_path}"]), "train")]
             for name in ("mlflow", "wandb", "both", "none")}
    assert kinds == {"mlflow": ["MLFlowLogger"], "wandb": ["WandbLogger"],
                     "both": ["MLFlowLogger", "WandbLogger"], "none": []}


def test_training_run_in_sqlite_mlflow(dataset, cache_dir, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from ip2p.training.run import run

    db = tmp_path / "tracking" / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    cfg = compose_train(tmp_path, dataset, cache_dir, **{
        "logger": "mlflow", "+train.hf_token": SECRET, "train.max_steps": 2, "train.log_every_n_steps": 1,
        "train.validation.every_n_steps": 1, "train.checkpoint.every_n_steps": 1, "train.export.enabled": "false"})
    run(cfg)

    client = MlflowClient(f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("ip2p")
    assert experiment.artifact_location == (db.parent / "mlartifacts").as_uri()
    (mlflow_run,) = client.search_runs([experiment.experiment_id])
    assert mlflow_run.info.status == "FINISHED"
    params = mlflow_run.data.params
    assert params["train.lr"] == "0.0001" and params["train.max_steps"] == "2"
    assert params["train.hf_token"] == "***"
    assert params["logger.mlflow.tracking_uri"] == "<from environment>"
    assert not any(SECRET in v or str(db) in v for v in params.values())
    assert params["data.rows.train"] == "8" and params["data.rows.val"] == "4" and params["data.pairs.train"] == "8"
    assert mlflow_run.data.tags["stage"] == "train"
    losses = client.get_metric_history(mlflow_run.info.run_id, "train/loss")
    assert [m.step for m in losses] == [0, 1] and all(torch.isfinite(torch.tensor(m.value)) for m in losses)
    assert len(client.get_metric_history(mlflow_run.info.run_id, "val/loss")) == 2
    samples = [a.path for a in client.list_artifacts(mlflow_run.info.run_id, "samples")]
    assert samples == ["samples/step-00000001.png", "samples/step-00000002.png"]
    reports = {a.path for a in client.list_artifacts(mlflow_run.info.run_id, "reports")}
    assert reports == {"reports/train.json", "reports/train_loss.csv"}
    stored = db.parent / "mlartifacts" / mlflow_run.info.run_id / "artifacts" / "samples" / "step-00000002.png"
    assert stored.read_bytes() == (tmp_path / "run" / "samples" / "step-00000002.png").read_bytes()


def test_start_mlflow_run_for_stages_without_lightning(cfg, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from ip2p.config import compose
    from ip2p.io.loggers import log_artifact, log_metrics, start_mlflow_run

    db = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    stage_cfg = compose([f"paths.cache={cfg.paths.cache}", "logger.experiment=eval-test",
                         f"+evaluate_llm.api_key={SECRET}"])
    report = tmp_path / "eval.json"
    report.write_text('{"clip_dir": 0.2}')
    with start_mlflow_run(stage_cfg, "evaluate", {"rows": {"test": 5}}) as active:
        assert active is not None
        assert log_artifact(report, "reports") and log_metrics({"clip_dir": 0.2}, step=0)
    with pytest.raises(RuntimeError):
        with start_mlflow_run(stage_cfg, "evaluate"):
            raise RuntimeError("boom")

    client = MlflowClient(f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("eval-test").experiment_id], order_by=["start_time"])
    assert [r.info.status for r in runs] == ["FINISHED", "FAILED"]
    first = runs[0]
    assert first.data.params["rows.test"] == "5" and first.data.params["evaluate_llm.api_key"] == "***"
    assert first.data.metrics["clip_dir"] == pytest.approx(0.2)
    assert [a.path for a in client.list_artifacts(first.info.run_id, "reports")] == ["reports/eval.json"]
    assert not log_artifact(report)  # no active run: nothing logged, no error

    with start_mlflow_run(compose(["logger=none"]), "evaluate") as nothing:
        assert nothing is None


def test_runs_of_killed_processes_are_closed_as_failed(cfg, tmp_path, monkeypatch):
    """A run left RUNNING by a process that is gone (kill -9) is marked FAILED by the next stage that
    opens the experiment; a live process's run and another host's run are left alone."""
    import socket
    import sys

    from mlflow.tracking import MlflowClient

    from ip2p.config import compose
    from ip2p.io.loggers import start_mlflow_run

    db = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    stage_cfg = compose([f"paths.cache={cfg.paths.cache}", "logger.experiment=orphans"])
    with start_mlflow_run(stage_cfg, "synthesize") as first:
        tags = first.data.tags
        assert tags["ip2p.host"] == socket.gethostname() and tags["ip2p.pid"] == str(os.getpid())
    client = MlflowClient(f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("orphans").experiment_id
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()                 # a pid that has exited
    host = socket.gethostname()
    killed = client.create_run(experiment, tags={"ip2p.host": host, "ip2p.pid": gone}).info.run_id
    alive = client.create_run(experiment, tags={"ip2p.host": host, "ip2p.pid": str(os.getpid())}).info.run_id
    elsewhere = client.create_run(experiment, tags={"ip2p.host": "another-node", "ip2p.pid": gone}).info.run_id
    with start_mlflow_run(stage_cfg, "filter"):
        pass
    status = {r: client.get_run(r).info.status for r in (killed, alive, elsewhere)}
    assert status == {killed: "FAILED", alive: "RUNNING", elsewhere: "RUNNING"}
    assert "killed" in client.get_run(killed).data.tags["ip2p.closed"]


@pytest.mark.slow
def test_sweep_gives_one_mlflow_run_per_job_with_a_shared_tag(dataset, cache_dir, tmp_path):
    from mlflow.tracking import MlflowClient

    db = tmp_path / "mlflow.db"
    sweep_dir = tmp_path / "sweep"
    overrides = [o for o in tiny_overrides(tmp_path, dataset, cache_dir, **{
        "train.max_steps": 2, "train.validation.every_n_steps": 2, "train.checkpoint.every_n_steps": 2,
        "logger": "mlflow"}) if not o.startswith("train.output_dir=")]  # sweep jobs use their own folders
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{db}", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
           "IP2P_CACHE": str(cache_dir)}
    result = subprocess.run([sys.executable, "-m", "ip2p.cli", "train", "-m", "train.lr=1e-4,5e-5", *overrides,
                             f"hydra.sweep.dir={sweep_dir}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    client = MlflowClient(f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("ip2p").experiment_id])
    assert len(runs) == 2
    assert {r.data.tags["sweep"] for r in runs} == {str(sweep_dir)}
    assert {r.data.tags["sweep_job"] for r in runs} == {"0", "1"}
    assert {r.data.params["train.lr"] for r in runs} == {"0.0001", "5e-05"}
    for job in ("0", "1"):  # each job keeps its own checkpoints, model and report
        folder = sweep_dir / job
        assert (folder / "checkpoints" / "last.ckpt").is_file()
        assert (folder / "model" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
        assert json.loads((folder / "reports" / "train.json").read_text())["steps"] == 2
    assert not (tmp_path / "artifacts" / "model").exists()  # nothing written to the single-run location
