"""`ip2p pretrain-t2i`: the world's text-to-image base (the stand-in for Stable Diffusion 1.5),
saved as a StableDiffusionPipeline folder: unet/, vae/, text_encoder/, tokenizer/, scheduler/.

Recipe (docs/miniature-world.md): as in SD, the text encoder is a frozen CLIP text tower (here the
world CLIP's own) and the VAE is frozen; only the UNet trains. Every training scene is rendered and
encoded once (posterior mean and std cached); each step draws fresh captions for its scenes (so the
UNet sees many phrasings of one scene) and samples the posterior. SD's 1000-step scaled-linear betas,
rescaled to zero terminal SNR, with the v target (`world.t2i.schedule`); min-SNR loss weighting over
timesteps, and over latent pixels a weight that favours the objects (`object_weight`: they are a few
percent of the pixels but all of the shape); captions dropped to "" 10% of the time so that
classifier-free guidance works; warmup + cosine learning rate; EMA weights are saved.

A curriculum (`world.t2i.curriculum`): the first steps draw only the simplest scenes (one large object,
no style, one background), the rest the whole world. On the whole world from the start the UNet
spends thousands of steps on colour, background, style and layout before shapes, which are a few
percent of the pixels; alone, one large object at a time, shape is learned within a few thousand
steps, and the full world is then learned on top of it (docs/miniature-world.md, "Shape").
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from scipy import ndimage
from tqdm.auto import tqdm

from ip2p.errors import Ip2pError
from ip2p.io.atomic import atomic_file, atomic_folder, atomic_write_json
from ip2p.io.images import to_tensor
from ip2p.io.loggers import log_metrics, start_mlflow_run
from ip2p.models.tiny import _scheduler_config
from ip2p.world.pretrain.loop import LoopConfig, recipe_of, train
from ip2p.sampling.text_to_image import encode_prompts, generate
from ip2p.world.language.captions import caption, plain_caption
from ip2p.world.oracle import read
from ip2p.world.render import object_coverage, render
from ip2p.world.scene import Scene, SceneDistribution, sample_scene, sample_scenes, valid
from ip2p.world.vocab import COLOURS, SHAPES

log = logging.getLogger(__name__)


def load_frozen(vae_dir: str, clip_dir: str, max_tokens: int):
    """The world VAE, and the CLIP text tower as a CLIPTextModel (SD's text-encoder class) + tokenizer."""
    from diffusers import AutoencoderKL
    from transformers import CLIPModel, CLIPTextModel, CLIPTokenizer

    vae = AutoencoderKL.from_pretrained(vae_dir).eval().requires_grad_(False)
    clip = CLIPModel.from_pretrained(clip_dir)
    text_encoder = CLIPTextModel(clip.config.text_config)
    # transformers 4 wraps the tower in `.text_model`; transformers 5 is the tower itself.
    getattr(text_encoder, "text_model", text_encoder).load_state_dict(clip.text_model.state_dict())
    tokenizer = CLIPTokenizer.from_pretrained(clip_dir, model_max_length=max_tokens)
    return vae, text_encoder.eval().requires_grad_(False), tokenizer


def build_unet(c: DictConfig, cross_attention_dim: int, sample_size: int):
    """SD's UNet class, sized by `world.t2i`: one level per entry of `channels` (the first at the latent
    size `sample_size`), cross-attention on the levels `cross_attention` marks (default: all but the
    deepest, as SD 1.5)."""
    from diffusers import UNet2DConditionModel

    channels = tuple(c.channels)
    n = len(channels)
    attend = tuple(c.get("cross_attention") or [True] * (n - 1) + [False])
    if len(attend) != n:
        raise Ip2pError(f"world.t2i.cross_attention needs one entry per level of channels ({n}), got {len(attend)}")
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, block_out_channels=channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attend),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attend)),
        layers_per_block=c.layers_per_block, cross_attention_dim=cross_attention_dim,
        attention_head_dim=c.attention_heads, norm_num_groups=c.norm_groups,
    )


