"""`ip2p pretrain-clip`: a CLIPModel trained contrastively from scratch on (render, caption).

Recipe (docs/miniature-world.md): a BPE tokenizer learned on world captions and instructions (each
world word one token); a ViT over 8 px patches of the 64 px render and a text transformer; the
symmetric InfoNCE loss of CLIP with a learned temperature, plus hard negatives: each image is also
contrasted with captions of the same scene edited in one attribute (same phrasing), because a random
batch rarely holds two captions that differ only in, say, the colour - and that is exactly what the
filter and evaluation ask CLIP to tell apart. The saved folder is a CLIPModel + CLIPProcessor, loaded
like openai/clip-vit-large-patch14.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from ip2p.io.atomic import atomic_folder, atomic_write_json
from ip2p.io.loggers import log_metrics, start_mlflow_run
from ip2p.models.tokenizer import write_clip_tokenizer
from ip2p.world.pretrain.loop import LoopConfig, recipe_of, train
from ip2p.world.language.captions import caption, plain_caption, sample_form
from ip2p.world.language.edits import sample_edit, world_triple
from ip2p.world.render import render
from ip2p.world.scene import sample_scene, sample_scenes

log = logging.getLogger(__name__)

# One-attribute edits whose captions serve as hard negatives (add/remove change the object count).
NEGATIVE_KINDS = ("recolour", "reshape", "background", "style", "size")


def world_corpus(seed: int, n: int) -> list[str]:
    """Captions (every phrasing) and instructions of random scenes: the tokenizer's training text."""
    rng = np.random.default_rng(seed)
    texts = []
    for _ in range(n):
        t = world_triple(sample_scene(rng), rng)
        texts += [t["input"], t["edit"], t["output"]]
    return texts


def build_tokenizer(c: DictConfig, folder: Path):
    from transformers import CLIPTokenizer

    write_clip_tokenizer(world_corpus(c.seed, c.tokenizer_texts), folder, c.tokenizer_merges, c.max_tokens)
    return CLIPTokenizer.from_pretrained(folder, model_max_length=c.max_tokens)


def build_clip(c: DictConfig, tokenizer):
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    text = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=c.width, intermediate_size=4 * c.width,
                          num_hidden_layers=c.text_layers, num_attention_heads=c.heads,
                          max_position_embeddings=c.max_tokens, projection_dim=c.projection_dim,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)
    vision = CLIPVisionConfig(hidden_size=c.width, intermediate_size=4 * c.width, num_hidden_layers=c.vision_layers,
                              num_attention_heads=c.heads, image_size=64, patch_size=c.patch,
                              projection_dim=c.projection_dim)
    return CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                projection_dim=c.projection_dim))


def build_processor(tokenizer):
    from transformers import CLIPImageProcessor, CLIPProcessor

    image = CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    return CLIPProcessor(image_processor=image, tokenizer=tokenizer)


class Encoder:
    """Pixels and texts -> unit embeddings, with the processor's exact normalisation (differentiable)."""

    def __init__(self, model, processor, max_tokens: int):
        self.model, self.tokenizer, self.max_tokens = model, processor.tokenizer, max_tokens
        ip = processor.image_processor
        self.mean = torch.tensor(ip.image_mean).view(1, 3, 1, 1)
        self.std = torch.tensor(ip.image_std).view(1, 3, 1, 1)

    def images(self, images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
        out = self.model.get_image_features(pixel_values=(x - self.mean) / self.std)
        return F.normalize(out if isinstance(out, torch.Tensor) else out.pooler_output, dim=-1)

    def texts(self, texts: list[str]) -> torch.Tensor:
        # Padding to the longest text is exact for CLIP (causal mask, pooled at the end token) and
        # halves the text tower's work against padding to the context length.
        tok = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt")
        out = self.model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
        return F.normalize(out if isinstance(out, torch.Tensor) else out.pooler_output, dim=-1)


def make_batch(seed: int, step: int, c: DictConfig) -> tuple[np.ndarray, list[str], list[str]]:
    """B renders, their captions, and K one-attribute-edited captions per scene (same phrasing)."""
    rng = np.random.default_rng([seed, step])
    images, captions, negatives = [], [], []
    for _ in range(c.batch_size):
        scene = sample_scene(rng)
        form = sample_form(rng)
        images.append(render(scene))
        captions.append(caption(scene, form=form))
        for _ in range(c.hard_negatives):
            _, _, edited = sample_edit(scene, rng, NEGATIVE_KINDS)
            negatives.append(caption(edited, form=form))
    return np.stack(images), captions, negatives


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, neg: torch.Tensor, logit_scale: torch.Tensor):
    """CLIP's symmetric cross-entropy; images also score the hard-negative captions."""
    scale = logit_scale.exp().clamp(max=100.0)
    labels = torch.arange(len(img))
    logits_img = scale * img @ torch.cat([txt, neg]).T        # [B, B + B*K]
    logits_txt = scale * txt @ img.T                           # [B, B]
    return (F.cross_entropy(logits_img, labels) + F.cross_entropy(logits_txt, labels)) / 2


