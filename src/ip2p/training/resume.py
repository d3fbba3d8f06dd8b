"""Where `ip2p train` starts: resume this run's last checkpoint, or start fresh (train.resume).

A run's fingerprint (the recipe, seed, models and training files) is written beside its checkpoints
(run.json); `resume=auto` continues only a run with the same fingerprint, so a plain rerun after a
kill continues and a rerun on new data (e.g. by `dvc repro`) does not.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ip2p.config import first_line
from ip2p.errors import Ip2pError
from ip2p.io.atomic import atomic_write_json
from ip2p.io.checkpoints import fingerprint_matches

log = logging.getLogger(__name__)


# train.* keys that do not change the trajectory: a run that differs only in these continues the old one
# (raising max_steps extends a finished run; moving outputs or logging differently changes nothing).
NOT_IN_FINGERPRINT = ("resume", "max_steps", "checkpoint_dir", "export_dir", "reports_dir", "output_dir", "export",
                      "log_every_n_steps", "validation", "checkpoint")


# train.data.* keys that change how batches are made, not what they hold: reading cached latents gives
# the loss of encoding every batch (tests/test_latent_cache.py), so a run may switch between the two
# (a float32 cache; a float16 one rounds the latents and counts as another recipe).
DATA_NOT_IN_FINGERPRINT = ("cache_latents", "latent_cache_dir", "cache_batch_size", "cache_dir", "num_workers")

# train.data.* keys renamed after runs were made -> the name the fingerprint hashes them under
RENAMED_DATA_KEYS = {"draw_by": "sampling"}

# train.* keys added after runs were made -> the value that changes nothing: at that value a key is left out of
# the fingerprint, so such runs keep theirs
ADDED_WITHOUT_EFFECT = {"conv_in_lr_scale": 1.0, "snr_gamma": None, "copy_rows": 0.0, "loss": "mse", "huber_c": 0.1,
                        "huber_schedule": "snr"}


def run_fingerprint(cfg: DictConfig) -> str:
    """What makes one training trajectory: the recipe (train.* but NOT_IN_FINGERPRINT), the seed, the
    models it starts from and the training data's files (names and sizes; not their bytes, which may be
    terabytes)."""
    recipe = {k: v for k, v in OmegaConf.to_container(cfg.train, resolve=True).items() if k not in NOT_IN_FINGERPRINT}
    recipe["data"] = {k: v for k, v in recipe["data"].items()
                      if k not in DATA_NOT_IN_FINGERPRINT and not (k == "cache_dtype" and v == "float32")}
    # train.data.draw_by was called train.data.sampling when runs were made: hashed under that name, such
    # runs keep their fingerprint.
    recipe["data"] = {RENAMED_DATA_KEYS.get(k, k): v for k, v in recipe["data"].items()}
    for key, no_effect in ADDED_WITHOUT_EFFECT.items():
        if key in recipe and recipe[key] == no_effect:
            recipe.pop(key)
    if recipe.get("lr_schedule", "constant") == "constant":
        # Keys added after runs were made, at the value that changes nothing: such runs keep their fingerprint.
        recipe.pop("lr_schedule", None)
        recipe.pop("min_lr", None)
    data_dir = Path(str(cfg.train.data.dir)).expanduser()
    files = sorted((str(p.relative_to(data_dir)), p.stat().st_size) for p in data_dir.rglob("*")
                   if p.is_file() and not p.name.startswith(".")) if data_dir.is_dir() else []
    model = OmegaConf.to_container(cfg.model, resolve=True)
    if model.get("base_vae", "unset") is None:   # added after runs were made; null changes nothing
        model.pop("base_vae")
    if str(cfg.train.init) == "base":            # the preset's editor is not where such a run starts
        model.pop("editor", None)
    parts = {"train": recipe, "seed": cfg.seed, "model": model,
             "trainer": OmegaConf.to_container(cfg.trainer, resolve=True), "data": files}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def first_process() -> bool:
    """False in the other processes of a multi-process launch (ranks 1..N-1): only the first one checks the
    data and touches the checkpoint folder."""
    return not any(int(os.environ.get(k, "0") or 0) for k in ("RANK", "SLURM_PROCID", "LOCAL_RANK"))


def supersede(checkpoint_dir: Path) -> None:
    """Move another run's checkpoints to <checkpoint_dir>/superseded/ (replacing older ones there), so
    that this run's ModelCheckpoint never mixes with them and `last` never means theirs.

    A folder without checkpoints (a run that failed before its first one left only run.json) supersedes
    nothing: superseded/ keeps the last run that has checkpoints, however many runs fail after it."""
    if not first_process():
        return
    checkpoints = list(checkpoint_dir.glob("*.ckpt"))
    record = checkpoint_dir / "run.json"
    if not checkpoints:
        record.unlink(missing_ok=True)  # this run writes its own
        return
    target = checkpoint_dir / "superseded"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for path in checkpoints + ([record] if record.exists() else []):
        os.replace(path, target / path.name)
    log.info("checkpoints of another run (other recipe or data) moved to %s", target)


def restore_superseded(checkpoint_dir: Path, fingerprint: str) -> bool:
    """resume=auto when <checkpoint_dir> holds no checkpoints: if superseded/ holds this recipe's run (one
    that another run pushed aside, and that run failed before its first checkpoint), move it back so the
    rerun continues it. True when restored."""
    old = checkpoint_dir / "superseded"
    if not first_process() or list(checkpoint_dir.glob("*.ckpt")) or not (old / "last.ckpt").exists() \
            or not fingerprint_matches(old / "run.json", fingerprint):
        return False
    for path in [*old.glob("*.ckpt"), old / "run.json"]:
        os.replace(path, checkpoint_dir / path.name)
    shutil.rmtree(old, ignore_errors=True)
    log.info("this recipe's checkpoints were in %s: moved back to resume them", old)
    return True


def resolve_resume(cfg: DictConfig, checkpoint_dir: Path) -> str | None:
    """`train.resume`:
    auto (the default): <checkpoint_dir>/last.ckpt when it was written by this same recipe on the same
        data (run.json's fingerprint), so a plain rerun after a kill continues; another run's
        checkpoints are superseded and training starts fresh;
    last: <checkpoint_dir>/last.ckpt if present, whatever wrote it; null / fresh: start from step 0;
    a path: that checkpoint."""
    value = cfg.train.get("resume")
    last = checkpoint_dir / "last.ckpt"
    if not value or str(value) == "fresh":
        supersede(checkpoint_dir)
        return None
    if str(value) == "auto":
        fingerprint = run_fingerprint(cfg)
        restore_superseded(checkpoint_dir, fingerprint)
        if fingerprint_matches(checkpoint_dir / "run.json", fingerprint) and last.exists():
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
