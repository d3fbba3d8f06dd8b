"""One loader for every model preset: tiny, SD 1.5-class, InstructPix2Pix, CLIP.

A model "source" is one of:
  "tiny"                       the embedded preset, built on first use (see ip2p.models.tiny)
  a folder                     diffusers pipeline layout (model_index.json, unet/, vae/, ...) or a CLIP folder
  a .ckpt / .safetensors file  an original single-file Stable Diffusion / InstructPix2Pix checkpoint
  models:/NAME@ALIAS           a model in the MLflow registry (MLFLOW_TRACKING_URI, default sqlite:///mlflow.db)
  anything else                a Hugging Face hub id (works offline only if it is in the local hub cache)
Weights load from safetensors, or from pickles with `weights_only=True` (diffusers and transformers
both do so), never with arbitrary unpickling.
"""

from __future__ import annotations

import logging
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping

import torch

from ip2p.config import first_line
from ip2p.errors import Ip2pError
from ip2p.models.tiny import ensure_tiny

log = logging.getLogger(__name__)

Role = Literal["editor", "base"]
SINGLE_FILE_SUFFIXES = (".ckpt", ".safetensors", ".pt", ".pth", ".bin")
PIPELINE_LAYOUT = "a diffusers pipeline folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)"


@dataclass
class DiffusionComponents:
    """The parts of a latent diffusion pipeline, loaded once and handed down to the stages."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    source: str
    autocast: torch.dtype | None = None   # the UNet's forward under torch.autocast in this dtype (None: off;
                                          # sampling.loop.unet_prediction)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "DiffusionComponents":
        for module in (self.unet, self.vae, self.text_encoder):
            module.to(device=device)
            if dtype is not None and module.dtype != dtype:
                module.to(dtype=dtype)
        return self


def check_square_resolution(components: DiffusionComponents, resolution: int, setting: str) -> None:
    """A square side the model can work at: a multiple of the VAE's downsampling factor (else the VAE drops
    the remainder, and decoded images no longer match the inputs' size), large enough for one latent
    pixel at the UNet's deepest level. One line naming `setting` otherwise."""
    factor = 2 ** (len(components.vae.config.block_out_channels) - 1)
    smallest = factor * 2 ** (len(components.unet.config.block_out_channels) - 1)
    if resolution % factor or resolution < smallest:
        raise Ip2pError(f"{setting} must be a multiple of {factor} (the VAE's factor) and at least {smallest} "
                        f"for this model (got {resolution})")


def weights_device(module) -> torch.device:
    """Where a module's weights are, read from its first parameter in microseconds. diffusers'
    ModelMixin `.device` / `.dtype` walk every submodule for offloading hooks (about a millisecond on
    SD 1.5's UNet), too slow to ask at every sampling step. A module without parameters answers itself."""
    p = next(module.parameters(), None)
    return module.device if p is None else p.device


def weights_dtype(module) -> torch.dtype:
    """The dtype of a module's weights, as `weights_device` reads their device."""
    p = next(module.parameters(), None)
    return module.dtype if p is None else p.dtype


