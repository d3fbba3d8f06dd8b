"""Lightning callbacks of the training stage: EMA updates, sample grids, loss history for DVC plots,
run metadata for the loggers, wall-clock throughput, and the checkpoint callback.

Lightning runs callbacks' on_train_batch_end before the LightningModule's and always runs
ModelCheckpoint last, so the EMA update below is already in every checkpoint it writes.
"""

from __future__ import annotations

import csv
import io
import logging
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.callbacks import Callback, ModelCheckpoint

from ip2p.io.atomic import atomic_write_bytes, atomic_write_text
from ip2p.io.images import tensor_to_pil
from ip2p.io.loggers import log_image_file, log_run_metadata
from ip2p.training.module import ema_unet_from_state, is_sharded

log = logging.getLogger(__name__)


class EMAUpdate(Callback):
    """After every optimizer step (not every micro-batch under gradient accumulation). The tensor lists
    are taken once per fit, after the strategy has placed (or wrapped) the UNet."""

    def __init__(self):
        self._tensors = None

    def on_train_start(self, trainer: pl.Trainer, pl_module) -> None:
        self._tensors = pl_module.ema.tensors(pl_module.unet)

    def on_train_end(self, trainer: pl.Trainer, pl_module) -> None:
        self._tensors = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        while int(pl_module.ema.num_updates) < trainer.global_step:
            pl_module.ema.update(pl_module.unet, self._tensors)


def sample_grid(inputs: torch.Tensor, edits: torch.Tensor, targets: torch.Tensor | None = None) -> Image.Image:
    """One row per example: input | model's edit (| dataset's edited image). Tensors in [-1, 1]."""
    columns = [tensor_to_pil(inputs), tensor_to_pil(edits)]
    if targets is not None:
        columns.append(tensor_to_pil(targets))
    width, height = columns[0][0].size
    grid = Image.new("RGB", (width * len(columns), height * len(columns[0])), "white")
    for col, images in enumerate(columns):
        for row, image in enumerate(images):
            grid.paste(image, (col * width, row * height))
    return grid


class SampleGrid(Callback):
    """At each validation: edit a few fixed validation pairs with the EMA weights, write
    <samples_dir>/step-XXXXXXXX.png and hand it to the loggers. Global rank 0 only."""

    def __init__(self, samples_dir: str | Path, num_images: int, seed: int):
        self.samples_dir = Path(samples_dir)
        self.num_images = int(num_images)
        self.seed = int(seed)
        self.written: list[Path] = []
        self._pairs: dict | None = None

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module) -> None:
        if trainer.sanity_checking or self.num_images < 1:
            return
        ema_unet = None
        if is_sharded(trainer.strategy):  # gather the EMA weights (a collective: every rank takes part)
            state = trainer.strategy.lightning_module_state_dict()
            if trainer.is_global_zero:
                ema_unet = ema_unet_from_state(state, pl_module.unet.config)
        if not trainer.is_global_zero:
            return
        if self._pairs is None:
            self._pairs = trainer.datamodule.fixed_pairs(self.num_images)
        if self._pairs is None:
            return
        with torch.autocast(device_type=pl_module.device.type, enabled=False):
            edits = pl_module.sample_edits(self._pairs, self.seed, ema_unet)
        grid = sample_grid(self._pairs["input"], edits, self._pairs["edited"])
        buffer = io.BytesIO()
        grid.save(buffer, format="PNG")
        path = atomic_write_bytes(self.samples_dir / f"step-{trainer.global_step:08d}.png", buffer.getvalue())
        self.written.append(path)
        log_image_file(trainer.loggers, path, trainer.global_step)


