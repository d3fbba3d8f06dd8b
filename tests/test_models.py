"""Model presets: the offline CLIP tokenizer, conv_in widening, the tiny preset's folders, the loader's
errors, and the real-model preset configs."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from ip2p.config import compose
from ip2p.errors import Ip2pError
from ip2p.models.loader import load_clip, load_diffusion, widen_conv_in
from ip2p.models.tiny import ensure_tiny
from ip2p.models.tokenizer import BOS_TOKEN, END_OF_WORD, EOS_TOKEN, train_bpe, write_clip_tokenizer


@pytest.fixture(scope="module")
def tiny_root(cfg) -> Path:
    return ensure_tiny(cfg.paths.cache, OmegaConf.to_container(cfg.model.build, resolve=True))


@pytest.fixture(scope="module")
def tokenizer(tiny_root):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(tiny_root / "editor" / "tokenizer")


# --- tokenizer ---

def test_tokenizer_round_trip(tokenizer):
    caption = "a photograph of a red house by the lake at sunset"
    ids = tokenizer(caption).input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == caption
    # CLIP lower-cases and splits punctuation into its own words; re-encoding the decoded text is stable.
    messy = "Turn the Sky PURPLE, please!"
    messy_ids = tokenizer(messy).input_ids
    decoded = tokenizer.decode(messy_ids, skip_special_tokens=True)
    assert decoded == "turn the sky purple , please !"
    assert tokenizer(decoded).input_ids == messy_ids


def test_tokenizer_truncates_to_77_tokens(tokenizer):
    long_text = " ".join(["a snowy mountain village with wooden houses"] * 30)
    ids = tokenizer(long_text, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True).input_ids
    assert tokenizer.model_max_length == 77
    assert len(ids) == 77
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    short = tokenizer("a cat", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(short) == 77 and short[-1] == tokenizer.pad_token_id


def test_tokenizer_special_ids_follow_the_clip_layout(tokenizer, tiny_root):
    # CLIP puts <|startoftext|> and <|endoftext|> last (49406, 49407 in OpenAI's 49408-entry vocab) and pads with eos.
    vocab = json.loads((tiny_root / "editor" / "tokenizer" / "vocab.json").read_text(encoding="utf-8"))
    assert len(tokenizer) == len(vocab)
    assert tokenizer.bos_token == BOS_TOKEN and tokenizer.bos_token_id == len(vocab) - 2 == vocab[BOS_TOKEN]
    assert tokenizer.eos_token == EOS_TOKEN and tokenizer.eos_token_id == len(vocab) - 1 == vocab[EOS_TOKEN]
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    # 256 byte symbols, then the same with the end-of-word marker
    assert vocab["a"] == ord("a") - ord("!") and vocab["a" + END_OF_WORD] == 256 + vocab["a"]


def test_vocab_and_merges_alone_give_the_same_tokens(tokenizer, tiny_root, tmp_path):
    """The two CLIP files (what other CLIP tokenizers read) agree with the saved fast tokenizer."""
    from transformers import CLIPTokenizer

    for name in ("vocab.json", "merges.txt"):
        shutil.copy(tiny_root / "editor" / "tokenizer" / name, tmp_path / name)
    from_files = CLIPTokenizer.from_pretrained(tmp_path)  # built from the two files alone
    assert len(from_files) == len(tokenizer)
    for text in ["make it snowy", "Turn the sky purple!", "a photo of 3 dogs, in watercolor style"]:
        assert from_files(text).input_ids == tokenizer(text).input_ids


def test_bpe_merges_by_hand():
    # "ab" x3 and "ac" x1 -> words (a, b</w>) x3, (a, c</w>) x1: (a, b</w>) first, then (a, c</w>), then nothing.
    assert train_bpe(["ab ab", "ab ac"], 5) == [("a", "b</w>"), ("a", "c</w>")]
    # A tie (each pair once) goes to the smallest pair.
    assert train_bpe(["cd ab"], 1) == [("a", "b</w>")]


def test_bpe_is_deterministic(tmp_path):
    texts = ["a red car on a wet street", "make the street snowy", "a cat sleeping on a red sofa",
             "turn the car into a boat", "a sofa in the street"] * 3
    first = train_bpe(texts, 40)
    assert train_bpe(list(texts), 40) == first
    assert train_bpe(list(reversed(texts)), 40) == first  # order of the input does not matter
    a = write_clip_tokenizer(texts, tmp_path / "a", 40)
    b = write_clip_tokenizer(list(reversed(texts)), tmp_path / "b", 40)
    for name in ("vocab.json", "merges.txt"):
        assert (a / name).read_bytes() == (b / name).read_bytes()


# --- conv_in widening ---

def test_widen_conv_in_copies_weights_and_bias(tiny_base):
    original = tiny_base.unet
    unet = widen_conv_in(copy.deepcopy(original), 8)
    old, new = original.conv_in, unet.conv_in
    assert new.in_channels == 8 and unet.config.in_channels == 8
    assert torch.equal(new.weight[:, :4], old.weight)
    assert torch.equal(new.weight[:, 4:], torch.zeros_like(new.weight[:, 4:]))
    assert torch.equal(new.bias, old.bias) and bool(new.bias.abs().sum() > 0)

    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 16, 16, generator=g)
    text = torch.randn(2, 77, original.config.cross_attention_dim, generator=g)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        expected = original(latents, t, encoder_hidden_states=text).sample
        got = unet(torch.cat([latents, torch.zeros_like(latents)], dim=1), t, encoder_hidden_states=text).sample
    # Equal up to float summation order: the convolution may sum the 8 channels in another order
    # than the 4 (bit-equal on the CPUs tried, but kernels differ between machines).
    assert torch.allclose(got, expected, atol=1e-6, rtol=0)
    assert float((got - expected).abs().max()) < 1e-6 < float(expected.abs().max())


def test_widen_conv_in_edge_cases(tiny_base, tiny_editor):
    unet = copy.deepcopy(tiny_editor.unet)
    assert widen_conv_in(unet, 8) is unet and torch.equal(unet.conv_in.weight, tiny_editor.unet.conv_in.weight)
    with pytest.raises(Ip2pError):
        widen_conv_in(copy.deepcopy(tiny_editor.unet), 4)


def test_base_folder_loaded_as_editor_is_widened(cfg, tiny_root, tiny_base, caplog):
    editor = load_diffusion(str(tiny_root / "base"), "editor", cfg.model, cfg.paths.cache, "cpu", "float32")
    assert editor.unet.config.in_channels == 8
    assert torch.equal(editor.unet.conv_in.weight[:, :4], tiny_base.unet.conv_in.weight)
    assert torch.equal(editor.unet.conv_in.weight[:, 4:], torch.zeros(editor.unet.conv_in.weight[:, 4:].shape))
    assert torch.equal(editor.unet.conv_in.bias, tiny_base.unet.conv_in.bias)
    assert "widening conv_in" in caplog.text
    with pytest.raises(Ip2pError) as err:  # an 8-channel editor is no text-to-image base
        load_diffusion(str(tiny_root / "editor"), "base", cfg.model, cfg.paths.cache, "cpu", "float32")
    assert "\n" not in str(err.value)


# --- the tiny preset's folders ---

def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("role", ["base", "editor"])
def test_pipeline_folder_round_trip(tiny_root, tmp_path, role):
    """Every weight file loads completely (nothing left at random init) and survives save + load."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    folder = tiny_root / role
    for sub, cls, weights in [("unet", UNet2DConditionModel, "diffusion_pytorch_model.safetensors"),
                              ("vae", AutoencoderKL, "diffusion_pytorch_model.safetensors"),
                              ("text_encoder", CLIPTextModel, "model.safetensors")]:
        model = cls.from_pretrained(folder / sub)
        state = model.state_dict()
        assert_same_tensors(state, load_file(str(folder / sub / weights)))
        model.save_pretrained(tmp_path / sub)
        assert_same_tensors(cls.from_pretrained(tmp_path / sub).state_dict(), state)
    index = json.loads((folder / "model_index.json").read_text())
    pipeline = "StableDiffusionInstructPix2PixPipeline" if role == "editor" else "StableDiffusionPipeline"
    assert index["_class_name"] == pipeline
    assert json.loads((folder / "unet" / "config.json").read_text())["in_channels"] == (8 if role == "editor" else 4)


