"""`ip2p world-eval`: the trained editor judged by the world's truth on held-out rendered scenes.

For every held-out case (a render, an instruction, the true edited scene; ip2p.world.cases) the editor
edits with the project's own grid code (the same as `ip2p evaluate`): cases of `grid_kinds` over the
whole text x image guidance grid, the other kinds at the default cell only (the grid chooses the default
and the targets are on the headline kinds; every kind on the grid costs 60% more edits). The oracle
reads input and edit and the world's verdict says whether the instructed attribute now holds (success)
and whether everything else stayed (preservation). CLIP metrics of the same edits sit beside them, so
the paper's trade-off plot can be read with the truth on its axes.
Baselines at the default cell, same cases: identity (return the input), regenerate (the base
text-to-image model draws the edited caption) and, when given, an editor trained on unfiltered pairs.

Writes reports/world_eval.json (DVC metrics), world_eval_grid.csv, world_eval.png (trade-off, truth and
CLIP side by side) and world_eval_failures.png. Targets: docs/miniature.md.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig

from ip2p.evaluation.grid import Cell, edit_grid, guidance_cells
from ip2p.evaluation.run import score_grid
from ip2p.io.atomic import atomic_write_json, atomic_write_text
from ip2p.io.figures import save_figure
from ip2p.io.images import tensor_to_unit, to_tensor, to_uint8
from ip2p.models.instruct_pix2pix import InstructPix2Pix
from ip2p.models.loader import load_clip, load_diffusion
from ip2p.sampling.text_to_image import generate
from ip2p.io.loggers import log_metrics, start_mlflow_run
from ip2p.world.cases import Case, caption_combinations, heldout_cases, unseen_in
from ip2p.world.oracle import Reading, read
from ip2p.world.render import render
from ip2p.world.verdict import judge_edit, read_any

log = logging.getLogger(__name__)

TRUTH = ("success", "preserved", "both")


def verdict_rows(cases: list[Case], befores: list[Reading], images: np.ndarray, method: str,
                 cell: Cell | None) -> list[dict]:
    """One row per case: the world's verdict on `images` (the method's outputs, case order)."""
    rows = []
    for case, before, img in zip(cases, befores, images):
        v = judge_edit(before, read_any(img), case.instruction)
        rows.append({"case": case.id, "kind": case.kind, "method": method,
                     "text_guidance": cell.text_guidance if cell else np.nan,
                     "image_guidance": cell.image_guidance if cell else np.nan,
                     "judged": v is not None, "success": bool(v and v.success),
                     "preserved": bool(v and v.preserved), "both": bool(v and v.both)})
    return rows


def summarise(rows: pd.DataFrame, headline_kinds: list[str]) -> dict:
    """Per kind and the headline average (the unweighted mean over headline kinds)."""
    by_kind = rows.groupby("kind")[list(TRUTH)].mean()
    out = {f"{m}_{k}": round(float(by_kind.loc[k, m]), 4) for k in by_kind.index for m in TRUTH}
    head = by_kind.loc[[k for k in headline_kinds if k in by_kind.index]]
    out.update({m: round(float(head[m].mean()), 4) for m in TRUTH})
    return out


def seen_combinations(dataset: Path) -> set | None:
    """Every (colour, shape, background) that the editor's training captions (input and output) name;
    None when there is no training split to read."""
    import pyarrow.parquet as pq

    parts = sorted((dataset / "train").glob("*.parquet"))
    if not parts:
        return None
    seen: set = set()
    for part in parts:
        table = pq.read_table(part, columns=["input_caption", "output_caption"])
        for text in table.column("input_caption").to_pylist() + table.column("output_caption").to_pylist():
            seen |= caption_combinations(text)
    return seen


def by_split(at_default: pd.DataFrame, cases: list[Case], seen: set) -> dict:
    """Truth at the default cell for cases whose combinations the training captions name (seen) and
    for those with at least one they never name (unseen), over all kinds."""
    unseen = {case.id for case in cases if unseen_in(case, seen)}
    split = at_default["case"].isin(unseen).map({True: "unseen", False: "seen"})
    out = {}
    for name, g in at_default.groupby(split):
        out[name] = {"cases": int(len(g)), **{m: round(float(g[m].mean()), 4) for m in TRUTH}}
    return out


def run(cfg: DictConfig) -> dict:
    with start_mlflow_run(cfg, "world-eval"):
        result = evaluate(cfg)
        log_metrics({k: v for k, v in result["editor"].items() if isinstance(v, float)})
    return result


def evaluate(cfg: DictConfig) -> dict:
    start = time.perf_counter()
    c = cfg.world.eval
    out = Path(cfg.paths.reports)
    grid_kinds = set(c.grid_kinds) if c.get("grid_kinds") else set(c.kinds)   # null or []: every kind (ip2p.checks)
    # 1. held-out cases, rendered; the oracle reads each input once
    cases = heldout_cases(int(c.seed), int(c.per_kind), tuple(c.kinds))
    renders = np.stack([render(case.scene) for case in cases])
    befores = [read(img) for img in renders]
    inputs = to_tensor(renders)  # [N, 3, 64, 64] in [-1, 1]
    ids = [case.id for case in cases]
    instructions = [case.instruction for case in cases]

    # 2. the editor over the guidance grid (the generic grid code of `ip2p evaluate`): the grid's kinds at
    #    every cell, the other kinds at the default cell only. Seeds follow the case, not the batch.
    default = Cell(float(c.default_text_guidance), float(c.default_image_guidance))
    cells = guidance_cells(c.text_guidances, c.image_guidances, extra=default)
    parts = [(idx, part_cells) for idx, part_cells in (
        ([i for i, case in enumerate(cases) if case.kind in grid_kinds], cells),
        ([i for i, case in enumerate(cases) if case.kind not in grid_kinds], [default])) if idx]
    autocast = cfg.get("autocast")
    editor = InstructPix2Pix(load_diffusion(c.model, "editor", cfg.model, cfg.paths.cache, cfg.device, "float32", autocast))
    clip = load_clip(cfg.model.clip, cfg.model, cfg.paths.cache, cfg.device)

    # 3. truth and CLIP for every (case, cell) edited
    rows, clip_parts = [], []
    at_default_edits = torch.empty_like(inputs)                                   # [N, 3, H, W]
    for idx, part_cells in parts:
        edits = edit_grid(editor, inputs[idx], [instructions[i] for i in idx], [ids[i] for i in idx], part_cells,
                          int(c.steps), str(c.scheduler), int(c.seed), int(c.batch_size),
                          bool(cfg.progress))                                     # [n, C, 3, H, W]
        for k, cell in enumerate(part_cells):
            rows += verdict_rows([cases[i] for i in idx], [befores[i] for i in idx], to_uint8(edits[:, k]), "editor", cell)
        scored = score_grid(clip, tensor_to_unit(inputs[idx]), tensor_to_unit(edits), None,
                            [cases[i].input_caption for i in idx], [cases[i].output_caption for i in idx], part_cells)
        scored["case"] = [ids[idx[j]] for j in scored["input"]]
        clip_parts.append(scored.drop(columns="input"))
        at_default_edits[idx] = edits[:, part_cells.index(default)]
    per_edit = pd.DataFrame(rows).merge(pd.concat(clip_parts), on=["case", "text_guidance", "image_guidance"])
    on_grid = per_edit[per_edit.kind.isin(grid_kinds)]       # every cell averages the same cases
    by_cell = on_grid.groupby(["text_guidance", "image_guidance"])
    grid = by_cell[[*TRUTH, "clip_sim_dir", "clip_sim_image"]].mean()
    grid.insert(0, "cases", by_cell.size())
    atomic_write_text(out / "world_eval_grid.csv", grid.reset_index().to_csv(index=False, float_format="%.4f"))

    # 4. baselines on the same cases
    at_default = per_edit[(per_edit.text_guidance == default.text_guidance) & (per_edit.image_guidance == default.image_guidance)]
    methods = {"editor": at_default}
    if c.baselines.identity:
        methods["identity"] = pd.DataFrame(verdict_rows(cases, befores, renders, "identity", None))
    if c.baselines.regenerate:
        base = load_diffusion(cfg.model.base, "base", cfg.model, cfg.paths.cache, cfg.device, "float32", autocast)
        drawn = generate(base.unet, base.vae, base.text_encoder, base.tokenizer, dict(base.scheduler.config),
                         [case.output_caption for case in cases], steps=int(c.regenerate.steps),
                         guidance=float(c.regenerate.guidance), seed=int(c.seed), scheduler=str(c.regenerate.scheduler),
                         resolution=int(renders.shape[1]), autocast=base.autocast)
        methods["regenerate"] = pd.DataFrame(verdict_rows(cases, befores, drawn, "regenerate", None))
    # other editors at the same cell and seeds: one trained on unfiltered pairs, the reference run's editor
    others = {"unfiltered": c.baselines.unfiltered_model, "reference": c.baselines.get("reference_model")}
    for name, source in others.items():
        if not source:
            continue
        other = InstructPix2Pix(load_diffusion(source, "editor", cfg.model, cfg.paths.cache, cfg.device, "float32",
                                               autocast))
        alt = edit_grid(other, inputs, instructions, ids, [default], int(c.steps), str(c.scheduler), int(c.seed),
                        int(c.batch_size), bool(cfg.progress))
        methods[name] = pd.DataFrame(verdict_rows(cases, befores, to_uint8(alt[:, 0]), name, default))

    # 5. the report: the default cell, baselines, the best cell, targets; plots
    headline = list(c.headline_kinds)
    summary = {name: summarise(df, headline) for name, df in methods.items()}
    best = grid.reset_index().sort_values("both", ascending=False).iloc[0]
    t = c.targets
    ed = summary["editor"]
    met = {"success": ed["success"] >= t.success, "preserved": ed["preserved"] >= t.preserved,
           "each_kind": all(ed[f"{m}_{k}"] >= t.each_kind for k in headline for m in ("success", "preserved"))}
    if "unfiltered" in summary:
        met["filtered_beats_unfiltered"] = ed["both"] > summary["unfiltered"]["both"]
    result = {**summary, "cases": len(cases), "per_kind": int(c.per_kind), "steps": int(c.steps),
              "edits": sum(len(idx) * len(part_cells) for idx, part_cells in parts),   # the editor's, what time grows with
              "default_cell": {"text_guidance": default.text_guidance, "image_guidance": default.image_guidance},
              "grid_kinds": [k for k in c.kinds if k in grid_kinds],
              "best_cell": {"text_guidance": float(best.text_guidance), "image_guidance": float(best.image_guidance),
                            **{m: round(float(best[m]), 4) for m in TRUTH}},
              "judged": round(float(at_default["judged"].mean()), 4),
              "targets": dict(t), "met": met}
    seen = seen_combinations(Path(c.training_data)) if c.training_data else None
    if seen is not None:
        result["editor_by_combination"] = by_split(at_default, cases, seen)
    result["seconds"] = round(time.perf_counter() - start, 1)
    atomic_write_json(out / "world_eval.json", result)
    tradeoff_picture(grid.reset_index(), result["grid_kinds"], out / "world_eval.png")
    failures_picture(cases, renders, at_default_edits, at_default, int(c.failures_shown),
                     out / "world_eval_failures.png")
    log.info("world-eval at %s: %s", default, {k: ed[k] for k in TRUTH})
    return result


def tradeoff_picture(grid: pd.DataFrame, kinds: list[str], path: Path) -> None:
    """Left: the truth (preservation vs success); right: the paper's CLIP axes. One line per text
    guidance through the image guidances, as the paper's figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    for text_guidance, g in grid.groupby("text_guidance"):
        g = g.sort_values("image_guidance")
        left.plot(g.preserved, g.success, "o-", label=f"text {text_guidance:g}")
        right.plot(g.clip_sim_dir, g.clip_sim_image, "o-", label=f"text {text_guidance:g}")
        for _, r in g.iterrows():
            left.annotate(f"{r.image_guidance:g}", (r.preserved, r.success), fontsize=7)
            right.annotate(f"{r.image_guidance:g}", (r.clip_sim_dir, r.clip_sim_image), fontsize=7)
    left.set(xlabel="preservation (oracle: everything else unchanged)", ylabel="success (oracle: attribute holds)",
             title="truth")
    right.set(xlabel="CLIP direction similarity", ylabel="CLIP image similarity", title="CLIP (the paper's axes)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Held-out rendered scenes ({', '.join(kinds)}), guidance grid (labels: image guidance)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def failures_picture(cases: list[Case], renders: np.ndarray, edits: torch.Tensor, verdicts: pd.DataFrame,
                     shown: int, path: Path) -> None:
    """Input | edit | the true edit, for failed cases (a few per kind)."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    failed = verdicts.reset_index(drop=True)
    failed = failed[~failed.both].groupby("kind").head(max(1, shown // 7)).head(shown)
    if failed.empty:
        return
    edited = to_uint8(edits)
    index = {case.id: i for i, case in enumerate(cases)}
    fig, axes = plt.subplots(len(failed), 3, figsize=(6.6, 2.2 * len(failed)), squeeze=False)
    for row, (_, v) in enumerate(failed.iterrows()):
        i = index[v.case]
        for col, img in enumerate((renders[i], edited[i], render(cases[i].edited))):
            axes[row, col].imshow(img, interpolation="nearest")
            axes[row, col].set_xticks([])
            axes[row, col].set_yticks([])
        axes[row, 0].set_ylabel("\n".join(textwrap.wrap(cases[i].instruction, 18)), fontsize=7, rotation=0,
                                ha="right", va="center")
        axes[row, 1].set_title(f"success {v.success}, kept {v.preserved}", fontsize=7)
    axes[0, 0].set_title("input", fontsize=8)
    axes[0, 2].set_title("true edit", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
