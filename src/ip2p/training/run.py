"""`ip2p train [overrides] [-m]`: train the editor with PyTorch Lightning, then export the EMA weights.

Writes: checkpoints (step-N.ckpt, last.ckpt), sample grids (<output_dir>/samples/step-N.png), the
diffusers pipeline (artifacts/model), reports/train.json and reports/train_loss.csv (DVC metric + plot).

Multi-process runs. With trainer=ddp on one machine, Lightning starts ranks 1..N-1 by re-running the
command line of rank 0 with Hydra's run folder and `hydra.output_subdir=null` appended. Our CLI's
argv (`ip2p-train <overrides>`, possibly with -m and sweep lists) cannot be re-run as is, so before
fitting we rewrite sys.argv to `ip2p train <this job's overrides> <resolved output paths>`: every rank
then trains the same job and agrees on where checkpoints and the model go. torchrun and srun start all
processes themselves (trainer=multinode_torchrun / slurm); each runs `ip2p train` directly.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ip2p.config import first_line
from ip2p.errors import Ip2pError
from ip2p.io.atomic import atomic_write_json
from ip2p.models.loader import DiffusionComponents, load_diffusion, widen_conv_in
from ip2p.training.module import InstructPix2PixModule, TrainSettings, ema_unet_from_state

log = logging.getLogger(__name__)

STAGE = "train"
# Environment variables Lightning's DDP launcher sets in rank 0's own process.
LAUNCHER_ENV = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


# ---------------------------------------------------------------------------------------------------
# Configuration -> objects
# ---------------------------------------------------------------------------------------------------

@dataclass
class RunPaths:
    output_dir: Path      # this run's folder (Hydra's); sample grids
    checkpoint_dir: Path
    export_dir: Path
    reports_dir: Path

    @property
    def samples_dir(self) -> Path:
        return self.output_dir / "samples"

    def pinned_overrides(self) -> dict[str, str]:
        return {"train.output_dir": str(self.output_dir), "train.checkpoint_dir": str(self.checkpoint_dir),
                "train.export_dir": str(self.export_dir), "train.reports_dir": str(self.reports_dir)}


def _hydra():
    try:
        from hydra.core.hydra_config import HydraConfig
    except ImportError:
        return None
    return HydraConfig.get() if HydraConfig.initialized() else None


def resolve_paths(cfg: DictConfig) -> RunPaths:
    """Single run: stable project paths (so `ckpt_path=last` finds them from any later run).
    Sweep job (-m): everything inside the job's own folder, so parallel jobs never collide."""
    from hydra.types import RunMode

    t = cfg.train
    hc = _hydra()
    sweep = hc is not None and hc.mode == RunMode.MULTIRUN
    hydra_dir = Path(hc.runtime.output_dir) if hc is not None else None
    output_dir = Path(t.output_dir or hydra_dir or Path(cfg.paths.artifacts) / "runs" / STAGE)
    job_dir = output_dir if sweep else None
    checkpoint_dir = Path(t.checkpoint_dir or (job_dir / "checkpoints" if job_dir else Path(cfg.paths.artifacts) / "checkpoints"))
    export_dir = Path(t.export_dir or (job_dir / "model" if job_dir else Path(cfg.paths.artifacts) / "model"))
    reports_dir = Path(t.reports_dir or (job_dir / "reports" if job_dir else Path(cfg.paths.reports)))
    return RunPaths(*(p.expanduser().resolve() for p in (output_dir, checkpoint_dir, export_dir, reports_dir)))


def load_components(cfg: DictConfig) -> DiffusionComponents:
    """train.init=base: the text-to-image UNet widened to 8 channels (new channels zero, bias kept);
    train.init=editor: an existing editor to fine-tune. Loaded on CPU in float32; Lightning moves it."""
    init = str(cfg.train.init)
    if init == "base":
        components = load_diffusion(cfg.model.base, "base", cfg.model, cfg.paths.cache, "cpu", "float32")
        widen_conv_in(components.unet, 2 * components.vae.config.latent_channels)
        return components
    if init == "editor":
        return load_diffusion(cfg.model.editor, "editor", cfg.model, cfg.paths.cache, "cpu", "float32")
    raise Ip2pError(f"train.init must be base or editor (got '{init}')")


