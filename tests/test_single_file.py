"""Original single-file checkpoints (CompVis/LDM key layout) through the loader and diffusers' own
single-file path.

The tiny models are written in the original layout by our own converter (tests/ldm_layout.py) and
read back by `load_diffusion`, which hands them to diffusers' `from_single_file` with the tiny
folders as configs. The weights in the files are perturbed first, so they differ from the weights
in the config folders: a component that silently came from the folder would be caught.
"""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf, open_dict
from safetensors.torch import save_file

from ip2p.errors import Ip2pError
from ip2p.models.loader import load_diffusion
from ldm_layout import TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX, ema_key, to_ldm_checkpoint, unet_to_ldm, vae_to_ldm

MODULES = ("unet", "vae", "text_encoder")


def perturbed(components, seed: int):
    """Deep copies of unet, vae and text encoder with every parameter moved by small noise."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in MODULES:
        module = copy.deepcopy(getattr(components, name))
        with torch.no_grad():
            for p in module.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=g))
        out[name] = module
    return out


def write(checkpoint: dict, path, fmt: str):
    if fmt == "safetensors":
        save_file(checkpoint, str(path))
    else:  # a training checkpoint as Lightning writes it, plain values beside the state dict
        torch.save({"state_dict": checkpoint, "global_step": 22000, "epoch": 3}, path)
    return path


@pytest.fixture(scope="module")
def model_cfg(cfg):
    model = copy.deepcopy(cfg.model)
    with open_dict(model):
        model.single_file_config = OmegaConf.create({"editor": "tiny", "base": "tiny"})
    return model


def assert_state_equal(loaded, expected):
    a, b = loaded.state_dict(), expected.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
@pytest.mark.parametrize("role", ["editor", "base"])
def test_single_file_round_trip(request, tmp_path, cfg, model_cfg, role, fmt):
    original = request.getfixturevalue(f"tiny_{role}")
    weights = perturbed(original, seed=1)
    checkpoint = to_ldm_checkpoint(weights["unet"], weights["vae"], weights["text_encoder"], original.scheduler)
    path = write(checkpoint, tmp_path / f"{role}.{fmt}", fmt)

    loaded = load_diffusion(str(path), role, model_cfg, cfg.paths.cache, "cpu", "float32")

    for name in MODULES:
        assert_state_equal(getattr(loaded, name), weights[name])
        # and not the config folder's weights
        first = next(iter(getattr(original, name).state_dict()))
        assert not torch.equal(getattr(loaded, name).state_dict()[first], getattr(original, name).state_dict()[first])
    assert loaded.unet.config.in_channels == original.unet.config.in_channels
    assert type(loaded.scheduler) is type(original.scheduler)
    assert dict(loaded.scheduler.config) == dict(original.scheduler.config)
    assert loaded.tokenizer("a red house").input_ids == original.tokenizer("a red house").input_ids
    assert not loaded.unet.training and not any(p.requires_grad for p in loaded.unet.parameters())


def test_training_checkpoint_loads_ema_weights(tmp_path, cfg, model_cfg, tiny_editor):
    raw = perturbed(tiny_editor, seed=2)
    ema = perturbed(tiny_editor, seed=3)
    checkpoint = to_ldm_checkpoint(raw["unet"], raw["vae"], raw["text_encoder"], tiny_editor.scheduler,
                                   ema_unet_state=ema["unet"].state_dict())
    assert sum(k.startswith("model_ema.") for k in checkpoint) > 100  # as in a real training checkpoint
    path = write(checkpoint, tmp_path / "train.ckpt", "ckpt")
    loaded = load_diffusion(str(path), "editor", model_cfg, cfg.paths.cache, "cpu", "float32")
    assert_state_equal(loaded.unet, ema["unet"])
    assert_state_equal(loaded.vae, raw["vae"])


def test_four_channel_file_as_editor_is_widened(tmp_path, cfg, model_cfg, tiny_base):
    weights = perturbed(tiny_base, seed=4)
    path = write(to_ldm_checkpoint(weights["unet"], weights["vae"], weights["text_encoder"]),
                 tmp_path / "sd.safetensors", "safetensors")
    loaded = load_diffusion(str(path), "editor", model_cfg, cfg.paths.cache, "cpu", "float32")
    conv, base_conv = loaded.unet.conv_in, weights["unet"].conv_in
    assert loaded.unet.config.in_channels == 8 and conv.weight.shape[1] == 8
    assert torch.equal(conv.weight[:, :4], base_conv.weight)
    assert torch.equal(conv.weight[:, 4:], torch.zeros_like(conv.weight[:, 4:]))
    assert torch.equal(conv.bias, base_conv.bias)
    rest = {k: v for k, v in loaded.unet.state_dict().items() if not k.startswith("conv_in.")}
    expected = weights["unet"].state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in rest.items())


def test_editor_file_as_base_is_refused(tmp_path, cfg, model_cfg, tiny_editor):
    path = write(to_ldm_checkpoint(tiny_editor.unet, tiny_editor.vae, tiny_editor.text_encoder),
                 tmp_path / "ip2p.safetensors", "safetensors")
    with pytest.raises(Ip2pError) as err:
        load_diffusion(str(path), "base", model_cfg, cfg.paths.cache, "cpu", "float32")
    assert "\n" not in str(err.value) and "8 input channels" in str(err.value)


class _WritesAFile:
    """A pickled object that would run code on load: it must never be unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_ckpt_with_pickled_objects_is_refused(tmp_path, cfg, model_cfg, tiny_editor):
    marker = tmp_path / "code-ran"
    checkpoint = to_ldm_checkpoint(tiny_editor.unet, tiny_editor.vae, tiny_editor.text_encoder)
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": checkpoint, "callbacks": _WritesAFile(marker)}, path)
    with pytest.raises(Ip2pError) as err:
        load_diffusion(str(path), "editor", model_cfg, cfg.paths.cache, "cpu", "float32")
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "weights_only" in message
    assert not marker.exists()


