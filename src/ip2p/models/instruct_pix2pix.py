"""The InstructPix2Pix editing sampler: image + instruction -> edited image(s).

Per step, ONE UNet call on a batch of three branches (the paper's dual classifier-free guidance):
    [ (text, image), (no text, image), (no text, no image) ]
The image condition is the VAE posterior MODE, not multiplied by the scaling factor: the released
checkpoint was trained that way (docs/method.md section 3) and diffusers' pipeline matches it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from ip2p.errors import Ip2pError
from ip2p.io.images import pil_to_tensor, tensor_to_pil
from ip2p.models.loader import DiffusionComponents, weights_device, weights_dtype
from ip2p.sampling.guidance import dual_guidance
from ip2p.sampling.loop import denoise, make_scheduler, unet_prediction


@dataclass
class EditSettings:
    """How one edit samples. No defaults of its own: they live in conf/ (sampling.*, edit.*, and the
    served model's register.serve.*), and each caller builds this from the config it reads."""

    steps: int
    text_guidance: float
    image_guidance: float
    scheduler: str
    num_images: int
    seed: int
    progress: bool
    # Asked before every denoising step; a reason (str) stops the edit with EditStopped. A server uses
    # it so that work nobody waits for any more (a shutdown, a client past its timeout) ends at once.
    should_stop: Callable[[], str | None] | None = field(default=None, compare=False)


class EditStopped(Ip2pError):
    """An edit abandoned between two denoising steps (EditSettings.should_stop gave the reason)."""


class InstructPix2Pix:
    """Holds the loaded components; every call is a pure function of its arguments and the seed."""

    def __init__(self, components: DiffusionComponents):
        self.c = components

    @property
    def device(self) -> torch.device:
        return weights_device(self.c.unet)

    @property
    def dtype(self) -> torch.dtype:
        return weights_dtype(self.c.unet)

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> CLIP text hidden states [B, 77, D] (padded and truncated to the model's 77 tokens)."""
        tok = self.c.tokenizer
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(self.device)
        return self.c.text_encoder(ids)[0].to(self.dtype)

    @torch.no_grad()
    def encode_condition(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> conditioning latents: posterior mode, unscaled."""
        images = images.to(self.device, weights_dtype(self.c.vae))
        return self.c.vae.encode(images).latent_dist.mode().to(self.dtype)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Denoised latents -> images in [-1, 1]."""
        latents = latents.to(weights_dtype(self.c.vae)) / self.c.vae.config.scaling_factor
        return self.c.vae.decode(latents).sample

    @torch.no_grad()
    def sample(
        self,
        condition: torch.Tensor,
        text_embeds: torch.Tensor,
        empty_text_embeds: torch.Tensor,
        text_guidance: float | torch.Tensor,
        image_guidance: float | torch.Tensor,
        steps: int,
        scheduler: str,
        generator: torch.Generator | list[torch.Generator],
        progress: bool = True,
        should_stop: Callable[[], str | None] | None = None,
    ) -> torch.Tensor:
        """Denoise a batch: condition [B, 4, h, w], text_embeds [B, L, D], empty_text_embeds [1, L, D].
        Scales may be per-sample tensors [B]. `generator` may be a list of B generators: each sample's
        noise then depends on its own generator only, whatever else shares the batch.
        Returns the final latents [B, 4, h, w]."""
        batch, channels, height, width = condition.shape
        # diffusers' randn_tensor: the same draws as its pipelines (CPU generators give the same noise
        # on every device), one generator per sample when a list is given.
        noise = randn_tensor((batch, self.c.unet.config.out_channels, height, width), generator=generator,
                             device=self.device, dtype=self.dtype)
        empty = empty_text_embeds.expand(batch, -1, -1)
        branch_text = torch.cat([text_embeds, empty, empty])
        branch_image = torch.cat([condition, condition, torch.zeros_like(condition)])

        def predict_noise(model_input: torch.Tensor, t: torch.Tensor, _: int) -> torch.Tensor:
            reason = should_stop() if should_stop is not None else None
            if reason:
                raise EditStopped(reason)
            x = torch.cat([model_input] * 3)
            eps = unet_prediction(self.c.unet, self.c.autocast, torch.cat([x, branch_image], dim=1), t, branch_text)
            eps_text_image, eps_image, eps_uncond = eps.chunk(3)
            return dual_guidance(eps_text_image, eps_image, eps_uncond, text_guidance, image_guidance)

        sched = make_scheduler(scheduler, self.c.scheduler.config)
        return denoise(sched, noise, predict_noise, steps, generator=generator, progress=progress, desc="editing")

    @torch.no_grad()
    def edit_tensor(self, image: Image.Image, instruction: str, settings: EditSettings) -> torch.Tensor:
        """One image, one instruction, `num_images` variants in one batch -> images in [-1, 1]."""
        generator = torch.Generator("cpu").manual_seed(int(settings.seed))
        k = settings.num_images
        condition = self.encode_condition(pil_to_tensor([image])).expand(k, -1, -1, -1)
        text = self.encode_text([instruction]).expand(k, -1, -1)
        latents = self.sample(condition, text, self.encode_text([""]), settings.text_guidance,
                              settings.image_guidance, settings.steps, settings.scheduler, generator,
                              settings.progress, settings.should_stop)
        return self.decode(latents)

    def edit(self, image: Image.Image, instruction: str, settings: EditSettings) -> list[Image.Image]:
        """The user-facing call. An empty instruction returns the (already resized) input unchanged."""
        if not instruction.strip():
            return [image.copy() for _ in range(settings.num_images)]
        return tensor_to_pil(self.edit_tensor(image, instruction, settings))
