"""Test helper: write diffusers/transformers weights in the original CompVis/LDM single-file layout.

The released Stable Diffusion and InstructPix2Pix checkpoints (v1-5-pruned-emaonly.safetensors,
instruct-pix2pix-00-22000.ckpt) hold one flat state dict with three prefixes:
  model.diffusion_model.*        the UNet (openaimodel.UNetModel)
  first_stage_model.*            the VAE (AutoencoderKL of ldm.models.autoencoder)
  cond_stage_model.transformer.* the CLIP text encoder (a transformers CLIPTextModel, keys unchanged)
and, in training checkpoints, `model_ema.*` copies of the UNet with the dots after "model." removed.

The mapping is derived from the two module structures:
UNet. LDM numbers its blocks flat. input_blocks.0 is conv_in; then, per resolution level, one
input block per layer holding [ResBlock, SpatialTransformer?], and after every level but the last
one more input block holding only the Downsample (`.0.op`). middle_block is [Res, Transformer, Res].
output_blocks has layers_per_block + 1 blocks per level, each [ResBlock, SpatialTransformer?, Upsample?],
the Upsample on the last block of every level but the last. Inside a ResBlock: in_layers = (norm,
SiLU, conv), emb_layers = (SiLU, linear), out_layers = (norm, SiLU, dropout, conv), skip_connection.
Inside a SpatialTransformer the names equal diffusers' Transformer2DModel.
VAE. encoder.down.{i}.block.{j} / .downsample.conv, mid.block_1, mid.attn_1 (1x1 convolutions
q, k, v, proj_out and norm), mid.block_2, norm_out; the decoder's up.{i} is numbered from the
lowest resolution in diffusers but from the highest in LDM, so up_blocks.{i} is up.{n-1-i}.
The residual shortcut is nin_shortcut.
"""

from __future__ import annotations

from typing import Mapping

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."

_RESNET_NAMES = [  # diffusers ResnetBlock2D -> LDM ResBlock
    ("norm1.", "in_layers.0."),
    ("conv1.", "in_layers.2."),
    ("time_emb_proj.", "emb_layers.1."),
    ("norm2.", "out_layers.0."),
    ("conv2.", "out_layers.3."),
    ("conv_shortcut.", "skip_connection."),
]


def _rename_start(rest: str, table: list[tuple[str, str]]) -> str:
    for old, new in table:
        if rest.startswith(old):
            return new + rest[len(old):]
    raise KeyError(f"no mapping for '{rest}'")


def _split(key: str, prefix: str) -> tuple[int, str, int, str]:
    """"down_blocks.1.resnets.0.conv1.weight" -> (1, "resnets", 0, "conv1.weight")."""
    if not key.startswith(prefix):
        return None
    block, kind, index, rest = key[len(prefix):].split(".", 3)
    return int(block), kind, int(index), rest


