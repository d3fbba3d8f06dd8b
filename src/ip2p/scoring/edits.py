"""Per-edit metrics of the guidance grid: pure functions of CLIP embeddings and pixels.

  clip_sim_image   cos(E_img(input), E_img(edit))                      how much of the input is kept
  clip_sim_dir     cos(E_img(edit) - E_img(input), E_txt(out) - E_txt(in))   does the change follow the captions
  clip_sim_1    cos(E_img(edit), E_txt(output caption))
and, where a ground-truth edited image exists (MagicBrush-style, docs/method.md section 5):
  l1, l2           mean |edit - gt| and mean (edit - gt)^2 on [0, 1] RGB
  clip_i_gt        cos(E_img(edit), E_img(gt))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of [B, D] tensors."""
    return F.cosine_similarity(a.float(), b.float(), dim=-1)


def edit_metrics(img_in: torch.Tensor, img_edit: torch.Tensor, txt_in: torch.Tensor, txt_out: torch.Tensor) -> dict[str, torch.Tensor]:
    """CLIP metrics for a batch of edits, from (not necessarily normalised) embeddings [B, D]."""
    return {
        "clip_sim_image": cosine(img_in, img_edit),
        "clip_sim_dir": cosine(img_edit - img_in, txt_out - txt_in),
        "clip_sim_1": cosine(img_edit, txt_out),
    }


def ground_truth_metrics(edit_unit: torch.Tensor, gt_unit: torch.Tensor, img_edit: torch.Tensor, img_gt: torch.Tensor) -> dict[str, torch.Tensor]:
    """Pixel and CLIP agreement with a ground-truth edit; images [B, 3, H, W] in [0, 1]."""
    diff = edit_unit.float() - gt_unit.float()
    return {
        "l1": diff.abs().flatten(1).mean(1),
        "l2": diff.pow(2).flatten(1).mean(1),
        "clip_i_gt": cosine(img_edit, img_gt),
    }