def scenes_key(vae, scenes: list[Scene]) -> torch.Tensor:
    """What a latent cache was made from: a digest of the VAE's weights and of the scenes (int64 [4]), so
    that a retrained VAE or another scene list is never served stale latents."""
    h = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    h.update(json.dumps([s.to_dict() for s in scenes], sort_keys=True).encode())
    return torch.from_numpy(np.frombuffer(h.digest(), dtype=np.int64).copy())


@torch.no_grad()
def cache_latents(vae, scenes: list[Scene], path: Path, batch: int = 128, progress: bool = True) -> dict:
    """Posterior mean and std of every scene's render, computed once (fp16 on disk)."""
    key = scenes_key(vae, scenes)
    if path.exists():
        cached = torch.load(path, weights_only=True)
        if torch.equal(cached.get("key", torch.zeros(0, dtype=torch.int64)), key):
            return cached
    means, stds = [], []
    for i in tqdm(range(0, len(scenes), batch), desc="encoding scenes", disable=not progress):
        dist = vae.encode(to_tensor(np.stack([render(s) for s in scenes[i:i + batch]]))).latent_dist
        means.append(dist.mean.half())
        stds.append(dist.std.half())
    cached = {"mean": torch.cat(means), "std": torch.cat(stds), "key": key}
    with atomic_file(path) as tmp:
        torch.save(cached, tmp)
    return cached


def first_scenes(seed: int, n: int, background: str | None, p_small: float = 0.0,
                 p_two_objects: float = 0.0) -> list[Scene]:
    """The curriculum's first scenes: one object (two with probability `p_two_objects`: a drill of binding
    each colour and shape to its own object), each small with probability `p_small`, no global style, on
    `background` (None: any)."""
    drill = SceneDistribution(p_two_objects=p_two_objects, p_style={"none": 1.0}, p_small=p_small)
    rng = np.random.default_rng(seed)
    out: list[Scene] = []
    while len(out) < n:
        scene = sample_scene(rng, drill)
        if background is not None:
            scene = dataclasses.replace(scene, background=background)
        if valid(scene):  # a colour too close to the forced background is drawn again
            out.append(scene)
    return out


def object_mask(scene: Scene, factor: int) -> np.ndarray:
    """[64/factor]^2 bool: latent pixels whose factor x factor patch touches an object (or its rim)."""
    cover = np.zeros((64, 64), dtype=np.float32)
    for o in scene.objects:
        cover = np.maximum(cover, object_coverage(o))
    patches = cover.reshape(64 // factor, factor, 64 // factor, factor).max(axis=(1, 3))
    return ndimage.binary_dilation(patches > 0, iterations=1)


def pixel_weight(masks: torch.Tensor, object_weight: float) -> torch.Tensor:
    """[B, h, w] bool -> [B, 1, h, w] loss weights (1 + object_weight on objects), each sample's
    weights normalised to mean 1 so the loss keeps the scale of a plain mean."""
    w = 1.0 + object_weight * masks.float()[:, None]
    return w / w.mean(dim=(2, 3), keepdim=True)


def scheduler_config(schedule: DictConfig | dict | None) -> dict:
    """SD 1.5's noise schedule with the world's overrides (`world.t2i.schedule`), saved with the base
    so that every later stage (synthesis, editor training, editing) samples as the base was trained."""
    return {**_scheduler_config(), **dict(schedule or {})}


def min_snr_weight(alphas_cumprod: torch.Tensor, t: torch.Tensor, gamma: float,
                   prediction_type: str = "epsilon") -> torch.Tensor:
    """Min-SNR-gamma loss weight; gamma <= 0 turns weighting off.

    In terms of the clean-latent error, the plain epsilon loss weighs step t by SNR(t) and the plain
    v loss by SNR(t) + 1; min-SNR clips that weight at gamma. So the epsilon loss is multiplied by
    min(SNR, gamma) / SNR and the v loss by min(SNR + 1, gamma) / (SNR + 1), which keeps a weight of
    at least 1 where SNR = 0 (the step that must draw the scene from nothing under a zero-terminal-SNR
    schedule)."""
    if gamma <= 0:
        return torch.ones_like(t, dtype=torch.float32)
    snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
    if prediction_type == "v_prediction":
        return torch.clamp(snr + 1, max=gamma) / (snr + 1)
    return torch.clamp(snr, max=gamma) / snr


@torch.no_grad()
def caption_reliance(unet, vae, text_encoder, tokenizer, schedule: dict, scenes: list[Scene],
                     timesteps: tuple[int, ...] = (300, 500, 700), seed: int = 0) -> dict:
    """How much the denoiser listens to each attribute word, cheaply (no sampling, no oracle): the relative
    rise of its clean-latent error on noised renders when the plain caption names another shape (or
    colour) than the image shows. 0 = the word is ignored. Single-object scenes of `scenes` are used."""
    from diffusers import DDPMScheduler

    single = [sc for sc in scenes if len(sc.objects) == 1]
    rng = np.random.default_rng(seed)
    prompts = {"true": [plain_caption(sc) for sc in single]}
    for attribute, values in (("shape", SHAPES), ("colour", tuple(COLOURS))):
        prompts[attribute] = [plain_caption(dataclasses.replace(sc, objects=(dataclasses.replace(
            sc.objects[0], **{attribute: str(rng.choice([v for v in values if v != getattr(sc.objects[0], attribute)]))}),)))
            for sc in single]
    text = {k: encode_prompts(tokenizer, text_encoder, v) for k, v in prompts.items()}
    x0 = vae.encode(to_tensor(np.stack([render(sc) for sc in single]))).latent_dist.mean * vae.config.scaling_factor
    alphas_cumprod = DDPMScheduler.from_config(schedule).alphas_cumprod
    v_target = schedule.get("prediction_type") == "v_prediction"
    errors = {k: 0.0 for k in text}
    for t in timesteps:
        a = alphas_cumprod[t]
        xt = a.sqrt() * x0 + (1 - a).sqrt() * torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed + t))
        for k, states in text.items():
            out = unet(xt, torch.full((len(single),), t), encoder_hidden_states=states).sample
            x0_pred = a.sqrt() * xt - (1 - a).sqrt() * out if v_target else (xt - (1 - a).sqrt() * out) / a.sqrt()
            errors[k] += float(((x0_pred - x0) ** 2).mean())
    return {f"reliance_{k}": errors[k] / errors["true"] - 1 for k in ("shape", "colour")}


