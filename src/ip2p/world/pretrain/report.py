"""`ip2p pretrain-report`: the oracle's verdict on the world's foundation models, loaded through the
project's one loader exactly as real checkpoints are -> reports/pretrain.json (DVC metrics) and two
pictures: generations per caption, and VAE reconstructions beside their originals.

Targets (docs/miniature-world.md): text-to-image colour >= 0.90, background >= 0.90, shape >= 0.75;
VAE oracle agreement >= 0.98 (the whole scene read back alike; `vae_agreement_*` per attribute); CLIP picks the true caption over one differing in one attribute >= 0.90
(pairwise; the stricter 1-of-6 choice is reported beside it) and directional similarity > 0 in
>= 0.90 of true before/after pairs; LM valid-and-consistent >= 0.90.
"""

from __future__ import annotations

import json
import logging
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from ip2p.io.atomic import atomic_write_json
from ip2p.io.figures import save_figure
from ip2p.io.loggers import log_metrics, start_mlflow_run
from ip2p.models.loader import ClipComponents, load_clip, load_diffusion
from ip2p.world.pretrain import clip as clip_stage
from ip2p.world.pretrain import t2i as t2i_stage
from ip2p.world.pretrain import vae as vae_stage
from ip2p.sampling.text_to_image import generate
from ip2p.world.language.captions import plain_caption
from ip2p.world.oracle import read
from ip2p.world.render import render
from ip2p.world.scene import sample_scenes

log = logging.getLogger(__name__)

TARGETS = {"t2i_colour": 0.90, "t2i_background": 0.90, "t2i_shape": 0.75, "vae_oracle_agreement": 0.98,
           "clip_pairwise": 0.90, "clip_direction_positive": 0.90, "llm_valid_and_consistent": 0.90}


def whole_scene_scores(scenes: list, images: np.ndarray) -> dict:
    """Stricter than the main-object scores of `t2i.score_generations`: the share of generations with as
    many objects as the caption names (`count`), and with every object's shape, colour and size (in any
    order), the background and the style all the caption's (`scene`). Both images of a Prompt-to-Prompt
    pair need this. The truth is the oracle's reading of the scene's own render, so that the oracle's
    conventions (no colour in black and white, sizes by side) apply to both sides alike."""
    def objects(r) -> Counter:
        return Counter((o.shape, o.colour, o.size) for o in r.objects)

    count, scene = [], []
    for s, img in zip(scenes, images):
        truth, got = read(render(s)), read(img)
        count.append(len(got.objects) == len(truth.objects))
        scene.append((got.background, got.style) == (truth.background, truth.style) and objects(got) == objects(truth))
    return {"count": float(np.mean(count)), "scene": float(np.mean(scene))}


def attribute_agreement(originals: np.ndarray, reconstructions: np.ndarray) -> dict:
    """Per attribute, how often the oracle reads a reconstruction as it reads its original: background,
    style and object count per image; shape, colour and size per object, over the images whose counts
    agree, objects matched by position as `same_scene` matches them. `same_scene` (the VAE target) asks
    all of them at once; this says which attribute a miss is made of."""
    scene_keys, object_keys = ("background", "style", "count"), ("shape", "colour", "size")
    agree, per_object = Counter(), 0
    for a, b in zip(originals, reconstructions):
        ra, rb = read(a), read(b)
        agree["background"] += ra.background == rb.background
        agree["style"] += ra.style == rb.style
        agree["count"] += len(ra.objects) == len(rb.objects)
        if len(ra.objects) == len(rb.objects):
            for p, q in zip(ra.objects, rb.objects):
                per_object += 1
                for k in object_keys:
                    agree[k] += getattr(p, k) == getattr(q, k)
    return {**{k: agree[k] / len(originals) for k in scene_keys},
            **{k: agree[k] / per_object if per_object else float("nan") for k in object_keys}}


def clip_encoder(clip: ClipComponents, max_tokens: int) -> clip_stage.Encoder:
    return clip_stage.Encoder(clip.model, clip.processor, max_tokens)