@dataclass
class ClipComponents:
    model: Any
    processor: Any
    source: str


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str | torch.dtype | None) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    table = {None: torch.float32, "float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if name not in table:
        raise Ip2pError(f"unknown dtype '{name}': use one of float32, float16, bfloat16")
    return table[name]


def resolve_autocast(name: str | torch.dtype | None) -> torch.dtype | None:
    """The `autocast` setting: null / "none" = off, else bfloat16 or float16."""
    if name is None or (isinstance(name, str) and name.lower() in ("none", "null", "off", "")):
        return None
    dtype = resolve_dtype(name)
    if dtype == torch.float32:
        return None
    return dtype


def _tiny_root(model_cfg: Mapping[str, Any], cache_dir: str | Path) -> Path:
    from omegaconf import DictConfig, OmegaConf

    build = model_cfg.get("build")
    if build is None:
        raise Ip2pError(f"model '{model_cfg.get('name')}' has no `build` section, so it cannot make a 'tiny' "
                        "model: use model=tiny, or give real checkpoints")
    if isinstance(build, DictConfig):
        build = OmegaConf.to_container(build, resolve=True)
    return ensure_tiny(cache_dir, build)


def resolve_source(source: str, role: str, model_cfg: Mapping[str, Any], cache_dir: str | Path) -> str:
    """Turn "tiny" into its built folder; leave folders, files and hub ids as they are."""
    if source == "tiny":
        return str(_tiny_root(model_cfg, cache_dir) / role)
    if str(source).startswith("models:/"):
        from ip2p.models.registry_uri import resolve_model_uri

        return resolve_model_uri(str(source), cache_dir)
    return str(source)


def _is_local(source: str) -> bool:
    return source.startswith((".", "/", "~")) or Path(source).expanduser().exists()


def _check_local(source: str, what: str) -> Path:
    path = Path(source).expanduser()
    if not path.exists():
        raise Ip2pError(f"checkpoint not found: '{source}' does not exist (expected {what})")
    return path


def widen_conv_in(unet, in_channels: int):
    """Give the UNet's first convolution `in_channels` inputs: old channels copied, new ones zero.

    The bias is kept (diffusers' training script drops it, diffusers issue 4960). With the new
    channels at zero the widened UNet computes exactly what the original did.
    """
    old = unet.conv_in
    if old.in_channels == in_channels:
        return unet
    if old.in_channels > in_channels:
        raise Ip2pError(f"cannot narrow conv_in from {old.in_channels} to {in_channels} input channels")
    new = torch.nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
                          device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, : old.in_channels] = old.weight
        new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=in_channels)
    return unet


def load_vae(source: str, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = "float32"):
    """An AutoencoderKL on its own: a VAE folder or hub id (config.json at its root, e.g.
    stabilityai/sd-vae-ft-mse, the VAE the original decodes its synthesized pairs with), or the vae/ of
    a pipeline folder. Frozen, in eval mode."""
    from diffusers import AutoencoderKL

    source = str(source)
    folder = Path(source).expanduser()
    subfolder = "vae" if (folder / "vae" / "config.json").is_file() else None
    if _is_local(source) and not (folder / "config.json").is_file() and subfolder is None:
        raise Ip2pError(f"'{source}' holds no VAE (expected config.json, or a pipeline folder with vae/)")
    try:
        vae = AutoencoderKL.from_pretrained(str(folder) if _is_local(source) else source, subfolder=subfolder)
    except (OSError, ValueError) as err:
        raise Ip2pError(f"cannot load the VAE '{source}': {first_line(err)}") from err
    vae = vae.eval().requires_grad_(False).to(resolve_device(str(device)) if isinstance(device, str) else device)
    wanted = resolve_dtype(dtype)
    # only a real cast: diffusers warns on any .to(dtype), even to the dtype the weights already have
    return vae.to(dtype=wanted) if wanted is not None and wanted != vae.dtype else vae


