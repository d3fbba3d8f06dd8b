"""`ip2p world-captions`: the world as a caption source, like a LAION metadata file.

Writes, from seeds (docs/miniature-world.md):
  captions.jsonl   {id, caption, scene}: what `ip2p captions` reads (the scene rides along as metadata,
                   so every later stage can be judged against the truth)
  edits.jsonl      {input, edit, output, kind}: world examples in the paper's instruction format, the
                   instruction LM's fine-tuning data (as the 700 human-written examples were GPT-3's)
  reports/world_samples.png   renders with their captions, for people to look at
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from ip2p.io.atomic import atomic_file, atomic_write_json
from ip2p.io.figures import save_figure
from ip2p.world.language.captions import caption
from ip2p.world.language.edits import world_triple
from ip2p.world.render import render
from ip2p.world.scene import Scene, SceneDistribution, sample_scene, sample_scenes

log = logging.getLogger(__name__)


def caption_records(seed: int, n: int) -> list[dict]:
    rng = np.random.default_rng([seed, 1])
    return [{"id": f"w{seed}-{k:06d}", "caption": caption(s, rng), "scene": s.to_dict()}
            for k, s in enumerate(sample_scenes(seed, n))]


def edit_records(seed: int, n: int, p_two_objects: float | None = None) -> list[dict]:
    """`n` examples in the paper's format. `p_two_objects` (None: the world's own share) oversamples
    scenes of two objects: there the LM must read which words belong to which object, and that binding
    is what it gets wrong (docs/miniature-world.md)."""
    dist = SceneDistribution() if p_two_objects is None else SceneDistribution(p_two_objects=p_two_objects)
    rng = np.random.default_rng(seed)
    return [world_triple(sample_scene(rng, dist), rng) for _ in range(n)]


def write_jsonl(path: Path, records: list[dict]) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records), encoding="utf-8")


def samples_picture(records: list[dict], path: Path, columns: int = 4) -> None:
    """Renders with their captions (wrapped), a few rows."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = (len(records) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.6 * rows))
    for ax, r in zip(np.ravel(axes), records):
        ax.imshow(render(Scene.from_dict(r["scene"])), interpolation="nearest")
        ax.set_title("\n".join(textwrap.wrap(r["caption"], 30)), fontsize=8)
    for ax in np.ravel(axes):
        ax.axis("off")
    fig.suptitle("The miniature world: renders and their captions", fontsize=11)
    fig.tight_layout()
    save_figure(fig, path, dpi=90)


def run(cfg: DictConfig) -> dict:
    c = cfg.world.source
    # 1. captions with their scenes (the caption source); 2. edit examples (the LM's fine-tuning set)
    captions = caption_records(c.seed, c.captions)
    write_jsonl(Path(c.captions_output), captions)
    edits = edit_records(c.edits_seed, c.edits, c.get("edits_p_two_objects"))
    write_jsonl(Path(c.edits_output), edits)
    # 3. a picture of samples; 4. counts
    samples_picture(captions[:c.picture_samples], Path(cfg.paths.reports) / "world_samples.png")
    kinds = {k: sum(e["kind"] == k for e in edits) for k in sorted({e["kind"] for e in edits})}
    summary = {"captions": len(captions), "edits": len(edits), "edits_by_kind": kinds}
    atomic_write_json(Path(cfg.paths.reports) / "world_captions.json", summary)
    log.info("world-captions: %s", summary)
    return summary
