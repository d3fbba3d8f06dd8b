"""Experiment tracking shared by every stage: MLflow (default), Weights & Biases, both, or none.

- `make_loggers(cfg, stage)`: Lightning loggers for the training stage.
- `start_mlflow_run(cfg, stage)`: a context manager for stages that do not use Lightning.
- `log_artifact(path)`, `log_metrics(metrics)`: write into the active MLflow run, if there is one.
- `run_config(cfg)`: the resolved config with secrets redacted and environment values left out.
- `provenance(cfg)`: git commit, DVC data hash, Hydra sweep tags: the tags every run carries.

MLflow keeps runs in `sqlite:///mlflow.db` (relative to the working directory, the project root)
and files in a local artifact folder beside the database; MLFLOW_TRACKING_URI overrides it.
MLflow 3 refuses plain file stores, hence sqlite.

Infrastructure, so it sits in the bottom layer: training, pretraining and the judges log their runs
without importing the register stage's package (ip2p.tracking).
"""

from __future__ import annotations

import contextlib
import logging
import netrc
import os
import re
import subprocess
from pathlib import Path
from typing import Any, Iterator, Mapping
from urllib.parse import urlparse

from omegaconf import DictConfig, OmegaConf

from ip2p.config import first_line
from ip2p.errors import Ip2pError

log = logging.getLogger(__name__)

REDACTED = "***"
# A key is secret when one of its parts (split on _ - .) names a credential: api_key, hf_token,
# client_secret, password... but not max_text_tokens or tokenizer_merges.
SECRET_KEY = re.compile(r"(^|[_\-.])(api_?key|apikey|token|secret|password|passwd|credentials?)([_\-.]|$)", re.I)
ENV_PLACEHOLDER = "<from environment>"
BACKENDS = ("mlflow", "wandb")


def quiet_telemetry() -> None:
    """No usage reporting from MLflow, W&B, Hugging Face or Gradio (users may still opt in by setting these)."""
    for name, value in {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "WANDB_ERROR_REPORTING": "false",
                        "WANDB_DISABLE_CODE": "true", "HF_HUB_DISABLE_TELEMETRY": "1", "DISABLE_TELEMETRY": "1",
                        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "GRADIO_ANALYTICS_ENABLED": "False"}.items():
        os.environ.setdefault(name, value)


# ---------------------------------------------------------------------------------------------------
# Config for logging: secrets redacted, environment values never written
# ---------------------------------------------------------------------------------------------------

def is_secret_key(key: str) -> bool:
    return bool(SECRET_KEY.search(str(key)))


def redact(value: Any) -> Any:
    """Replace the value of every secret-named key (at any depth) by "***"."""
    if isinstance(value, Mapping):
        return {k: (REDACTED if is_secret_key(k) else redact(v)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    return value


def redact_override(override: str) -> str:
    """"train.hf_token=abc" -> "train.hf_token=***" (command-line overrides end up in tags)."""
    key, sep, _ = override.partition("=")
    leaf = key.lstrip("+~").rsplit(".", 1)[-1]
    return f"{key}={REDACTED}" if sep and is_secret_key(leaf) else override


def _mask_env(raw: Any) -> Any:
    """In the unresolved config, every value that reads an environment variable becomes a placeholder,
    so nothing that resolves through it (directly or via other keys) carries the variable's value."""
    if isinstance(raw, dict):
        return {k: _mask_env(v) for k, v in raw.items()}
    if isinstance(raw, list):
        return [_mask_env(v) for v in raw]
    if isinstance(raw, str) and ("oc.env:" in raw or "${env:" in raw):
        return ENV_PLACEHOLDER
    return raw


def run_config(cfg: DictConfig) -> dict:
    """The fully resolved config as plain data, secrets -> "***", environment values -> placeholder."""
    raw = OmegaConf.to_container(cfg, resolve=False)
    masked = OmegaConf.create(_mask_env(raw))
    try:
        resolved = OmegaConf.to_container(masked, resolve=True, throw_on_missing=False)
    except Exception as err:  # an interpolation that only resolves inside Hydra (e.g. ${hydra:...})
        log.debug("config not fully resolvable for logging (%s); logging it unresolved", err)
        resolved = OmegaConf.to_container(masked, resolve=False)
    return redact(resolved)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1e-4}} -> {"train.lr": 1e-4}; lists stay whole (one parameter)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