def load_diffusion(
    source: str,
    role: Role,
    model_cfg: Mapping[str, Any],
    cache_dir: str | Path,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = "float32",
    autocast: str | torch.dtype | None = None,
) -> DiffusionComponents:
    """Load a pipeline's components. role="editor" returns an 8-channel UNet (a 4-channel
    checkpoint is widened), role="base" the text-to-image UNet as stored. `autocast` (bfloat16 |
    float16 | None) runs the UNet's forward under torch.autocast (sampling.loop.unet_prediction)."""
    autocast_dtype = resolve_autocast(autocast)   # a bad name fails before any weights load
    if source is None:
        raise Ip2pError(f"model preset '{model_cfg.get('name')}' has no {role} checkpoint configured "
                        f"(set model.{role}=PATH or pick another preset)")
    resolved = resolve_source(source, role, model_cfg, cache_dir)
    if resolved.lower().endswith(SINGLE_FILE_SUFFIXES):
        parts = _load_single_file(resolved, role, model_cfg, cache_dir)
    else:
        parts = _load_pipeline_folder(resolved)
    base_vae = model_cfg.get("base_vae") if role == "base" else None
    if base_vae:  # another VAE under the base (as SD users swap in SD's fine-tuned VAE): every stage that
        parts = _swap_vae(parts, str(base_vae))   # starts from the base encodes and decodes with it
    latent_channels = parts.vae.config.latent_channels
    if role == "editor" and parts.unet.config.in_channels == latent_channels:
        log.warning("%s has a %d-channel UNet: widening conv_in to %d channels (image channels start at zero)",
                    source, latent_channels, 2 * latent_channels)
        widen_conv_in(parts.unet, 2 * latent_channels)
    expected = 2 * latent_channels if role == "editor" else latent_channels
    if parts.unet.config.in_channels != expected:
        raise Ip2pError(f"'{source}' has a UNet with {parts.unet.config.in_channels} input channels; "
                        f"a {role} needs {expected}")
    for module in (parts.unet, parts.vae, parts.text_encoder):
        module.eval().requires_grad_(False)
    parts.autocast = autocast_dtype
    return parts.to(resolve_device(str(device)) if isinstance(device, str) else device, resolve_dtype(dtype))


def _swap_vae(parts: DiffusionComponents, source: str) -> DiffusionComponents:
    """The base's components with the VAE at `source` in place of its own. Its latents must have the
    base's channels; an editor trained from the base saves this VAE in its folder, so it travels on."""
    vae = load_vae(source)
    own = parts.vae.config.latent_channels
    if vae.config.latent_channels != own:
        raise Ip2pError(f"model.base_vae '{source}' has {vae.config.latent_channels} latent channels; "
                        f"the base '{parts.source}' has {own}")
    parts.vae = vae
    return parts


def _load_pipeline_folder(source: str) -> DiffusionComponents:
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    if _is_local(source):
        path = _check_local(source, PIPELINE_LAYOUT)
        missing = [d for d in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if not (path / d).is_dir()]
        if missing:
            raise Ip2pError(f"'{source}' is not a pipeline checkpoint: missing {', '.join(missing)} "
                            f"(expected {PIPELINE_LAYOUT})")
        source = str(path)
    try:
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet")
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae")
        text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder")
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
        scheduler_config = diffusers.DDPMScheduler.load_config(source, subfolder="scheduler")
    except (OSError, ValueError, EnvironmentError) as err:
        reason = first_line(err)
        raise Ip2pError(f"cannot load checkpoint '{source}' (expected {PIPELINE_LAYOUT} or a hub id "
                        f"available offline): {reason}") from err
    # Keep the scheduler the checkpoint ships; samplers pick their own by name from its config.
    scheduler_cls = getattr(diffusers, scheduler_config.get("_class_name", ""), diffusers.DDPMScheduler)
    scheduler = scheduler_cls.from_config(scheduler_config)
    return DiffusionComponents(unet, vae, text_encoder, tokenizer, scheduler, source)


# The first convolution of the UNet in the original layout: its input channels tell a
# text-to-image checkpoint (4) from an InstructPix2Pix one (8).
LDM_CONV_IN_KEY = "model.diffusion_model.input_blocks.0.0.weight"