def test_missing_single_file_config_is_one_line_error(tmp_path, cfg, model_cfg, tiny_editor):
    path = write(to_ldm_checkpoint(tiny_editor.unet, tiny_editor.vae, tiny_editor.text_encoder),
                 tmp_path / "ip2p.safetensors", "safetensors")
    model = copy.deepcopy(model_cfg)
    model.single_file_config.editor = None
    with pytest.raises(Ip2pError) as err:
        load_diffusion(str(path), "editor", model, cfg.paths.cache, "cpu", "float32")
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "model.single_file_config.editor" in message


def test_missing_and_foreign_files_are_one_line_errors(tmp_path, cfg, model_cfg, tiny_editor):
    missing = tmp_path / "nope.ckpt"
    with pytest.raises(Ip2pError) as err:
        load_diffusion(str(missing), "editor", model_cfg, cfg.paths.cache, "cpu", "float32")
    assert "\n" not in str(err.value) and str(missing) in str(err.value)

    vae_only = {VAE_PREFIX + k: v.contiguous() for k, v in
                vae_to_ldm(tiny_editor.vae.state_dict(), tiny_editor.vae.config).items()}
    path = write(vae_only, tmp_path / "vae.safetensors", "safetensors")
    with pytest.raises(Ip2pError) as err:
        load_diffusion(str(path), "editor", model_cfg, cfg.paths.cache, "cpu", "float32")
    assert "\n" not in str(err.value) and str(path) in str(err.value)

    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(Ip2pError) as err:
        load_diffusion(str(garbage), "editor", model_cfg, cfg.paths.cache, "cpu", "float32")
    assert "\n" not in str(err.value) and str(garbage) in str(err.value)


# --- the converter at Stable Diffusion 1.5 size (empty weights on the meta device: no memory) ---

@pytest.fixture(scope="module")
def sd15_size_checkpoint():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768)  # the defaults are SD 1.x's UNet
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
        )
        text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                            num_attention_heads=12, max_position_embeddings=77))
    checkpoint = {}
    checkpoint.update({UNET_PREFIX + k: v for k, v in unet_to_ldm(unet.state_dict(), unet.config).items()})
    checkpoint.update({VAE_PREFIX + k: v for k, v in vae_to_ldm(vae.state_dict(), vae.config).items()})
    checkpoint.update({TEXT_PREFIX + ("text_model." + k).replace("text_model.text_model.", "text_model."): v
                       for k, v in text.state_dict().items()})
    return unet, vae, checkpoint


def test_converter_writes_the_released_key_names(sd15_size_checkpoint):
    """Key names and shapes as they appear in v1-5-pruned-emaonly.safetensors."""
    unet, vae, checkpoint = sd15_size_checkpoint
    assert len([k for k in checkpoint if k.startswith(UNET_PREFIX)]) == len(unet.state_dict())  # one to one
    assert len([k for k in checkpoint if k.startswith(VAE_PREFIX)]) == len(vae.state_dict())
    shapes = {
        "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "model.diffusion_model.input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
        "model.diffusion_model.input_blocks.11.0.out_layers.3.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.middle_block.1.proj_in.weight": (1280, 1280, 1, 1),
        "model.diffusion_model.middle_block.2.emb_layers.1.weight": (1280, 1280),
        "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
        "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight": (2560, 320),
        "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
        "model.diffusion_model.time_embed.2.weight": (1280, 1280),
        "first_stage_model.encoder.down.0.downsample.conv.weight": (128, 128, 3, 3),
        "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "first_stage_model.encoder.norm_out.weight": (512,),
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "first_stage_model.decoder.up.3.block.2.conv2.weight": (512, 512, 3, 3),
        "first_stage_model.quant_conv.weight": (8, 8, 1, 1),
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": (768,),
    }
    for key, shape in shapes.items():
        assert tuple(checkpoint[key].shape) == shape, key


def test_diffusers_recognises_and_inverts_the_layout(sd15_size_checkpoint):
    """diffusers' own model-type guess and converters, on the SD 1.5-size layout we write."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        infer_diffusers_model_type,
    )

    unet, vae, checkpoint = sd15_size_checkpoint
    assert infer_diffusers_model_type(checkpoint) == "v1"
    assert convert_ldm_unet_checkpoint(checkpoint, unet.config).keys() == unet.state_dict().keys()
    assert convert_ldm_vae_checkpoint(checkpoint, vae.config).keys() == vae.state_dict().keys()
    widened = dict(checkpoint)
    widened[UNET_PREFIX + "input_blocks.0.0.weight"] = torch.empty(320, 8, 3, 3, device="meta")
    assert infer_diffusers_model_type(widened) == "instruct-pix2pix"
    assert ema_key(UNET_PREFIX + "input_blocks.0.0.weight") == "model_ema.diffusion_modelinput_blocks00weight"