# ---------------------------------------------------------------------------------------------------
# Provenance: git, DVC, Hydra sweep
# ---------------------------------------------------------------------------------------------------

def git_commit(cwd: str | Path = ".") -> dict[str, str]:
    """{"git_commit": sha, "git_dirty": "true"/"false"} when `cwd` is inside a git work tree, else {}."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return {}
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git_commit": sha.stdout.strip(), "git_dirty": str(bool(status.stdout.strip())).lower()}


def dvc_md5(dvc_file: str | Path) -> str | None:
    """The md5 of the first output recorded in a .dvc file (a folder's hash ends in .dir)."""
    import yaml

    path = Path(dvc_file)
    if not path.is_file():
        return None
    try:
        outs = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("outs") or []
    except (yaml.YAMLError, OSError, UnicodeDecodeError):
        log.warning("cannot read %s: no DVC data hash logged", path)
        return None
    return next((str(o["md5"]) for o in outs if isinstance(o, Mapping) and o.get("md5")), None)


def dvc_lock_md5(lock_file: str | Path, out_path: str | Path) -> str | None:
    """The md5 that dvc.lock records for the output `out_path` of any stage (e.g. artifacts/dataset)."""
    import yaml

    path = Path(lock_file)
    if not path.is_file():
        return None
    try:
        stages = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("stages") or {}
    except (yaml.YAMLError, OSError, UnicodeDecodeError):
        return None
    wanted = Path(out_path).as_posix().rstrip("/")
    for stage in stages.values():
        for out in (stage or {}).get("outs") or []:
            if isinstance(out, Mapping) and Path(str(out.get("path", ""))).as_posix().rstrip("/") == wanted:
                return str(out.get("md5")) if out.get("md5") else None
    return None


def hydra_tags() -> dict[str, str]:
    """Under `-m` (multirun): the sweep folder (one tag shared by every job of the sweep) and job number."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
    except ImportError:
        return {}
    if not HydraConfig.initialized():
        return {}
    hc = HydraConfig.get()
    tags = {"hydra_job_name": str(hc.job.name)}
    if hc.mode == RunMode.MULTIRUN:
        tags["sweep"] = str(hc.sweep.dir)
        tags["sweep_job"] = str(hc.job.num)
        tags["sweep_overrides"] = ",".join(redact_override(o) for o in hc.overrides.task)
    return tags


def provenance(cfg: DictConfig, stage: str) -> dict[str, str]:
    """Tags every run carries: stage, git commit, DVC hash of the raw data and of the dataset, Hydra sweep."""
    tags = {"stage": stage, **git_commit(), **hydra_tags(), **process_tags()}
    if tags.get("git_commit"):
        tags["mlflow.source.git.commit"] = tags["git_commit"]
    data_md5 = dvc_md5(f"{cfg.paths.data}.dvc")
    if data_md5:
        tags["dvc_data_md5"] = data_md5
    dataset_md5 = dvc_lock_md5("dvc.lock", Path(cfg.paths.artifacts) / "dataset")
    if dataset_md5:
        tags["dvc_dataset_md5"] = dataset_md5
    return tags


# ---------------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------------

def backends(cfg: DictConfig) -> list[str]:
    chosen = [str(b) for b in (cfg.get("logger") or {}).get("backends") or []]
    unknown = [b for b in chosen if b not in BACKENDS]
    if unknown:
        raise Ip2pError(f"unknown logger backend {unknown}: use logger=mlflow, wandb, both or none")
    return chosen


def mlflow_tracking_uri(cfg: DictConfig) -> str:
    """The configured URI (MLFLOW_TRACKING_URI when set, see conf/logger/mlflow.yaml); a relative
    sqlite path is made absolute against the working directory, so DDP children and later stages agree."""
    uri = str(cfg.logger.mlflow.tracking_uri)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).expanduser().resolve())
    elif "://" not in uri:  # a bare folder: MLflow 3 has no file store; keep a sqlite db inside it
        folder = Path(uri).expanduser().resolve()
        uri = "sqlite:///" + str(folder / "mlflow.db")
    return uri


def mlflow_artifact_location(cfg: DictConfig, tracking_uri: str) -> str | None:
    """Where a new experiment keeps its files: the configured folder, or mlartifacts/ beside a sqlite db.
    None for remote servers (they manage their own artifact store)."""
    configured = cfg.logger.mlflow.get("artifact_location")
    if configured:
        text = str(configured)
        return text if "://" in text else Path(text).expanduser().resolve().as_uri()
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):])
        return (db.parent / "mlartifacts").as_uri()
    return None


def _ensure_sqlite_folder(uri: str) -> None:
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)


def process_tags() -> dict[str, str]:
    """Which process owns a run: a run still RUNNING whose process is gone was killed (close_orphaned_runs)."""
    import socket

    return {"ip2p.host": socket.gethostname(), "ip2p.pid": str(os.getpid())}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def close_orphaned_runs(client, experiment_id: str) -> list[str]:
    """Runs of this host left RUNNING by a process that no longer exists (a kill -9, a lost node) are
    marked FAILED, so the tracking UI does not show them running forever. Returns their ids."""
    import socket

    host = socket.gethostname().replace("'", "")
    closed = []
    for run in client.search_runs([experiment_id], filter_string=f"attributes.status = 'RUNNING' and tags.`ip2p.host` = '{host}'",
                                  max_results=1000):
        pid = run.data.tags.get("ip2p.pid", "")
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            client.set_tag(run.info.run_id, "ip2p.closed", f"process {pid} was gone: killed")
            client.set_terminated(run.info.run_id, status="FAILED")
            closed.append(run.info.run_id)
    if closed:
        log.info("marked %d run(s) of killed processes FAILED", len(closed))
    return closed


def ensure_experiment(cfg: DictConfig) -> tuple[str, str]:
    """(tracking_uri, experiment_id): the experiment is created with our artifact location if new."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = mlflow_tracking_uri(cfg)
    _ensure_sqlite_folder(uri)
    client = MlflowClient(uri)
    name = str(cfg.logger.experiment)
    try:
        found = client.get_experiment_by_name(name)
        if found is not None:
            close_orphaned_runs(client, found.experiment_id)
            return uri, found.experiment_id
        return uri, client.create_experiment(name, artifact_location=mlflow_artifact_location(cfg, uri))
    except mlflow.exceptions.MlflowException as err:
        # Two processes may create the experiment at once: the loser reads the winner's.
        found = client.get_experiment_by_name(name)
        if found is not None:
            return uri, found.experiment_id
        raise Ip2pError(f"cannot open MLflow experiment '{name}' at {uri}: {first_line(err)}") from err


def wandb_logged_in() -> bool:
    """An API key in the environment or a stored login (netrc entry for the W&B host)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode(cfg: DictConfig) -> str:
    """WANDB_MODE wins (tests set `disabled`); else the configured mode; `auto` = online only when logged in."""
    env = os.environ.get("WANDB_MODE")
    if env:
        return env
    mode = str(cfg.logger.wandb.get("mode") or "auto")
    if mode == "auto":
        return "online" if wandb_logged_in() else "offline"
    return mode


def run_name(cfg: DictConfig, stage: str) -> str:
    configured = cfg.logger.get("run_name")
    if configured:
        return str(configured)
    tags = hydra_tags()
    return f"{stage}-{tags['sweep_job']}" if "sweep_job" in tags else stage


def output_dir(cfg: DictConfig) -> Path:
    """The Hydra run (or sweep job) folder; outside Hydra, <artifacts>/runs."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            return Path(HydraConfig.get().runtime.output_dir)
    except ImportError:
        pass
    return Path(cfg.paths.artifacts) / "runs"


def global_rank() -> int:
    """This process's rank as the launcher announced it (RANK, LOCAL_RANK, SLURM_PROCID...); 0 alone."""
    from lightning_fabric.utilities.rank_zero import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0) or 0)