def settings_from_config(cfg: DictConfig) -> TrainSettings:
    t = cfg.train
    p = float(t.conditioning_dropout)
    if not 0.0 <= 3 * p <= 1.0:
        raise Ip2pError(f"train.conditioning_dropout must be in [0, 1/3] (got {p})")
    grid = OmegaConf.to_container(t.validation.grid, resolve=True)
    return TrainSettings(lr=float(t.lr), betas=tuple(float(b) for b in t.betas), weight_decay=float(t.weight_decay),
                         eps=float(t.eps), warmup_steps=int(t.warmup_steps), conditioning_dropout=p,
                         ema_decay=float(t.ema.decay), ema_warmup=bool(t.ema.warmup),
                         gradient_checkpointing=bool(t.gradient_checkpointing), seed=int(cfg.seed), grid=grid)


def _check_recipe(cfg: DictConfig) -> None:
    t = cfg.train
    for key in ("max_steps", "batch_size", "accumulate_grad_batches"):
        if int(t[key]) < 1:
            raise Ip2pError(f"train.{key} must be at least 1 (got {t[key]})")
    for key in ("validation.every_n_steps", "checkpoint.every_n_steps"):
        if int(OmegaConf.select(t, key)) < 1:
            raise Ip2pError(f"train.{key} must be at least 1")


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


# train.* keys that do not change the trajectory: a run that differs only in these continues the old one
# (raising max_steps extends a finished run; moving outputs or logging differently changes nothing).
NOT_IN_FINGERPRINT = ("resume", "max_steps", "checkpoint_dir", "export_dir", "reports_dir", "output_dir", "export",
                      "log_every_n_steps", "validation", "checkpoint")


def run_fingerprint(cfg: DictConfig) -> str:
    """What makes one training trajectory: the recipe (train.* but NOT_IN_FINGERPRINT), the seed, the
    models it starts from and the training data's files (names and sizes; not their bytes, which may be
    terabytes)."""
    import hashlib

    recipe = {k: v for k, v in OmegaConf.to_container(cfg.train, resolve=True).items() if k not in NOT_IN_FINGERPRINT}
    data_dir = Path(str(cfg.train.data.dir)).expanduser()
    files = sorted((str(p.relative_to(data_dir)), p.stat().st_size) for p in data_dir.rglob("*")
                   if p.is_file() and not p.name.startswith(".")) if data_dir.is_dir() else []
    parts = {"train": recipe, "seed": cfg.seed, "model": OmegaConf.to_container(cfg.model, resolve=True),
             "trainer": OmegaConf.to_container(cfg.trainer, resolve=True), "data": files}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def supersede(checkpoint_dir: Path) -> None:
    """Move another run's checkpoints to <checkpoint_dir>/superseded/ (replacing older ones there), so
    that this run's ModelCheckpoint never mixes with them and `last` never means theirs."""
    if any(int(os.environ.get(k, "0") or 0) for k in ("RANK", "SLURM_PROCID", "LOCAL_RANK")):
        return  # only the first process of a multi-process launch touches the folder
    old = [p for p in checkpoint_dir.glob("*.ckpt")] + [p for p in (checkpoint_dir / "run.json",) if p.exists()]
    if not old:
        return
    target = checkpoint_dir / "superseded"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for path in old:
        os.replace(path, target / path.name)
    log.info("checkpoints of another run (other recipe or data) moved to %s", target)


