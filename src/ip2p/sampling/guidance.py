"""Classifier-free guidance combiners: small pure functions, the math visible.

Scales may be Python floats or tensors of shape [B] (one scale per sample), so one batch can hold
several guidance settings (the evaluation grid does this).
"""

from __future__ import annotations

import torch


def _per_sample(scale: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor | float:
    if isinstance(scale, torch.Tensor):
        return scale.to(like.device, like.dtype).view(-1, *([1] * (like.ndim - 1)))
    return scale


def dual_guidance(
    eps_text_image: torch.Tensor,
    eps_image: torch.Tensor,
    eps_uncond: torch.Tensor,
    text_guidance: float | torch.Tensor,
    image_guidance: float | torch.Tensor,
) -> torch.Tensor:
    """InstructPix2Pix guidance (paper eq. 3):
    eps = eps(0,0) + s_I * (eps(img,0) - eps(0,0)) + s_T * (eps(img,txt) - eps(img,0))."""
    s_t = _per_sample(text_guidance, eps_uncond)
    s_i = _per_sample(image_guidance, eps_uncond)
    # Summed in the order diffusers' pipeline uses: float addition is not associative, and with
    # large scales a last-bit difference can grow over the steps (DDIM: ~1e-4 after 10 steps).
    return eps_uncond + s_t * (eps_text_image - eps_image) + s_i * (eps_image - eps_uncond)


def classifier_free_guidance(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """Standard two-way guidance: eps = eps(0) + s * (eps(c) - eps(0))."""
    return eps_uncond + _per_sample(scale, eps_uncond) * (eps_cond - eps_uncond)


def rescale_guidance(guided: torch.Tensor, cond: torch.Tensor, phi: float) -> torch.Tensor:
    """Guidance rescale (Lin et al. 2023, "Common diffusion noise schedules and sample steps are
    flawed", eq. 15-16): bring the guided prediction back to the per-sample standard deviation of the
    conditional one, then mix by phi. Large guidance on a zero-terminal-SNR model over-exposes
    without it; phi = 0 leaves the prediction as it is."""
    if phi == 0:
        return guided
    dims = tuple(range(1, guided.ndim))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return phi * rescaled + (1 - phi) * guided
