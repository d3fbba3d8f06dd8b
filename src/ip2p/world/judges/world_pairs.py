"""`ip2p world-pairs`: true before/after render pairs in the layout `ip2p synthesize` writes.

The world can draw what Prompt-to-Prompt only approximates: a scene, one edit of it and the edited
scene, both rendered exactly. Written as pair folders (prompt.json, {seed}_0.png, {seed}_1.png,
metadata.jsonl; one candidate per pair) under `world.pairs.out_dir`, they go through the same
`ip2p filter` and `ip2p train` as generated candidates. An editor trained on them measures the
editor's own ceiling under the training recipe: what the chain could reach with perfect pairs, so
that a miss can be laid on the data or on the editor (docs/miniature.md).

Scenes come from `world.pairs.seed`, which neither the held-out cases nor the caption source use.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from PIL import Image
from tqdm.auto import tqdm

from ip2p.errors import Ip2pError
from ip2p.io.atomic import atomic_folder, atomic_write_json
from ip2p.io.pairs import write_candidate, write_lines, write_prompt  # the format `ip2p synthesize` writes
from ip2p.world.language.edits import EDIT_KINDS, world_edit
from ip2p.world.render import render
from ip2p.world.scene import sample_scene

log = logging.getLogger(__name__)


def true_pair(k: int, seed: int, rng: np.random.Generator, kinds: tuple[str, ...], p_plain: float) -> dict:
    """One pair: its id, the triple and both renders (the candidate's seed is the scene's index)."""
    while True:
        scene = sample_scene(rng)
        try:
            triple, edited = world_edit(scene, rng, p_plain, kinds)
        except ValueError:  # no edit of these kinds applies to the scene
            continue
        return {"pair_id": f"t{seed}-{k:06d}", "seed": k, "triple": triple,
                "images": (render(scene), render(edited))}


def write_pair_folder(root: Path, pair: dict) -> None:
    t = pair["triple"]
    meta = {"id": f"{pair['pair_id']}-{pair['seed']}", "pair_id": pair["pair_id"], "seed": pair["seed"], "k": 0,
            "p": None, "cfg": None, "kind": t["kind"], **{k: t[k] for k in ("input", "edit", "output")}}
    folder = root / pair["pair_id"]
    with atomic_folder(folder) as tmp:
        write_prompt(tmp, t)
        write_candidate(tmp, pair["seed"], *(Image.fromarray(image) for image in pair["images"]))
        write_lines(tmp, "metadata.jsonl", [meta])


def run(cfg: DictConfig) -> dict:
    c = cfg.world.pairs
    kinds = tuple(c.kinds)
    unknown = sorted(set(kinds) - set(EDIT_KINDS))
    if unknown:
        raise Ip2pError(f"world.pairs.kinds: unknown edit kinds {unknown} (known: {list(EDIT_KINDS)})")
    root = Path(c.out_dir)
    # 1. draw scenes and edits from the seed (deterministic: pair k is the same whatever was there before)
    rng = np.random.default_rng([int(c.seed), 17])
    by_kind: Counter = Counter()
    written = 0
    for k in tqdm(range(int(c.pairs)), desc="true pairs", unit="pair", disable=not cfg.progress):
        pair = true_pair(k, int(c.seed), rng, kinds, float(c.p_plain))
        by_kind[pair["triple"]["kind"]] += 1
        # 2. one pair folder each, written whole or not at all; finished folders are kept on a rerun
        if not (root / pair["pair_id"] / "metadata.jsonl").is_file():
            write_pair_folder(root, pair)
            written += 1
    summary = {"pairs": int(c.pairs), "written": written, "by_kind": dict(sorted(by_kind.items())),
               "out_dir": str(root)}
    atomic_write_json(Path(cfg.paths.reports) / "world_pairs.json", summary)
    log.info("world-pairs: %s", summary)
    return summary
