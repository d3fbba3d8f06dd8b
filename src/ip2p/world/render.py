"""Scene -> 64x64 RGB uint8. Shapes are polygons drawn at 4x resolution and box-filtered down
(anti-aliased edges); backgrounds and styles follow docs/miniature-world.md exactly."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from ip2p.world.scene import Obj, Scene, styled
from ip2p.world.vocab import (CANVAS, COLOURS, FLAT_BACKGROUNDS, GRASS, GRASS_PERIOD, GRASS_STRIPE, SKY_BOTTOM,
                              SKY_TOP, SNOW_FRACTION, SNOW_RGB)

SUPERSAMPLE = 4


@lru_cache(maxsize=None)
def unit_polygon(shape: str) -> np.ndarray:
    """The shape's outline [N, 2] (x right, y down), stretched so its box is exactly [-1, 1]^2."""
    if shape == "circle":
        t = np.linspace(0, 2 * np.pi, 96, endpoint=False)
        pts = np.stack([np.cos(t), np.sin(t)], 1)
    elif shape == "square":
        pts = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64)
    elif shape == "triangle":  # apex up
        pts = np.array([[0, -1], [1, 1], [-1, 1]], dtype=np.float64)
    elif shape == "star":  # 5 points, one pointing up; inner radius 0.45 of the outer keeps arms readable
        k = np.arange(10)
        r = np.where(k % 2 == 0, 1.0, 0.45)
        a = -np.pi / 2 + k * np.pi / 5
        pts = np.stack([r * np.cos(a), r * np.sin(a)], 1)
    elif shape == "heart":
        t = np.linspace(0, 2 * np.pi, 96, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        pts = np.stack([x, y], 1)
    else:
        raise ValueError(f"unknown shape '{shape}'")
    lo, hi = pts.min(0), pts.max(0)
    return (pts - lo) / (hi - lo) * 2 - 1


def coverage(shape: str, x0: float, y0: float, x1: float, y1: float, canvas: int = CANVAS,
             window: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """Fraction [canvas, canvas] (or [height, width] of `window`) of each pixel covered by `shape`
    stretched to the box (x0, y0)-(x1, y1).

    window = (left, top, width, height) in whole pixels draws only that part of the canvas, with the
    same values as the whole canvas there, provided it holds the box with a pixel to spare on every
    side that is not the canvas's edge (the polygon's fill may spill one supersample past its box, and
    a cut through it changes how the edge rows fill). The oracle fits 45 templates per object in one."""
    s = SUPERSAMPLE
    left, top, width, height = window or (0, 0, canvas, canvas)
    pts = unit_polygon(shape)
    # Shifting by whole pixels (left * s) is exact in floating point, so the fill is the same.
    px = (x0 + (pts[:, 0] + 1) / 2 * (x1 - x0)) * s - left * s
    py = (y0 + (pts[:, 1] + 1) / 2 * (y1 - y0)) * s - top * s
    mask = Image.new("L", (width * s, height * s), 0)
    # PIL fills pixel (i, j) when its corner point is inside; shift by half a pixel to sample centres.
    ImageDraw.Draw(mask).polygon(list(zip(px - 0.5, py - 0.5)), fill=255)
    return np.asarray(mask.resize((width, height), Image.BOX), dtype=np.float32) / 255.0


def object_coverage(o: Obj, canvas: int = CANVAS) -> np.ndarray:
    return coverage(o.shape, *o.box(), canvas=canvas)


@lru_cache(maxsize=None)
def background_image(background: str, canvas: int = CANVAS) -> np.ndarray:
    """[canvas, canvas, 3] float 0-255, before any style."""
    img = np.zeros((canvas, canvas, 3), dtype=np.float64)
    if background in FLAT_BACKGROUNDS:
        img[:] = FLAT_BACKGROUNDS[background]
    elif background == "sky":
        t = (np.arange(canvas) / (canvas - 1))[:, None, None]
        img[:] = (1 - t) * np.array(SKY_TOP) + t * np.array(SKY_BOTTOM)
    elif background == "grass":
        img[:] = GRASS
        img[np.arange(canvas) % GRASS_PERIOD == GRASS_PERIOD - 1] = GRASS_STRIPE
    else:
        raise ValueError(f"unknown background '{background}'")
    img.setflags(write=False)
    return img


def snow_mask(seed: int, canvas: int = CANVAS) -> np.ndarray:
    """About SNOW_FRACTION of the pixels, in flakes 1-2 px across (mostly 2 x 2, some 1 x 2 or 2 x 1),
    drawn from the scene's seed. Flakes of two pixels across stay visible through a VAE with f=4
    latents (single-pixel specks at random places are more than its 4 channels per 4 x 4 cell carry)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((canvas, canvas), dtype=bool)
    target = int(round(SNOW_FRACTION * canvas * canvas))
    while mask.sum() < target:
        y, x = (int(v) for v in rng.integers(0, canvas - 1, size=2))
        u = rng.random()
        h, w = (2, 2) if u < 0.7 else ((1, 2) if u < 0.85 else (2, 1))
        mask[y:y + h, x:x + w] = True
    return mask


def render(scene: Scene) -> np.ndarray:
    """The scene as a [64, 64, 3] uint8 image."""
    img = background_image(scene.background).copy()
    for o in scene.objects:
        alpha = object_coverage(o)[..., None]
        img = img * (1 - alpha) + np.array(COLOURS[o.colour], dtype=np.float64) * alpha
    if scene.style in ("night", "bw"):
        img = styled(img, scene.style)
    elif scene.style == "snowy":
        img[snow_mask(scene.seed)] = SNOW_RGB
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)
