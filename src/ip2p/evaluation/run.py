"""`ip2p evaluate`: the guidance grid on held-out test pairs -> reports/.

Writes guidance_grid.csv (one row per cell, metric means), eval.json (headline metrics at the default
scales), guidance_grid.png (the trade-off plot) and guidance_examples.png (one input across the grid).
"""

from __future__ import annotations

import glob
import io
import logging
import random
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import torch
from omegaconf import DictConfig
from PIL import Image, ImageOps

from ip2p.errors import Ip2pError
from ip2p.evaluation.grid import Cell, edit_grid, guidance_cells
from ip2p.evaluation.plots import picture_grid, tradeoff_plot
from ip2p.io.atomic import atomic_write_json, atomic_write_text
from ip2p.io.images import pil_to_tensor, tensor_to_pil, tensor_to_unit, to_rgb
from ip2p.io.stage import stable_seed
from ip2p.models.clip_embed import embed_images, embed_texts
from ip2p.models.instruct_pix2pix import InstructPix2Pix
from ip2p.models.loader import check_square_resolution, load_clip, load_diffusion
from ip2p.scoring.edits import cosine, edit_metrics, ground_truth_metrics

log = logging.getLogger(__name__)

METRICS = ["clip_sim_image", "clip_sim_dir", "clip_sim_1", "clip_sim_0", "l1", "l2", "clip_i_gt"]


DRAW_UNITS = ("row", "pair")


def load_test_pairs(dataset_dir: str | Path, split: str, num_samples: int | None, seed: int,
                    unit: str) -> list[dict]:
    """Rows of the held-out split, sorted by id. unit=row: a seeded sample of `num_samples` rows (a caption
    pair with 4 kept candidates is 4x as likely to be tested); unit=pair (the original): a seeded sample of
    `num_samples` caption pairs, then one of each pair's kept candidates (seeded by the pair)."""
    if num_samples is not None and num_samples < 1:
        raise Ip2pError(f"evaluate.num_samples must be at least 1, or null for the whole split (got {num_samples})")
    if unit not in DRAW_UNITS:
        raise Ip2pError(f"evaluate.draw_by must be one of {', '.join(DRAW_UNITS)} (got '{unit}')")
    files = sorted(glob.glob(str(Path(dataset_dir) / split / "*.parquet")))
    if not files:
        raise Ip2pError(f"no {split} split in '{dataset_dir}' (expected {split}/*.parquet from `ip2p filter`)")
    # Ids first, images only for the chosen rows: a real test split holds gigabytes of images.
    columns = ["id"] if unit == "row" else ["id", "pair_id"]
    keys = [row for f in files for row in pq.read_table(f, columns=columns).to_pylist()]
    if not keys:
        raise Ip2pError(f"the {split} split in '{dataset_dir}' has no rows")
    if unit == "row":
        ids = sorted(str(k["id"]) for k in keys)
        chosen = set(ids if num_samples is None or num_samples >= len(ids)
                     else random.Random(seed).sample(ids, num_samples))
    else:
        rows_of: dict[str, list[str]] = {}
        for k in keys:
            rows_of.setdefault(str(k["pair_id"]), []).append(str(k["id"]))
        pairs = sorted(rows_of)
        if num_samples is not None and num_samples < len(pairs):
            pairs = random.Random(seed).sample(pairs, num_samples)
        chosen = {sorted(rows_of[p])[random.Random(stable_seed(seed, "eval-candidate", p)).randrange(len(rows_of[p]))]
                  for p in pairs}
    rows = [r for f in files for r in pq.read_table(f, filters=[("id", "in", sorted(chosen))]).to_pylist()]
    return sorted(rows, key=lambda r: str(r["id"]))


def _decode(struct: dict | None, resolution: int) -> Image.Image | None:
    if not struct or not struct.get("bytes"):
        return None
    with Image.open(io.BytesIO(struct["bytes"])) as img:
        img.load()
        return ImageOps.fit(to_rgb(img), (resolution, resolution), method=Image.Resampling.LANCZOS)


def score_grid(clip, inputs: torch.Tensor, edits: torch.Tensor, gts: torch.Tensor | None,
               captions_in: list[str], captions_out: list[str], cells: list[Cell], preprocess: str = "hf",
               value_range: str = "unit") -> pd.DataFrame:
    """One row per (input, cell). inputs [N,3,H,W], edits [N,C,3,H,W], gts [N,3,H,W] or None; all in [0,1].
    `preprocess` / `value_range`: how images reach CLIP (ip2p.models.clip_embed)."""
    n, c = edits.shape[:2]
    embed = lambda x: embed_images(clip, x, preprocess=preprocess, value_range=value_range)  # noqa: E731
    e_in = embed(inputs)
    e_edit = embed(edits.flatten(0, 1)).view(n, c, -1)
    t_in, t_out = embed_texts(clip, captions_in), embed_texts(clip, captions_out)
    e_gt = embed(gts) if gts is not None else None
    rows = []
    input_text = cosine(e_in, t_in)  # the filter's clip_sim_0: how well the input matches its caption
    for k, cell in enumerate(cells):
        m = {**edit_metrics(e_in, e_edit[:, k], t_in, t_out), "clip_sim_0": input_text}
        if gts is not None:
            m.update(ground_truth_metrics(edits[:, k], gts, e_edit[:, k], e_gt))
        for i in range(n):
            rows.append({"input": i, "text_guidance": cell.text_guidance, "image_guidance": cell.image_guidance,
                         **{name: float(v[i]) for name, v in m.items()}})
    return pd.DataFrame(rows)