def judge(unet, vae, text_encoder, tokenizer, schedule: dict, e: DictConfig, scenes: list[Scene]) -> dict:
    """Generate from the plain captions of held-out scenes (noise schedule `schedule`, sampler settings
    `e`: world.t2i.eval); the oracle reads colour, background, shape and style."""
    prompts = [plain_caption(s) for s in scenes]
    images = generate(unet, vae, text_encoder, tokenizer, schedule, prompts, steps=e.steps,
                      guidance=e.guidance, seed=e.seed, scheduler=e.scheduler, guidance_rescale=e.guidance_rescale)
    return score_generations(scenes, images)


def score_generations(scenes: list[Scene], images: np.ndarray) -> dict:
    """Share of generations whose main object has the caption's colour (where colour shows) and shape,
    and whose background (and style) is the caption's; single-object captions are the first object."""
    colour, shape, background, style = [], [], [], []
    for s, img in zip(scenes, images):
        r = read(img)
        background.append(r.background == s.background)
        style.append(r.style == s.style)
        o = r.main_object()
        truth = max(s.objects, key=lambda q: q.side)
        if s.style != "bw":
            colour.append(o is not None and any(o.colour == q.colour for q in s.objects) if len(s.objects) > 1
                          else o is not None and o.colour == truth.colour)
        shape.append(o is not None and (any(o.shape == q.shape for q in s.objects) if len(s.objects) > 1
                                        else o.shape == truth.shape))
    return {"colour": float(np.mean(colour)), "background": float(np.mean(background)),
            "shape": float(np.mean(shape)), "style": float(np.mean(style))}


@dataclasses.dataclass
class Pool:
    """Training scenes with their cached latents and object masks."""

    scenes: list[Scene]
    cached: dict
    masks: torch.Tensor  # [N, h, w] bool

    @staticmethod
    def encode(vae, scenes: list[Scene], path: Path, progress: bool) -> "Pool":
        cached = cache_latents(vae, scenes, path, progress=progress)
        factor = 64 // cached["mean"].shape[-1]  # the VAE's downsampling
        return Pool(scenes, cached, torch.from_numpy(np.stack([object_mask(s, factor) for s in scenes])))


