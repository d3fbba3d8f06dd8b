"""The world's foundation models as shipped (`dvc pull`, done by scripts/setup.sh), loaded through the
project's one loader with the `mini` preset exactly as real checkpoints are, and judged by the oracle
on held-out scenes (seeds no training run used). Thresholds: docs/miniature-world.md."""

from __future__ import annotations

from pathlib import Path

import pytest

from ip2p.config import compose
from ip2p.models.loader import load_clip, load_diffusion
from ip2p.world.scene import sample_scenes

REPO = Path(__file__).resolve().parents[1]

# What the shipped weights hold (a little under the measured value: these samples are smaller than
# the report's). The issue's targets are in reports/pretrain.json ("targets", "met"); the text-to-image
# targets are met there but not on the 48 captions below, and a test says so as a strict expected failure.
VAE_AGREEMENT = 0.94          # the refined VAE under the base: 0.98 on these 100 scenes, 0.977 on the report's 300
                              # (pretrain-vae's own: 0.95 here; target 0.98; the oracle of 2026-12-06)
VAE_PSNR = 38.5               # the refined VAE: 40.1 dB here; pretrain-vae's own: 36.8 (so the preset must swap it in)
CLIP = {"pairwise": 0.90, "direction_positive": 0.95}
# the shipped base (curriculum + five refine runs) on these 48 captions, through the refined VAE: colour 0.90,
# background 0.98, style 0.92, shape 0.67 (read by the oracle of 2026-12-06, which reads blurred snow and splits
# merged objects; before it 0.83 / 0.98 / 0.92 / 0.65, through its own VAE shape 0.60) (after four refine runs: 0.83 / 0.96 / 0.92 / 0.65; after three: 0.85 / 0.98 / 0.92 / 0.65; after two:
# 0.88 / 0.98 / 0.92 / 0.56; after one: 0.88 / 0.98 / 0.92 / 0.50; the curriculum base alone: 0.80 / 0.98 / 0.85 /
# 0.375; trained on the whole world from the start: shape at chance, about 0.2); on 1,000 in reports/pretrain.json
# 0.952 / 0.973 / 0.941 / 0.836
T2I_HELD = {"colour": 0.75, "background": 0.90, "style": 0.80, "shape": 0.55}
T2I = {"colour": 0.90, "background": 0.90, "shape": 0.75}   # the issue's targets
LLM_CONSISTENT = 0.80        # measured 0.914 on 1,000 held-out captions, 0.90 on these 60 (target 0.90); well formed: 1.00


@pytest.fixture(scope="module")
def mini():
    import os

    old = os.getcwd()
    os.chdir(REPO)  # the preset's paths are relative to the project root, as under `dvc repro`
    try:
        cfg = compose(["model=mini"])
        base = Path(cfg.model.base)
        assert (base / "model_index.json").is_file(), \
            f"{base} is missing: run `dvc pull pretrain_t2i` (scripts/setup.sh does) before these tests"
        parts = load_diffusion(cfg.model.base, "base", cfg.model, cfg.paths.cache, "cpu", "float32")
        clip = load_clip(cfg.model.clip, cfg.model, cfg.paths.cache, "cpu")
        yield cfg, parts, clip
    finally:
        os.chdir(old)


def test_mini_preset_loads_real_classes_in_real_layouts(mini):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPModel, CLIPTextModel, CLIPTokenizer

    cfg, parts, clip = mini
    assert isinstance(parts.unet, UNet2DConditionModel) and parts.unet.config.in_channels == 4
    assert isinstance(parts.vae, AutoencoderKL) and parts.vae.config.latent_channels == 4
    assert isinstance(parts.text_encoder, CLIPTextModel) and isinstance(parts.tokenizer, CLIPTokenizer)
    assert isinstance(clip.model, CLIPModel)
    # The base's frozen text encoder is the world CLIP's text tower (as SD 1.5's is OpenAI CLIP's).
    import torch

    tower = getattr(parts.text_encoder, "text_model", parts.text_encoder)  # transformers 4 | 5
    for name, tensor in tower.state_dict().items():
        assert torch.equal(tensor, clip.model.text_model.state_dict()[name]), name
    # The editor role widens the base UNet to 8 input channels (image channels start at zero).
    editor = load_diffusion(cfg.model.base, "editor", cfg.model, cfg.paths.cache, "cpu", "float32")
    assert editor.unet.config.in_channels == 8
    assert float(editor.unet.conv_in.weight[:, 4:].abs().sum()) == 0.0


