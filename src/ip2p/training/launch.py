"""How `ip2p train` is launched: Lightning strategy and cluster environment from conf/trainer/, devices
and nodes, the trainer itself, and the re-launch of DDP ranks.

Multi-process runs. With trainer=ddp on one machine, Lightning starts ranks 1..N-1 by re-running the
command line of rank 0 with Hydra's run folder and `hydra.output_subdir=null` appended. Our CLI's
argv (`ip2p-train <overrides>`, possibly with -m and sweep lists) cannot be re-run as is, so before
fitting we rewrite sys.argv to `ip2p train <this job's overrides> <resolved output paths>`: every rank
then trains the same job and agrees on where checkpoints and the model go. torchrun and srun start all
processes themselves (trainer=multinode_torchrun / slurm); each runs `ip2p train` directly.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ip2p.errors import Ip2pError
from ip2p.io.checkpoints import atomic_checkpoint_io

STAGE = "train"
# Environment variables Lightning's DDP launcher sets in rank 0's own process.
LAUNCHER_ENV = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _hydra():
    try:
        from hydra.core.hydra_config import HydraConfig
    except ImportError:
        return None
    return HydraConfig.get() if HydraConfig.initialized() else None


def _diffusers_class(name: str):
    import importlib

    for module in ("diffusers.models.attention", "diffusers.models.resnet",
                   "diffusers.models.transformers.transformer_2d", "diffusers.models.unets.unet_2d_blocks"):
        cls = getattr(importlib.import_module(module), name, None)
        if cls is not None:
            return cls
    raise Ip2pError(f"unknown block class '{name}' in trainer.strategy (a diffusers module class name)")


def build_strategy(trainer_cfg: DictConfig):
    """"auto" / "ddp" / ... as Lightning names them, or a mapping {name: ddp|fsdp|deepspeed, options...}."""
    spec = trainer_cfg.strategy
    if isinstance(spec, str) or spec is None:
        return spec or "auto"
    options = OmegaConf.to_container(spec, resolve=True)
    name = options.pop("name")
    if name in ("fsdp", "deepspeed") and str(trainer_cfg.accelerator) == "cpu":
        raise Ip2pError(f"trainer.strategy {name} needs GPUs: set trainer.accelerator=gpu (or use trainer=ddp on CPUs)")
    if name == "ddp":
        from pytorch_lightning.strategies import DDPStrategy

        return DDPStrategy(**options)
    if name == "fsdp":
        from pytorch_lightning.strategies import FSDPStrategy

        for key in ("auto_wrap_policy", "activation_checkpointing_policy"):
            if options.get(key):
                options[key] = {_diffusers_class(n) for n in options[key]}
            else:
                options.pop(key, None)
        return FSDPStrategy(**options)
    if name == "deepspeed":
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise Ip2pError("trainer=deepspeed needs the deepspeed package (pip install deepspeed)")
        from pytorch_lightning.strategies import DeepSpeedStrategy

        return DeepSpeedStrategy(**options)
    raise Ip2pError(f"unknown trainer.strategy.name '{name}' (ddp, fsdp or deepspeed)")


def _leading_int(text: str | None) -> int | None:
    digits = "".join(ch for ch in str(text or "").split("(")[0] if ch.isdigit())
    return int(digits) if digits else None


def devices_and_nodes(trainer_cfg: DictConfig) -> tuple[Any, int]:
    """`auto` devices/nodes from the launcher's environment (torchrun or SLURM), else Lightning's auto / 1."""
    env = os.environ
    devices, nodes = trainer_cfg.devices, trainer_cfg.num_nodes
    cluster = str(trainer_cfg.get("cluster_environment", "auto"))
    if devices == "auto":
        if cluster == "torchelastic" and env.get("LOCAL_WORLD_SIZE"):
            devices = int(env["LOCAL_WORLD_SIZE"])
        elif cluster == "slurm" and _leading_int(env.get("SLURM_NTASKS_PER_NODE")):
            devices = _leading_int(env.get("SLURM_NTASKS_PER_NODE"))
    if nodes == "auto":
        if cluster == "torchelastic" and env.get("WORLD_SIZE") and env.get("LOCAL_WORLD_SIZE"):
            nodes = int(env["WORLD_SIZE"]) // int(env["LOCAL_WORLD_SIZE"])
        elif cluster == "slurm":
            nodes = _leading_int(env.get("SLURM_NNODES") or env.get("SLURM_JOB_NUM_NODES")) or 1
        else:
            nodes = 1
    return devices, int(nodes)


def cluster_plugins(trainer_cfg: DictConfig) -> list:
    cluster = str(trainer_cfg.get("cluster_environment", "auto"))
    if cluster == "auto":
        return []
    from lightning_fabric.plugins.environments import (LightningEnvironment, SLURMEnvironment,
                                                       TorchElasticEnvironment)

    if cluster == "slurm":
        requeue = signal.Signals[str(trainer_cfg.get("slurm_requeue_signal", "SIGUSR1"))]
        return [SLURMEnvironment(auto_requeue=bool(trainer_cfg.get("slurm_auto_requeue", True)),
                                 requeue_signal=requeue)]
    if cluster == "torchelastic":
        return [TorchElasticEnvironment()]
    if cluster == "lightning":
        return [LightningEnvironment()]
    raise Ip2pError(f"unknown trainer.cluster_environment '{cluster}' (auto, lightning, slurm, torchelastic)")


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _quote(value: str | None) -> str:
    return "null" if value is None else "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def prepare_ddp_relaunch(pinned: dict[str, str | None]) -> None:
    """Make sys.argv a command Lightning's subprocess launcher can re-run for ranks 1..N-1 (see module doc)."""
    hc = _hydra()
    if hc is None or "LOCAL_RANK" in os.environ:
        return
    from omegaconf import read_write

    task = [o for o in hc.overrides.task if _override_key(o) not in pinned]
    script = shutil.which("ip2p") or str(Path(sys.executable).parent / "ip2p")
    if not Path(script).exists():  # no console script: the CLI module's file (found, not imported)
        import importlib.util

        script = importlib.util.find_spec("ip2p.cli").origin
    argv = [script, STAGE, *task, *(f"{k}={_quote(v)}" for k, v in pinned.items())]
    # Children log to <run folder>/<job>_rank<LOCAL_RANK>.log instead of appending to rank 0's log.
    if OmegaConf.select(hc, "job_logging.handlers.file.filename") is not None:
        argv.append("hydra.job_logging.handlers.file.filename="
                    "'${hydra.runtime.output_dir}/${hydra.job.name}_rank${oc.env:LOCAL_RANK,0}.log'")
    sys.argv = argv
    # Lightning passes hydra.run.dir to the children; in a sweep job that must be the job's folder.
    if hc.run.dir != hc.runtime.output_dir:
        with read_write(hc.run):
            hc.run.dir = hc.runtime.output_dir