def resolve_resume(cfg: DictConfig, checkpoint_dir: Path) -> str | None:
    """`ckpt_path` (top level) or `train.resume`:
    auto (the default): <checkpoint_dir>/last.ckpt when it was written by this same recipe on the same
        data (run.json's fingerprint), so a plain rerun after a kill continues; another run's
        checkpoints are superseded and training starts fresh;
    last: <checkpoint_dir>/last.ckpt if present, whatever wrote it; null / fresh: start from step 0;
    a path: that checkpoint."""
    value = cfg.get("ckpt_path") or cfg.train.get("resume")
    last = checkpoint_dir / "last.ckpt"
    if not value or str(value) == "fresh":
        supersede(checkpoint_dir)
        return None
    if str(value) == "auto":
        record = checkpoint_dir / "run.json"
        try:
            same = json.loads(record.read_text())["fingerprint"] == run_fingerprint(cfg)
        except (OSError, ValueError, KeyError, TypeError):
            same = False
        if same and last.exists():
            check_checkpoint(last)
            log.info("resuming this run from %s", last)
            return str(last)
        supersede(checkpoint_dir)
        return None
    if str(value) == "last":
        if last.exists():
            check_checkpoint(last)
            return str(last)
        log.info("no checkpoint at %s: training from the start", last)
        return None
    path = Path(str(value)).expanduser()
    if not path.exists():
        raise Ip2pError(f"checkpoint to resume from not found: '{value}'")
    check_checkpoint(path)
    return str(path.resolve())


def record_run(cfg: DictConfig, checkpoint_dir: Path) -> None:
    """run.json beside the checkpoints: the fingerprint that `resume=auto` compares."""
    atomic_write_json(checkpoint_dir / "run.json", {"fingerprint": run_fingerprint(cfg)})


