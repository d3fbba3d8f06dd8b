"""Benchmark: one optimisation step of our training (`ip2p.training.module.InstructPix2PixModule` in a
real `pl.Trainer`) vs a UNet-only reference step on the same UNet.

  ours       pl.Trainer.fit of the LightningModule with the EMA callback, on an in-memory dataset that goes
             through the training DataModule's own item and batch code (EditPairDataset, StreamSampler,
             collate). One step: VAE encoding of both images, text encoding, conditioning dropout, UNet
             forward/backward, AdamW, EMA update (timed from on_train_batch_start to on_train_batch_end;
             `wall` also counts loading the next batch).
  ours_cached_latents  the same Trainer step reading the latent cache (train.data.cache_latents): no VAE or
             text encoder per step (the cache is built once before the timed rounds).
  unet_only  reference: noise prediction + MSE + AdamW on precomputed latents and text embeddings
             (no VAE, no text encoder, no EMA), same UNet, same autocast and optimizer settings.

The UNet is the text-to-image one widened to 8 input channels, as `ip2p train` does with train.init=base.
Rounds alternate ours / reference (a fresh Trainer and optimizer each), the first --warmup steps of each
round are dropped; medians over the rest. Peak GPU memory is per variant (the other variant's extra
state, EMA copy and frozen encoders, is moved off the GPU first). Output: one JSON document.

  python bench/train_speed.py --preset tiny --device cpu --resolution 64 --batch-size 2 --steps 3
  python bench/train_speed.py --preset sd15-random --precision bf16 --resolution 256 --batch-size 32 \\
      --out bench/results/train_speed_<card>_<date>.json
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F
from edit_speed import add_common_arguments, emit, sync  # same folder
from synthesis_speed import build_base

PRECISIONS = {"bf16": "bf16-mixed", "fp32": "32-true"}  # --precision -> Lightning's name
INSTRUCTIONS = ["make it snowy", "turn the cat into a dog", "add fireworks in the sky", "make it a watercolor"]
ANCHOR = "docs/method.md section 6, H100: UNet-only step at 256 px, batch 32, bf16 autocast, AdamW: 0.183 s, 175 samples/s, 21.3 GB"


class MemorySource:
    """Random-noise image pairs held in memory, read like the Parquet source (index -> Pair)."""

    def __init__(self, count: int, size: int, seed: int = 0):
        import numpy as np
        from PIL import Image

        from ip2p.training.datamodule import Pair

        rng = np.random.default_rng(seed)

        def image():
            return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))

        self.pairs = [Pair(image(), image(), INSTRUCTIONS[i % len(INSTRUCTIONS)], f"pair-{i}") for i in range(count)]

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int, generator):
        return self.pairs[int(index)]


def train_loader(tokenizer, args, device: torch.device):
    from torch.utils.data import DataLoader

    from ip2p.training.datamodule import EditPairDataset, StreamSampler, collate

    r = args.resolution
    dataset = EditPairDataset(MemorySource(max(2 * args.batch_size, 8), r), tokenizer, r, r, r, flip=True,
                              augment=True, seed=0)
    return DataLoader(dataset, batch_size=args.batch_size, sampler=StreamSampler(len(dataset), seed=0),
                      num_workers=args.num_workers, persistent_workers=args.num_workers > 0,
                      pin_memory=device.type == "cuda", collate_fn=collate)


def cached_loader(parts, args, device: torch.device, root: str):
    """The same kind of pairs through the latent cache (ip2p.training.latent_cache): built once here
    (not timed), then read by CachedPairDataset as `ip2p train` does with train.data.cache_latents."""
    import datasets
    from torch.utils.data import DataLoader

    from ip2p.io.dataset import image_struct
    from ip2p.io.pairs import encode_image
    from ip2p.training.datamodule import CachedPairDataset, ParquetSource, StreamSampler, collate
    from ip2p.training.latent_cache import LatentCache, build_latent_cache

    r = args.resolution
    pairs = MemorySource(max(2 * args.batch_size, 8), r).pairs

    def encoded(img) -> dict:
        return image_struct(encode_image(img, "png", 0))

    table = datasets.Dataset.from_dict({"id": [p.id for p in pairs], "pair_id": [p.id for p in pairs],
                                        "input_image": [encoded(p.input) for p in pairs],
                                        "edited_image": [encoded(p.edited) for p in pairs],
                                        "edit_prompt": [p.prompt for p in pairs]})
    for part in (parts.vae, parts.text_encoder):
        part.to(device)
    folder = build_latent_cache(os.path.join(root, "latents"), root, "train", table, parts, r, True, 32, "float32",
                                False)
    dataset = CachedPairDataset(ParquetSource(table, "row"), LatentCache(folder), r, r, flip=True, augment=True, seed=0)
    return DataLoader(dataset, batch_size=args.batch_size, sampler=StreamSampler(len(dataset), seed=0),
                      num_workers=args.num_workers, persistent_workers=args.num_workers > 0,
                      pin_memory=device.type == "cuda", collate_fn=collate)


def step_timer_class():
    from pytorch_lightning.callbacks import Callback

    class StepTimer(Callback):
        """perf_counter at the start and end of each training batch (device synchronised)."""

        def __init__(self, device: torch.device):
            self.device, self.starts, self.ends = device, [], []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            sync(self.device)
            self.starts.append(time.perf_counter())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            sync(self.device)
            self.ends.append(time.perf_counter())

    return StepTimer


def free_memory(module, device: torch.device) -> None:
    for p in module.unet.parameters():
        p.grad = None  # the other variant's last gradients
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def ours_round(module, loader, args, device: torch.device, root: str) -> dict:
    """One Trainer.fit of warmup + steps optimizer steps; per-step seconds of the timed steps."""
    import pytorch_lightning as pl

    from ip2p.training.callbacks import EMAUpdate

    free_memory(module, device)
    module.ema.num_updates.zero_()  # EMAUpdate catches up to the new Trainer's global_step, which restarts at 0
    timer = step_timer_class()(device)
    accelerator, devices = ("gpu", [device.index or 0]) if device.type == "cuda" else ("cpu", 1)
    trainer = pl.Trainer(accelerator=accelerator, devices=devices, precision=PRECISIONS[args.precision],
                         max_steps=args.warmup + args.steps, max_epochs=-1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0, use_distributed_sampler=False,
                         callbacks=[EMAUpdate(), timer], default_root_dir=root)
    trainer.fit(module, train_dataloaders=loader)
    if int(module.ema.num_updates) != args.warmup + args.steps:
        raise RuntimeError(f"expected {args.warmup + args.steps} EMA updates, got {int(module.ema.num_updates)}")
    steps = [end - start for start, end in zip(timer.starts, timer.ends)][args.warmup:]
    first = timer.ends[args.warmup - 1] if args.warmup > 0 else timer.starts[0]
    result = {"step_s": steps, "wall_s_per_step": (timer.ends[-1] - first) / len(steps), "peak_gib": peak_gib(device)}
    module.trainer = None  # drop the Trainer and with it the optimizer state
    del trainer
    return result


def unet_only_round(module, args, device: torch.device) -> dict:
    """warmup + steps UNet-only optimisation steps on fixed random latents and text embeddings."""
    s = module.settings
    for part in (module.ema, module.frozen.vae, module.frozen.text_encoder):
        part.to("cpu")  # not part of the reference step: keep them out of its memory
    unet = module.unet.to(device).train()
    free_memory(module, device)
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=s.lr, betas=tuple(s.betas),
                                  weight_decay=s.weight_decay, eps=s.eps)
    latent_channels = module.frozen.vae.config.latent_channels
    latent = args.resolution // 2 ** (len(module.frozen.vae.config.block_out_channels) - 1)
    generator = torch.Generator(device).manual_seed(0)
    shape = (args.batch_size, latent_channels, latent, latent)
    target = torch.randn(shape, generator=generator, device=device)
    condition = torch.randn(shape, generator=generator, device=device)
    text = torch.randn(args.batch_size, module.frozen.tokenizer.model_max_length,
                       unet.config.cross_attention_dim, generator=generator, device=device)
    scheduler = module.noise_scheduler
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    times = []
    for _ in range(args.warmup + args.steps):
        sync(device)
        start = time.perf_counter()
        noise = torch.randn(shape, generator=generator, device=device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch_size,), generator=generator,
                          device=device)
        noisy = scheduler.add_noise(target, noise, t)
        with autocast:
            prediction = unet(torch.cat([noisy, condition], dim=1), t, encoder_hidden_states=text).sample
        loss = F.mse_loss(prediction.float(), noise.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - start)
    result = {"step_s": times[args.warmup:], "peak_gib": peak_gib(device)}
    del optimizer
    return result


def summary(rounds: list[dict], batch_size: int) -> dict:
    steps = [s for r in rounds for s in r["step_s"]]
    median = statistics.median(steps)
    out = {"step_s_median": median, "samples_per_s": batch_size / median,
           "round_medians_s": [statistics.median(r["step_s"]) for r in rounds], "step_s": steps}
    if "wall_s_per_step" in rounds[0]:
        out["wall_s_per_step_median"] = statistics.median(r["wall_s_per_step"] for r in rounds)
    if rounds[0]["peak_gib"] is not None:
        out["peak_mem_gib"] = max(r["peak_gib"] for r in rounds)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(ap)
    ap.add_argument("--precision", default="bf16", choices=list(PRECISIONS))
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps per round")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of each round")
    ap.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (train.data.num_workers)")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--matmul-precision", default="high", help="float32 matmul precision (conf/trainer/gpu.yaml)")
    args = ap.parse_args()
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1:
        ap.error("need --steps >= 1, --warmup >= 0, --repeats >= 1")

    import diffusers
    from dataclasses import replace

    import pytorch_lightning as pl

    from ip2p.config import compose
    from ip2p.models.loader import widen_conv_in
    from ip2p.training.module import InstructPix2PixModule
    from ip2p.training.run import _quiet_lightning, settings_from_config

    _quiet_lightning()
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision(args.matmul_precision)
    parts = build_base(args.preset, device, torch.float32, args.cache)  # fp32 weights: autocast does bf16
    widen_conv_in(parts.unet, 2 * parts.vae.config.latent_channels)
    # the recipe's one home is conf/train (TrainSettings has no defaults of its own)
    recipe = settings_from_config(compose([]))
    module = InstructPix2PixModule(parts, replace(recipe, gradient_checkpointing=args.gradient_checkpointing))
    loader = train_loader(parts.tokenizer, args, device)

    ours, cached, reference = [], [], []
    with tempfile.TemporaryDirectory() as root:
        loader_cached = cached_loader(parts, args, device, root)
        for _ in range(args.repeats):  # interleaved, so that drift hits all alike
            ours.append(ours_round(module, loader, args, device, root))
            cached.append(ours_round(module, loader_cached, args, device, root))
            reference.append(unet_only_round(module, args, device))
    results = {
        "preset": args.preset, "device": str(device), "precision": args.precision,
        "resolution": args.resolution, "batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup,
        "repeats": args.repeats, "num_workers": args.num_workers,
        "gradient_checkpointing": args.gradient_checkpointing,
        "matmul_precision": args.matmul_precision if device.type == "cuda" else None,
        "unet_parameters": sum(p.numel() for p in module.unet.parameters()),
        "torch": torch.__version__, "pytorch_lightning": pl.__version__, "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu": f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads",
        "ours": summary(ours, args.batch_size),
        "ours_cached_latents": summary(cached, args.batch_size),
        "unet_only": summary(reference, args.batch_size),
        "anchor": ANCHOR,
    }
    results["ratio_ours_over_unet_only"] = results["ours"]["step_s_median"] / results["unet_only"]["step_s_median"]
    results["ratio_ours_cached_over_unet_only"] = (results["ours_cached_latents"]["step_s_median"]
                                                   / results["unet_only"]["step_s_median"])
    emit(results, args.out)


if __name__ == "__main__":
    main()
