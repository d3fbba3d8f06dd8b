"""Text-to-image sampling through the one loop: 2-way classifier-free guidance on a latent diffusion
model (Stable Diffusion layout). Used to judge a base model (and as the "regenerate" baseline)."""

from __future__ import annotations

import numpy as np
import torch

from ip2p.io.images import to_uint8
from ip2p.sampling.guidance import classifier_free_guidance, rescale_guidance
from ip2p.sampling.loop import denoise, make_scheduler, unet_prediction


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    """[B, L, D] hidden states of the prompts, padded to the tokenizer's context length as SD does."""
    tok = tokenizer(prompts, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                    return_tensors="pt")
    return text_encoder(tok["input_ids"].to(text_encoder.device))[0]


@torch.no_grad()
def generate(unet, vae, text_encoder, tokenizer, scheduler_config: dict, prompts: list[str], *, steps: int,
             guidance: float, seed: int, scheduler: str = "ddim", resolution: int | None = None,
             batch_size: int = 64, progress: bool = False, guidance_rescale: float = 0.0,
             autocast: torch.dtype | None = None) -> np.ndarray:
    """[B, H, W, 3] uint8 images for the prompts; prompt k uses noise seeded by seed + k. The model's
    prediction (epsilon or v, as the scheduler config says) is guided, then optionally rescaled.
    `autocast`: the UNet's forward under torch.autocast in that dtype (sampling.loop.unet_prediction)."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    size = (resolution or unet.config.sample_size * factor) // factor
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        cond = encode_prompts(tokenizer, text_encoder, chunk)
        uncond = encode_prompts(tokenizer, text_encoder, [""] * len(chunk))
        text = torch.cat([cond, uncond])
        latents = torch.cat([
            torch.randn((1, unet.config.in_channels, size, size), generator=torch.Generator().manual_seed(seed + start + k))
            for k in range(len(chunk))]).to(unet.device, unet.dtype)
        generator = torch.Generator().manual_seed(seed + start)

        def predict(x, t, _i):
            eps_c, eps_u = unet_prediction(unet, autocast, torch.cat([x, x]), t, text).chunk(2)
            return rescale_guidance(classifier_free_guidance(eps_c, eps_u, guidance), eps_c, guidance_rescale)

        noise_scheduler = make_scheduler(scheduler, scheduler_config)
        latents = denoise(noise_scheduler, latents, predict, steps, generator=generator, progress=progress)
        images = vae.decode(latents / vae.config.scaling_factor).sample
        out.append(to_uint8(images))
    return np.concatenate(out)