def test_vae_reconstructions_read_back_as_the_same_scenes(mini):
    from ip2p.world.pretrain.vae import judge

    _, parts, _ = mini
    result = judge(parts.vae, sample_scenes(777001, 100))
    assert result["oracle_agreement"] >= VAE_AGREEMENT, result
    assert result["psnr"] >= VAE_PSNR, result


@pytest.fixture(scope="module")
def generations(mini):
    from ip2p.world.pretrain.t2i import judge

    cfg, parts, _ = mini
    return judge(parts.unet, parts.vae, parts.text_encoder, parts.tokenizer, dict(parts.scheduler.config),
                 cfg.world.report.t2i, sample_scenes(777002, 48))


def test_text_to_image_draws_the_caption(mini, generations):
    cfg, parts, _ = mini
    # the base carries the schedule it was trained with, for every later stage to sample alike
    assert parts.scheduler.config.prediction_type == cfg.world.t2i.schedule.prediction_type == "v_prediction"
    assert parts.scheduler.config.rescale_betas_zero_snr
    for attribute, level in T2I_HELD.items():
        assert generations[attribute] >= level, (attribute, generations)


def test_caption_reliance_shows_what_the_base_listens_to(mini):
    """The cheap probe of the base's caption use (pretrain.t2i.caption_reliance): 0 exactly for a copy whose
    cross-attention outputs are zeroed (the caption cannot matter); on the shipped base, a wrong colour
    word costs more than a wrong shape word (at t = 500 on these scenes 1.10 vs 0.43; the base trained without
    the curriculum: 0.95 vs 0.11, the diagnosis of its blob shapes)."""
    import copy

    import torch

    from ip2p.world.pretrain.t2i import caption_reliance

    cfg, parts, _ = mini
    scenes = sample_scenes(777003, 40)
    args = (parts.vae, parts.text_encoder, parts.tokenizer, dict(parts.scheduler.config), scenes)
    deaf = copy.deepcopy(parts.unet)
    for name, module in deaf.named_modules():
        if name.endswith("attn2.to_out.0"):
            torch.nn.init.zeros_(module.weight)
            torch.nn.init.zeros_(module.bias)
    assert caption_reliance(deaf, *args, timesteps=(500,)) == {"reliance_shape": 0.0, "reliance_colour": 0.0}
    shipped = caption_reliance(parts.unet, *args, timesteps=(500,))
    assert shipped["reliance_colour"] > 0.3 and shipped["reliance_colour"] > 2 * shipped["reliance_shape"] > 0


@pytest.mark.xfail(strict=True, reason="the shipped base meets the targets on the report's 1,000 held-out "
                   "captions (colour 0.952, shape 0.836 through the refined VAE) but not on these 48, harder than the world's mix (56% "
                   "small main objects against 42%, 38% two-object scenes against 32%): colour 0.90, shape 0.67; "
                   "docs/miniature-world.md")
def test_text_to_image_reaches_the_issue_targets(generations):
    for attribute, target in T2I.items():
        assert generations[attribute] >= target, (attribute, generations)


def test_clip_tells_one_attribute_apart_and_points_the_right_way(mini):
    from ip2p.world.pretrain.clip import Encoder, judge

    cfg, _, clip = mini
    result = judge(Encoder(clip.model, clip.processor, cfg.world.clip.max_tokens), 777003, 100)
    assert result["pairwise"] >= CLIP["pairwise"], result
    assert result["direction_positive"] >= CLIP["direction_positive"], result


def test_instruction_lm_writes_consistent_edits(mini):
    from ip2p.world.pretrain.llm import judge

    cfg, _, _ = mini
    c = cfg.world.llm
    small = c.copy()
    small.eval.captions, small.eval.seed = 60, 777004
    result = judge(c.finetune.output, cfg, small)
    assert result["well_formed"] >= 0.95, result  # the paper's format is learned...
    assert result["valid_and_consistent"] >= LLM_CONSISTENT, result  # ...and copying the caption mostly