@torch.no_grad()
def judge(enc: Encoder, seed: int, n: int) -> dict:
    """On held-out scenes, against captions of the same scene edited in one attribute (plain form):
      caption_choice       the true caption scores highest among all its variants (1 of up to 6)
      pairwise_<kind>      the true caption beats the variant of that kind (1 of 2), and their mean
      direction_positive   cos(E_img(after) - E_img(before), E_txt(after) - E_txt(before)) > 0 for
                           the rendered before/after pairs (the paper's directional similarity)"""
    rng = np.random.default_rng(seed)
    scenes = sample_scenes(seed, n)
    right, positive = [], []
    pairwise: dict[str, list[bool]] = {k: [] for k in NEGATIVE_KINDS}
    for s in scenes:
        kinds, variants = [], []
        for kind in NEGATIVE_KINDS:
            try:
                variants.append(sample_edit(s, rng, (kind,))[2])
                kinds.append(kind)
            except ValueError:
                continue
        texts = [plain_caption(s)] + [plain_caption(v) for v in variants]
        img = enc.images(np.stack([render(s)] + [render(v) for v in variants]))
        txt = enc.texts(texts)
        scores = img[0] @ txt.T
        right.append(bool(scores.argmax() == 0))
        for k, kind in enumerate(kinds):
            pairwise[kind].append(bool(scores[0] > scores[k + 1]))
        d_img, d_txt = img[1:] - img[:1], txt[1:] - txt[:1]
        positive += (F.cosine_similarity(d_img, d_txt, dim=-1) > 0).tolist()
    result = {"caption_choice": float(np.mean(right)), "direction_positive": float(np.mean(positive))}
    result.update({f"pairwise_{k}": float(np.mean(v)) for k, v in pairwise.items() if v})
    result["pairwise"] = float(np.mean([result[f"pairwise_{k}"] for k in pairwise if pairwise[k]]))
    return result


def run(cfg: DictConfig) -> dict:
    c = cfg.world.clip
    out = Path(c.output)
    torch.manual_seed(c.seed)
    # 1. tokenizer on world text, model, processor
    tok_dir = Path(c.checkpoint).parent / "clip_tokenizer"
    tokenizer = build_tokenizer(c, tok_dir)
    model = build_clip(c, tokenizer)
    processor = build_processor(tokenizer)
    enc = Encoder(model, processor, c.max_tokens)
    loop = LoopConfig.from_cfg(c.loop, progress=cfg.progress)

    def loss_fn(step: int) -> dict:
        images, captions, negatives = make_batch(c.seed, step, c)
        loss = contrastive_loss(enc.images(images), enc.texts(captions), enc.texts(negatives), model.logit_scale)
        return {"loss": loss, "temperature": 1.0 / model.logit_scale.exp().detach()}

    def evaluate(ema_model, step: int) -> dict:
        return judge(Encoder(ema_model, processor, c.max_tokens), c.eval_seed, c.eval_scenes)

    with start_mlflow_run(cfg, "pretrain-clip", {"parameters": sum(p.numel() for p in model.parameters())}):
        # 2. train; 3. judge the EMA weights; 4. save model + processor (with CLIP's vocab/merges files)
        ema = train("pretrain-clip", model, loss_fn, loop, Path(c.checkpoint), evaluate=evaluate, recipe=recipe_of(c),
                    log_metrics=log_metrics)
        final = ema.model.eval()
        result = {**judge(Encoder(final, processor, c.max_tokens), c.eval_seed, c.eval_scenes),
                  "parameters": sum(p.numel() for p in final.parameters()), "steps": loop.steps}
        with atomic_folder(out) as tmp:
            final.save_pretrained(tmp, safe_serialization=True)
            processor.save_pretrained(tmp)
            for name in ("vocab.json", "merges.txt"):
                (tmp / name).write_bytes((tok_dir / name).read_bytes())
        log_metrics({f"final/{k}": v for k, v in result.items()})
    atomic_write_json(Path(cfg.paths.reports) / "pretrain_clip.json", result)
    log.info("pretrain-clip: %s", result)
    return result
