"""CLIP embeddings. Images reach CLIP one of two ways (`preprocess`):

- hf (default): the model's own processor on 8-bit images: bicubic resize with antialiasing, centre
  crop, CLIP's mean/std;
- original: as InstructPix2Pix's code computes its scores: float images resized bicubically to CLIP's
  input size without antialiasing (torch's interpolate), then CLIP's mean/std; no crop.

`value_range="signed"` reproduces the original evaluation script, which fed images in [-1, 1] where
CLIP expects [0, 1] (docs/method.md section 5): only to put our numbers beside the paper's figure."""

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


PREPROCESS = ("hf", "original")
VALUE_RANGES = ("unit", "signed")


def pil_to_unit(images: list[Image.Image]) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(i.convert("RGB"), dtype=np.float32) / 255.0 for i in images])
                            ).permute(0, 3, 1, 2)


def original_pixels(clip: ClipComponents, images: torch.Tensor, value_range: str = "unit") -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] -> CLIP's input as the original code makes it (see the module doc)."""
    proc = getattr(clip.processor, "image_processor", clip.processor)
    size = int(clip.model.config.vision_config.image_size)
    x = images.float() * 2 - 1 if value_range == "signed" else images.float()
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    mean = torch.tensor(proc.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(proc.image_std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def embed_images(clip: ClipComponents, images: list[Image.Image] | torch.Tensor, batch_size: int = 64,
                 preprocess: str = "hf", value_range: str = "unit") -> torch.Tensor:
    """Images (PIL, or a [B, 3, H, W] tensor in [0, 1]) -> L2-normalised image embeddings [B, D]."""
    if preprocess not in PREPROCESS or value_range not in VALUE_RANGES:
        raise ValueError(f"preprocess must be one of {PREPROCESS} and value_range one of {VALUE_RANGES}")
    if value_range == "signed" and preprocess == "hf":
        raise ValueError("value_range=signed (the original evaluation's bug) needs preprocess=original")
    if preprocess == "original":
        images = images if isinstance(images, torch.Tensor) else pil_to_unit(images)
    elif isinstance(images, torch.Tensor):
        images = unit_to_pil(images)
    device = clip.model.device
    out = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        if preprocess == "original":
            pixels = original_pixels(clip, chunk, value_range)
        else:
            pixels = clip.processor(images=chunk, return_tensors="pt")["pixel_values"]
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
