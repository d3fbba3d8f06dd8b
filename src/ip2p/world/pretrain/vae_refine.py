"""`ip2p refine-vae`: the world VAE, continued on whole images with each object's outline weighted up.

pretrain-vae's VAE reads back the same scene from 89% of its reconstructions; the misses are corners
(small squares, stars, hearts and triangles read back as circles) and objects that touch (read as one).
Both live on a thin band around each object's outline, a few percent of the pixels, so a pixel loss
that is already weighted up on the objects still spends little on them. This stage continues the
pretrain-vae VAE (encoder and decoder: `train_encoder`) on whole images, with the detail weights of
pretrain-vae plus `outline_weight` on a band `outline_px` pixels each side of every object's outline,
drawn per object so that the seam between touching objects counts too (docs/miniature-world.md).

The text-to-image base was trained on the latents of pretrain-vae's VAE and is not retrained: the
refined VAE is swapped in under it (`model.base_vae` of the mini preset), as SD users swap in SD's
fine-tuned VAE. The stage reports how far the latents moved (`latent_drift`: the mean distance of the
new latents from the old, over the old latents' mean norm) so that a user who retrains more can see
when the base would need retraining too; with `train_encoder: false` the latents do not move at all.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from scipy import ndimage

from ip2p.io.atomic import atomic_folder, atomic_write_json
from ip2p.io.images import to_tensor
from ip2p.io.loggers import log_metrics, start_mlflow_run
from ip2p.models.loader import load_vae
from ip2p.world.pretrain import vae as vae_stage
from ip2p.world.pretrain.loop import LoopConfig, recipe_of, train
from ip2p.world.render import object_coverage, render
from ip2p.world.scene import Scene, SceneDistribution, sample_scene, sample_scenes
from ip2p.world.vocab import CANVAS

log = logging.getLogger(__name__)


def outline_band(scene: Scene, px: int) -> np.ndarray:
    """[CANVAS, CANVAS] 1 within `px` pixels of any object's outline (its coverage > 1/2, dilated minus eroded),
    object by object: where two objects touch, both outlines, so the seam between them, are on it."""
    band = np.zeros((CANVAS, CANVAS), dtype=bool)
    for o in scene.objects:
        inside = object_coverage(o) > 0.5
        band |= ndimage.binary_dilation(inside, iterations=px) & ~ndimage.binary_erosion(inside, iterations=px)
    return band.astype(np.float32)


def loss_weights(scene: Scene, c: DictConfig) -> np.ndarray:
    """pretrain-vae's detail weights (objects, their rims, snow flakes) plus the outline band's."""
    return vae_stage.detail_weight(scene, c.detail_weight) + c.outline_weight * outline_band(scene, c.outline_px)


def scene_distribution(mix) -> SceneDistribution:
    """The training scenes' mix: each key that is not null overrides the world's own distribution."""
    given = {k: v for k, v in dict(mix or {}).items() if v is not None}
    if "p_style" in given:
        given["p_style"] = {str(k): float(v) for k, v in dict(given["p_style"]).items()}
    return SceneDistribution(**{k: v if k == "p_style" else float(v) for k, v in given.items()})


def make_batch(seed: int, step: int, c: DictConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch `step`: whole 64 px renders [B, 3, 64, 64] in [-1, 1] and their loss weights [B, 1, 64, 64]."""
    rng = np.random.default_rng([seed, step])
    dist = scene_distribution(c.get("scenes"))
    scenes = [sample_scene(rng, dist) for _ in range(c.batch_size)]
    images = np.stack([render(s) for s in scenes])
    weights = np.stack([loss_weights(s, c) for s in scenes])
    return to_tensor(images), torch.from_numpy(weights)[:, None]


def refine_loss(vae, x: torch.Tensor, w: torch.Tensor, kl_weight: float, train_encoder: bool) -> dict:
    """Weighted L1 + MSE of reconstructing a posterior sample, + SD's tiny KL when the encoder learns."""
    with torch.set_grad_enabled(train_encoder):
        posterior = vae.encode(x).latent_dist
        z = posterior.sample()
    l1, l2 = vae_stage.weighted_pixel_losses(vae.decode(z).sample - x, w)
    out = {"loss": l1 + l2, "l1": l1.detach(), "l2": l2.detach()}
    if train_encoder:
        kl = posterior.kl().mean() / x[0].numel()
        out["loss"] = out["loss"] + kl_weight * kl
        out["kl"] = kl.detach()
    return out


@torch.no_grad()
def latent_drift(old, new, scenes: list[Scene]) -> float:
    """Mean |z_new - z_old| / mean |z_old| over the posterior means of `scenes` (0: the latents are the same)."""
    x = to_tensor(np.stack([render(s) for s in scenes]))
    z_old, z_new = old.encode(x).latent_dist.mean, new.encode(x).latent_dist.mean
    return float((z_new - z_old).norm(dim=1).mean() / z_old.norm(dim=1).mean())


def run(cfg: DictConfig) -> dict:
    c = cfg.world.vae_refine
    torch.manual_seed(c.seed)
    # 1. the VAE the base was trained on, and a frozen copy of it to measure the latents' drift against
    vae = load_vae(str(c.source), "cpu", "float32").requires_grad_(False)
    source = load_vae(str(c.source), "cpu", "float32")
    parts = [vae.decoder, vae.post_quant_conv] + ([vae.encoder, vae.quant_conv] if c.train_encoder else [])
    for part in parts:
        part.requires_grad_(True)
    eval_scenes = sample_scenes(c.eval_seed, c.eval_scenes)
    loop = LoopConfig.from_cfg(c.loop, progress=cfg.progress)

    def loss_fn(step: int) -> dict:
        x, w = make_batch(c.seed, step, c)
        return refine_loss(vae, x, w, c.kl_weight, c.train_encoder)

    with start_mlflow_run(cfg, "refine-vae", {"train_encoder": bool(c.train_encoder)}):
        before = vae_stage.judge(source, eval_scenes)
        # 2. continue it (EMA weights are judged and kept; resumable from c.checkpoint)
        ema = train("refine-vae", vae, loss_fn, loop, Path(c.checkpoint), recipe=recipe_of(c),
                    evaluate=lambda m, step: vae_stage.judge(m, eval_scenes), log_metrics=log_metrics)
        final = ema.model.eval()
        # 3. how far the latents moved. The scaling factor stays the source's: the base's UNet speaks that
        #    scale; the one measured afresh is reported beside it
        result = {**vae_stage.judge(final, eval_scenes), "scaling_factor": final.config.scaling_factor,
                  "scaling_factor_measured": vae_stage.measure_scaling_factor(final, c.eval_seed + 1, 256),
                  "latent_drift": latent_drift(source, final, eval_scenes), "steps": loop.steps,
                  **{f"{k}_before": v for k, v in before.items()}}
        # 4. save, diffusers layout
        with atomic_folder(Path(c.output)) as tmp:
            final.save_pretrained(tmp, safe_serialization=True)
        log_metrics({f"final/{k}": v for k, v in result.items()})
    atomic_write_json(Path(cfg.paths.reports) / "refine_vae.json", result)
    log.info("refine-vae: %s", result)
    return result
