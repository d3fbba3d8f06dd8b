"""`ip2p edit` behind the CLI: load the editor once, edit, write the image(s) atomically."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from ip2p.checks import check_config
from ip2p.errors import Ip2pError
from ip2p.io.images import load_image, resize_for_editing, save_image_atomic
from ip2p.models.instruct_pix2pix import EditSettings, InstructPix2Pix
from ip2p.models.loader import load_diffusion
from ip2p.models.speed import accelerate

log = logging.getLogger(__name__)


def output_paths(output: str | Path, num_images: int) -> list[Path]:
    """out.png for one image; out_0.png, out_1.png, ... for several."""
    output = Path(output)
    if num_images == 1:
        return [output]
    return [output.with_name(f"{output.stem}_{i}{output.suffix}") for i in range(num_images)]


def settings_from_config(cfg: DictConfig) -> EditSettings:
    """The edit's settings from conf/edit; their ranges are ip2p.checks' (run checks them first)."""
    e = cfg.edit
    return EditSettings(steps=int(e.steps), text_guidance=float(e.text_guidance),
                        image_guidance=float(e.image_guidance), scheduler=str(e.scheduler),
                        num_images=int(e.num_images), seed=int(e.seed), progress=bool(cfg.progress))


def run(cfg: DictConfig) -> list[Path]:
    if not cfg.edit.input:
        raise Ip2pError("no input image given")
    check_config(cfg, groups=("edit",))  # before the model loads; the CLI has checked, a direct call has not
    settings = settings_from_config(cfg)
    image = resize_for_editing(load_image(cfg.edit.input, int(cfg.edit.max_input_pixels)), int(cfg.edit.resolution),
                               float(cfg.edit.max_edit_area), "edit.max_edit_area")
    instruction = str(cfg.edit.instruction or "")
    if instruction.strip():
        components = load_diffusion(cfg.model.editor, "editor", cfg.model, cfg.paths.cache, cfg.device, cfg.dtype,
                                     cfg.get("autocast"))
        speed = cfg.edit.speed
        accelerate(components, bool(speed.channels_last), speed.compile, speed.compile_mode)
        images = InstructPix2Pix(components).edit(image, instruction, settings)
    else:
        images = [image.copy() for _ in range(settings.num_images)]
    paths = output_paths(cfg.edit.output, settings.num_images)
    for img, path in zip(images, paths):
        save_image_atomic(img, path)
    return paths
