"""`models:/NAME@ALIAS` and `models:/NAME/VERSION`: registered editors resolved to a local diffusers
folder, so that every loader takes a registry URI wherever it takes a folder (`ip2p edit --model`)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ip2p.config import first_line
from ip2p.errors import Ip2pError
from ip2p.io.atomic import build_once


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
    target = build_once(Path(cache_dir).expanduser() / "registry" / mv.name / _version_key(mv),
                        lambda folder: mlflow.artifacts.download_artifacts(
                            artifact_uri=f"models:/{mv.name}/{mv.version}", dst_path=str(folder)))
    return str(_pipeline_folder(target, uri))


def _version_key(mv) -> str:
    """The cache folder of one registered version. Every registry numbers its versions from 1 (each clone's
    sqlite store, each test's), so the number alone would hand one registry's download to another: the
    version's source (MLflow 3: its logged model's unique id) and creation time tell them apart."""
    digest = hashlib.sha256(f"{mv.source}|{mv.run_id}|{mv.creation_timestamp}".encode()).hexdigest()[:12]
    return f"v{mv.version}-{digest}"


def _pipeline_folder(model_dir: Path, uri: str) -> Path:
    """The `pipeline` artifact of a logged ip2p pyfunc model, as MLmodel records it."""
    import yaml

    try:
        mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text())
        relative = mlmodel["flavors"]["python_function"]["artifacts"]["pipeline"]["path"]
    except (OSError, KeyError, TypeError) as err:
        raise Ip2pError(f"'{uri}' is not an ip2p editor model (no `pipeline` artifact in its MLmodel)") from err
    return model_dir / relative
