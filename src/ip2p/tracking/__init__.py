"""Experiment tracking: loggers (MLflow, W&B), redacted configs, provenance tags; the model registry."""

from ip2p.tracking.loggers import (
    log_artifact,
    log_metrics,
    make_loggers,
    provenance,
    redact,
    run_config,
    start_mlflow_run,
)

__all__ = ["log_artifact", "log_metrics", "make_loggers", "provenance", "redact", "run_config", "start_mlflow_run"]
