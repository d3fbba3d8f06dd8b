"""`ip2p world-yield`: kept pairs per hour and their correctness, for each synthesis setting.

The paper's synthesis is its dominant cost (100 candidates x 100 sampler steps per caption pair). What
a setting buys is kept training pairs per hour, and what it may cost is their correctness; the world
can measure both. The same true world caption pairs (`world.yield_table.seed`) and the same candidates
(seed, p, guidance: `draw_samples`, as `ip2p synthesize` draws them) go through every setting in
`world.yield_table.settings` (sampler, steps, samples per UNet call, caption pairs per call, and
optionally the UNet's autocast dtype):

1. synthesis, timed (denoising and VAE decoding: the stage's own PairSampler);
2. CLIP scores and the filter's choice (its thresholds, then its top_k per caption pair: `select`);
3. the oracle's verdict on every candidate (the instructed attribute changed and the rest stayed);
4. an early look: the clean images that the guided prediction implies after `look_at` of the steps,
   scored by CLIP against the filter's thresholds lowered by each of `look_margins`. A candidate failing
   there is one that `synthesis.early_drop` with that look would stop; `false_rejects` counts those the
   full filter would have kept, and `denoising_saved` the share of UNet calls the drop would save (the
   rest of the steps of the dropped candidates).

Kept pairs per hour = kept candidates / (synthesis + CLIP scoring seconds) x 3600. Ratios are over the
first setting (the original recipe). Writes reports/world_yield.json and world_yield.png.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from ip2p.filtering.select import select
from ip2p.io.atomic import atomic_write_json
from ip2p.io.figures import finish_figure
from ip2p.io.images import tensor_to_pil, to_uint8
from ip2p.io.loggers import log_metrics, start_mlflow_run
from ip2p.models.loader import load_clip, load_diffusion, resolve_autocast
from ip2p.scoring.clip import ClipScorer
from ip2p.filtering.run import thresholds_from_config
from ip2p.scoring.thresholds import first_failure
from ip2p.synthesis.pipeline import PairSampler, draw_samples
from ip2p.synthesis.run import look_step, resolution, settings_from_config
from ip2p.world.language.edits import world_triple
from ip2p.world.oracle import read
from ip2p.world.scene import sample_scene
from ip2p.world.verdict import judge_edit

log = logging.getLogger(__name__)

SETTING_KEYS = ("name", "steps", "scheduler", "batch_size", "pairs_per_batch")


def true_triples(seed: int, count: int) -> list[dict]:
    """`count` world caption pairs with their instruction, ids y<seed>-<k>; the same for every setting."""
    rng = np.random.default_rng([seed, 23])
    out = []
    while len(out) < count:
        scene = sample_scene(rng)
        try:
            triple = world_triple(scene, rng)
        except ValueError:  # no edit applies to this scene
            continue
        out.append({"id": f"y{seed}-{len(out):04d}", **triple})
    return out


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson interval of a share: the counts here are small, and the interval says how small."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (round(centre - half, 4), round(centre + half, 4))


def synthesise(sampler: PairSampler, triples: list[dict], setting: dict, cfg: DictConfig, size: int,
               look: int, progress: bool) -> tuple[list[dict], float]:
    """Every candidate of every triple under one setting: rows with the final images and those of the
    look after step `look`, and the seconds spent in synthesis (denoising + decoding; the look excluded)."""
    s = cfg.synthesis
    rows = []
    for t in triples:
        for k, spec in enumerate(draw_samples(int(cfg.seed), t["id"], int(cfg.world.yield_table.candidates),
                                              (float(s.p_min), float(s.p_max)), (float(s.cfg_min), float(s.cfg_max)))):
            rows.append({"pair_id": t["id"], "k": k, "seed": spec.seed, "spec": spec, "triple": t})
    per_call = int(setting["batch_size"]) * int(setting["pairs_per_batch"])
    # several caption pairs share a call only in whole groups of pairs, as the synthesis stage does
    group_rows = int(cfg.world.yield_table.candidates) * int(setting["pairs_per_batch"])
    seconds = 0.0
    bar = tqdm(total=len(rows), desc=f"synthesis ({setting['name']})", unit="cand", disable=not progress)
    for g0 in range(0, len(rows), group_rows):
        group = rows[g0:g0 + group_rows]
        for start in range(0, len(group), per_call):
            chunk = group[start:start + per_call]
            looked = {}
            captions = [(r["triple"]["input"], r["triple"]["output"]) for r in chunk]

            def observe(step, x0):
                if step == look:
                    looked["x0"] = x0.clone()

            t0 = time.perf_counter()
            images_0, images_1 = sampler.decode_pairs(*sampler.sample_rows(captions, [r["spec"] for r in chunk], size,
                                                                           size, observe=observe))
            seconds += time.perf_counter() - t0
            early_0, early_1 = sampler.decode_pairs(*looked["x0"].chunk(2))
            for r, a, b, ea, eb in zip(chunk, images_0, images_1, early_0, early_1):
                r.update(images=(a, b), early=(ea, eb))
            bar.update(len(chunk))
    bar.close()
    return rows, seconds


def judge_setting(rows: list[dict], scorer: ClipScorer, thresholds: dict, top_k: int,
                  margins: list[float]) -> tuple[list[dict], float]:
    """CLIP scores (final and early), the filter's choice and the oracle's verdict per candidate;
    returns the rows and the seconds CLIP scoring of the final images took."""
    inputs = [r["triple"]["input"] for r in rows]
    outputs = [r["triple"]["output"] for r in rows]
    t0 = time.perf_counter()
    finals = scorer.score(tensor_to_pil(torch.stack([r["images"][0] for r in rows])),
                          tensor_to_pil(torch.stack([r["images"][1] for r in rows])), inputs, outputs)
    scoring_seconds = time.perf_counter() - t0
    early = scorer.score(tensor_to_pil(torch.stack([r["early"][0] for r in rows])),
                         tensor_to_pil(torch.stack([r["early"][1] for r in rows])), inputs, outputs)
    table = [{"pair_id": r["pair_id"], "seed": r["seed"], "kind": r["triple"]["kind"], **score}
             for r, score in zip(rows, finals)]
    kept = {(k["pair_id"], k["seed"]) for k in select(table, thresholds, top_k)[0]}
    for row, r, e in zip(table, rows, early):
        a, b = (to_uint8(x[None])[0] for x in r["images"])
        verdict = judge_edit(read(a), read(b), r["triple"]["edit"])
        row.update(kept=(row["pair_id"], row["seed"]) in kept, correct=bool(verdict and verdict.both),
                   early_pass=[first_failure(e, {k: v - m for k, v in thresholds.items()}) is None for m in margins])
    return table, scoring_seconds


def summarise(table: list[dict], setting: dict, synthesis_s: float, scoring_s: float, look_at: float,
              margins: list[float]) -> dict:
    """One setting's row of the report; `early_pass` of each candidate holds one answer per margin."""
    n = len(table)
    kept = [r for r in table if r["kept"]]
    correct = sum(r["correct"] for r in table)
    kept_correct = sum(r["correct"] for r in kept)
    hours = (synthesis_s + scoring_s) / 3600
    return {
        **{k: setting[k] for k in SETTING_KEYS},
        "autocast": str(setting.get("autocast")),
        "candidates": n,
        "seconds_per_candidate": round(synthesis_s / n, 4),
        "scoring_seconds_per_candidate": round(scoring_s / n, 4),
        "kept": len(kept),
        "kept_per_hour": round(len(kept) / hours, 1),
        "correct": round(correct / n, 4),
        "correct_interval": list(wilson(correct, n)),
        "kept_correct": round(kept_correct / max(1, len(kept)), 4),
        "kept_correct_interval": list(wilson(kept_correct, len(kept))),
        "correct_kept_per_hour": round(kept_correct / hours, 1),
        "look_at": look_at,
        "early": [early_look(table, i, margin, look_at, len(kept)) for i, margin in enumerate(margins)],
    }


