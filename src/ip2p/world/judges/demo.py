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
    # 2. edit each with the editor, and with the editor to compare it with (world.demo.compare) when given
    editors = [(str(c.model), c.model)] + ([(str(c.compare), c.compare)] if c.get("compare") else [])
    loaded = [InstructPix2Pix(load_diffusion(source, "editor", cfg.model, cfg.paths.cache, cfg.device, "float32",
                                             cfg.get("autocast"))) for _, source in editors]
    settings = EditSettings(steps=int(c.steps), text_guidance=float(c.text_guidance),
                            image_guidance=float(c.image_guidance), scheduler=str(c.scheduler), num_images=1,
                            seed=int(c.seed), progress=False)
    good = [0] * len(editors)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_scene = 1 + len(editors)   # the input, then one edit per editor
    fig, axes = plt.subplots(per_scene * len(grid), len(kinds), figsize=(1.9 * len(kinds), 2.15 * per_scene * len(grid)),
                             squeeze=False)
    for row, cases_of_row in enumerate(grid):
        for col, case in enumerate(cases_of_row):
            before = render(case.scene)
            top = axes[per_scene * row, col]
            top.imshow(before, interpolation="nearest")
            top.set_title("\n".join(textwrap.wrap(f'"{case.instruction}"', 20)), fontsize=7)
            for e, editor in enumerate(loaded):
                after = np.asarray(editor.edit(Image.fromarray(before), case.instruction, settings)[0].convert("RGB"))
                v = judge_edit(read(before), read_any(after), case.instruction)
                good[e] += bool(v and v.both)
                ax = axes[per_scene * row + 1 + e, col]
                ax.imshow(after, interpolation="nearest")
                verdict = "not judged" if v is None else ("done" if v.both else
                                                         f"{'ok' if v.success else 'missed'}, {'kept' if v.preserved else 'changed rest'}")
                label = f"{chr(65 + e)}: " if len(loaded) > 1 else ""
                ax.set_title(label + verdict, fontsize=7, color="green" if v and v.both else "red")
            for ax in axes[per_scene * row:per_scene * (row + 1), col]:
                ax.set_xticks([])
                ax.set_yticks([])
    names = "; ".join(f"{chr(65 + e)}: {name}" for e, (name, _) in enumerate(editors)) if len(editors) > 1 else editors[0][0]
    fig.suptitle(f"Held-out world scenes, input above its edits ({names})", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))   # 0.4 in above the grid for the title
    out = save_figure(fig, c.picture, dpi=110)
    scene_png = Path(c.scene_png)
    scene_png.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(scene_png) as tmp:
        Image.fromarray(render(grid[0][0].scene)).save(tmp, format="PNG")
    result = {"edits": len(cases), "done": good[0], "picture": str(out), "scene": str(scene_png)}
    if len(editors) > 1:
        result["compare"] = {"model": str(editors[1][0]), "done": good[1]}
    log.info("world-demo: %s of %d edits done as instructed -> %s", " / ".join(map(str, good)), len(cases), out)
    return result