class LossHistory(Callback):
    """Training loss per optimizer step (mean over its micro-batches and over ranks), kept in the
    checkpoint so a resumed run continues the same curve; written as CSV `step,loss` for DVC plots."""

    def __init__(self, csv_path: str | Path):
        self.csv_path = Path(csv_path)
        self.history: list[tuple[int, float]] = []
        self._micro: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if pl_module.last_loss is not None:
            self._micro.append(pl_module.last_loss)
        recorded = self.history[-1][0] if self.history else 0
        if trainer.global_step > recorded and self._micro:
            mean = torch.tensor(sum(self._micro) / len(self._micro), device=pl_module.device)
            mean = trainer.strategy.reduce(mean, reduce_op="mean")
            self.history.append((int(trainer.global_step), float(mean)))
            self._micro = []

    def write(self) -> Path:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["step", "loss"])
        writer.writerows((step, f"{loss:.6g}") for step, loss in self.history)
        return atomic_write_text(self.csv_path, buffer.getvalue())

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module, checkpoint: dict) -> None:
        if trainer.is_global_zero:
            self.write()

    def on_train_end(self, trainer: pl.Trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self.write()

    def state_dict(self) -> dict[str, Any]:
        return {"history": [list(item) for item in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [(int(s), float(v)) for s, v in state_dict.get("history", [])]

    def mean_of_last(self, count: int) -> float | None:
        tail = [loss for _, loss in self.history[-count:]]
        return sum(tail) / len(tail) if tail else None


class Throughput(Callback):
    """Seconds and optimizer steps of this process's fit (a resumed run counts only its own part)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.steps = 0
        self.first_step = 0
        self._t0: float | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module) -> None:
        self.first_step = trainer.global_step
        self._t0 = time.perf_counter()

    def on_train_end(self, trainer: pl.Trainer, pl_module) -> None:
        if self._t0 is not None:
            self.seconds = time.perf_counter() - self._t0
        self.steps = trainer.global_step - self.first_step


class RunMetadata(Callback):
    """Config (redacted), rows per split and provenance to the loggers, once data is set up."""

    def __init__(self, cfg, stage_name: str = "train", extra: dict | None = None):
        self.cfg = cfg
        self.stage_name = stage_name
        self.extra = dict(extra or {})

    def on_fit_start(self, trainer: pl.Trainer, pl_module) -> None:
        if not trainer.is_global_zero or not trainer.loggers:
            return
        data = {key: getattr(trainer.datamodule, key, {}) or {} for key in ("rows", "pairs")}
        extra = {**self.extra, "data": data, "run": {"world_size": trainer.world_size}}
        log_run_metadata(trainer.loggers, self.cfg, extra, self.stage_name)


class FinalCheckpoint(Callback):
    """Checkpoint the state at max_steps when it is not a multiple of the checkpoint interval (Lightning's
    ModelCheckpoint would skip it), so last.ckpt always holds the final weights and resumes continue from
    there. Saved at the same point of the step as ModelCheckpoint's own saves (after the EMA update)."""

    def __init__(self, dirpath: str | Path, every_n_steps: int, save_last: bool):
        self.dirpath = Path(dirpath)
        self.every_n_steps = int(every_n_steps)
        self.save_last = bool(save_last)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if step != trainer.max_steps or step % self.every_n_steps == 0:
            return
        name = "last.ckpt" if self.save_last else f"step-{step:08d}.ckpt"
        trainer.save_checkpoint(self.dirpath / name)


def checkpoint_callback(dirpath: str | Path, every_n_steps: int, save_top_k: int, save_last: bool) -> ModelCheckpoint:
    """step-XXXXXXXX.ckpt every N optimizer steps and last.ckpt; files are overwritten, not versioned, so
    `train.resume=last` always means the newest state of this checkpoint folder."""
    return ModelCheckpoint(dirpath=str(dirpath), filename="step-{step:08d}", auto_insert_metric_name=False,
                           every_n_train_steps=int(every_n_steps), save_top_k=int(save_top_k),
                           save_last=bool(save_last), monitor=None, enable_version_counter=False,
                           save_on_train_epoch_end=False)