def early_look(table: list[dict], i: int, margin: float, look_at: float, kept: int) -> dict:
    """What the look with thresholds lowered by `margin` (answer i of each candidate) would drop."""
    dropped = [r for r in table if not r["early_pass"][i]]
    return {
        "margin": margin,
        "dropped": round(len(dropped) / len(table), 4),
        # candidates the full filter keeps that the early look would have stopped
        "false_rejects": sum(r["kept"] for r in dropped),
        "false_reject_share_of_kept": round(sum(r["kept"] for r in dropped) / max(1, kept), 4),
        "correct_among_dropped": sum(r["correct"] for r in dropped),
        "denoising_saved": round(len(dropped) / len(table) * (1 - look_at), 4),
    }


def run(cfg: DictConfig) -> dict:
    c = cfg.world.yield_table
    settings = [dict(OmegaConf.to_container(s, resolve=True)) for s in c.settings]
    for s in settings:
        s.setdefault("autocast", cfg.get("autocast"))   # a setting may run the UNet under its own autocast
    margins = [float(m) for m in c.look_margins]
    for s in settings:
        missing = [k for k in SETTING_KEYS if k not in s]
        if missing:
            raise ValueError(f"world.yield_table.settings: '{s.get('name', '?')}' lacks {missing}")
    # 1. the caption pairs, the text-to-image model, the filter's CLIP and choice
    triples = true_triples(int(c.seed), int(c.pairs))
    components = load_diffusion(cfg.model.base, "base", cfg.model, cfg.paths.cache, cfg.device, cfg.dtype,
                                cfg.get("autocast"))
    scorer = ClipScorer(load_clip(cfg.model.clip, cfg.model, cfg.paths.cache, cfg.device), int(cfg.filter.batch_size),
                        str(cfg.filter.clip_preprocess))
    thresholds = thresholds_from_config(cfg.filter.thresholds)  # the filter's own reading (null: not applied)
    results = []
    with start_mlflow_run(cfg, "world-yield"):
        for setting in settings:
            # 2. synthesis under this setting, timed; 3. CLIP, the filter's choice and the oracle
            base = settings_from_config(cfg)
            parts = dataclasses.replace(components, autocast=resolve_autocast(setting["autocast"]))
            sampler = PairSampler(parts, dataclasses.replace(base, steps=int(setting["steps"]),
                                                             scheduler=str(setting["scheduler"])))
            look = look_step(float(c.look_at), int(setting["steps"]))
            rows, synthesis_s = synthesise(sampler, triples, setting, cfg, resolution(cfg, sampler), look,
                                           bool(cfg.progress))
            table, scoring_s = judge_setting(rows, scorer, thresholds, int(cfg.filter.top_k), margins)
            results.append(summarise(table, setting, synthesis_s, scoring_s, (look + 1) / int(setting["steps"]), margins))
            log.info("world-yield %s: %s", setting["name"], {k: results[-1][k] for k in
                                                              ("seconds_per_candidate", "kept_per_hour", "kept_correct")})
        # 4. ratios over the first setting (the original recipe), the report
        ref = results[0]
        for r in results:
            r["kept_per_hour_ratio"] = round(r["kept_per_hour"] / max(1e-9, ref["kept_per_hour"]), 2)
            r["kept_correct_minus_reference"] = round(r["kept_correct"] - ref["kept_correct"], 4)
        log_metrics({f"{r['name']}/{k}": r[k] for r in results for k in ("kept_per_hour", "kept_correct")})
    result = {"pairs": len(triples), "candidates_per_pair": int(c.candidates), "model": str(cfg.model.base),
              "thresholds": thresholds, "top_k": int(cfg.filter.top_k), "reference": settings[0]["name"],
              "torch_threads": torch.get_num_threads(), "settings": results}
    out = Path(cfg.paths.reports)
    atomic_write_json(out / "world_yield.json", result)
    picture(results, out / "world_yield.png")
    return result


def picture(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for r in results:
        low, high = r["kept_correct_interval"]
        left.errorbar(r["kept_per_hour"], r["kept_correct"], yerr=[[r["kept_correct"] - low], [high - r["kept_correct"]]],
                      fmt="o", capsize=3, label=r["name"])
    left.set(xscale="log", xlabel="kept pairs per hour (this machine)", ylabel="kept pairs correct (oracle)",
             title="yield vs correctness (95% intervals)")
    names = [r["name"] for r in results]
    right.bar(names, [r["correct_kept_per_hour"] for r in results])
    right.set(ylabel="correct kept pairs per hour", title="what a setting buys")
    right.tick_params(axis="x", rotation=30, labelsize=8)
    left.legend(fontsize=7)
    finish_figure(fig, path, "Synthesis settings on the same world caption pairs and candidates", axes=(left, right))
