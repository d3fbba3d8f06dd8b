"""Editing as a service: the model loaded once and shared, every request checked before it runs.

What the web app (ip2p.editing.app) calls; no web framework here, so the rules are tested directly.
The edit itself is ip2p.models.instruct_pix2pix.InstructPix2Pix.edit, the same call that `ip2p edit`
and the MLflow pyfunc make.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from omegaconf import DictConfig
from PIL import Image

from ip2p.errors import Ip2pError
from ip2p.io.images import load_image, resize_for_editing
from ip2p.models.instruct_pix2pix import EditSettings, InstructPix2Pix
from ip2p.models.loader import load_diffusion
from ip2p.models.request_limits import Limits, out_of_range

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Request:
    image_path: str | None
    instruction: str
    steps: int
    text_guidance: float
    image_guidance: float
    num_images: int
    seed: int


def request_problem(r: Request, limits: Limits) -> str | None:
    """The first thing wrong with a request, in one line for the page; None when it may run."""
    if not r.image_path:
        return "Upload an image first."
    if not (r.instruction or "").strip():
        return "Type an instruction, e.g. \"make it snowy\"."
    if len(r.instruction) > limits.max_instruction_chars:
        return f"The instruction is {len(r.instruction)} characters long; the limit is {limits.max_instruction_chars}."
    checks = [("Steps", r.steps, limits.steps), ("Text guidance", r.text_guidance, limits.text_guidance),
              ("Image guidance", r.image_guidance, limits.image_guidance),
              ("Number of images", r.num_images, limits.num_images), ("Seed", r.seed, limits.seed)]
    for name, value, bounds in checks:
        problem = out_of_range(name, value, bounds)
        if problem:
            return problem
    for name, value in (("Steps", r.steps), ("Number of images", r.num_images), ("Seed", r.seed)):
        if float(value) != int(value):
            return f"{name} must be a whole number (got {value})"
    return None


def read_upload(path: str, max_pixels: int) -> Image.Image:
    """An uploaded file as RGB; one line naming the problem (not the server's temp path) otherwise."""
    try:
        return load_image(path, max_pixels)
    except Ip2pError as err:
        message = str(err).replace(" (edit.max_input_pixels)", "")
        for named, plain in ((f"input image '{path}'", "the uploaded image"), (f"image '{path}'", "the uploaded image"),
                             (f"'{path}'", "the uploaded file")):
            message = message.replace(named, plain)
        raise Ip2pError(message) from None


def native_resolution(editor: InstructPix2Pix) -> int:
    """The size the model was trained at: UNet sample size x the VAE's downsampling factor."""
    c = editor.c
    return int(c.unet.config.sample_size) * 2 ** (len(c.vae.config.block_out_channels) - 1)


class EditorPool:
    """Editors by model source, loaded on first use and kept (at most `keep` of them, the oldest
    dropped first). A lock makes concurrent first requests for one model load it once."""

    def __init__(self, model_cfg: DictConfig | Mapping, cache_dir: str, device: str, dtype: str, keep: int = 1,
                 autocast: str | None = None):
        self.model_cfg, self.cache_dir, self.device, self.dtype = model_cfg, cache_dir, device, dtype
        self.autocast = autocast
        self.keep = max(1, int(keep))
        self._editors: dict[str, InstructPix2Pix] = {}
        self._lock = threading.Lock()
        self.loads = 0

    def get(self, source: str, model_cfg: DictConfig | Mapping | None = None) -> InstructPix2Pix:
        with self._lock:
            if source not in self._editors:
                log.info("app: loading editor %s", source)
                components = load_diffusion(source, "editor", model_cfg or self.model_cfg, self.cache_dir,
                                            self.device, self.dtype, self.autocast)
                self.loads += 1
                while len(self._editors) >= self.keep:
                    self._editors.pop(next(iter(self._editors)))
                self._editors[source] = InstructPix2Pix(components)
            return self._editors[source]


def model_source(spec: str | None, cfg: DictConfig) -> tuple[str, DictConfig]:
    """A model as the user names it (preset, folder, checkpoint file, hub id or models:/ URI) ->
    (what the loader takes, the model config to load it with)."""
    from ip2p.config import available_presets, compose

    spec = (spec or "").strip()
    if not spec:
        return str(cfg.model.editor), cfg.model
    if spec in available_presets("model"):
        model = compose([f"model={spec}", f"paths.artifacts={cfg.paths.artifacts}"]).model
        if model.editor is None:
            raise Ip2pError(f"the '{spec}' preset has no editor checkpoint configured")
        return str(model.editor), model
    if not (spec.startswith("models:/") or Path(spec).expanduser().exists() or spec.count("/") == 1):
        raise Ip2pError(f"model '{spec}' is not a preset ({', '.join(available_presets('model'))}), "
                        "an existing folder or file, a hub id or a models:/ URI")
    return spec, cfg.model


def run_edit(editor: InstructPix2Pix, request: Request, limits: Limits, scheduler: str,
             resolution: int | None, progress: bool = True) -> tuple[Image.Image, list[Image.Image]]:
    """Check, read, resize and edit: (the resized input, the variants). Raises Ip2pError (one line)."""
    problem = request_problem(request, limits)
    if problem:
        raise Ip2pError(problem)
    image = resize_for_editing(read_upload(request.image_path, limits.max_input_pixels),
                               int(resolution or native_resolution(editor)), limits.max_edit_area)
    settings = EditSettings(steps=int(request.steps), text_guidance=float(request.text_guidance),
                            image_guidance=float(request.image_guidance), scheduler=scheduler,
                            num_images=int(request.num_images), seed=int(request.seed), progress=progress)
    return image, editor.edit(image, request.instruction, settings)
