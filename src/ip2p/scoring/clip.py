"""The four CLIP scores of a candidate pair (docs/method.md section 2), from L2-normalised embeddings:

    clip_sim_0      cos(E_img(image_0), E_txt(input caption))
    clip_sim_1      cos(E_img(image_1), E_txt(output caption))
    clip_sim_dir    cos(E_img(image_1) - E_img(image_0), E_txt(output caption) - E_txt(input caption))
    clip_sim_image  cos(E_img(image_0), E_img(image_1))
    clip_sim_rest   cos(P E_img(image_0), P E_img(image_1)), P = I - u u^T, u = the unit caption direction
                    E_txt(output caption) - E_txt(input caption): how alike the two images are apart from
                    the instructed change (clip_sim_image also counts the instructed change as a
                    difference, so it ranks a successful edit of a large region, e.g. a background, below a
                    failed one; docs/miniature.md measures both against the truth)

Images reach CLIP through its own processor (bicubic resize, centre crop, CLIP's mean/std), or as the
original code resized them (`filter.clip_preprocess=original`; ip2p.models.clip_embed).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from ip2p.models.clip_embed import embed_images, embed_texts
from ip2p.models.loader import ClipComponents
from ip2p.scoring.edits import cosine, edit_metrics

PAPER_METRICS = ("clip_sim_0", "clip_sim_1", "clip_sim_dir", "clip_sim_image")   # the released data carries these
METRICS = (*PAPER_METRICS, "clip_sim_rest")


def clip_metrics(image_0: torch.Tensor, image_1: torch.Tensor, text_0: torch.Tensor,
                 text_1: torch.Tensor) -> dict[str, torch.Tensor]:
    """Embeddings [B, D] (image of the input / output caption, input / output caption) -> four [B] scores."""
    edit = edit_metrics(image_0, image_1, text_0, text_1)  # shared with evaluation: image, direction, text
    return {
        "clip_sim_0": cosine(image_0, text_0),
        "clip_sim_1": edit["clip_sim_1"],
        "clip_sim_dir": edit["clip_sim_dir"],
        "clip_sim_image": edit["clip_sim_image"],
        "clip_sim_rest": similarity_apart_from(image_0, image_1, text_1 - text_0),
    }


def similarity_apart_from(a: torch.Tensor, b: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """cos of rows of a and b [B, D] after removing their components along `direction` [B, D] (each row
    projected onto the hyperplane orthogonal to its direction; a zero direction removes nothing)."""
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    u = F.normalize(direction.float(), dim=-1)
    a = a - (a * u).sum(-1, keepdim=True) * u
    b = b - (b * u).sum(-1, keepdim=True) * u
    return cosine(a, b)


def clip_id(source: str, preprocess: str = "hf") -> str:
    """A name for the scorer (the resolved CLIP source and how images reach it), stored next to cached
    scores so a different CLIP or preprocessing recomputes them: the last two parts of a local folder
    (tiny-ce9bcd0796/clip) or the hub id, with "+original" for the original's preprocessing."""
    parts = str(source).replace("\\", "/").rstrip("/").split("/")
    return "/".join(parts[-2:]) + ("" if preprocess == "hf" else f"+{preprocess}")


class ClipScorer:
    """Scores batches of candidate pairs; text embeddings of repeated captions are computed once."""

    def __init__(self, clip: ClipComponents, batch_size: int = 32, preprocess: str = "hf"):
        self.clip = clip
        self.batch_size = batch_size
        self.preprocess = preprocess
        self.name = clip_id(clip.source, preprocess)
        self._text_cache: dict[str, torch.Tensor] = {}

    def _texts(self, texts: Sequence[str]) -> torch.Tensor:
        new = sorted({t for t in texts if t not in self._text_cache})
        if new:
            for text, emb in zip(new, embed_texts(self.clip, new, batch_size=self.batch_size)):
                self._text_cache[text] = emb
        if len(self._text_cache) > 100_000:  # captions repeat within a pair only: keep memory bounded
            keep = set(texts)
            self._text_cache = {t: e for t, e in self._text_cache.items() if t in keep}
        return torch.stack([self._text_cache[t] for t in texts])

    @torch.no_grad()
    def score(self, images_0: Sequence[Image.Image], images_1: Sequence[Image.Image],
              captions_0: Sequence[str] | None, captions_1: Sequence[str] | None) -> list[dict[str, float | None]]:
        """One dict of the four METRICS per candidate. Without captions (None) only clip_sim_image is
        measurable; the text scores are None."""
        if not images_0:
            return []
        e0 = embed_images(self.clip, list(images_0), batch_size=self.batch_size, preprocess=self.preprocess)
        e1 = embed_images(self.clip, list(images_1), batch_size=self.batch_size, preprocess=self.preprocess)
        if captions_0 is None or captions_1 is None:
            image_sim = cosine(e0, e1)
            return [{"clip_sim_0": None, "clip_sim_1": None, "clip_sim_dir": None,
                     "clip_sim_image": float(image_sim[i]), "clip_sim_rest": None} for i in range(len(images_0))]
        scores = clip_metrics(e0, e1, self._texts(captions_0), self._texts(captions_1))
        return [{m: float(scores[m][i]) for m in METRICS} for i in range(len(images_0))]
