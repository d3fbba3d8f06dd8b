"""Shared fixtures: an isolated cache with the tiny preset built once per session, offline hub,
W&B disabled, MLflow pointed at a temp sqlite store."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

# Set before any test imports diffusers/transformers/huggingface_hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["WANDB_MODE"] = "disabled"
os.environ["DVC_NO_ANALYTICS"] = "1"
os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"

# One intra-op thread in the test process: the 2 CI cores are shared with subprocesses, and OpenMP
# spin-waiting made tiny-model steps stall for seconds. Subprocesses that must reproduce this
# process's floats bit for bit get OMP_NUM_THREADS=1 too (float sums depend on the thread count).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One tiny-preset build for the whole session (IP2P_CACHE is shared with CLI subprocesses)."""
    path = Path(os.environ.get("IP2P_TEST_CACHE") or tmp_path_factory.mktemp("ip2p-cache"))
    os.environ["IP2P_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def cfg(cache_dir):
    """The composed default configuration (tiny preset), as every stage sees it."""
    from ip2p.config import compose

    return compose(["device=cpu", "progress=false", f"paths.cache={cache_dir}"])


@pytest.fixture(scope="session")
def tiny_editor(cfg):
    from ip2p.models.loader import load_diffusion

    return load_diffusion("tiny", "editor", cfg.model, cfg.paths.cache, "cpu", "float32")


@pytest.fixture(scope="session")
def tiny_base(cfg):
    from ip2p.models.loader import load_diffusion

    return load_diffusion("tiny", "base", cfg.model, cfg.paths.cache, "cpu", "float32")


@pytest.fixture(scope="session")
def tiny_clip(cfg):
    from ip2p.models.loader import load_clip

    return load_clip("tiny", cfg.model, cfg.paths.cache, "cpu")


@pytest.fixture
def noise_image():
    """A deterministic 96x80 RGB test image with structure (gradient + noise)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:80, 0:96]
    base = np.stack([x * 2.5, y * 3.0, (x + y) * 1.4], axis=-1)
    return Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))


@contextlib.contextmanager
def file_size_limit(max_bytes: int):
    """A real write failure, as a full disk gives one: in this block the kernel refuses to grow any file of
    this process past `max_bytes` (EFBIG, "file too large"; SIGXFSZ ignored so that the write fails
    instead of killing the process)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