def _single_file_unet_in_channels(path: str) -> int:
    """Read the UNet's input channels from an original single-file checkpoint without loading it all
    (safetensors header; pickles memory-mapped, always with weights_only=True)."""
    try:
        if path.lower().endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as handle:
                shape = handle.get_slice(LDM_CONV_IN_KEY).get_shape() if LDM_CONV_IN_KEY in handle.keys() else None
        else:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
            while isinstance(checkpoint, Mapping) and "state_dict" in checkpoint:  # Lightning nests it
                checkpoint = checkpoint["state_dict"]
            weight = checkpoint.get(LDM_CONV_IN_KEY) if isinstance(checkpoint, Mapping) else None
            shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else None
    except pickle.UnpicklingError as err:
        raise Ip2pError(f"refusing to load '{path}': it holds pickled objects other than tensors and plain "
                        "containers (only weights_only loading is allowed; use a .safetensors file)") from err
    except Exception as err:  # safetensors, zipfile and torch raise many types for damaged files
        raise Ip2pError(f"cannot read single-file checkpoint '{path}': {first_line(err)}") from err
    if shape is None or len(shape) != 4:
        raise Ip2pError(f"'{path}' is not an original Stable Diffusion / InstructPix2Pix checkpoint: "
                        f"no UNet weight '{LDM_CONV_IN_KEY}'")
    return int(shape[1])


def _load_single_file(path: str, role: Role, model_cfg: Mapping[str, Any], cache_dir: str | Path) -> DiffusionComponents:
    """An original (CompVis/LDM key layout) checkpoint in one file; component configs come from
    `model.single_file_config.<role>` (a diffusers folder or hub id) since the file has none.

    With `config` given, diffusers converts the weights with that folder's configs; without it, it
    guesses the model type from the keys and fetches the released model's hub configs (SD 1.5 sizes),
    which fits neither other sizes nor an offline machine. The UNet's input
    channels are taken from the file, so a 4-channel text-to-image file loads as an editor too (it is
    widened afterwards, like a 4-channel folder). Training checkpoints keep EMA weights beside the raw
    ones; the EMA weights are the ones the original code samples with, so they are loaded.
    """
    from diffusers import StableDiffusionInstructPix2PixPipeline, StableDiffusionPipeline

    _check_local(path, "a .ckpt or .safetensors checkpoint file")
    config_source = (model_cfg.get("single_file_config") or {}).get(role)
    if config_source is None:
        raise Ip2pError(f"'{path}' is a single-file checkpoint: set model.single_file_config.{role} to a "
                        "diffusers folder or hub id that holds its component configs")
    config_source = resolve_source(config_source, role, model_cfg, cache_dir)
    in_channels = _single_file_unet_in_channels(path)
    pipeline_cls = StableDiffusionInstructPix2PixPipeline if role == "editor" else StableDiffusionPipeline
    try:
        pipe = pipeline_cls.from_single_file(
            path, config=config_source, local_files_only=_is_local(config_source),
            safety_checker=None, requires_safety_checker=False,
            num_in_channels=in_channels,  # diffusers' name for the UNet's in_channels here (UNet only)
            extract_ema=True,             # no-op for files without model_ema.* (e.g. *-emaonly)
        )
    except Exception as err:  # diffusers raises many types here; the user needs one line
        reason = first_line(err)
        raise Ip2pError(f"cannot load single-file checkpoint '{path}' with configs from '{config_source}': "
                        f"{reason}") from err
    return DiffusionComponents(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler, path)


def load_clip(source: str, model_cfg: Mapping[str, Any], cache_dir: str | Path,
              device: str | torch.device = "cpu") -> ClipComponents:
    """CLIPModel + CLIPProcessor (tiny, a local folder, or a hub id such as openai/clip-vit-large-patch14)."""
    from transformers import CLIPModel, CLIPProcessor

    resolved = resolve_source(source, "clip", model_cfg, cache_dir)
    if _is_local(resolved):
        resolved = str(_check_local(resolved, "a CLIP folder (config.json, model weights, processor files)"))
    try:
        model = CLIPModel.from_pretrained(resolved)
        processor = CLIPProcessor.from_pretrained(resolved)
    except (OSError, ValueError) as err:
        reason = first_line(err)
        raise Ip2pError(f"cannot load CLIP model '{source}': {reason}") from err
    model.eval().requires_grad_(False)
    dev = resolve_device(str(device)) if isinstance(device, str) else device
    return ClipComponents(model.to(dev), processor, resolved)