def make_loggers(cfg: DictConfig, stage_name: str) -> list:
    """Lightning loggers for `cfg.logger.backends`, on global rank 0 only (other ranks get none: they
    never log, and must not open the tracking database at the same time).
    Call `log_run_metadata` (the training stage does) to record config and provenance."""
    quiet_telemetry()
    chosen = backends(cfg)
    if global_rank() != 0:
        return []
    tags = provenance(cfg, stage_name)
    name = run_name(cfg, stage_name)
    loggers = []
    if "mlflow" in chosen:
        from pytorch_lightning.loggers import MLFlowLogger

        uri, _ = ensure_experiment(cfg)
        loggers.append(MLFlowLogger(experiment_name=str(cfg.logger.experiment), run_name=name, tracking_uri=uri,
                                    tags=tags, artifact_location=mlflow_artifact_location(cfg, uri),
                                    log_model=False))
    if "wandb" in chosen:
        from pytorch_lightning.loggers import WandbLogger

        w = cfg.logger.wandb
        save_dir = Path(w.get("dir") or output_dir(cfg))
        save_dir.mkdir(parents=True, exist_ok=True)
        loggers.append(WandbLogger(project=str(w.project), entity=w.get("entity"), name=name,
                                   group=tags.get("sweep"), job_type=stage_name, save_dir=str(save_dir),
                                   mode=wandb_mode(cfg), tags=[stage_name], log_model=False))
    return loggers