def unet_to_ldm(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel (SD 1.x family) -> LDM UNetModel keys, without the prefix."""
    per_level = config["layers_per_block"]
    up_has_attention = ["CrossAttn" in name for name in config["up_block_types"]]
    top = {
        "time_embedding.linear_1.": "time_embed.0.",
        "time_embedding.linear_2.": "time_embed.2.",
        "conv_in.": "input_blocks.0.0.",
        "conv_norm_out.": "out.0.",
        "conv_out.": "out.2.",
    }
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        new = None
        for old, ldm in top.items():
            if key.startswith(old):
                new = ldm + key[len(old):]
        if new is None and key.startswith("down_blocks."):
            level, kind, index, rest = _split(key, "down_blocks.")
            first = 1 + level * (per_level + 1)  # input block of this level's first layer
            if kind == "resnets":
                new = f"input_blocks.{first + index}.0." + _rename_start(rest, _RESNET_NAMES)
            elif kind == "attentions":
                new = f"input_blocks.{first + index}.1.{rest}"
            elif kind == "downsamplers":  # 'downsamplers.0.conv.weight' -> '.0.op.weight'
                new = f"input_blocks.{first + per_level}.0.op." + rest.removeprefix("conv.")
        elif new is None and key.startswith("mid_block."):
            kind, index, rest = key[len("mid_block."):].split(".", 2)
            if kind == "resnets":
                new = f"middle_block.{2 * int(index)}." + _rename_start(rest, _RESNET_NAMES)
            else:
                new = f"middle_block.1.{rest}"
        elif new is None and key.startswith("up_blocks."):
            level, kind, index, rest = _split(key, "up_blocks.")
            first = level * (per_level + 1)
            if kind == "resnets":
                new = f"output_blocks.{first + index}.0." + _rename_start(rest, _RESNET_NAMES)
            elif kind == "attentions":
                new = f"output_blocks.{first + index}.1.{rest}"
            elif kind == "upsamplers":  # after the transformer if this level has one
                slot = 2 if up_has_attention[level] else 1
                new = f"output_blocks.{first + per_level}.{slot}.{rest}"
        if new is None:
            raise KeyError(f"unexpected UNet key '{key}'")
        out[new] = value
    return out


_VAE_ATTENTION_NAMES = [
    ("group_norm.", "norm."),
    ("to_q.", "q."),
    ("to_k.", "k."),
    ("to_v.", "v."),
    ("to_out.0.", "proj_out."),
]


def _vae_resnet(rest: str) -> str:
    return rest.replace("conv_shortcut.", "nin_shortcut.")


def vae_to_ldm(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL -> LDM autoencoder keys, without the prefix. Attention projections
    become 1x1 convolutions, as LDM stores them."""
    num_up = len(config["up_block_types"])
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        part, _, rest = key.partition(".")
        if part in ("quant_conv", "post_quant_conv"):
            out[key] = value
            continue
        if part not in ("encoder", "decoder"):
            raise KeyError(f"unexpected VAE key '{key}'")
        if rest.startswith(("conv_in.", "conv_out.")):
            new = rest
        elif rest.startswith("conv_norm_out."):
            new = "norm_out." + rest[len("conv_norm_out."):]
        elif rest.startswith("mid_block.resnets."):
            _, _, index, tail = rest.split(".", 3)
            new = f"mid.block_{int(index) + 1}." + _vae_resnet(tail)
        elif rest.startswith("mid_block.attentions.0."):
            new = "mid.attn_1." + _rename_start(rest[len("mid_block.attentions.0."):], _VAE_ATTENTION_NAMES)
            if value.ndim == 2:
                value = value[:, :, None, None]
        elif rest.startswith(("down_blocks.", "up_blocks.")):
            group, level, kind, index, tail = rest.split(".", 4)
            level = int(level)
            if group == "down_blocks":
                name = f"down.{level}"
            else:
                name = f"up.{num_up - 1 - level}"
            if kind == "resnets":
                new = f"{name}.block.{index}." + _vae_resnet(tail)
            elif kind in ("downsamplers", "upsamplers"):  # index is always 0
                new = f"{name}.{'downsample' if kind == 'downsamplers' else 'upsample'}.{tail}"
            else:
                raise KeyError(f"unexpected VAE key '{key}'")
        else:
            raise KeyError(f"unexpected VAE key '{key}'")
        out[f"{part}.{new}"] = value
    return out


def text_encoder_to_ldm(state_dict: Mapping[str, torch.Tensor], max_positions: int) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModel -> the keys SD 1.x stores under cond_stage_model.transformer.
    (always `text_model.*`; newer transformers versions drop that level from their own names).
    SD 1.x checkpoints also carry the position_ids buffer."""
    out = {}
    for key, value in state_dict.items():
        out[key if key.startswith("text_model.") else "text_model." + key] = value
    out.setdefault("text_model.embeddings.position_ids", torch.arange(max_positions).unsqueeze(0))
    return out


def ema_key(ldm_unet_key: str) -> str:
    """LDM's EMA copy of 'model.diffusion_model.a.b.weight' is 'model_ema.diffusion_modelabweight'."""
    return "model_ema." + ldm_unet_key[len("model."):].replace(".", "")


def to_ldm_checkpoint(unet, vae, text_encoder, scheduler=None, ema_unet_state: Mapping | None = None) -> dict:
    """One flat state dict in the original single-file layout, from loaded diffusers/transformers modules.

    `scheduler` adds the noise-schedule buffers training checkpoints carry (betas, alphas_cumprod);
    `ema_unet_state` (a diffusers UNet state dict) adds model_ema.* entries as training checkpoints have.
    """
    checkpoint: dict[str, torch.Tensor] = {}
    for key, value in unet_to_ldm(unet.state_dict(), unet.config).items():
        checkpoint[UNET_PREFIX + key] = value
    for key, value in vae_to_ldm(vae.state_dict(), vae.config).items():
        checkpoint[VAE_PREFIX + key] = value
    max_positions = text_encoder.config.max_position_embeddings
    for key, value in text_encoder_to_ldm(text_encoder.state_dict(), max_positions).items():
        checkpoint[TEXT_PREFIX + key] = value
    if scheduler is not None:
        checkpoint["betas"] = scheduler.betas.clone()
        checkpoint["alphas_cumprod"] = scheduler.alphas_cumprod.clone()
    if ema_unet_state is not None:
        for key, value in unet_to_ldm(ema_unet_state, unet.config).items():
            checkpoint[ema_key(UNET_PREFIX + key)] = value
        checkpoint["model_ema.decay"] = torch.tensor(0.9999)
        checkpoint["model_ema.num_updates"] = torch.tensor(22000, dtype=torch.int32)
    return {k: v.detach().contiguous().clone() for k, v in checkpoint.items()}
