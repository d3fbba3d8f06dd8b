"""Optional speed-ups of the editing path (models/speed.py): channels-last and torch.compile give the
eager path's output within floating-point tolerance; a bad backend is one line before any work."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from ip2p.config import compose
from ip2p.editing.run import settings_from_config
from ip2p.errors import Ip2pError
from ip2p.models.instruct_pix2pix import InstructPix2Pix
from ip2p.models.loader import load_diffusion
from ip2p.models.speed import accelerate


def _edit(parts) -> torch.Tensor:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    return InstructPix2Pix(parts).edit_tensor(image, "make it snowy", replace(settings_from_config(compose(["progress=false"])), steps=3, seed=1))


@pytest.mark.parametrize("channels_last, backend", [(True, None), (True, "aot_eager")])
def test_accelerated_edit_equals_the_eager_one(cfg, channels_last, backend):
    load = lambda: load_diffusion("tiny", "editor", cfg.model, cfg.paths.cache)  # noqa: E731
    eager = _edit(load())
    parts = accelerate(load(), channels_last=channels_last, compile_backend=backend)
    assert parts.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last) == channels_last
    fast = _edit(parts)
    torch.testing.assert_close(fast, eager, atol=1e-4, rtol=1e-4)
    if backend is not None:  # the compiled module really runs: its wrapper is in place
        assert parts.unet._compiled_call_impl is not None and parts.vae.decoder._compiled_call_impl is not None


def test_unknown_compile_backend_is_one_line(cfg):
    with pytest.raises(Ip2pError, match="unknown torch.compile backend 'nosuch'"):
        accelerate(load_diffusion("tiny", "editor", cfg.model, cfg.paths.cache), compile_backend="nosuch")
