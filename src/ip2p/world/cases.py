"""Held-out edit cases: rendered scenes (drawn by the renderer, never generated, as real photos are
at test time) with one instruction each and the true edited scene, an equal number per edit kind.

Drawn from a seed that no training data uses. Edits that pixels cannot show (recolouring in black and
white) are not drawn.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ip2p.io.images import save_image_atomic
from ip2p.world.language.captions import plain_caption
from ip2p.world.language.edits import sample_edit
from ip2p.world.language.parsing import parse_caption
from ip2p.world.render import render
from ip2p.world.scene import Scene, sample_scene


Combination = tuple[str, str, str]  # (object colour, object shape, background)


def scene_combinations(scene: Scene) -> set[Combination]:
    return {(o.colour, o.shape, scene.background) for o in scene.objects}


def caption_combinations(text: str) -> set[Combination]:
    """The combinations a caption names; empty when it does not read as a caption of the world."""
    parsed = parse_caption(text)
    return {(o.colour, o.shape, parsed.background) for o in parsed.objects} if parsed else set()


def unseen_in(case: "Case", seen: set[Combination]) -> bool:
    """Does the true edited scene hold an (object colour, shape, background) combination that no
    training caption names? The editor must then draw something it never saw drawn."""
    return bool(scene_combinations(case.edited) - seen)


@dataclass(frozen=True)
class Case:
    id: str
    kind: str
    scene: Scene
    instruction: str
    edited: Scene
    input_caption: str
    output_caption: str


def heldout_cases(seed: int, per_kind: int, kinds: tuple[str, ...], max_draws_per_case: int = 200) -> list[Case]:
    """`per_kind` cases of each kind, in kind order; captions in the plain phrasing (what a user types)."""
    rng = np.random.default_rng([seed, 7])
    cases = []
    for kind in kinds:
        made = draws = 0
        while made < per_kind:
            draws += 1
            if draws > max_draws_per_case * per_kind:
                raise ValueError(f"could not draw {per_kind} '{kind}' cases from seed {seed}")
            scene = sample_scene(rng)
            if kind == "recolour" and scene.style == "bw":
                continue
            try:
                _, text, edited = sample_edit(scene, rng, (kind,))
            except ValueError:  # the kind does not apply to this scene
                continue
            cases.append(Case(f"{kind}-{made:04d}", kind, scene, text, edited, plain_caption(scene),
                              plain_caption(edited)))
            made += 1
    return cases


def app_examples(folder: Path, seed: int, kinds: list[str]) -> list[list[str]]:
    """[image path, instruction] for one held-out scene per edit kind, rendered once into folder: the
    web editor's examples (ip2p.editing.app takes them from the CLI, not from the world)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for case in heldout_cases(seed, 1, tuple(kinds)):
        path = folder / f"{case.id}.png"
        if not path.is_file():
            save_image_atomic(Image.fromarray(render(case.scene)), path)
        rows.append([str(path), case.instruction])
    return rows
