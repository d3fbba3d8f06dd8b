"""Benchmark: `ip2p` editing sampler vs diffusers' StableDiffusionInstructPix2PixPipeline, same weights.

Both run on the same modules (one set of weights), same scheduler (Euler ancestral), same image,
same steps; we report medians and the ratio ours/diffusers. Output: one JSON document.

  python bench/edit_speed.py --preset tiny --resolution 128 --steps 20        # CPU smoke run
  python bench/edit_speed.py --preset sd15-random --dtype float16 --steps 20 100  # GPU, SD 1.5 size

`sd15-random` builds the Stable Diffusion 1.5 architecture (UNet 8-channel as InstructPix2Pix,
VAE, CLIP ViT-L/14 text encoder) with random weights: speed does not depend on the weight values.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time

import numpy as np
import torch
from PIL import Image

# Stable Diffusion 1.5 / InstructPix2Pix architecture (public model configs).
SD15_UNET = dict(sample_size=64, in_channels=8, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
                block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215)
CLIP_L14_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                     num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                     projection_dim=768)


def build_components(preset: str, device: torch.device, dtype: torch.dtype, cache: str):
    from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ip2p.config import config_dir
    from ip2p.models.loader import DiffusionComponents, load_diffusion
    from ip2p.models.tiny import ensure_tiny

    if preset == "tiny":
        import yaml

        model_cfg = yaml.safe_load((config_dir() / "model" / "tiny.yaml").read_text())
        return load_diffusion("tiny", "editor", model_cfg, cache, device, dtype)
    if preset == "mini":  # the miniature world's base, widened to an editor (`dvc pull pretrain_t2i`)
        return load_diffusion("artifacts/world/base", "editor", {"name": "mini"}, cache, device, dtype)
    # sd15-random: the tokenizer only turns text into ids; ours (from the tiny preset) is fine for timing.
    import yaml

    tiny_root = ensure_tiny(cache, yaml.safe_load((config_dir() / "model" / "tiny.yaml").read_text())["build"])
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_root / "editor" / "tokenizer")
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(**SD15_VAE)
        text = CLIPTextModel(CLIPTextConfig(**CLIP_L14_TEXT, bos_token_id=tokenizer.bos_token_id,
                                            eos_token_id=tokenizer.eos_token_id))
    scheduler = EulerAncestralDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                                beta_schedule="scaled_linear", steps_offset=1)
    parts = DiffusionComponents(unet.eval(), vae.eval(), text.eval(), tokenizer, scheduler, "sd15-random")
    for m in (unet, vae, text):
        m.requires_grad_(False)
    return parts.to(device, dtype)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_call(fn, device, repeats: int, warmup: bool = True) -> list[float]:
    if warmup:
        fn()  # kernels, allocator
    out = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - start)
    return out


def add_common_arguments(ap: argparse.ArgumentParser) -> None:
    """Options every bench script shares."""
    ap.add_argument("--preset", default="tiny", choices=["tiny", "mini", "sd15-random"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cache", default="~/.cache/ip2p")
    ap.add_argument("--out", default=None, help="write the JSON here as well as to stdout")


def emit(results: dict, out: str | None) -> None:
    """Print the JSON document and write it to `out` if given."""
    text = json.dumps(results, indent=1)
    print(text)
    if out:
        open(out, "w").write(text + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    add_common_arguments(ap)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--steps", type=int, nargs="+", default=[20, 100])
    ap.add_argument("--channels-last", action="store_true", help="ours with the channels-last layout (edit.speed)")
    ap.add_argument("--compile", default=None, help="ours with torch.compile, this backend (e.g. inductor)")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode (reduce-overhead, max-autotune)")
    ap.add_argument("--autocast", default=None,
                    help="ours with the UNet under torch.autocast in this dtype (bfloat16); the reference stays as --dtype")
    args = ap.parse_args()

    from diffusers import StableDiffusionInstructPix2PixPipeline

    from ip2p.models.instruct_pix2pix import EditSettings, InstructPix2Pix
    from ip2p.models.loader import resolve_autocast, resolve_dtype

    device, dtype = torch.device(args.device), resolve_dtype(args.dtype)
    parts = build_components(args.preset, device, dtype, args.cache)
    ours = InstructPix2Pix(dataclasses.replace(parts, autocast=resolve_autocast(args.autocast)))
    if args.channels_last or args.compile:  # ours on its own copy (same weights), the reference stays eager
        from ip2p.models.speed import accelerate

        fast = accelerate(build_components(args.preset, device, dtype, args.cache),
                          args.channels_last, args.compile, args.compile_mode)
        ours = InstructPix2Pix(dataclasses.replace(fast, autocast=resolve_autocast(args.autocast)))
    ref = StableDiffusionInstructPix2PixPipeline(
        vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, unet=parts.unet,
        scheduler=parts.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (args.resolution, args.resolution, 3), dtype=np.uint8))
    instruction = "make it snowy"

    # UNet forward on the 3-way guided batch: the cost of one sampling step.
    latent = args.resolution // 8
    x = torch.randn(3, 8, latent, latent, device=device, dtype=dtype)
    ctx = torch.randn(3, 77, parts.text_encoder.config.hidden_size, device=device, dtype=dtype)
    t = torch.tensor(500, device=device)
    with torch.no_grad():
        unet_s = time_call(lambda: parts.unet(x, t, encoder_hidden_states=ctx), device, max(args.repeats, 10))

    results = {"preset": args.preset, "device": str(device), "dtype": args.dtype, "resolution": args.resolution,
               "torch": torch.__version__, "python": platform.python_version(),
               "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor(),
               "unet_forward_3way_s_median": statistics.median(unet_s), "runs": [],
               "ours_speed": {"channels_last": args.channels_last, "compile": args.compile,
                              "compile_mode": args.compile_mode, "autocast": args.autocast}}
    for steps in args.steps:
        settings = EditSettings(steps=steps, progress=False, seed=0)

        def run_ours():
            ours.edit(image, instruction, settings)

        def run_ref():
            ref(instruction, image=image, num_inference_steps=steps,
                generator=torch.Generator("cpu").manual_seed(0)).images

        # Interleave the two so that clock and load drift hit both alike.
        run_ours(), run_ref()
        ours_s, ref_s = [], []
        for _ in range(args.repeats):
            ours_s += time_call(run_ours, device, 1, warmup=False)
            ref_s += time_call(run_ref, device, 1, warmup=False)
        row = {"steps": steps, "ours_s": ours_s, "diffusers_s": ref_s,
               "ours_median_s": statistics.median(ours_s), "diffusers_median_s": statistics.median(ref_s)}
        row["ratio_ours_over_diffusers"] = row["ours_median_s"] / row["diffusers_median_s"]
        results["runs"].append(row)
    if device.type == "cuda":
        results["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    emit(results, args.out)


if __name__ == "__main__":
    main()
