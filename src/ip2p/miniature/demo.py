"""`ip2p world-demo`: a picture a person can look at. A few held-out world scenes, each edited with
several instructions by the editor (a folder, preset or registry URI such as
models:/instruct-pix2pix@champion), with the world's verdict under every edit. Also writes the first
scene as a PNG, ready for `ip2p edit`.
"""

from __future__ import annotations

import logging
import textwrap
from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from PIL import Image

from ip2p.io.atomic import atomic_file
from ip2p.io.figures import save_figure
from ip2p.models.instruct_pix2pix import EditSettings, InstructPix2Pix
from ip2p.models.loader import load_diffusion
from ip2p.world.cases import heldout_cases
from ip2p.world.oracle import read
from ip2p.world.render import render
from ip2p.world.verdict import judge_edit, read_any

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict:
    c = cfg.world.demo
    # 1. scenes and instructions: held-out cases, one row per scene, one column per kind
    kinds = tuple(c.kinds)
    cases = heldout_cases(int(c.seed), int(c.scenes), kinds)
    grid = [[cases[k * int(c.scenes) + row] for k in range(len(kinds))] for row in range(int(c.scenes))]
    # 2. edit each with the editor
    editor = InstructPix2Pix(load_diffusion(c.model, "editor", cfg.model, cfg.paths.cache, cfg.device, "float32",
                                            cfg.get("autocast")))
    settings = EditSettings(steps=int(c.steps), text_guidance=float(c.text_guidance),
                            image_guidance=float(c.image_guidance), scheduler=str(c.scheduler), num_images=1,
                            seed=int(c.seed), progress=False)
    good = 0
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2 * len(grid), len(kinds), figsize=(1.9 * len(kinds), 4.3 * len(grid)), squeeze=False)
    for row, cases_of_row in enumerate(grid):
        for col, case in enumerate(cases_of_row):
            before = render(case.scene)
            after = np.asarray(editor.edit(Image.fromarray(before), case.instruction, settings)[0].convert("RGB"))
            v = judge_edit(read(before), read_any(after), case.instruction)
            good += bool(v and v.both)
            top, bottom = axes[2 * row, col], axes[2 * row + 1, col]
            top.imshow(before, interpolation="nearest")
            bottom.imshow(after, interpolation="nearest")
            top.set_title("\n".join(textwrap.wrap(f'"{case.instruction}"', 20)), fontsize=7)
            verdict = "not judged" if v is None else ("done" if v.both else
                                                     f"{'ok' if v.success else 'missed'}, {'kept' if v.preserved else 'changed rest'}")
            bottom.set_title(verdict, fontsize=7, color="green" if v and v.both else "red")
            for ax in (top, bottom):
                ax.set_xticks([])
                ax.set_yticks([])
    fig.suptitle(f"The editor ({c.model}) on held-out world scenes: input above, edit below", fontsize=9)
    fig.tight_layout()
    out = save_figure(fig, c.picture, dpi=110)
    scene_png = Path(c.scene_png)
    scene_png.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(scene_png) as tmp:
        Image.fromarray(render(grid[0][0].scene)).save(tmp, format="PNG")
    result = {"edits": len(cases), "done": good, "picture": str(out), "scene": str(scene_png)}
    log.info("world-demo: %d of %d edits done as instructed -> %s", good, len(cases), out)
    return result
