"""The MLflow model registry: `ip2p register` logs and registers the trained editor, `ip2p promote`
moves aliases (candidate -> champion; no deprecated stages). `models:/NAME@ALIAS` URIs are resolved
to local folders by ip2p.models.registry_uri, below every stage."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ip2p.config import first_line
from ip2p.errors import Ip2pError
from ip2p.io.atomic import atomic_write_json
from ip2p.io.loggers import ensure_experiment, provenance, quiet_telemetry
from ip2p.models.model_card import card_for_export, render_readme, write_card

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
    # The model card (the editor's own, with the evaluation's numbers) rides beside the pipeline as its own
    # artifact, and its README is the version's description: the pipeline folder itself is not touched.
    card = card_for_export(str(model_dir), [r.eval_report] if metrics else [])
    scratch = Path(tempfile.mkdtemp(prefix="ip2p-card-"))
    card_dir = scratch / "card"      # MLflow keeps an artifact folder's name: artifacts/card/ in the model
    if card is not None:
        write_card(card_dir, card)
    with mlflow.start_run(experiment_id=experiment_id, run_name="register", tags=tags):
        info = mlflow.pyfunc.log_model(
            name="editor",
            python_model=InstructPix2PixModel(),
            artifacts={"pipeline": str(model_dir), **({"card": str(card_dir)} if card is not None else {})},
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
    if card is not None:
        client.update_model_version(r.name, version, description=render_readme(card))
    shutil.rmtree(scratch, ignore_errors=True)
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