def log_run_metadata(loggers: list, cfg: DictConfig, extra_params: Mapping[str, Any] | None = None,
                     stage_name: str | None = None) -> None:
    """Log the redacted config as parameters (plus `extra_params`, e.g. rows per split) on every logger.
    Call on global rank 0 only."""
    params = flatten(run_config(cfg))
    params.update(flatten(dict(extra_params or {})))
    for logger in loggers:
        logger.log_hyperparams(params)
        if type(logger).__name__ == "WandbLogger":
            tags = provenance(cfg, stage_name or "run")
            logger.experiment.config.update({f"provenance/{k}": v for k, v in tags.items()}, allow_val_change=True)


def log_image_file(loggers: list, path: str | Path, step: int, key: str = "samples") -> None:
    """A PNG already on disk -> an MLflow artifact under `key/`, and a W&B image at `step`."""
    path = Path(path)
    for logger in loggers:
        kind = type(logger).__name__
        if kind == "MLFlowLogger":
            logger.experiment.log_artifact(logger.run_id, str(path), artifact_path=key)
        elif kind == "WandbLogger":
            logger.log_image(key=key, images=[str(path)], step=step)


def log_file(loggers: list, path: str | Path, artifact_path: str | None = None) -> None:
    """Any file (report, CSV, config) as an artifact of each logger's run."""
    path = Path(path)
    for logger in loggers:
        kind = type(logger).__name__
        if kind == "MLFlowLogger":
            logger.experiment.log_artifact(logger.run_id, str(path), artifact_path=artifact_path)
        elif kind == "WandbLogger":
            logger.experiment.save(str(path), base_path=str(path.parent), policy="now")


# ---------------------------------------------------------------------------------------------------
# Stages without Lightning
# ---------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def start_mlflow_run(cfg: DictConfig, stage_name: str, extra_params: Mapping[str, Any] | None = None) -> Iterator:
    """`with start_mlflow_run(cfg, "evaluate") as run:` an active MLflow run with the redacted config as
    parameters and the provenance tags; `run` is None when MLflow is not among the backends.
    A failing body marks the run FAILED and re-raises."""
    if "mlflow" not in backends(cfg):
        yield None
        return
    quiet_telemetry()
    import mlflow

    uri, experiment_id = ensure_experiment(cfg)
    mlflow.set_tracking_uri(uri)
    params = flatten(run_config(cfg))
    params.update(flatten(dict(extra_params or {})))
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name(cfg, stage_name),
                          tags=provenance(cfg, stage_name)) as run:
        items = [(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 parameters per call
            mlflow.log_params(dict(items[i:i + 100]))
        yield run


def log_artifact(path: str | Path, artifact_path: str | None = None) -> bool:
    """Attach a file to the active MLflow run; False (and nothing done) when no run is active."""
    import mlflow

    if mlflow.active_run() is None:
        return False
    mlflow.log_artifact(str(path), artifact_path=artifact_path)
    return True


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> bool:
    import mlflow

    if mlflow.active_run() is None:
        return False
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)
    return True


def close_loggers(loggers: list) -> None:
    """End W&B runs explicitly (each job of a sweep must get its own run); MLflow runs are ended by Lightning."""
    for logger in loggers:
        if type(logger).__name__ == "WandbLogger" and getattr(logger, "_experiment", None) is not None:
            logger.experiment.finish()