def test_clip_folder_round_trip(tiny_root, tmp_path, cfg):
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(tiny_root / "clip")
    state = model.state_dict()
    assert_same_tensors(state, load_file(str(tiny_root / "clip" / "model.safetensors")))
    model.save_pretrained(tmp_path / "clip")
    assert_same_tensors(CLIPModel.from_pretrained(tmp_path / "clip").state_dict(), state)
    clip = load_clip("tiny", cfg.model, cfg.paths.cache, "cpu")
    assert_same_tensors(clip.model.state_dict(), state)
    assert clip.processor.tokenizer("make it snowy").input_ids == \
        clip.processor.tokenizer.__class__.from_pretrained(tiny_root / "editor" / "tokenizer")("make it snowy").input_ids


def test_base_vae_replaces_the_base_vae_for_the_base_role_only(cfg, tiny_base, tmp_path):
    """model.base_vae (a VAE swapped in under the base, as SD users swap in SD's fine-tuned VAE): the base
    role encodes and decodes with it and keeps its own UNet; an editor keeps the VAE of its own folder;
    a VAE with other latent channels is a one-line error."""
    other = type(tiny_base.vae).from_config(tiny_base.vae.config)
    other.load_state_dict(tiny_base.vae.state_dict())
    with torch.no_grad():
        other.decoder.conv_out.bias.add_(0.3)
    other.save_pretrained(tmp_path / "vae-ft")
    model = OmegaConf.merge(cfg.model, {"base_vae": str(tmp_path / "vae-ft")})
    base = load_diffusion("tiny", "base", model, cfg.paths.cache, "cpu", "float32")
    assert torch.equal(base.vae.decoder.conv_out.bias, other.decoder.conv_out.bias)
    assert not torch.equal(base.vae.decoder.conv_out.bias, tiny_base.vae.decoder.conv_out.bias)
    assert all(torch.equal(t, tiny_base.unet.state_dict()[n]) for n, t in base.unet.state_dict().items())
    editor = load_diffusion("tiny", "editor", model, cfg.paths.cache, "cpu", "float32")
    assert torch.equal(editor.vae.decoder.conv_out.bias, tiny_base.vae.decoder.conv_out.bias)
    wide = type(tiny_base.vae).from_config({**tiny_base.vae.config, "latent_channels": 8})
    wide.save_pretrained(tmp_path / "vae-8")
    with pytest.raises(Ip2pError, match="8 latent channels") as err:
        load_diffusion("tiny", "base", OmegaConf.merge(cfg.model, {"base_vae": str(tmp_path / "vae-8")}),
                       cfg.paths.cache, "cpu", "float32")
    assert "\n" not in str(err.value)