def refine_runs(c: DictConfig) -> list[DictConfig]:
    """The settings of each refine run, in order: `world.t2i.refine` is one run (a mapping), several (a
    list of them) or none (null). Each one's keys override the first run's settings (not the previous
    refine's), and each continues the saved base (`init_from` the output the run before it wrote)."""
    settings = OmegaConf.to_container(c, resolve=True)
    runs = settings.pop("refine") or []
    runs = [runs] if isinstance(runs, dict) else list(runs)
    checkpoints = [str(Path(c.checkpoint))]
    for run in runs:
        checkpoint = str(Path(run.get("checkpoint", c.checkpoint)))
        if checkpoint in checkpoints:  # it would resume from another run's finished checkpoint
            raise Ip2pError(f"world.t2i.refine.checkpoint must differ from world.t2i.checkpoint and from every other "
                            f"refine run's ('{checkpoint}' is used twice)")
        checkpoints.append(checkpoint)
    return [OmegaConf.merge(settings, run, {"init_from": settings["output"], "refine": None}) for run in runs]


def run(cfg: DictConfig) -> dict:
    c = cfg.world.t2i
    refines = refine_runs(c)  # checked before the first run spends its hours
    runs = [train_base(cfg, c, "pretrain-t2i")]
    for k, refine in enumerate(refines, start=1):  # each continues the base the run before it saved
        runs.append(train_base(cfg, refine, "pretrain-t2i-refine" if len(refines) == 1 else f"pretrain-t2i-refine{k}"))
    result = runs[-1]  # the last run's numbers on top, then every run before it
    if len(runs) > 1:
        result = {**result, "first_run": runs[0]}
    if len(runs) > 2:
        result["refine_runs"] = runs[1:-1]
    atomic_write_json(Path(cfg.paths.reports) / "pretrain_t2i.json", result)
    log.info("pretrain-t2i: %s", result)
    return result