def generations_picture(parts, scenes, path: Path, seeds: int, c: DictConfig) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prompts = [plain_caption(s) for s in scenes]
    fig, axes = plt.subplots(len(prompts), seeds + 1, figsize=(1.9 * (seeds + 1) + 2.2, 1.9 * len(prompts)))
    for row, (scene, prompt) in enumerate(zip(scenes, prompts)):
        images = generate(parts.unet, parts.vae, parts.text_encoder, parts.tokenizer,
                          dict(parts.scheduler.config), [prompt] * seeds, steps=c.steps, guidance=c.guidance,
                          seed=c.seed + 1000 * row, scheduler=c.scheduler, guidance_rescale=c.guidance_rescale)
        axes[row, 0].imshow(render(scene), interpolation="nearest")
        axes[row, 0].set_title("a render", fontsize=7)
        axes[row, 0].set_ylabel("\n".join(textwrap.wrap(prompt, 24)), fontsize=7, rotation=0, ha="right", va="center")
        for k, img in enumerate(images):
            ax = axes[row, k + 1]
            ax.imshow(img, interpolation="nearest")
            r = read(img)
            o = r.main_object()
            ax.set_title(f"{o.colour or '-'} {o.shape} / {r.background}" if o else f"(none) / {r.background}",
                         fontsize=7)
    for ax in np.ravel(axes):
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("Text-to-image base, generated from held-out captions (titles: what the oracle reads)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=90)


def reconstructions_picture(vae, scenes, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    originals = np.stack([render(s) for s in scenes])
    recon = vae_stage.reconstruct(vae, originals)
    fig, axes = plt.subplots(2, len(scenes), figsize=(1.6 * len(scenes), 3.6))
    for k in range(len(scenes)):
        axes[0, k].imshow(originals[k], interpolation="nearest")
        axes[1, k].imshow(recon[k], interpolation="nearest")
    for ax in np.ravel(axes):
        ax.axis("off")
    axes[0, 0].set_title("renders", fontsize=8, loc="left")
    axes[1, 0].set_title("VAE reconstructions", fontsize=8, loc="left")
    fig.tight_layout()
    save_figure(fig, path, dpi=90)


@torch.no_grad()
def run(cfg: DictConfig) -> dict:
    w, c = cfg.world, cfg.world.report
    # 1. load every model through the one loader, as the pipeline stages will: the base with the VAE the
    #    mini preset swaps in under it (model.base_vae), so the VAE judged is the one the chain uses
    model_cfg = OmegaConf.merge(cfg.model, {"base_vae": c.base_vae})
    parts = load_diffusion(w.t2i.output, "base", model_cfg, cfg.paths.cache, "cpu", "float32")
    clip = load_clip(w.clip.output, cfg.model, cfg.paths.cache, "cpu")
    # 2. judge each against the world's truth on held-out scenes
    vae_scenes = sample_scenes(c.seed, c.vae_scenes)
    originals = np.stack([render(s) for s in vae_scenes])
    reconstructions = vae_stage.reconstruct(parts.vae, originals)
    vae_result = {**vae_stage.scores(originals, reconstructions),
                  "agreement": attribute_agreement(originals, reconstructions)}
    t2i_scenes = sample_scenes(c.seed + 1, c.t2i_scenes)
    e = c.t2i  # the same generations as t2i.judge makes, scored per main object and as whole scenes
    t2i_images = generate(parts.unet, parts.vae, parts.text_encoder, parts.tokenizer, dict(parts.scheduler.config),
                          [plain_caption(s) for s in t2i_scenes], steps=e.steps, guidance=e.guidance, seed=e.seed,
                          scheduler=e.scheduler, guidance_rescale=e.guidance_rescale)
    t2i_result = {**t2i_stage.score_generations(t2i_scenes, t2i_images), **whole_scene_scores(t2i_scenes, t2i_images)}
    t2i_result.update(t2i_stage.caption_reliance(parts.unet, parts.vae, parts.text_encoder, parts.tokenizer,
                                                 dict(parts.scheduler.config), t2i_scenes, seed=c.seed))
    clip_result = clip_stage.judge(clip_encoder(clip, w.clip.max_tokens), c.seed + 2, c.clip_scenes)
    llm_report = Path(cfg.paths.reports) / "pretrain_llm.json"
    llm_result = json.loads(llm_report.read_text()) if llm_report.exists() else {}
    metrics = {
        "vae_psnr": vae_result["psnr"], "vae_oracle_agreement": vae_result["oracle_agreement"],
        **{f"vae_agreement_{k}": v for k, v in vae_result["agreement"].items()},
        **{f"t2i_{k}": v for k, v in t2i_result.items()},
        **{f"clip_{k}": v for k, v in clip_result.items()},
        "llm_well_formed": llm_result.get("well_formed"),
        "llm_valid_and_consistent": llm_result.get("valid_and_consistent"),
    }
    result = {**metrics, "targets": TARGETS,
              "met": {k: metrics.get(k) is not None and metrics[k] >= v for k, v in TARGETS.items()}}
    # 3. pictures people look at
    reports = Path(cfg.paths.reports)
    generations_picture(parts, sample_scenes(c.seed + 3, c.picture_captions), reports / "world_generations.png",
                        c.picture_seeds, c.t2i)
    reconstructions_picture(parts.vae, sample_scenes(c.seed + 4, 10), reports / "world_reconstructions.png")
    with start_mlflow_run(cfg, "pretrain-report"):
        log_metrics({k: v for k, v in metrics.items() if v is not None})
    atomic_write_json(reports / "pretrain.json", result)
    log.info("pretrain-report: %s", result)
    return result