def check_checkpoint(path: Path) -> None:
    """A one-line error, before Lightning's traceback, for a file that is not a checkpoint of this stage
    (truncated, another format, the released .ckpt). Memory-mapped: the weights are not read."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises many types for foreign or broken files
        raise Ip2pError(f"cannot resume from '{path}': not a readable checkpoint ({type(err).__name__}: "
                        f"{first_line(err)[:120]})") from err
    if not isinstance(state, dict) or not {"state_dict", "global_step"} <= set(state):
        raise Ip2pError(f"cannot resume from '{path}': not a checkpoint of `ip2p train` (no state_dict/global_step)")


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

    pinned_keys = set(pinned) | {"ckpt_path"}
    task = [o for o in hc.overrides.task if _override_key(o) not in pinned_keys]
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


def atomic_checkpoint_io():
    """Lightning's torch checkpoint writer, but each file is written to a temp name beside its target and
    renamed into place: a full disk or a kill mid-save leaves the previous step-N.ckpt / last.ckpt (or
    nothing), never a truncated file that a resume would then choke on."""
    from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

    class AtomicCheckpointIO(TorchCheckpointIO):
        def save_checkpoint(self, checkpoint, path, storage_options=None):
            path = Path(path)
            tmp = path.with_name(f".{path.name}.partial")
            try:
                super().save_checkpoint(checkpoint, tmp, storage_options)
                os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise

    return AtomicCheckpointIO()


def build_trainer(cfg: DictConfig, paths: RunPaths, loggers: list, callbacks: list):
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
        logger=loggers or False, callbacks=callbacks, default_root_dir=str(paths.checkpoint_dir),
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


# ---------------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------------

def _quiet_lightning() -> None:
    import warnings

    # The EMA copy is in eval mode on purpose (it is never trained); Lightning's tips are noise here.
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(
        lambda record: "litlogger" not in record.getMessage())


def run(cfg: DictConfig) -> dict:
    import pytorch_lightning as pl

    from ip2p.models.export import export_pipeline
    from ip2p.tracking.loggers import close_loggers, log_file, make_loggers
    from ip2p.training.callbacks import (EMAUpdate, FinalCheckpoint, LossHistory, RunMetadata, SampleGrid,
                                         Throughput, checkpoint_callback)
    from ip2p.training.datamodule import EditDataModule

    _check_recipe(cfg)
    _quiet_lightning()
    t = cfg.train
    env_before = {k: os.environ.get(k) for k in LAUNCHER_ENV}
    paths = resolve_paths(cfg)
    resume = resolve_resume(cfg, paths.checkpoint_dir)
    if resume is not None:  # resuming into its own checkpoint folder is the point, not a mistake
        import warnings

        warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    if cfg.trainer.get("matmul_precision"):
        torch.set_float32_matmul_precision(str(cfg.trainer.matmul_precision))

    components = load_components(cfg)
    module = InstructPix2PixModule(components, settings_from_config(cfg))
    data_cfg = OmegaConf.to_container(t.data, resolve=True)
    datamodule = EditDataModule(data_cfg, components.tokenizer, int(t.batch_size), int(t.validation.batch_size),
                                int(t.accumulate_grad_batches), int(cfg.seed), bool(cfg.progress))

    loggers = make_loggers(cfg, STAGE)
    history = LossHistory(paths.reports_dir / "train_loss.csv")
    clock = Throughput()
    grids = SampleGrid(paths.samples_dir, int(t.validation.grid.num_images), int(cfg.seed))
    callbacks = [EMAUpdate(), history, clock, grids, RunMetadata(cfg, STAGE),
                 FinalCheckpoint(paths.checkpoint_dir, t.checkpoint.every_n_steps, t.checkpoint.save_last),
                 checkpoint_callback(paths.checkpoint_dir, t.checkpoint.every_n_steps, t.checkpoint.save_top_k,
                                     t.checkpoint.save_last)]
    trainer = build_trainer(cfg, paths, loggers, callbacks)
    _check_launch(trainer)
    prepare_ddp_relaunch({**paths.pinned_overrides(), "train.resume": resume})
    if trainer.is_global_zero:
        record_run(cfg, paths.checkpoint_dir)

    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume)
        if trainer.interrupted:
            raise Ip2pError("training was interrupted; run the same command again to resume (train.resume=auto)")
        if module.validated_at_step != trainer.global_step:
            trainer.validate(module, datamodule=datamodule, verbose=False)  # final val loss and grid
        state = trainer.strategy.lightning_module_state_dict()  # gathers sharded weights (FSDP) on all ranks
        report: dict = {}
        if trainer.is_global_zero:
            if t.export.enabled:
                ema_unet = ema_unet_from_state(state, module.unet.config)
                export_pipeline(components, paths.export_dir, scheduler=str(t.export.scheduler), unet=ema_unet)
                log.info("exported the EMA editor to %s", paths.export_dir)
            report = write_report(cfg, trainer, datamodule, history, clock, paths)
            for file in (paths.reports_dir / "train.json", history.csv_path):
                log_file(trainer.loggers, file, artifact_path="reports")
        trainer.strategy.barrier("export")
        return report
    finally:
        close_loggers(loggers)
        _reset_launcher_env(env_before)


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


def write_report(cfg: DictConfig, trainer, datamodule, history, clock, paths: RunPaths) -> dict:
    t = cfg.train
    effective_batch = int(t.batch_size) * int(t.accumulate_grad_batches) * trainer.world_size
    val_loss = trainer.callback_metrics.get("val/loss")
    samples = clock.steps * effective_batch
    report = {
        "stage": STAGE,
        "steps": int(trainer.global_step),
        "max_steps": int(t.max_steps),
        "resumed_from_step": int(clock.first_step),
        "train_loss": history.mean_of_last(50),          # mean over the last (up to) 50 steps
        "train_loss_last_step": history.history[-1][1] if history.history else None,
        "val_loss": None if val_loss is None or math.isnan(float(val_loss)) else round(float(val_loss), 6),
        "world_size": int(trainer.world_size),
        "effective_batch_size": effective_batch,
        "samples_seen_this_run": int(samples),
        "samples_per_second": round(samples / clock.seconds, 3) if clock.seconds > 0 else None,
        "seconds": round(clock.seconds, 3),
        "rows": datamodule.rows,
        "precision": str(cfg.trainer.precision),
    }
    atomic_write_json(paths.reports_dir / "train.json", report)
    for logger in trainer.loggers:
        logger.log_metrics({k: v for k, v in (("final/train_loss", report["train_loss"]),
                                               ("final/val_loss", report["val_loss"]),
                                               ("final/samples_per_second", report["samples_per_second"]))
                            if v is not None}, step=int(trainer.global_step))
    return report