def train_base(cfg: DictConfig, c: DictConfig, name: str) -> dict:
    """One training run of the base with the settings `c` (world.t2i's layout); saves it to `c.output`."""
    out = Path(c.output)
    torch.manual_seed(c.seed)
    # 1. frozen parts (world VAE and CLIP text tower) and the UNet to train
    vae, text_encoder, tokenizer = load_frozen(c.vae, c.clip, cfg.world.clip.max_tokens)
    from diffusers import DDPMScheduler

    sched = scheduler_config(c.schedule)
    noise_scheduler = DDPMScheduler.from_config(sched)  # its alphas_cumprod include the zero-SNR rescale
    alphas_cumprod = noise_scheduler.alphas_cumprod
    v_target = sched["prediction_type"] == "v_prediction"
    # 2. the training scenes, encoded once: the curriculum's first ones, then the whole world's
    checkpoints = Path(c.checkpoint).parent
    pools = [Pool.encode(vae, sample_scenes(c.seed, c.scenes), checkpoints / "t2i_latents.pt", cfg.progress)]
    curriculum = c.get("curriculum") or {}
    first_steps = int(curriculum.get("steps", 0))
    if first_steps >= c.loop.steps:
        raise Ip2pError(f"world.t2i.curriculum.steps ({first_steps}) must be fewer than world.t2i.loop.steps "
                        f"({c.loop.steps}): the base would never see the whole world")
    rehearsal = float(curriculum.get("rehearsal", 0.0))
    if first_steps:
        first = first_scenes(curriculum.seed, curriculum.scenes, curriculum.get("background"),
                             float(curriculum.get("p_small", 0.0)), float(curriculum.get("p_two_objects", 0.0)))
        first_cache = checkpoints / f"{Path(c.checkpoint).stem}_latents_first.pt"  # a refine run has its own
        pools.insert(0, Pool.encode(vae, first, first_cache, cfg.progress))
    latent_size = pools[-1].cached["mean"].shape[-1]
    if c.get("init_from"):  # continue training a saved base (its own architecture; `channels` etc. unused)
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(Path(c.init_from) / "unet")
    else:
        unet = build_unet(c, text_encoder.config.hidden_size, sample_size=latent_size)
    empty = encode_prompts(tokenizer, text_encoder, [""])
    eval_scenes = sample_scenes(c.eval.seed, c.eval.scenes)
    loop = LoopConfig.from_cfg(c.loop, progress=cfg.progress)
    scale = vae.config.scaling_factor

    def draw(pool: Pool, rng: np.random.Generator, n: int):
        """n scenes of `pool`: (cached mean, cached std, object masks, scenes)."""
        idx = torch.from_numpy(rng.integers(0, len(pool.scenes), n))
        return (pool.cached["mean"][idx].float(), pool.cached["std"][idx].float(), pool.masks[idx],
                [pool.scenes[i] for i in idx.tolist()])

    def loss_fn(step: int) -> dict:
        rng = np.random.default_rng([c.seed, step])
        g = torch.Generator().manual_seed(int(rng.integers(2**31)))
        if step < first_steps:
            mean, std, masks, scenes = draw(pools[0], rng, c.batch_size)
        else:  # the whole world, with a share of each batch rehearsing the curriculum's first scenes
            n_first = int(round(rehearsal * c.batch_size)) if first_steps else 0
            parts = [draw(pools[-1], rng, c.batch_size - n_first)] + ([draw(pools[0], rng, n_first)] if n_first else [])
            mean, std, masks = (torch.cat([p[k] for p in parts]) for k in range(3))
            scenes = [s for p in parts for s in p[3]]
        x0 = (mean + std * torch.randn(mean.shape, generator=g)) * scale
        prompts = [caption(scene, rng) for scene in scenes]
        text = encode_prompts(tokenizer, text_encoder, prompts)
        drop = torch.from_numpy(rng.random(c.batch_size) < c.caption_dropout)
        text = torch.where(drop[:, None, None], empty.expand_as(text), text)
        t = torch.randint(0, len(alphas_cumprod), (c.batch_size,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        if c.offset_noise:  # a per-channel constant in the noise, so the model learns to move the mean
            noise = noise + c.offset_noise * torch.randn((c.batch_size, noise.shape[1], 1, 1), generator=g)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        pred = unet(xt, t, encoder_hidden_states=text).sample
        target = a.sqrt() * noise - (1 - a).sqrt() * x0 if v_target else noise  # v = sqrt(a) eps - sqrt(1-a) x0
        per_pixel = F.mse_loss(pred, target, reduction="none") * pixel_weight(masks, c.object_weight)
        per_sample = per_pixel.mean(dim=(1, 2, 3))
        w = min_snr_weight(alphas_cumprod, t, c.min_snr_gamma, sched["prediction_type"])
        return {"loss": (w * per_sample).mean(), "mse": per_sample.mean().detach()}

    def evaluate(ema_unet, step: int) -> dict:
        return {**judge(ema_unet, vae, text_encoder, tokenizer, sched, c.eval, eval_scenes),
                **caption_reliance(ema_unet, vae, text_encoder, tokenizer, sched, eval_scenes)}

    with start_mlflow_run(cfg, name, {"parameters": sum(p.numel() for p in unet.parameters())}):
        # 3. train; 4. judge the EMA UNet; 5. save the whole text-to-image pipeline
        ema = train(name, unet, loss_fn, loop, Path(c.checkpoint), evaluate=evaluate, log_metrics=log_metrics,
                    recipe=recipe_of(c))
        final = ema.model.eval()
        result = {**judge(final, vae, text_encoder, tokenizer, sched, c.eval, eval_scenes),
                  "parameters": sum(p.numel() for p in final.parameters()), "steps": loop.steps}
        save_pipeline(out, final, vae, text_encoder, tokenizer, c.clip, sched)
        log_metrics({f"final/{k}": v for k, v in result.items()})
    return result


def save_pipeline(out: Path, unet, vae, text_encoder, tokenizer, clip_dir: str, schedule: dict) -> None:
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=EulerAncestralDiscreteScheduler.from_config(schedule),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    with atomic_folder(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        for name in ("vocab.json", "merges.txt"):  # CLIP's slow-tokenizer files beside tokenizer.json
            (tmp / "tokenizer" / name).write_bytes((Path(clip_dir) / name).read_bytes())
