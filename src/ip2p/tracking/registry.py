"""The MLflow model registry: `ip2p register` logs and registers the trained editor, `ip2p promote`
moves aliases (candidate -> champion; no deprecated stages), and `models:/NAME@ALIAS` URIs resolve
to a local diffusers folder for `ip2p edit --model`."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ip2p.config import first_line
from ip2p.errors import Ip2pError
from ip2p.io.atomic import atomic_write_json, build_once
from ip2p.tracking.loggers import ensure_experiment, provenance, quiet_telemetry

log = logging.getLogger(__name__)


def run_register(cfg: DictConfig) -> dict[str, Any]:
    import mlflow

    from ip2p.tracking.pyfunc_model import InstructPix2PixModel, image_to_b64, signature

    r = cfg.register
    model_dir = Path(r.model_dir)
    if not (model_dir / "model_index.json").is_file():
        raise Ip2pError(f"no exported editor in '{model_dir}' (expected the diffusers folder `ip2p train` writes)")
    quiet_telemetry()
    tracking_uri, experiment_id = ensure_experiment(cfg)
    mlflow.set_tracking_uri(tracking_uri)

    from PIL import Image

    # MLflow runs the example once through the served model when logging it: one step keeps that cheap.
    example = {"image": [image_to_b64(Image.new("RGB", (64, 64), (120, 160, 200)))],
               "instruction": ["make it snowy"], "steps": [1]}
    metrics = json.loads(Path(r.eval_report).read_text()) if Path(r.eval_report).is_file() else {}
    tags = provenance(cfg, "register")
    with mlflow.start_run(experiment_id=experiment_id, run_name="register", tags=tags):
        info = mlflow.pyfunc.log_model(
            name="editor",
            python_model=InstructPix2PixModel(),
            artifacts={"pipeline": str(model_dir)},
            signature=signature(),
            input_example=example,
            model_config=OmegaConf.to_container(r.serve, resolve=True),
            pip_requirements=["ip2p", "torch", "diffusers", "transformers", "pillow", "pandas"],
            registered_model_name=r.name,
        )
        mlflow.log_metrics({f"eval.{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
    version = str(info.registered_model_version)
    client = mlflow.MlflowClient()
    version_tags = {**{f"eval.{k}": v for k, v in metrics.items()},
                    **{k: tags[k] for k in ("git_commit", "git_dirty", "dvc_data_md5", "dvc_dataset_md5") if k in tags}}
    for key, value in version_tags.items():
        client.set_model_version_tag(r.name, version, key, str(value))
    client.set_registered_model_alias(r.name, r.alias, version)
    # No run id or time stamp here: the record is a DVC output and must not change when nothing did.
    record = {"name": r.name, "version": int(version), "alias": r.alias, "model_uri": f"models:/{r.name}@{r.alias}"}
    atomic_write_json(r.record, record)
    log.info("registered %s version %s with alias %s", r.name, version, r.alias)
    print(f"registered models:/{r.name}/{version} (alias {r.alias})")
    return record


def promote(tracking_uri: str, name: str, alias: str, version: str | None = None, from_alias: str = "candidate") -> str:
    """Point `alias` at `version` (or at the version `from_alias` points to). Returns the version."""
    import mlflow
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient()
    try:
        if version is None:
            version = str(client.get_model_version_by_alias(name, from_alias).version)
        else:
            client.get_model_version(name, str(version))
        client.set_registered_model_alias(name, alias, str(version))
        client.set_model_version_tag(name, str(version), f"alias.{alias}", "set by ip2p promote")
    except MlflowException as err:
        raise Ip2pError(f"cannot promote {name}: {first_line(err)}") from err
    return str(version)


def resolve_model_uri(uri: str, cache_dir: str | Path, tracking_uri: str | None = None) -> str:
    """models:/NAME@ALIAS or models:/NAME/VERSION -> local diffusers folder (downloaded once per version)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"))
    client = mlflow.MlflowClient()
    ref = uri[len("models:/"):]
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            mv = client.get_model_version_by_alias(name, alias)
        else:
            name, version = ref.rsplit("/", 1)
            mv = client.get_model_version(name, version)
    except (MlflowException, ValueError) as err:
        raise Ip2pError(f"cannot resolve '{uri}' in the registry at {mlflow.get_tracking_uri()}: {first_line(err)}") from err
    target = build_once(Path(cache_dir).expanduser() / "registry" / mv.name / f"v{mv.version}",
                        lambda folder: mlflow.artifacts.download_artifacts(
                            artifact_uri=f"models:/{mv.name}/{mv.version}", dst_path=str(folder)))
    return str(_pipeline_folder(target, uri))


def _pipeline_folder(model_dir: Path, uri: str) -> Path:
    """The `pipeline` artifact of a logged ip2p pyfunc model, as MLmodel records it."""
    import yaml

    try:
        mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text())
        relative = mlmodel["flavors"]["python_function"]["artifacts"]["pipeline"]["path"]
    except (OSError, KeyError, TypeError) as err:
        raise Ip2pError(f"'{uri}' is not an ip2p editor model (no `pipeline` artifact in its MLmodel)") from err
    return model_dir / relative
