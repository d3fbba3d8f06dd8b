"""`autocast`: the UNet's forward under torch.autocast at inference, everything else in float32.

The float32 run of the same code is the reference: with bfloat16 autocast each result must differ
from it (the setting is really in effect) by no more than bfloat16 rounding accounts for, and come
back as float32 (the sampler's arithmetic never runs in the lower precision).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from ip2p.errors import Ip2pError
from ip2p.models.instruct_pix2pix import InstructPix2Pix
from ip2p.models.loader import load_diffusion, resolve_autocast
from ip2p.sampling.loop import unet_autocast
from ip2p.sampling.text_to_image import generate
from ip2p.synthesis.pipeline import PairSampler, SampleSpec
from test_synthesis import synthesis_settings

BF16 = torch.bfloat16


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours.double() - reference.double()).norm() / reference.double().norm())


def test_resolve_autocast_names():
    assert resolve_autocast(None) is None and resolve_autocast("none") is None and resolve_autocast("null") is None
    assert resolve_autocast("float32") is None  # float32 autocast would change nothing: off
    assert resolve_autocast("bf16") is BF16 and resolve_autocast("bfloat16") is BF16
    assert resolve_autocast("float16") is torch.float16 and resolve_autocast(BF16) is BF16
    with pytest.raises(Ip2pError, match="unknown dtype 'int8'"):
        resolve_autocast("int8")


def test_load_diffusion_sets_autocast_and_refuses_a_bad_name_first(cfg):
    parts = load_diffusion("tiny", "editor", cfg.model, cfg.paths.cache, "cpu", "float32", "bfloat16")
    assert parts.autocast is BF16 and parts.unet.dtype == torch.float32  # weights stay float32
    with unet_autocast("cpu", parts.autocast):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") is BF16
    assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(Ip2pError, match="unknown dtype"):
        load_diffusion("no/such/folder", "editor", cfg.model, cfg.paths.cache, "cpu", "float32", "fp8")


def test_editor_under_autocast_stays_float32_and_close(tiny_editor):
    editor = InstructPix2Pix(tiny_editor)
    fast = InstructPix2Pix(dataclasses.replace(tiny_editor, autocast=BF16))
    generator = torch.Generator().manual_seed(0)
    condition = torch.randn(2, 4, 8, 8, generator=generator)
    text = torch.randn(2, 77, tiny_editor.text_encoder.config.hidden_size, generator=generator)
    empty = torch.randn(1, 77, tiny_editor.text_encoder.config.hidden_size, generator=generator)

    def run(e):
        return e.sample(condition, text, empty, 5.0, 1.5, 6, "euler_ancestral",
                        [torch.Generator().manual_seed(s) for s in (1, 2)], progress=False)

    exact, approx = run(editor), run(fast)
    assert approx.dtype == torch.float32
    assert 0 < relative_error(approx, exact) < 0.04  # measured 0.015


def test_text_to_image_under_autocast_is_close(tiny_base):
    kwargs = dict(steps=5, guidance=5.0, seed=3, scheduler="ddim", resolution=64)
    args = (tiny_base.unet, tiny_base.vae, tiny_base.text_encoder, tiny_base.tokenizer, dict(tiny_base.scheduler.config),
            ["a red circle", "a blue square"])
    exact = generate(*args, **kwargs).astype(np.float64)
    approx = generate(*args, autocast=BF16, **kwargs).astype(np.float64)
    assert approx.shape == exact.shape
    assert 0 < np.abs(approx - exact).mean() < 1.5  # grey levels of 255 (measured 0.45)


def test_pair_sampler_under_autocast_keeps_the_attention_control(tiny_base):
    """The P2P sampler with a bfloat16 UNet: float32 latents near the float32 run, and the official
    control still holds exactly (p = 1 and the same caption in both branches: identical images)."""
    cat, dog = "a photo of a cat", "a photo of a dog"
    specs = [SampleSpec(61, 0.5, 7.5), SampleSpec(62, 0.9, 9.0)]
    exact = PairSampler(tiny_base, synthesis_settings(steps=6)).sample_latents(cat, dog, specs, 64, 64)
    fast_parts = dataclasses.replace(tiny_base, autocast=BF16)
    fast = PairSampler(fast_parts, synthesis_settings(steps=6))
    approx = fast.sample_latents(cat, dog, specs, 64, 64)
    for a, b in zip(exact, approx):
        assert b.dtype == torch.float32
        assert 0 < relative_error(b, a) < 0.05  # measured 0.025
    same_in, same_out = fast.sample_latents(cat, cat, [SampleSpec(63, 1.0, 9.0)], 64, 64)
    assert torch.equal(same_in, same_out)
