"""`ip2p train [overrides] [-m]`: train the editor with PyTorch Lightning, then export the EMA weights.

Writes: checkpoints (step-N.ckpt, last.ckpt), sample grids (<output_dir>/samples/step-N.png), the
diffusers pipeline (artifacts/model), reports/train.json and reports/train_loss.csv (DVC metric + plot).
Launching (strategies, clusters, DDP ranks) is ip2p.training.launch; where a run starts (resume) is
ip2p.training.resume.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ip2p.checks import check_config
from ip2p.errors import Ip2pError
from ip2p.io.atomic import atomic_write_json
from ip2p.models.loader import DiffusionComponents, check_square_resolution, load_diffusion, widen_conv_in
from ip2p.training.card import editor_card
from ip2p.training.launch import (LAUNCHER_ENV, STAGE, _check_launch, _hydra, _reset_launcher_env, build_trainer,
                                  prepare_ddp_relaunch)
from ip2p.training.module import InstructPix2PixModule, TrainSettings, ema_unet_from_state
from ip2p.training.resume import first_process, record_run, resolve_resume

log = logging.getLogger(__name__)



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


def resolve_paths(cfg: DictConfig) -> RunPaths:
    """Single run: stable project paths (so `train.resume=last` finds them from any later run).
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
    """The module's recipe; the ranges are ip2p.checks' (run checks them first)."""
    t = cfg.train
    p = float(t.conditioning_dropout)
    grid = OmegaConf.to_container(t.validation.grid, resolve=True)
    copy_error = OmegaConf.to_container(t.validation.copy_error, resolve=True)
    return TrainSettings(lr=float(t.lr), betas=tuple(float(b) for b in t.betas), weight_decay=float(t.weight_decay),
                         eps=float(t.eps), warmup_steps=int(t.warmup_steps), lr_schedule=str(t.lr_schedule),
                         min_lr=float(t.min_lr), max_steps=int(t.max_steps), conditioning_dropout=p,
                         copy_rows=float(t.copy_rows),
                         timestep_power=float(t.timestep_power), conv_in_lr_scale=float(t.conv_in_lr_scale),
                         snr_gamma=None if t.snr_gamma is None else float(t.snr_gamma),
                         loss=str(t.loss), huber_c=float(t.huber_c), huber_schedule=str(t.huber_schedule),
                         ema_decay=float(t.ema.decay), ema_warmup=bool(t.ema.warmup),
                         gradient_checkpointing=bool(t.gradient_checkpointing), seed=int(cfg.seed), grid=grid,
                         copy_error=copy_error)


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
    from ip2p.io.loggers import close_loggers, log_file, make_loggers
    from ip2p.training.callbacks import (EMAUpdate, FinalCheckpoint, LossHistory, RunMetadata, SampleGrid,
                                         Throughput, checkpoint_callback)
    from ip2p.training.datamodule import EditDataModule, check_data

    # 1. the recipe and the data checked, and the run's folders. Where the run resumes from (which may
    # move another run's checkpoints aside) and its run record come last, after every check, so that a
    # run that fails on a typo or bad data leaves a finished run's checkpoints where they are.
    check_config(cfg, groups=("train",))  # the ranges' one home; the CLI has checked them, a direct call has not
    settings = settings_from_config(cfg)
    _quiet_lightning()
    t = cfg.train
    env_before = {k: os.environ.get(k) for k in LAUNCHER_ENV}
    paths = resolve_paths(cfg)
    data_cfg = OmegaConf.to_container(t.data, resolve=True)
    if first_process():
        check_data(data_cfg, bool(cfg.progress))
    # The folder holds this run's run.json, and a resumed run's own checkpoints: not a mistake to warn about
    # (another run's checkpoints were moved to superseded/ by resolve_resume).
    import warnings

    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    if cfg.trainer.get("matmul_precision"):
        torch.set_float32_matmul_precision(str(cfg.trainer.matmul_precision))

    # 2. the model (input convolution widened to 8 channels) and the data
    components = load_components(cfg)
    check_square_resolution(components, int(t.data.resolution), "train.data.resolution")
    module = InstructPix2PixModule(components, settings)
    datamodule = EditDataModule(data_cfg, components.tokenizer, int(t.batch_size), int(t.validation.batch_size),
                                int(t.accumulate_grad_batches), int(cfg.seed), bool(cfg.progress), components)

    # 3. loggers, callbacks and the trainer (strategy, devices, DDP re-launch)
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
    resume = resolve_resume(cfg, paths.checkpoint_dir)
    prepare_ddp_relaunch({**paths.pinned_overrides(), "train.resume": resume})
    if trainer.is_global_zero:
        record_run(cfg, paths.checkpoint_dir)

    # 4. train, then export the EMA editor and write the report
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
                card = editor_card(cfg, int(trainer.global_step)) if t.export.get("card", True) else None
                export_pipeline(components, paths.export_dir, scheduler=str(t.export.scheduler), unet=ema_unet,
                                card=card)
                log.info("exported the EMA editor to %s", paths.export_dir)
            report = write_report(cfg, trainer, datamodule, history, clock, paths)
            history.write()  # also when no checkpoint was saved this run (a resume already at max_steps)
            for file in (paths.reports_dir / "train.json", history.csv_path):
                log_file(trainer.loggers, file, artifact_path="reports")
        trainer.strategy.barrier("export")
        return report
    finally:
        close_loggers(loggers)
        _reset_launcher_env(env_before)


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
        # the copy where the val pairs keep their input, by fraction of the schedule (ip2p.training.module)
        "val_copy_error": {key.removeprefix("val/copy_error_"): round(float(value), 6)
                           for key, value in trainer.callback_metrics.items()
                           if key.startswith("val/copy_error_") and not math.isnan(float(value))},
        "world_size": int(trainer.world_size),
        "effective_batch_size": effective_batch,
        "samples_seen_this_run": int(samples),
        "samples_per_second": round(samples / clock.seconds, 3) if clock.seconds > 0 else None,
        "seconds": round(clock.seconds, 3),
        "rows": datamodule.rows,
        "pairs": datamodule.pairs,
        "precision": str(cfg.trainer.precision),
    }
    atomic_write_json(paths.reports_dir / "train.json", report)
    for logger in trainer.loggers:
        logger.log_metrics({k: v for k, v in (("final/train_loss", report["train_loss"]),
                                               ("final/val_loss", report["val_loss"]),
                                               ("final/samples_per_second", report["samples_per_second"]))
                            if v is not None}, step=int(trainer.global_step))
    return report