def run(cfg: DictConfig) -> dict:
    """Evaluate inside an MLflow run (logger=mlflow|both): config, metrics and every report file logged."""
    from ip2p.io.loggers import log_artifact, log_metrics, start_mlflow_run

    with start_mlflow_run(cfg, "evaluate"):
        summary = evaluate(cfg)
        log_metrics({k: v for k, v in summary.items() if k in METRICS})
        for name in ("guidance_grid.csv", "eval.json", "guidance_grid.png", "guidance_examples.png"):
            log_artifact(Path(cfg.evaluate.out_dir) / name, artifact_path="evaluation")
    return summary


def evaluate(cfg: DictConfig) -> dict:
    # 1. the test pairs, the editor and CLIP
    start = time.perf_counter()
    e = cfg.evaluate
    out_dir = Path(e.out_dir)
    pairs = load_test_pairs(e.dataset_dir, e.split, e.num_samples, int(e.seed), str(e.draw_by))
    inputs = [_decode(r["input_image"], int(e.resolution)) for r in pairs]
    gts = [_decode(r.get("edited_image"), int(e.resolution)) for r in pairs]
    has_gt = all(g is not None for g in gts)

    components = load_diffusion(e.model, "editor", cfg.model, cfg.paths.cache, cfg.device, cfg.dtype, cfg.get("autocast"))
    check_square_resolution(components, int(e.resolution), "evaluate.resolution")
    editor = InstructPix2Pix(components)
    clip = load_clip(cfg.model.clip, cfg.model, cfg.paths.cache, cfg.device)
    default = Cell(float(e.default_text_guidance), float(e.default_image_guidance))
    cells = guidance_cells(e.text_guidances, e.image_guidances, extra=default)

    # 2. edit every pair at every cell of the guidance grid, then score the edits with CLIP
    edits = edit_grid(editor, pil_to_tensor(inputs), [r["edit_prompt"] for r in pairs], [str(r["id"]) for r in pairs],
                      cells, int(e.steps), str(e.scheduler), int(e.seed), int(e.batch_size), bool(cfg.progress))
    per_edit = score_grid(clip, tensor_to_unit(pil_to_tensor(inputs)), tensor_to_unit(edits),
                          tensor_to_unit(pil_to_tensor(gts)) if has_gt else None,
                          [r["input_caption"] for r in pairs], [r["output_caption"] for r in pairs], cells,
                          str(e.clip_preprocess), str(e.clip_value_range))
    metrics = [m for m in METRICS if m in per_edit]
    grid = per_edit.groupby(["text_guidance", "image_guidance"], sort=True)[metrics].mean().reset_index()
    grid.insert(2, "num_samples", len(pairs))
    atomic_write_text(out_dir / "guidance_grid.csv", grid.to_csv(index=False, float_format="%.6f"))

    # 3. the trade-off plot, one example's grid of edits, and the headline cell
    on_grid = grid[grid.text_guidance.isin([float(t) for t in e.text_guidances])
                   & grid.image_guidance.isin([float(i) for i in e.image_guidances])]
    tradeoff_plot(on_grid, out_dir / "guidance_grid.png")
    ex = int(e.example_index) % len(pairs)
    edit_images = {(cells[k].text_guidance, cells[k].image_guidance): tensor_to_pil(edits[ex, k:k + 1])[0] for k in range(len(cells))}
    picture_grid(inputs[ex], edit_images, [float(t) for t in e.text_guidances], [float(i) for i in e.image_guidances],
                 out_dir / "guidance_examples.png", caption=f"\"{pairs[ex]['edit_prompt']}\"")

    headline = grid[(grid.text_guidance == default.text_guidance) & (grid.image_guidance == default.image_guidance)].iloc[0]
    summary = {"text_guidance": default.text_guidance, "image_guidance": default.image_guidance, "num_samples": len(pairs),
               "steps": int(e.steps), "resolution": int(e.resolution), "model": str(e.model),
               **{m: round(float(headline[m]), 6) for m in metrics}, "seconds": round(time.perf_counter() - start, 1)}
    atomic_write_json(out_dir / "eval.json", summary)
    log.info("evaluation: %s", summary)
    return summary
