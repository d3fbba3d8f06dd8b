"""The one training loop of the pretraining stages: warmup + cosine learning rate, EMA weights,
atomic checkpoints every N steps and exact resume, a progress bar, metrics to MLflow.

Batches are a pure function of (seed, step), so a resumed run draws exactly the batches an
uninterrupted one would: no data-loader state needs saving. What a loss draws from torch's global
generator (a VAE's posterior sample, dropout) is covered too: the generator's state is saved with each
checkpoint and restored on resume. Each checkpoint also names its recipe (`recipe_of`): a run whose
recipe changed since (a new learning rate, another scene mix) starts over instead of resuming weights
that another recipe made.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from ip2p.config import first_line
from ip2p.errors import Ip2pError
from ip2p.io.atomic import atomic_file
from ip2p.models.ema import ExponentialMovingAverage

log = logging.getLogger(__name__)

# Config keys that do not change a run's weights: where it writes, and how often the loop reports.
NOT_RECIPE = ("output", "checkpoint", "checkpoint_every", "eval_every", "log_every")


@dataclass
class LoopConfig:
    """One pretraining run's loop. No defaults of its own: each stage's `loop` in conf/world/ is their one
    home (a refine run's loop is merged over its stage's)."""

    steps: int
    lr: float
    min_lr: float
    warmup_steps: int
    weight_decay: float
    ema_decay: float
    grad_clip: float
    checkpoint_every: int
    eval_every: int
    log_every: int
    progress: bool

    @staticmethod
    def from_cfg(cfg: Mapping, progress: bool) -> "LoopConfig":
        keys = ("steps", "lr", "min_lr", "warmup_steps", "weight_decay", "ema_decay", "grad_clip",
                "checkpoint_every", "eval_every", "log_every")
        return LoopConfig(**{k: cfg[k] for k in keys}, progress=progress)


def learning_rate(step: int, c: LoopConfig) -> float:
    """Linear warmup to `lr`, then half a cosine down to `min_lr` at `steps`."""
    if step < c.warmup_steps:
        return c.lr * (step + 1) / c.warmup_steps
    t = (step - c.warmup_steps) / max(1, c.steps - c.warmup_steps)
    return c.min_lr + 0.5 * (c.lr - c.min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


def recipe_of(cfg: Mapping, leave_out: tuple[str, ...] = ()) -> str:
    """A short hash of what a run's weights depend on: its config without where things are written and
    how often the loop reports (`NOT_RECIPE`, at any depth), nor the top-level keys in `leave_out`."""
    def strip(node):
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k not in NOT_RECIPE}
        return [strip(v) for v in node] if isinstance(node, list) else node

    plain = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    plain = strip({k: v for k, v in plain.items() if k not in leave_out})
    return hashlib.sha256(json.dumps(plain, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_checkpoint(path: Path, model: torch.nn.Module, ema: ExponentialMovingAverage,
                    opt: torch.optim.Optimizer, recipe: str | None = None) -> int:
    """Restore a run; returns the number of steps already done (0 when there is no checkpoint, or when
    it is another recipe's: the run starts over and its first save replaces it)."""
    if not path.exists():
        return 0
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if recipe and state.get("recipe", recipe) != recipe:  # checkpoints before 2026-12-06 name none
            log.warning("%s was written by another recipe (%s, now %s): starting over", path, state["recipe"], recipe)
            return 0
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        if "rng" in state:  # checkpoints written before 2026-12-06 lack it: they resume, not bit for bit
            torch.set_rng_state(state["rng"])
        return int(state["step"])
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same one-line error
        raise Ip2pError(f"cannot resume from '{path}': {first_line(err)} (delete it to start over)") from err


def save_checkpoint(path: Path, model, ema, opt, step: int, recipe: str | None = None) -> None:
    with atomic_file(path) as tmp:
        torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                    "step": step, "rng": torch.get_rng_state(), **({"recipe": recipe} if recipe else {})}, tmp)


def train(name: str, model: torch.nn.Module, loss_fn: Callable[[int], dict[str, torch.Tensor]],
          c: LoopConfig, checkpoint: Path, evaluate: Callable[[torch.nn.Module, int], dict] | None = None,
          log_metrics: Callable[[dict, int], None] | None = None, recipe: str | None = None) -> ExponentialMovingAverage:
    """Train `model` for `c.steps` steps; `loss_fn(step)` draws batch `step` and returns {"loss": ..., ...}.

    `evaluate(ema_model, step)` runs every `c.eval_every` steps and at the end. `recipe` (`recipe_of`
    the stage's config) is saved with each checkpoint and resumes only the same recipe. Returns the EMA.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
    ema = ExponentialMovingAverage(model, decay=c.ema_decay, warmup=True)
    for stale in checkpoint.parent.glob(f".{checkpoint.name}.*.tmp"):  # left by a kill mid-save
        stale.unlink(missing_ok=True)
    start = load_checkpoint(checkpoint, model, ema, opt, recipe)
    if start:
        log.info("%s: resuming at step %d of %d from %s", name, start, c.steps, checkpoint)
    model.train()
    ema_tensors = ema.tensors(model)  # walked once: the parameters stay the same objects from here on
    bar = tqdm(total=c.steps, initial=start, desc=name, disable=not c.progress, unit="step", dynamic_ncols=True)
    t0, running, counted = time.perf_counter(), {}, 0
    for step in range(start, c.steps):
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, c)
        losses = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        if c.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, c.grad_clip)
        opt.step()
        ema.update(model, ema_tensors)
        for k, v in losses.items():
            running[k] = running.get(k, 0.0) + float(v.detach())
        counted += 1
        done = step + 1
        bar.update(1)
        if done % c.log_every == 0 or done == c.steps:
            n = counted  # steps since the last log (fewer right after a resume)
            metrics = {f"train/{k}": v / n for k, v in running.items()}
            metrics["train/lr"] = opt.param_groups[0]["lr"]
            metrics["train/steps_per_s"] = n / max(1e-9, time.perf_counter() - t0)
            bar.set_postfix(loss=f"{metrics['train/loss']:.4f}")
            if log_metrics:
                log_metrics(metrics, done)
            running, t0, counted = {}, time.perf_counter(), 0
        if evaluate and (done % c.eval_every == 0 or done == c.steps):
            ema.model.eval()
            result = evaluate(ema.model, done)
            model.train()
            if log_metrics and result:
                log_metrics({f"eval/{k}": v for k, v in result.items() if isinstance(v, (int, float))}, done)
            bar.write(f"{name} step {done}: " + ", ".join(f"{k}={v:.4g}" for k, v in result.items()
                                                          if isinstance(v, (int, float))))
        if done % c.checkpoint_every == 0 and done < c.steps:
            # after the evaluation: the generator state saved is the one the next step starts from
            save_checkpoint(checkpoint, model, ema, opt, done, recipe)
    bar.close()
    save_checkpoint(checkpoint, model, ema, opt, c.steps, recipe)
    return ema
