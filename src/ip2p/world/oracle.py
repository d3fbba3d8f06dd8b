"""The oracle: read a scene's attributes back from its pixels.

It knows the world's rules (palette, backgrounds, styles, shapes) but not the scene, so it judges any
64 px image: fresh renders, VAE reconstructions, generated or edited images. Steps:

1. background and style together: the (background, style) whose expected image is closest to the
   picture (per-pixel distance, capped so that objects and flakes count as a constant);
2. snow: small near-grey specks brighter than their neighbourhood; they are painted over with the
   median of the unpainted pixels around them before objects are read, and in a snowy scene the
   background is any blend of the background and snow (what a blurred flake's rim is);
3. objects: pixels far from the background, split into connected parts (and a part showing solid
   blocks of two palette colours into one part per colour: two objects blurred together); each part's
   colour is the nearest palette colour (under the style) of its core pixels, its shape the one whose
   coverage template, stretched to the part's box, is closest (L1) to the part's estimated per-pixel
   coverage (pixels under painted flakes left out); size and position from the box.
Under black and white the object colours collapse to grey levels, so colour reads as None.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy import ndimage

from ip2p.world.render import background_image, coverage
from ip2p.world.scene import Placed, styled
from ip2p.world.vocab import (BACKGROUNDS, CANVAS, COLOURS, GRASS, GRASS_STRIPE, LUMA, NIGHT_SCALE, SHAPES,
                             SNOW_RGB)

DIST_CAP = 40.0        # per-pixel distance cap when matching backgrounds
FOREGROUND = 20.0      # RGB distance from the expected background that marks an object pixel, or
CAST_FACTOR = 2.0      # this many times the median distance, if more (a generated image's colour cast)
MIN_PEAK = 30.0        # a part's farthest pixel is at least this far from the background (objects are
                       # at least scene.MIN_CONTRAST away; a drifting background is not)
COVERED = 0.15         # a pixel this much covered belongs to the object's box
SHRINK = (0.0, 0.5, 1.0)  # the part's box is found from pixels a little covered; try these tighter boxes
MIN_PART = 12          # pixels; smaller parts are noise
SNOW_LEVEL = 110.0     # a flake's darkest channel is at least this bright (a blurred flake on black too)
SNOW_LIFT = 35.0       # and brighter than its 5x5 neighbourhood's median by this much
SNOW_CHROMA = 60.0     # and close to grey (max - min channel; objects are saturated)
SNOW_SPECK = 12        # pixels: flakes are specks; an object's rim is a bigger connected part
SNOW_SHARE = 0.008     # share of speck pixels that makes a scene snowy (renders: ~3%)
PAINT_WINDOW = 5       # pixels: flakes are painted over with the median of this square around them
FLAKE_PART = 24        # pixels: a near-grey part this small, brighter than the background, is a flake
PALETTE_TOL = 70.0     # an object's core colour lies this close to an object colour (x0.35 at night);
                       # a dark halo or a drifting patch of background does not
SPLIT_TOL = 40.0       # RGB distance to a palette colour of the solid block each object of a split part shows
BW_CHROMA = 40.0       # chroma (max-min channel) of every object's core below this: the scene is grey
# Readings near a boundary. A generated image and its own VAE round trip differ in a few pixels, yet a
# reading that sits at a boundary can flip between them; these say which other readings are plausible
# (ip2p.world.verdict compares two readings through them, docs/miniature.md "Judging an edit").
SHAPE_MARGIN = 0.1     # shapes whose fit is within this of the best fit are plausible too
COLOUR_MARGIN = 0.25   # colours that win at least this share of the core pixels' votes are plausible too
SIZE_MARGIN = 2.0      # pixels: a box side this close to scene.SIZE_SPLIT reads as either size
FAINT_PART = 24        # pixels: an object part this small (a speck) may come or go between two readings
SNOW_MARGIN = 2.5      # a snowy reading below SNOW_SHARE x SNOW_MARGIN is marginal: it may be the same
                       # scene as a "none" reading (the decoder draws such specks on the sky of a generated
                       # image's latents by itself; renders' snow covers about 3%)


@dataclass
class ReadObject(Placed):
    shape: str
    colour: str | None
    side: float
    x: float
    y: float
    pixels: int
    shape_fit: float   # 1 - L1(coverage, template) / coverage
    shapes: tuple[str, ...] = ()           # plausible shapes, best first (SHAPE_MARGIN); () = (shape,)
    colours: tuple[str | None, ...] = ()   # plausible colours, best first (COLOUR_MARGIN); () = (colour,)


@dataclass
class Reading:
    background: str
    style: str
    objects: list[ReadObject] = field(default_factory=list)
    snow: float = 0.0   # share of the canvas read as snow specks (style "snowy" from SNOW_SHARE on)

    def main_object(self) -> ReadObject | None:
        return max(self.objects, key=lambda o: o.pixels) if self.objects else None


_EXPECTED: dict[tuple[str, str], np.ndarray] = {}


def _expected(background: str, style: str) -> np.ndarray:
    key = (background, style)
    if key not in _EXPECTED:
        _EXPECTED[key] = styled(background_image(background), style)
    return _EXPECTED[key]


def _bases(bg: str, style: str) -> list[np.ndarray]:
    """The background as one or more images that each count as background anywhere: grass is either
    tone at every pixel (a generated or reconstructed lawn need not keep the stripes' exact phase)."""
    if bg == "grass":
        return [np.broadcast_to(styled(tone, style), (CANVAS, CANVAS, 3)) for tone in (GRASS, GRASS_STRIPE)]
    return [_expected(bg, style)]


def _to_snow(img: np.ndarray, base: np.ndarray) -> np.ndarray:
    """Per-pixel RGB distance to the nearest blend of `base` (the background) and snow: a blurred
    flake, or its rim, is such a blend; an object is not (objects are saturated, snow is white)."""
    span = np.asarray(SNOW_RGB, dtype=np.float64) - base
    t = np.clip(((img - base) * span).sum(-1) / np.maximum((span ** 2).sum(-1), 1e-6), 0.0, 1.0)
    return np.linalg.norm(img - (base + t[..., None] * span), axis=-1)


def _background_distance(img: np.ndarray, bg: str, style: str) -> np.ndarray:
    """Per-pixel RGB distance to the nearest background image (under snow: to the background blended
    with snow)."""
    bases = _bases(bg, style)
    if style == "snowy":
        return np.minimum.reduce([_to_snow(img, b) for b in bases])
    return np.minimum.reduce([np.linalg.norm(img - b, axis=-1) for b in bases])


def _snow_specks(img: np.ndarray) -> np.ndarray:
    """Small near-grey parts brighter than their surroundings: snow flakes, sharp or blurred."""
    level = img.min(-1)
    lift = level - ndimage.median_filter(level, size=5)
    chroma = img.max(-1) - img.min(-1)
    candidate = (lift >= SNOW_LIFT) & (chroma <= SNOW_CHROMA) & (level >= SNOW_LEVEL)
    labels, n = ndimage.label(candidate)
    if n == 0:
        return candidate
    sizes = ndimage.sum(candidate, labels, np.arange(1, n + 1))
    return np.isin(labels, 1 + np.flatnonzero(sizes <= SNOW_SPECK))


def _paint_over(img: np.ndarray, mask: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """`img` with the pixels under `mask` replaced by the median of the unmasked pixels around them
    (PAINT_WINDOW square; the expected background where all are masked). Leaving the masked pixels out
    of the median keeps a flake next to an object from painting a blend of both."""
    pad = PAINT_WINDOW // 2
    holes = np.where(mask[..., None], np.nan, img)
    padded = np.pad(holes, ((pad, pad), (pad, pad), (0, 0)), constant_values=np.nan)
    windows = sliding_window_view(padded, (PAINT_WINDOW, PAINT_WINDOW), axis=(0, 1))  # [H, W, 3, k, k]
    windows = windows[mask].reshape(int(mask.sum()), 3, -1)
    seen = ~np.isnan(windows[:, 0, :]).all(-1)
    fill = np.array(expected[mask], dtype=np.float64)
    fill[seen] = np.nanmedian(windows[seen], axis=-1)
    out = img.copy()
    out[mask] = fill
    return out


def _background_and_style(img: np.ndarray) -> tuple[str, str, np.ndarray]:
    best = None
    for style in ("none", "night", "bw"):
        for bg in BACKGROUNDS:
            d = _background_distance(img, bg, style)
            score = np.minimum(d, DIST_CAP).mean()
            # White, grey and black are the same in black and white: a tie keeps the earlier style
            # ("none"; the objects decide below), so demand a real improvement, not float noise.
            if best is None or score < best[0] - 1e-6:
                best = (score, bg, style, d)
    _, bg, style, dist = best
    return bg, style, dist


def _palette(style: str) -> np.ndarray:
    """The object colours [8, 3] as they look under `style`."""
    return styled(np.array(list(COLOURS.values()), dtype=np.float64), style)


def _palette_distance(rgb: np.ndarray, style: str) -> float:
    if style == "bw":  # grey levels: compare luminance
        lum = np.array(list(COLOURS.values()), dtype=np.float64) @ np.array(LUMA)
        return float(np.abs(lum - rgb.mean()).min() * np.sqrt(3))
    return float(np.linalg.norm(_palette(style) - rgb, axis=-1).min())


def _read_part(img: np.ndarray, bases: list[np.ndarray], dist: np.ndarray, part: np.ndarray, style: str,
               hidden: np.ndarray) -> ReadObject:
    # `hidden`: pixels under painted-over flakes. What lies beneath them is a guess, so they neither
    # stretch the box nor count in the shape's fit.
    # The object's flat colour: its pixels farthest from the background (edges are blends).
    core = part & (dist >= 0.7 * dist[part].max())
    colour_rgb = np.median(img[core], axis=0)
    colours: tuple[str | None, ...] = (None,)
    if style != "bw":
        votes = np.linalg.norm(img[core][:, None, :] - _palette(style)[None], axis=-1).argmin(1)
        counts = np.bincount(votes, minlength=len(COLOURS))
        order = np.argsort(-counts, kind="stable")
        colours = tuple(list(COLOURS)[k] for k in order
                        if k == order[0] or counts[k] >= COLOUR_MARGIN * counts.sum())
    colour = colours[0]
    # Coverage of each pixel: where it lies between the background and the object's colour (the least
    # over the background's images: a grass stripe is not a brown object's edge).
    region = ndimage.binary_dilation(part, iterations=2)
    alpha = np.minimum.reduce([((img - b) * (colour_rgb - b)).sum(-1) / np.maximum(((colour_rgb - b) ** 2).sum(-1), 1e-6)
                               for b in bases])
    seen = region & ~hidden
    if not (alpha[seen] > COVERED).any():  # a speck of an object, all of it under flakes
        seen = region
    alpha = np.where(seen, np.clip(alpha, 0, 1), 0.0)
    ys, xs = np.nonzero(alpha > COVERED)
    x0, x1, y0, y1 = float(xs.min()), float(xs.max() + 1), float(ys.min()), float(ys.max() + 1)
    # Templates are compared on `region` only, so draw them in its box plus a pixel (coverage's window):
    # the same errors, summed over the same pixels in the same order, at a fraction of the drawing.
    rys, rxs = np.nonzero(region)
    left, top = max(int(rxs.min()) - 1, 0), max(int(rys.min()) - 1, 0)
    right, bottom = min(int(rxs.max()) + 2, img.shape[1]), min(int(rys.max()) + 2, img.shape[0])
    window = (left, top, right - left, bottom - top)
    alpha_w, region_w = alpha[top:bottom, left:right], seen[top:bottom, left:right]
    errors = {}   # each shape's best error over the tighter boxes
    for shape in SHAPES:
        for sx in SHRINK:
            for sy in SHRINK:
                template = coverage(shape, x0 + sx, y0 + sy, x1 - sx, y1 - sy, window=window)
                err = np.abs(template - alpha_w)[region_w].sum()
                if err < errors.get(shape, np.inf):
                    errors[shape] = err
    total = max(alpha.sum(), 1e-6)
    ranked = sorted(SHAPES, key=lambda s: errors[s])   # stable: a tie keeps the vocabulary's order
    fits = {s: 1.0 - errors[s] / total for s in ranked}
    shapes = tuple(s for s in ranked if fits[s] >= fits[ranked[0]] - SHAPE_MARGIN)
    side = max(x1 - x0, y1 - y0)
    return ReadObject(ranked[0], colour, side, (x0 + x1) / 2, (y0 + y1) / 2, int(part.sum()), float(fits[ranked[0]]),
                      shapes, colours)


def _split_by_colour(part: np.ndarray, to_palette: np.ndarray | None, dist: np.ndarray,
                     style: str) -> list[np.ndarray]:
    """A part holding two objects of different colours (drawn close, their blurred edges touching) as
    one part per object. Each object shows itself as a solid block of pixels near one palette colour
    (SPLIT_TOL; edge blends between an object and the background are thin rings, not blocks); every
    pixel of the part goes to the nearest block. One colour (or black and white, `to_palette` None):
    the part as it is. `to_palette`: [H, W, colours] RGB distance of each pixel to each object colour."""
    if to_palette is None or part.sum() < 2 * MIN_PART:
        return [part]
    tol = SPLIT_TOL * (NIGHT_SCALE if style == "night" else 1)
    nearest = to_palette.argmin(-1)
    strong = part & (to_palette.min(-1) <= tol) & (dist >= MIN_PEAK)
    seeds = np.zeros(part.shape, dtype=np.int64)                       # 0: no block; k + 1: colour k's
    for k in np.unique(nearest[strong]):
        block = ndimage.binary_erosion(strong & (nearest == k), structure=np.ones((3, 3)))
        if block.any():
            seeds[ndimage.binary_dilation(block, structure=np.ones((3, 3))) & strong & (nearest == k)] = k + 1
    if len(np.unique(seeds[seeds > 0])) < 2:
        return [part]
    _, (iy, ix) = ndimage.distance_transform_edt(seeds == 0, return_indices=True)
    owner = seeds[iy, ix]                                             # the colour of the nearest block
    return [part & (owner == k) for k in np.unique(owner[part])]


def read(image) -> Reading:
    """Attributes of a [64, 64, 3] uint8 (or float 0-255) RGB image of the world."""
    img = np.asarray(image, dtype=np.float64)
    if img.shape != (CANVAS, CANVAS, 3):
        raise ValueError(f"the oracle reads {CANVAS}x{CANVAS} RGB images, got shape {img.shape}")
    bg, style, dist = _background_and_style(img)
    expected = _expected(bg, style)

    hidden = np.zeros(img.shape[:2], dtype=bool)
    snow = 0.0
    if style == "none":
        flakes = _snow_specks(img)
        snow = float(flakes.mean())
        if snow >= SNOW_SHARE:
            style = "snowy"  # paint the flakes (and their blurred rims) over before reading objects
            hidden = ndimage.binary_dilation(flakes)
            img = _paint_over(img, hidden, expected)
            dist = _background_distance(img, bg, style)

    fg = dist > max(FOREGROUND, CAST_FACTOR * float(np.median(dist)))
    labels, n = ndimage.label(fg, structure=np.ones((3, 3)))
    objects, object_chroma, flake_pixels = [], [], 0
    bg_level = float(np.median(expected.min(-1)))
    bases = _bases(bg, style)
    to_palette = None if style == "bw" else np.linalg.norm(img[..., None, :] - _palette(style), axis=-1)
    parts = [piece for k in range(1, n + 1) for piece in _split_by_colour(labels == k, to_palette, dist, style)]
    for part in parts:
        if part.sum() < MIN_PART or dist[part].max() < MIN_PEAK:
            continue
        core = img[part & (dist >= 0.7 * dist[part].max())]
        level, chroma = float(np.median(core.min(-1))), float(np.median(core.max(-1) - core.min(-1)))
        if (style in ("none", "snowy") and part.sum() <= FLAKE_PART and chroma <= SNOW_CHROMA
                and level >= bg_level + SNOW_LIFT):
            flake_pixels += int(part.sum())  # a blurred flake, as a VAE or a generator draws one
            continue
        colour = np.median(core, axis=0)
        near = _palette_distance(colour, style)
        if style == "none" and bg in ("white", "gray", "black"):  # may still turn out black and white
            near = min(near, _palette_distance(colour, "bw"))
        if near > PALETTE_TOL * (NIGHT_SCALE if style == "night" else 1):
            continue
        objects.append(_read_part(img, bases, dist, part, style, hidden))
        object_chroma.append(chroma)
    snow = max(snow, flake_pixels / fg.size)
    if style == "none" and snow >= SNOW_SHARE:
        style = "snowy"
    # White, grey and black backgrounds look the same in black and white: the objects tell.
    if style == "none" and bg in ("white", "gray", "black") and objects:
        if max(object_chroma) < BW_CHROMA:  # the objects' cores, not their (grey) blurred rims
            style = "bw"
            for o in objects:
                o.colour, o.colours = None, (None,)
    objects.sort(key=lambda o: (o.x, o.y))
    return Reading(bg, style, objects, snow)


def same_scene(a: Reading, b: Reading) -> bool:
    """Do two readings describe the same scene (background, style, and each object's shape, colour
    and size, objects matched by position)? Used to judge reconstructions against originals."""
    if (a.background, a.style, len(a.objects)) != (b.background, b.style, len(b.objects)):
        return False
    return all((p.shape, p.colour, p.size) == (q.shape, q.colour, q.size) for p, q in zip(a.objects, b.objects))