def build_trainer(cfg: DictConfig, paths, loggers: list, callbacks: list):
    """The Lightning Trainer of conf/train and conf/trainer; `paths` is the run's RunPaths."""
    import pytorch_lightning as pl

    t, tr = cfg.train, cfg.trainer
    devices, num_nodes = devices_and_nodes(tr)
    strategy = build_strategy(tr)
    plugins = cluster_plugins(tr)
    if isinstance(strategy, str) or type(strategy).__name__ == "DDPStrategy":  # FSDP/DeepSpeed save shards their way
        plugins.append(atomic_checkpoint_io())
    accumulate = int(t.accumulate_grad_batches)
    max_val = t.validation.max_batches
    return pl.Trainer(
        accelerator=str(tr.accelerator), devices=devices, num_nodes=num_nodes, strategy=strategy,
        precision=str(tr.precision), plugins=plugins or None,
        max_steps=int(t.max_steps), max_epochs=-1, accumulate_grad_batches=accumulate,
        gradient_clip_val=None if t.gradient_clip_val is None else float(t.gradient_clip_val),
        # Validation counts micro-batches: every N optimizer steps is every N x accumulate batches.
        val_check_interval=int(t.validation.every_n_steps) * accumulate, check_val_every_n_epoch=None,
        limit_val_batches=1.0 if max_val is None else int(max_val), num_sanity_val_steps=0,
        log_every_n_steps=int(t.log_every_n_steps), enable_progress_bar=bool(cfg.progress),
        enable_model_summary=bool(tr.get("enable_model_summary", False)), deterministic=bool(tr.deterministic),
        use_distributed_sampler=False,  # our samplers shard by rank and resume by step themselves
        # tqdm, not Lightning's default Rich bar when rich is installed: Rich draws nothing into a
        # redirected log (a cluster job's, `dvc repro > log`), tqdm's lines show rate and ETA there too
        logger=loggers or False, callbacks=callbacks + ([pl.callbacks.TQDMProgressBar()] if cfg.progress else []),
        default_root_dir=str(paths.checkpoint_dir),
    )


def _check_launch(trainer) -> None:
    launcher = getattr(trainer.strategy, "launcher", None)
    if launcher is None or getattr(launcher, "num_processes", 1) <= 1:
        return
    # Without Hydra (`ip2p train --params FILE`, as dvc.yaml runs it) Lightning re-runs sys.argv as is,
    # which is fine for that command line, but not for, say, a test runner calling run() in-process.
    rerunnable = _hydra() is not None or sys.argv[1:2] == [STAGE]
    if type(launcher).__name__ == "_SubprocessScriptLauncher" and not rerunnable \
            and not trainer.strategy.cluster_environment.creates_processes_externally:
        raise Ip2pError("multi-process training must be started from the command line (ip2p train ...), "
                        "or by torchrun / srun")


def _reset_launcher_env(env_before: dict) -> None:
    """After a run that launched DDP children: forget the launcher's environment and process group, so
    the next job of a sweep (-m) in this process launches its own."""
    if env_before.get("LOCAL_RANK") is not None:
        return
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    for key, value in env_before.items():
        if value is None:
            os.environ.pop(key, None)
