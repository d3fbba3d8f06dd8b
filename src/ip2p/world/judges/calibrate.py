"""`ip2p world-calibrate`: the CLIP filter's thresholds for a CLIP other than ViT-L/14.

The paper's thresholds (0.75 / 0.2 / 0.2 / 0.2) are ViT-L/14's scale; another CLIP has its own. The
world knows which pairs are right, so it calibrates them: score true before/after render pairs (a
scene and its true edit, with the captions of both) and two kinds of wrong pair (the same scene edited
otherwise than the edited caption says; an unrelated scene), and put each threshold at a low quantile
of the true pairs' scores. The report says how many true pairs the set keeps and how many wrong ones
it drops; conf/experiment/mini.yaml copies the thresholds (docs/miniature.md, "Calibrating the filter").
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from PIL import Image

from ip2p.io.atomic import atomic_write_json
from ip2p.models.loader import load_clip
from ip2p.scoring.clip import ClipScorer
from ip2p.world.cases import heldout_cases
from ip2p.world.language.edits import EDIT_KINDS, sample_edit
from ip2p.world.render import render

log = logging.getLogger(__name__)

# The paper's four scores (the filter's optional clip_sim_rest has no calibrated threshold)
THRESHOLD_NAMES = {"clip_sim_image": "sim_image", "clip_sim_dir": "sim_dir", "clip_sim_0": "sim_0", "clip_sim_1": "sim_1"}


def calibration_pairs(seed: int, per_kind: int) -> dict[str, tuple[list, list, list, list]]:
    """{"true" | "wrong_edit" | "unrelated": (images_0, images_1, captions_0, captions_1)}: held-out
    cases of every kind; the wrong edit is another kind's edit of the same scene, the unrelated image
    the next case's scene. Captions are always the case's own (input, edited)."""
    cases = heldout_cases(seed, per_kind, EDIT_KINDS)
    rng = np.random.default_rng([seed, 12])
    sets = {name: ([], [], [], []) for name in ("true", "wrong_edit", "unrelated")}

    def add(name: str, case, after) -> None:
        for store, value in zip(sets[name], (Image.fromarray(render(case.scene)), Image.fromarray(render(after)),
                                             case.input_caption, case.output_caption)):
            store.append(value)

    for i, case in enumerate(cases):
        add("true", case, case.edited)
        add("unrelated", case, cases[(i + 1) % len(cases)].scene)
        try:
            _, _, other = sample_edit(case.scene, rng, tuple(k for k in EDIT_KINDS if k != case.kind))
            add("wrong_edit", case, other)
        except ValueError:
            pass
    return sets


def run(cfg: DictConfig) -> dict:
    c = cfg.world.calibrate
    # 1. score true and wrong pairs with the world CLIP through the filter's own scorer
    scorer = ClipScorer(load_clip(cfg.model.clip, cfg.model, cfg.paths.cache, cfg.device), int(c.batch_size))
    scores = {name: scorer.score(*pairs) for name, pairs in calibration_pairs(int(c.seed), int(c.per_kind)).items()}
    # 2. thresholds: the q-quantile of the true pairs' scores, per metric
    values = {name: {m: np.array([s[m] for s in rows]) for m in THRESHOLD_NAMES} for name, rows in scores.items()}
    thresholds = {THRESHOLD_NAMES[m]: round(float(np.quantile(values["true"][m], float(c.quantile))), 3)
                  for m in THRESHOLD_NAMES}

    # 3. what the set keeps and drops
    def kept(name: str) -> float:
        v = values[name]
        return float(np.mean(np.all([v[m] >= thresholds[THRESHOLD_NAMES[m]] for m in THRESHOLD_NAMES], axis=0)))

    result = {"quantile": float(c.quantile), "thresholds": thresholds,
              "kept_true": round(kept("true"), 4), "kept_wrong_edit": round(kept("wrong_edit"), 4),
              "kept_unrelated": round(kept("unrelated"), 4),
              "medians": {name: {m: round(float(np.median(v[m])), 3) for m in THRESHOLD_NAMES} for name, v in values.items()}}
    atomic_write_json(Path(cfg.paths.reports) / "world_calibration.json", result)
    log.info("world-calibrate: %s", result)
    return result
