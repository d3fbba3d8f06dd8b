"""Scenes of the world and the seeded scene sampler.

A scene is 1-2 flat-coloured objects on one background, optionally under one global style. Two
world rules keep every scene readable from its pixels (by people and by the oracle):
  * objects do not overlap (their boxes keep a gap of at least `MIN_GAP` pixels);
  * an object's colour stands out from every colour of its background under the scene's style
    (`visible`), e.g. a brown object on grass in black and white is not a scene of this world.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ip2p.world.vocab import (BACKGROUNDS, CANVAS, COLOURS, FLAT_BACKGROUNDS, GRASS, GRASS_STRIPE, HPOS, LUMA,
                              NIGHT_BLUE, NIGHT_SCALE, SHAPES, SIZE_SPLIT, SIZES, SKY_BOTTOM, SKY_TOP, STYLES, VPOS)

MIN_GAP = 2.0          # pixels between object boxes
MARGIN = 1.0           # pixels between an object box and the canvas edge
MIN_CONTRAST = 40.0    # RGB distance between an object and each background colour, after the style


class Placed:
    """Size word and named position of anything with a box side and a centre (objects drawn or read)."""

    side: float
    x: float
    y: float

    @property
    def size(self) -> str:
        return "small" if self.side < SIZE_SPLIT else "large"

    @property
    def hpos(self) -> str:
        return HPOS[min(2, int(self.x / (CANVAS / 3)))]

    @property
    def vpos(self) -> str:
        return VPOS[min(2, int(self.y / (CANVAS / 3)))]


@dataclass(frozen=True)
class Obj(Placed):
    shape: str
    colour: str
    side: float      # bounding-box side in pixels
    x: float         # centre, pixels from the left edge
    y: float         # centre, pixels from the top edge

    def box(self) -> tuple[float, float, float, float]:
        h = self.side / 2
        return (self.x - h, self.y - h, self.x + h, self.y + h)


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: str
    style: str = "none"
    seed: int = 0    # draws the snow flakes

    def to_dict(self) -> dict[str, Any]:
        return {"background": self.background, "style": self.style, "seed": self.seed,
                "objects": [dataclasses.asdict(o) for o in self.objects]}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "Scene":
        objs = tuple(Obj(o["shape"], o["colour"], float(o["side"]), float(o["x"]), float(o["y"])) for o in d["objects"])
        return Scene(objs, d["background"], d.get("style", "none"), int(d.get("seed", 0)))

    def replace(self, **changes) -> "Scene":
        return dataclasses.replace(self, **changes)


# ----------------------------------------------------------------------------- colour under a style


def styled(rgb, style: str) -> np.ndarray:
    """Colour(s) [..., 3] in 0-255 after a global style (snow leaves colours as they are)."""
    rgb = np.asarray(rgb, dtype=np.float64)
    if style == "night":
        return np.clip(rgb * NIGHT_SCALE + np.array([0.0, 0.0, NIGHT_BLUE]), 0, 255)
    if style == "bw":
        lum = rgb @ np.array(LUMA)
        return np.repeat(lum[..., None], 3, axis=-1)
    return rgb


def background_colours(background: str) -> list[tuple[int, int, int]]:
    """Every colour a background shows (both ends of the sky gradient, both grass tones)."""
    if background in FLAT_BACKGROUNDS:
        return [FLAT_BACKGROUNDS[background]]
    if background == "sky":
        return [SKY_TOP, tuple((a + b) // 2 for a, b in zip(SKY_TOP, SKY_BOTTOM)), SKY_BOTTOM]
    if background == "grass":
        return [GRASS, GRASS_STRIPE]
    raise ValueError(f"unknown background '{background}'")


def visible(colour: str, background: str, style: str) -> bool:
    obj = styled(COLOURS[colour], style)
    return all(np.linalg.norm(obj - styled(c, style)) >= MIN_CONTRAST for c in background_colours(background))


def valid(scene: Scene) -> bool:
    """A scene of the world: known names, 1-2 objects inside the canvas, no overlap, all visible
    (snow included: white flakes on a white background would not show, so it never snows there)."""
    if scene.background not in BACKGROUNDS or scene.style not in STYLES or not 1 <= len(scene.objects) <= 2:
        return False
    if scene.style == "snowy" and scene.background == "white":
        return False
    for o in scene.objects:
        if o.shape not in SHAPES or o.colour not in COLOURS or not visible(o.colour, scene.background, scene.style):
            return False
        lo, hi = SIZES["small"][0], SIZES["large"][1]
        if not lo - 1e-6 <= o.side <= hi + 1e-6:
            return False
        x0, y0, x1, y1 = o.box()
        if x0 < MARGIN - 1e-6 or y0 < MARGIN - 1e-6 or x1 > CANVAS - MARGIN + 1e-6 or y1 > CANVAS - MARGIN + 1e-6:
            return False
    return not (len(scene.objects) == 2 and _overlaps(scene.objects[1], scene.objects[:1]))


# ----------------------------------------------------------------------------------------- sampler


@dataclass(frozen=True)
class SceneDistribution:
    """How scenes are drawn. The defaults are the world's training distribution."""

    p_two_objects: float = 0.35
    p_style: dict[str, float] = field(default_factory=lambda: {"none": 0.55, "night": 0.15, "bw": 0.15, "snowy": 0.15})
    p_small: float = 0.5
    max_tries: int = 200


def sample_side(rng: np.random.Generator, size: str) -> float:
    lo, hi = SIZES[size]
    return float(rng.uniform(lo, hi))


def place(rng: np.random.Generator, side: float, others: tuple[Obj, ...], shape: str, colour: str,
          max_tries: int = 200) -> Obj | None:
    """An object of this side at a random place inside the canvas, clear of `others`; None if no room."""
    lo, hi = side / 2 + MARGIN, CANVAS - side / 2 - MARGIN
    for _ in range(max_tries):
        o = Obj(shape, colour, side, float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi)))
        if not _overlaps(o, others):
            return o
    return None


def _overlaps(o: Obj, others: tuple[Obj, ...]) -> bool:
    a = o.box()
    for other in others:
        b = other.box()
        apart_x = a[2] + MIN_GAP <= b[0] or b[2] + MIN_GAP <= a[0]
        apart_y = a[3] + MIN_GAP <= b[1] or b[3] + MIN_GAP <= a[1]
        if not (apart_x or apart_y):
            return True
    return False


def sample_scene(rng: np.random.Generator, dist: SceneDistribution = SceneDistribution()) -> Scene:
    """One random valid scene. Deterministic given the generator's state."""
    styles, probs = zip(*dist.p_style.items())
    for _ in range(dist.max_tries):
        background = str(rng.choice(BACKGROUNDS))
        style = str(rng.choice(styles, p=np.array(probs) / sum(probs)))
        n = 2 if rng.random() < dist.p_two_objects else 1
        objs: tuple[Obj, ...] = ()
        for _ in range(n):
            colour = str(rng.choice(list(COLOURS)))
            shape = str(rng.choice(SHAPES))
            size = "small" if rng.random() < dist.p_small else "large"
            o = place(rng, sample_side(rng, size), objs, shape, colour, dist.max_tries)
            if o is None:
                break
            objs += (o,)
        scene = Scene(objs, background, style, int(rng.integers(0, 2**31 - 1)))
        if len(objs) == n and valid(scene):
            return scene
    raise RuntimeError("could not draw a valid scene: the distribution leaves no room")


def sample_scenes(seed: int, n: int, dist: SceneDistribution = SceneDistribution()) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, dist) for _ in range(n)]
