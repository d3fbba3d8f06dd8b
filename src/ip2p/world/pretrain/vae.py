"""`ip2p pretrain-vae`: an AutoencoderKL trained from scratch on world renders.

Recipe (docs/miniature-world.md, "How the models are made"): f=4 (64 px -> 16x16x4 latents), no
attention in the middle block so the model is fully convolutional and trains on 32 px crops (5x
cheaper per step than whole images, and it still sees whole images at test time); crops centred on
an object most of the time, and the pixel loss weighted up on objects and snow flakes, which cover a
few percent of the pixels but carry every attribute but the background; L1 + MSE, a tiny KL as SD's VAE; warmup +
cosine learning rate; EMA weights are the ones saved. Then the decoder alone is fine-tuned on whole
images with the encoder frozen (`world.vae.decoder`), as SD's ft-MSE VAE was: the latents do not
change. The scaling factor (SD: 0.18215) is measured: 1 / std of the latents of fresh renders.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from scipy import ndimage

from ip2p.io.atomic import atomic_folder, atomic_write_json
from ip2p.io.images import to_tensor, to_uint8
from ip2p.io.loggers import log_metrics, start_mlflow_run
from ip2p.world.pretrain.loop import LoopConfig, recipe_of, train
from ip2p.world.oracle import read, same_scene
from ip2p.world.render import object_coverage, render, snow_mask
from ip2p.world.scene import Scene, sample_scene, sample_scenes
from ip2p.world.vocab import CANVAS

log = logging.getLogger(__name__)


def build_vae(c: DictConfig):
    from diffusers import AutoencoderKL

    channels = tuple(c.channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=channels, layers_per_block=c.layers_per_block, latent_channels=c.latent_channels,
        norm_num_groups=c.norm_groups, sample_size=CANVAS, mid_block_add_attention=c.mid_attention,
        scaling_factor=1.0,
    )


def detail_weight(scene: Scene, boost: float) -> np.ndarray:
    """1 on the background, 1 + boost on objects, a 1-pixel rim around them (their edges) and snow
    flakes: small things a plain pixel loss lets the model blur away (a 1-pixel flake at 3% of the
    pixels costs an L1 model less to drop than to place)."""
    cover = np.zeros((CANVAS, CANVAS), dtype=np.float32)
    for o in scene.objects:
        cover = np.maximum(cover, object_coverage(o))
    detail = np.maximum(cover, ndimage.binary_dilation(cover > 0, iterations=1).astype(np.float32))
    if scene.style == "snowy":
        detail = np.maximum(detail, snow_mask(scene.seed).astype(np.float32))
    return 1.0 + boost * detail


def crop_origin(rng: np.random.Generator, scene: Scene, crop: int, p_object: float) -> tuple[int, int]:
    if crop >= CANVAS:
        return 0, 0
    if rng.random() < p_object:
        o = scene.objects[rng.integers(len(scene.objects))]
        cx, cy = o.x + rng.uniform(-crop / 4, crop / 4), o.y + rng.uniform(-crop / 4, crop / 4)
    else:
        cx, cy = rng.uniform(0, CANVAS), rng.uniform(0, CANVAS)
    clip = lambda v: int(np.clip(round(v - crop / 2), 0, CANVAS - crop))  # noqa: E731
    return clip(cx), clip(cy)


def make_batch(seed: int, step: int, c: DictConfig) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng([seed, step])
    images, weights = [], []
    for _ in range(c.batch_size):
        scene = sample_scene(rng)
        x0, y0 = crop_origin(rng, scene, c.crop, c.p_crop_object)
        sl = np.s_[y0:y0 + c.crop, x0:x0 + c.crop]
        images.append(render(scene)[sl])
        weights.append(detail_weight(scene, c.detail_weight)[sl])
    return to_tensor(np.stack(images)), torch.from_numpy(np.stack(weights))[:, None]


@torch.no_grad()
def reconstruct(vae, images: np.ndarray, batch: int = 64) -> np.ndarray:
    out = []
    for i in range(0, len(images), batch):
        x = to_tensor(images[i:i + batch])
        out.append(to_uint8(vae.decode(vae.encode(x).latent_dist.mode()).sample))
    return np.concatenate(out)


def scores(originals: np.ndarray, recon: np.ndarray) -> dict:
    """PSNR and the oracle's agreement (same scene read from both) of uint8 images [N, H, W, 3]."""
    mse = ((originals.astype(np.float64) - recon) ** 2).reshape(len(originals), -1).mean(1)
    agree = [same_scene(read(a), read(b)) for a, b in zip(originals, recon)]
    return {"psnr": float(np.mean(10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10)))),
            "oracle_agreement": float(np.mean(agree))}


