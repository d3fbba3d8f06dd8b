"""Build the `tiny` preset: real diffusers/transformers classes, small configs, seeded random weights.

Three folders are written with `save_pretrained`, in the layouts real checkpoints use:
  base/    Stable Diffusion text-to-image pipeline (4-channel UNet)
  editor/  InstructPix2Pix pipeline (8-channel UNet)
  clip/    CLIPModel + CLIPProcessor for scoring
They are loaded back with `from_pretrained` by `ip2p.models.loader`, the same code that loads SD 1.5.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import torch

from ip2p.io.atomic import build_once
from ip2p.models.tokenizer import write_clip_tokenizer

TINY_LAYOUT_VERSION = 1  # bump when the builder changes what it writes


def tokenizer_corpus() -> list[str]:
    """The packaged text the tiny tokenizer is trained on (our own captions and edit phrases)."""
    text = resources.files("ip2p").joinpath("assets/tokenizer_corpus.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]


def tiny_dir(cache_dir: str | Path, build: Mapping[str, Any]) -> Path:
    """Folder of the tiny preset for this build spec: a change to the spec gives a new folder."""
    spec = json.dumps({"v": TINY_LAYOUT_VERSION, **dict(build)}, sort_keys=True)
    digest = hashlib.sha256(spec.encode()).hexdigest()[:10]
    return Path(cache_dir).expanduser() / f"tiny-{digest}"


def ensure_tiny(cache_dir: str | Path, build: Mapping[str, Any]) -> Path:
    """Return the tiny preset's folder, building it first if needed (atomic: temp folder + rename)."""
    return build_once(tiny_dir(cache_dir, build), lambda folder: _build(folder, build))


def _scheduler_config() -> dict:
    # The noise schedule of Stable Diffusion 1.5 and the released InstructPix2Pix checkpoint.
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        prediction_type="epsilon",
    )


def _unet(b: Mapping[str, Any], in_channels: int):
    from diffusers import UNet2DConditionModel

    channels = tuple(b["unet_channels"])
    down = ("CrossAttnDownBlock2D",) * (len(channels) - 1) + ("DownBlock2D",)
    up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (len(channels) - 1)
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=in_channels,
        out_channels=b["latent_channels"],
        down_block_types=down,
        up_block_types=up,
        block_out_channels=channels,
        layers_per_block=b["unet_layers_per_block"],
        cross_attention_dim=b["text_hidden"],
        attention_head_dim=b["unet_attention_head_dim"],
        norm_num_groups=b["norm_groups"],
    )


def _text_config_kwargs(b: Mapping[str, Any], tokenizer) -> dict:
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=b["text_hidden"],
        intermediate_size=2 * b["text_hidden"],
        num_hidden_layers=b["text_layers"],
        num_attention_heads=b["text_heads"],
        max_position_embeddings=b["max_text_tokens"],
        projection_dim=b["projection_dim"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _build(root: Path, b: Mapping[str, Any]) -> None:
    from diffusers import (
        AutoencoderKL,
        EulerAncestralDiscreteScheduler,
        StableDiffusionInstructPix2PixPipeline,
        StableDiffusionPipeline,
    )
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTokenizer,
        CLIPVisionConfig,
    )

    tok_dir = write_clip_tokenizer(tokenizer_corpus(), root / "_tokenizer", b["tokenizer_merges"])
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir, model_max_length=b["max_text_tokens"])
    text_kwargs = _text_config_kwargs(b, tokenizer)

    torch.manual_seed(b["seed"])
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_kwargs)).eval()
    vae_channels = tuple(b["vae_channels"])
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_channels),
        block_out_channels=vae_channels,
        latent_channels=b["latent_channels"],
        norm_num_groups=b["norm_groups"],
        layers_per_block=1,
        sample_size=128,
        scaling_factor=0.18215,
    ).eval()
    scheduler = EulerAncestralDiscreteScheduler(**_scheduler_config())
    base_unet = _unet(b, in_channels=b["latent_channels"]).eval()
    edit_unet = _unet(b, in_channels=2 * b["latent_channels"]).eval()

    common = dict(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                  safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    StableDiffusionPipeline(unet=base_unet, **common).save_pretrained(root / "base", safe_serialization=True)
    StableDiffusionInstructPix2PixPipeline(unet=edit_unet, **common).save_pretrained(
        root / "editor", safe_serialization=True
    )

    vision = CLIPVisionConfig(
        hidden_size=b["text_hidden"],
        intermediate_size=2 * b["text_hidden"],
        num_hidden_layers=b["text_layers"],
        num_attention_heads=b["text_heads"],
        image_size=b["vision_image_size"],
        patch_size=b["vision_patch"],
        projection_dim=b["projection_dim"],
    )
    clip_config = CLIPConfig(
        text_config=CLIPTextConfig(**text_kwargs).to_dict(),
        vision_config=vision.to_dict(),
        projection_dim=b["projection_dim"],
    )
    CLIPModel(clip_config).eval().save_pretrained(root / "clip", safe_serialization=True)
    size = b["vision_image_size"]
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
        tokenizer=tokenizer,
    )
    processor.save_pretrained(root / "clip")
    # transformers 5 saves tokenizer.json only; keep CLIP's vocab.json + merges.txt beside it so that
    # older transformers and other CLIP tokenizers read the same files.
    for folder in (root / "base" / "tokenizer", root / "editor" / "tokenizer", root / "clip"):
        for name in ("vocab.json", "merges.txt"):
            shutil.copy(tok_dir / name, folder / name)
    shutil.rmtree(tok_dir)
