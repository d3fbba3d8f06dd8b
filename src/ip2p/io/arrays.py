"""Image batches between numpy uint8 (what renderers, readers and files hold) and the [-1, 1] float
tensors that VAEs take and return (the diffusers convention)."""

from __future__ import annotations

import numpy as np
import torch


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """[B, H, W, 3] uint8 -> [B, 3, H, W] float in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] float in [-1, 1] (clamped) -> [B, H, W, 3] uint8, rounded to the nearest level."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