def judge(vae, scenes: list[Scene]) -> dict:
    """`scores` of the renders of `scenes` and their reconstructions (posterior mode)."""
    originals = np.stack([render(s) for s in scenes])
    return scores(originals, reconstruct(vae, originals))


@torch.no_grad()
def measure_scaling_factor(vae, seed: int, n: int) -> float:
    x = to_tensor(np.stack([render(s) for s in sample_scenes(seed, n)]))
    return float(1.0 / vae.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(seed)).std())


def weighted_pixel_losses(err: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L1, MSE) of a reconstruction error under the detail weights, normalised by the mean weight."""
    return (w * err.abs()).mean() / w.mean(), (w * err ** 2).mean() / w.mean()


def decoder_loss(vae, x: torch.Tensor, w: torch.Tensor, generator: torch.Generator) -> dict:
    """The weighted L1 + MSE of decoding a posterior sample of the frozen encoder (the decoder phase)."""
    with torch.no_grad():
        z = vae.encode(x).latent_dist.sample(generator=generator)
    l1, l2 = weighted_pixel_losses(vae.decode(z).sample - x, w)
    return {"loss": l1 + l2, "l1": l1.detach(), "l2": l2.detach()}


def finetune_decoder(vae, c: DictConfig, eval_scenes: list[Scene], progress: bool):
    """Phase 2: the decoder alone on whole images, the encoder frozen, as SD's ft-MSE VAE was made from
    SD's VAE. The latents stay bit for bit the same (the EMA of a frozen weight is that weight), so every
    model trained on them stays valid, while reconstructions sharpen. Returns the EMA model."""
    d = c.decoder
    vae.requires_grad_(False)
    for part in (vae.decoder, vae.post_quant_conv):
        part.requires_grad_(True)
    batch_cfg = {"batch_size": d.batch_size, "crop": d.crop, "p_crop_object": c.p_crop_object,
                 "detail_weight": c.detail_weight}

    def loss_fn(step: int) -> dict:
        x, w = make_batch(d.seed, step, DictConfig(batch_cfg))
        return decoder_loss(vae, x, w, torch.Generator().manual_seed(int(d.seed) * 1_000_003 + step))

    loop = LoopConfig.from_cfg(d.loop, progress=progress)
    ema = train("finetune-vae-decoder", vae, loss_fn, loop, Path(d.checkpoint), recipe=recipe_of(c),
                evaluate=lambda m, step: judge(m, eval_scenes), log_metrics=log_metrics)
    return ema.model.eval()


def run(cfg: DictConfig) -> dict:
    c = cfg.world.vae
    out = Path(c.output)
    torch.manual_seed(c.seed)
    # 1. the model, fresh or resumed from the stage's checkpoint
    vae = build_vae(c)
    eval_scenes = sample_scenes(c.eval_seed, c.eval_scenes)
    loop = LoopConfig.from_cfg(c.loop, progress=cfg.progress)

    def loss_fn(step: int) -> dict:
        x, w = make_batch(c.seed, step, c)
        posterior = vae.encode(x).latent_dist
        l1, l2 = weighted_pixel_losses(vae.decode(posterior.sample()).sample - x, w)
        kl = posterior.kl().mean() / x[0].numel()
        return {"loss": l1 + l2 + c.kl_weight * kl, "l1": l1.detach(), "l2": l2.detach(), "kl": kl.detach()}

    with start_mlflow_run(cfg, "pretrain-vae", {"parameters": sum(p.numel() for p in vae.parameters())}):
        # 2. train encoder and decoder together (EMA weights are judged and kept)
        ema = train("pretrain-vae", vae, loss_fn, loop, Path(c.checkpoint), recipe=recipe_of(c, ("decoder",)),
                    evaluate=lambda m, step: judge(m, eval_scenes), log_metrics=log_metrics)
        final = ema.model.eval()
        before = judge(final, eval_scenes)
        # 3. then the decoder alone (skipped with decoder.loop.steps: 0)
        if c.decoder.loop.steps > 0:
            final = finetune_decoder(final, c, eval_scenes, cfg.progress)
        # 4. latent scale, measured as SD's was (the encoder is the same either way); 5. save, diffusers layout
        final.register_to_config(scaling_factor=measure_scaling_factor(final, c.eval_seed + 1, 256))
        result = {**judge(final, eval_scenes), "scaling_factor": final.config.scaling_factor,
                  "parameters": sum(p.numel() for p in final.parameters()), "steps": loop.steps,
                  "decoder_steps": int(c.decoder.loop.steps),
                  **{f"{k}_before_decoder_phase": v for k, v in before.items()}}
        with atomic_folder(out) as tmp:
            final.save_pretrained(tmp, safe_serialization=True)
        log_metrics({f"final/{k}": v for k, v in result.items()})
    atomic_write_json(Path(cfg.paths.reports) / "pretrain_vae.json", result)
    log.info("pretrain-vae: %s", result)
    return result
