"""Our InstructPix2Pix sampler against diffusers' own StableDiffusionInstructPix2PixPipeline.

The tiny editor is exported with `export_pipeline`, loaded by diffusers unchanged, and both are run
with the same seed, scheduler, steps and guidance scales. diffusers is the independent reference:
the two must agree before 8-bit quantisation (float32 on CPU).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from ip2p.config import compose
from ip2p.editing.run import settings_from_config
from ip2p.io.images import pil_to_tensor, tensor_to_unit
from ip2p.models.export import export_pipeline
from ip2p.models.instruct_pix2pix import EditSettings, InstructPix2Pix
from ip2p.sampling.loop import make_scheduler

TOLERANCE = 1e-4


def structured_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255.0 / width, y * 255.0 / height, (x + y) * 127.0 / (width + height)], axis=-1)
    return Image.fromarray(np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def exported(tiny_editor, tmp_path_factory):
    """The tiny editor as a diffusers folder, and diffusers' pipeline loaded from it."""
    from diffusers import StableDiffusionInstructPix2PixPipeline

    out = export_pipeline(tiny_editor, tmp_path_factory.mktemp("export") / "editor")
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    return out, pipe


def ours(editor, image, instruction, settings: EditSettings) -> np.ndarray:
    """Our edit as float [K, H, W, 3] in [0, 1], the form diffusers' output_type="np" has."""
    images = InstructPix2Pix(editor).edit_tensor(image, instruction, settings)
    return tensor_to_unit(images).permute(0, 2, 3, 1).numpy()


def theirs(pipe, image, instruction, settings: EditSettings) -> np.ndarray:
    pipe.scheduler = make_scheduler(settings.scheduler, pipe.scheduler.config)
    return pipe(
        instruction,
        image=image,
        num_inference_steps=settings.steps,
        guidance_scale=settings.text_guidance,
        image_guidance_scale=settings.image_guidance,
        num_images_per_prompt=settings.num_images,
        generator=torch.Generator("cpu").manual_seed(settings.seed),
        output_type="np",
    ).images


CASES = [
    # (width, height, scheduler, steps, num_images, seed)
    (64, 64, "euler_ancestral", 10, 1, 0),
    (128, 128, "euler_ancestral", 12, 2, 3),
    (128, 64, "euler_ancestral", 10, 1, 7),   # non-square
    (64, 128, "ddim", 10, 2, 1),
    (128, 64, "dpmpp_2m", 15, 1, 5),
]


@pytest.mark.parametrize("width,height,scheduler,steps,num_images,seed", CASES)
def test_matches_diffusers_pipeline(tiny_editor, exported, width, height, scheduler, steps, num_images, seed):
    _, pipe = exported
    image = structured_image(width, height, seed)
    settings = EditSettings(steps=steps, text_guidance=7.5, image_guidance=1.5, scheduler=scheduler,
                            num_images=num_images, seed=seed, progress=False)
    a = ours(tiny_editor, image, "make it snowy", settings)
    b = theirs(pipe, image, "make it snowy", settings)
    assert a.shape == b.shape == (num_images, height, width, 3)
    assert np.abs(a - b).max() <= TOLERANCE
    # The comparison means something only if the edit moved away from the input image.
    assert np.abs(a - (pil_to_tensor([image]).permute(0, 2, 3, 1).numpy() + 1) / 2).max() > 0.05
    if num_images == 2:
        assert np.abs(a[0] - a[1]).max() > 1e-3  # the variants draw different noise


def test_exported_scheduler_class_is_the_requested_one(tiny_editor, tmp_path):
    import json

    out = export_pipeline(tiny_editor, tmp_path / "ddim", scheduler="ddim")
    config = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert config["_class_name"] == "DDIMScheduler"
    # The noise schedule is the checkpoint's, not the class default.
    assert config["beta_schedule"] == tiny_editor.scheduler.config.beta_schedule == "scaled_linear"
    assert config["beta_end"] == tiny_editor.scheduler.config.beta_end


def test_same_seed_same_result_other_seed_differs(tiny_editor):
    image = structured_image(64, 64, 11)
    editor = InstructPix2Pix(tiny_editor)

    def run(seed: int) -> torch.Tensor:
        return editor.edit_tensor(image, "turn it into a painting",
                                  replace(settings_from_config(compose(["progress=false"])), steps=8,
                                          scheduler="euler_ancestral", seed=seed))

    first, again, other = run(4), run(4), run(5)
    assert torch.equal(first, again)
    assert (first - other).abs().max() > 1e-3