def test_tiny_build_is_deterministic(cfg, tmp_path):
    build = OmegaConf.to_container(cfg.model.build, resolve=True)
    first, second = ensure_tiny(tmp_path / "one", build), ensure_tiny(tmp_path / "two", build)
    assert first.name == second.name  # the folder name is a hash of the build spec
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert Path("editor/unet/diffusion_pytorch_model.safetensors") in files
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    for rel in files:
        if rel.suffix in (".safetensors", ".txt") or rel.name == "vocab.json":
            assert (first / rel).read_bytes() == (second / rel).read_bytes(), rel
    # no staging folders left behind
    assert [p.name for p in (tmp_path / "one").iterdir()] == [first.name]


# --- loader errors: one line, naming what was asked for ---

def assert_one_line_naming(err, name: str):
    message = str(err.value)
    assert "\n" not in message and name in message


def test_missing_folder(cfg, tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(Ip2pError) as err:
        load_diffusion(str(missing), "editor", cfg.model, cfg.paths.cache)
    assert_one_line_naming(err, str(missing))
    with pytest.raises(Ip2pError) as err:
        load_clip(str(missing), cfg.model, cfg.paths.cache)
    assert_one_line_naming(err, str(missing))


def test_folder_without_unet(cfg, tiny_root, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_root / "editor", broken)
    shutil.rmtree(broken / "unet")
    with pytest.raises(Ip2pError) as err:
        load_diffusion(str(broken), "editor", cfg.model, cfg.paths.cache)
    assert_one_line_naming(err, str(broken))
    assert "unet" in str(err.value)


@pytest.mark.parametrize("hub_id", ["nobody/no-such-model-ip2p", "timbrooks/instruct-pix2pix"])
def test_hub_id_not_available_offline(cfg, monkeypatch, hub_id):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(Ip2pError) as err:
        load_diffusion(hub_id, "editor", cfg.model, cfg.paths.cache)
    assert_one_line_naming(err, hub_id)


# --- the real-model presets ---

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
IP2P = "timbrooks/instruct-pix2pix"
CLIP_L14 = "openai/clip-vit-large-patch14"


def test_sd15_preset():
    model = compose(["model=sd15"]).model
    assert model.name == "sd15"
    assert model.base == SD15 and model.editor is None and model.clip == CLIP_L14
    assert model.single_file_config.base == SD15 and model.single_file_config.editor == IP2P


def test_ip2p_preset():
    model = compose(["model=ip2p"]).model
    assert model.name == "ip2p"
    assert model.editor == IP2P and model.base == SD15 and model.clip == CLIP_L14
    assert model.single_file_config.editor == IP2P and model.single_file_config.base == SD15


def test_tiny_preset_is_the_default():
    model = compose([]).model
    assert model.name == "tiny"
    assert model.editor == model.base == model.clip == "tiny"
    assert model.single_file_config.editor == model.single_file_config.base == "tiny"
    assert model.build.max_text_tokens == 77 and model.build.latent_channels == 4


def test_preset_without_editor_is_a_clear_error(cfg):
    model = compose(["model=sd15"]).model
    with pytest.raises(Ip2pError) as err:
        load_diffusion(model.editor, "editor", model, cfg.paths.cache)
    assert_one_line_naming(err, "model.editor")


def test_a_tiny_source_under_a_preset_without_build_is_a_clear_error(tmp_path):
    """model=mini / sd15 / ip2p carry `build: null` (dvc.yaml tracks the key); asking one of them for a
    'tiny' component must say so, not fail inside the builder."""
    from ip2p.models.loader import resolve_source

    model_cfg = OmegaConf.to_container(compose(["model=mini"]).model, resolve=True)
    assert model_cfg["build"] is None
    with pytest.raises(Ip2pError, match="no `build` section"):
        resolve_source("tiny", "base", model_cfg, tmp_path)
    assert not any(tmp_path.iterdir())  # nothing half-built
