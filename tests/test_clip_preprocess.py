"""How images reach CLIP (ip2p.models.clip_embed): the model's processor, or the original code's float
bicubic resize, optionally with the original evaluation's [-1, 1] input; checked against hand-made
pixel tensors fed to the model directly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ip2p.models.clip_embed import embed_images, original_pixels


def _hand_embedding(clip, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        feats = clip.model.get_image_features(pixel_values=pixels)
    feats = feats if isinstance(feats, torch.Tensor) else feats.pooler_output
    return torch.nn.functional.normalize(feats.float(), dim=-1)


def test_original_preprocessing_by_hand(tiny_clip):
    images = torch.rand(3, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    proc = getattr(tiny_clip.processor, "image_processor", tiny_clip.processor)
    size = tiny_clip.model.config.vision_config.image_size
    mean = torch.tensor(proc.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(proc.image_std).view(1, 3, 1, 1)
    resized = torch.nn.functional.interpolate(images, size=(size, size), mode="bicubic", align_corners=False,
                                              antialias=False)
    assert torch.allclose(original_pixels(tiny_clip, images), (resized - mean) / std, atol=1e-6)
    signed = torch.nn.functional.interpolate(images * 2 - 1, size=(size, size), mode="bicubic", align_corners=False)
    assert torch.allclose(original_pixels(tiny_clip, images, "signed"), (signed - mean) / std, atol=1e-6)

    ours = embed_images(tiny_clip, images, preprocess="original")
    assert torch.allclose(ours, _hand_embedding(tiny_clip, (resized - mean) / std), atol=1e-5)
    bugged = embed_images(tiny_clip, images, preprocess="original", value_range="signed")
    assert not torch.allclose(ours, bugged, atol=1e-3)
    # the default path: the processor on 8-bit images, a different input than the float resize
    hf = embed_images(tiny_clip, images)
    pil = [Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for im in images]
    pixels = tiny_clip.processor(images=pil, return_tensors="pt")["pixel_values"]
    assert torch.allclose(hf, _hand_embedding(tiny_clip, pixels), atol=1e-5)
    # PIL input to the original path: read as floats in [0, 1]
    assert embed_images(tiny_clip, pil, preprocess="original").shape == ours.shape
    with pytest.raises(ValueError, match="needs preprocess=original"):
        embed_images(tiny_clip, images, value_range="signed")


def test_scorer_names_its_preprocessing_so_cached_scores_are_not_mixed(tiny_clip):
    from ip2p.scoring.clip import ClipScorer, clip_id

    assert clip_id("/cache/tiny-abc/clip") == "tiny-abc/clip"
    assert clip_id("/cache/tiny-abc/clip", "original") == "tiny-abc/clip+original"
    hf, original = ClipScorer(tiny_clip), ClipScorer(tiny_clip, preprocess="original")
    assert hf.name != original.name
    img = [Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8))]
    a = hf.score(img, img[::-1], ["a cat"], ["a dog"])[0]
    b = original.score(img, img[::-1], ["a cat"], ["a dog"])[0]
    assert a["clip_sim_image"] == pytest.approx(1.0, abs=1e-5) and b["clip_sim_image"] == pytest.approx(1.0, abs=1e-5)
    assert a["clip_sim_0"] != pytest.approx(b["clip_sim_0"], abs=1e-6)


def test_signed_range_needs_the_original_path():
    from ip2p.checks import config_problems
    from ip2p.config import compose

    assert any("clip_value_range=signed" in p for p in config_problems(compose(["evaluate.clip_value_range=signed"])))
    assert config_problems(compose(["evaluate.clip_value_range=signed", "evaluate.clip_preprocess=original"])) == []
    assert any(p.startswith("filter.clip_preprocess") for p in config_problems(compose(["filter.clip_preprocess=x"])))


def test_the_paper_preset_scores_as_the_original_code():
    """experiment=paper: its thresholds (0.75 / 0.2 / 0.2 / 0.2) were set on the original code's scores,
    so the filter, synthesis' early drop and the evaluation resize for CLIP as it did; the other
    presets keep CLIP's own processor."""
    from ip2p.config import compose

    paper = compose(["experiment=paper"])
    assert paper.filter.clip_preprocess == paper.synthesis.early_drop.clip_preprocess == "original"
    assert paper.evaluate.clip_preprocess == "original" and paper.evaluate.clip_value_range == "unit"
    for preset in ("tiny", "small", "mini"):
        other = compose([f"experiment={preset}"])
        assert other.filter.clip_preprocess == other.evaluate.clip_preprocess == "hf", preset
