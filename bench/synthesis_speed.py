"""Benchmark: Prompt-to-Prompt pair synthesis (`ip2p.synthesis.PairSampler`) vs plain text-to-image sampling.

One caption pair, S samples per batch, --steps Euler-ancestral steps; every variant denoises the same
2S images (S with the input caption, S with the output caption) with 2-way classifier-free guidance,
i.e. one UNet call on 4S rows per step. Variants:

  plain         reference: diffusers' StableDiffusionPipeline on the 2S prompts, no attention control
  official      ours, InstructPix2Pix's self-attention copy as fused SDPA on gathered rows (the default)
  materialised  ours with a bench-only control that computes the copied self-attention maps explicitly,
                softmax(Q_in K_in^T) V_out, as the original code does (what the fused path avoids)
  google        ours, the original Prompt-to-Prompt mode (cross-attention word swap/refine, self copy
                on small layers), with the default settings of conf/synthesis/default.yaml

Timed: the denoising (text encoding included, VAE decoding excluded), interleaved round by round so
that clock and load drift hit all variants alike; medians. p = 1 (the default) copies self-attention at
every step: the most expensive case. Output: one JSON document (stdout, and --out).

  python bench/synthesis_speed.py --preset tiny --device cpu --steps 4 --samples-per-batch 1 2 --repeats 2
  python bench/synthesis_speed.py --preset sd15-random --dtype float16 --steps 20 --samples-per-batch 1 4 8 \\
      --out bench/results/synthesis_speed_<card>_<date>.json
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import time
from unittest import mock

import torch

# Same folder: the SD 1.5 architecture configs and the device sync of the editing benchmark.
from edit_speed import CLIP_L14_TEXT, SD15_UNET, SD15_VAE, add_common_arguments, emit, sync

INPUT_CAPTION = "a photo of a cat sitting on a sofa"
OUTPUT_CAPTION = "a photo of a dog sitting on a sofa"
VARIANTS = ("plain", "official", "materialised", "google")
SAMPLER = "euler_ancestral"


def build_base(preset: str, device: torch.device, dtype: torch.dtype, cache: str):
    """Text-to-image components (4-channel UNet), as synthesis loads them (role "base")."""
    import yaml

    from ip2p.config import config_dir
    from ip2p.models.loader import DiffusionComponents, load_diffusion
    from ip2p.models.tiny import ensure_tiny

    tiny_cfg = yaml.safe_load((config_dir() / "model" / "tiny.yaml").read_text())
    if preset == "tiny":
        return load_diffusion("tiny", "base", tiny_cfg, cache, device, dtype)
    if preset == "mini":  # the miniature world's base (`dvc pull pretrain_t2i` or `bash scripts/main.sh`)
        return load_diffusion("artifacts/world/base", "base", {"name": "mini"}, cache, device, dtype)
    from diffusers import (
        AutoencoderKL,
        EulerAncestralDiscreteScheduler,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    # The tokenizer only turns text into ids; the tiny preset's is fine for timing.
    tokenizer = CLIPTokenizer.from_pretrained(ensure_tiny(cache, tiny_cfg["build"]) / "base" / "tokenizer")
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**{**SD15_UNET, "in_channels": 4})
        vae = AutoencoderKL(**SD15_VAE)
        text = CLIPTextModel(CLIPTextConfig(**CLIP_L14_TEXT, bos_token_id=tokenizer.bos_token_id,
                                            eos_token_id=tokenizer.eos_token_id))
    scheduler = EulerAncestralDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                                beta_schedule="scaled_linear", steps_offset=1)
    for m in (unet, vae, text):
        m.eval().requires_grad_(False)
    return DiffusionComponents(unet, vae, text, tokenizer, scheduler, "sd15-random").to(device, dtype)


def materialised_control_class():
    """An AttentionControl whose copied self-attention materialises the maps: softmax(Q_src K_src^T) for
    every row, rows gathered, times V. Bench-only: the naive form of the same computation."""
    from ip2p.synthesis.attention import AttentionControl, attention

    class MaterialisedControl(AttentionControl):
        def self_attention(self, attn, q, k, v, mask):
            self._samples(q.shape[0])
            if not bool(self.self_controlled.any()):
                return attention(q, k, v, attn.scale, mask)
            logits = (q @ k.transpose(-1, -2)) * attn.scale  # [4S, heads, N, N]
            if mask is not None:
                logits = logits + mask
            rows = self._device("self_rows", self._self_rows, q.device)
            return logits.softmax(dim=-1).index_select(0, rows) @ v

    return MaterialisedControl


def make_runners(parts, variants, specs, size: int, steps: int, cfg: float, autocast=None) -> dict:
    """name -> a function that denoises one batch of len(specs) samples of the caption pair (ours with
    the UNet under `autocast` when it is set, the plain reference as loaded)."""
    from diffusers import StableDiffusionPipeline

    import ip2p.synthesis.pipeline as pair_pipeline
    from ip2p.config import compose
    from ip2p.sampling import make_scheduler
    from ip2p.synthesis import PairSampler
    from ip2p.synthesis.run import settings_from_config

    runners = {}
    materialised_control = materialised_control_class()
    configured = settings_from_config(compose([]))  # conf/synthesis: google mode's settings, the alignment scores
    if "plain" in variants:
        pipe = StableDiffusionPipeline(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                                       unet=parts.unet, scheduler=make_scheduler(SAMPLER, parts.scheduler.config),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        prompts = [INPUT_CAPTION] * len(specs) + [OUTPUT_CAPTION] * len(specs)

        def plain():
            # one generator per image, seeded as ours (the two branches of a sample share the seed)
            generators = [torch.Generator("cpu").manual_seed(s.seed) for s in specs + specs]
            return pipe(prompts, height=size, width=size, num_inference_steps=steps, guidance_scale=cfg,
                        generator=generators, output_type="latent").images

        runners["plain"] = plain
    for name, mode in (("official", "official"), ("materialised", "official"), ("google", "google")):
        if name not in variants:
            continue
        sampler = PairSampler(dataclasses.replace(parts, autocast=autocast),
                              dataclasses.replace(configured, steps=steps, scheduler=SAMPLER, mode=mode, progress=False))

        def ours(sampler=sampler, materialise=name == "materialised"):
            if materialise:  # the sampler builds its control internally: swap the class for this call
                with mock.patch.object(pair_pipeline, "AttentionControl", materialised_control):
                    return sampler.sample_latents(INPUT_CAPTION, OUTPUT_CAPTION, specs, size, size)
            return sampler.sample_latents(INPUT_CAPTION, OUTPUT_CAPTION, specs, size, size)

        runners[name] = ours
    return runners


def timed(fn, device: torch.device) -> tuple[float | None, float | None]:
    """(seconds, peak GiB of this call on CUDA) or (None, None) when the call ran out of memory."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None, None
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return seconds, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(ap)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--resolution", type=int, default=None, help="pixels per side (default: the model's native)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--samples-per-batch", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--p", type=float, default=1.0, help="fraction of steps with copied self-attention")
    ap.add_argument("--cfg", type=float, default=7.5, help="classifier-free guidance scale (all samples)")
    ap.add_argument("--autocast", default=None,
                    help="ours with the UNet under torch.autocast in this dtype (bfloat16); plain stays as --dtype")
    args = ap.parse_args()

    import diffusers

    from ip2p.models.loader import resolve_autocast, resolve_dtype
    from ip2p.synthesis import SampleSpec

    device, dtype = torch.device(args.device), resolve_dtype(args.dtype)
    parts = build_base(args.preset, device, dtype, args.cache)
    size = args.resolution or int(parts.unet.config.sample_size) * 2 ** (len(parts.vae.config.block_out_channels) - 1)
    timing_key = f"timing_p{args.p:g}_{args.steps}steps"
    results = {
        "preset": args.preset, "device": str(device), "dtype": args.dtype, "resolution": size, "steps": args.steps,
        "p": args.p, "cfg": args.cfg, "repeats": args.repeats, "ours_autocast": args.autocast, "samples_per_batch": args.samples_per_batch,
        "captions": [INPUT_CAPTION, OUTPUT_CAPTION], "scheduler": SAMPLER,
        "reference": "plain = diffusers StableDiffusionPipeline, same weights and batch, no attention control",
        "timed": "denoising incl. text encoding; VAE decoding excluded",
        "torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu": f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads",
        timing_key: {}, "ratios_over_plain": {},
    }
    timing, peaks = results[timing_key], []
    for samples in args.samples_per_batch:
        specs = [SampleSpec(seed=1000 + k, p=args.p, cfg=args.cfg) for k in range(samples)]
        runners = make_runners(parts, args.variants, specs, size, args.steps, args.cfg, resolve_autocast(args.autocast))
        seconds = {name: [] for name in runners}
        memory = {name: [] for name in runners}
        failed = {name for name, fn in runners.items() if timed(fn, device)[0] is None}  # warm-up
        for _ in range(args.repeats):
            for name, fn in runners.items():
                if name in failed:
                    continue
                s, peak = timed(fn, device)
                if s is None:
                    failed.add(name)
                    continue
                seconds[name].append(s)
                if peak is not None:
                    memory[name].append(peak)
        for name in runners:
            key = f"S{samples}_{name}"
            if name in failed:
                timing[key] = {"error": "out of memory"}
                continue
            median = statistics.median(seconds[name])
            timing[key] = {"s_per_step": median / args.steps, "s_per_candidate": median / samples,
                           "s_per_candidate_100_steps": median / args.steps * 100 / samples,
                           "runs_s": seconds[name]}
            if memory[name]:
                timing[key]["peak_mem_gib"] = max(memory[name])
                peaks.append(max(memory[name]))
        plain = timing.get(f"S{samples}_plain", {}).get("s_per_step")
        for name in runners:
            ours = timing[f"S{samples}_{name}"].get("s_per_step")
            if name != "plain" and plain and ours:
                results["ratios_over_plain"][f"S{samples}_{name}"] = ours / plain
        del runners
    if peaks:
        results["peak_mem_gib"] = max(peaks)
    emit(results, args.out)


if __name__ == "__main__":
    main()
