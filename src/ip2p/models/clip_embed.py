"""CLIP embeddings through the model's own processor (so images get CLIP's resize and normalisation;
the original evaluation script fed [-1, 1] images where CLIP expects [0, 1], a bug we avoid)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ip2p.models.loader import ClipComponents


def _features(output) -> torch.Tensor:
    # transformers 4 returns the projected tensor; transformers 5 an output whose pooler_output holds it.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def unit_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] float in [0, 1] -> 8-bit RGB images (what a saved image would be)."""
    array = (images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in array]


@torch.no_grad()
def embed_images(clip: ClipComponents, images: list[Image.Image] | torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Images (PIL, or a [B, 3, H, W] tensor in [0, 1]) -> L2-normalised image embeddings [B, D]."""
    if isinstance(images, torch.Tensor):
        images = unit_to_pil(images)
    device = clip.model.device
    out = []
    for start in range(0, len(images), batch_size):
        pixels = clip.processor(images=images[start:start + batch_size], return_tensors="pt")["pixel_values"]
        feats = _features(clip.model.get_image_features(pixel_values=pixels.to(device, clip.model.dtype)))
        out.append(torch.nn.functional.normalize(feats.float(), dim=-1).cpu())
    return torch.cat(out) if out else torch.empty(0)


@torch.no_grad()
def embed_texts(clip: ClipComponents, texts: list[str], batch_size: int = 256) -> torch.Tensor:
    """Texts -> L2-normalised text embeddings [B, D] (truncated to CLIP's 77 tokens)."""
    device = clip.model.device
    out = []
    for start in range(0, len(texts), batch_size):
        tokens = clip.processor(text=list(texts[start:start + batch_size]), padding=True, truncation=True,
                                max_length=clip.processor.tokenizer.model_max_length, return_tensors="pt")
        feats = _features(clip.model.get_text_features(input_ids=tokens["input_ids"].to(device),
                                                       attention_mask=tokens["attention_mask"].to(device)))
        out.append(torch.nn.functional.normalize(feats.float(), dim=-1).cpu())
    return torch.cat(out) if out else torch.empty(0)
