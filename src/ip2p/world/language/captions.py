"""Writing captions: a scene in one of the grammar's phrasings (ip2p.world.language explains the
grammar). A `CaptionForm` holds every phrasing choice, so one form captions a scene and its edit alike."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ip2p.world.language.words import (BACKGROUND_NOUNS, BACKGROUND_PHRASES, COUNT_WORDS, JOINERS, SHAPE_WORDS,
                                       SIZE_WORDS, STYLE_PREFIXES, STYLE_SUFFIXES, TEMPLATES)
from ip2p.world.scene import Obj, Scene


@dataclass(frozen=True)
class ObjectWords:
    """Phrasing choices for one object slot. Choice numbers pick from a word list modulo its length
    (12 is a multiple of every list length, so a uniform number gives uniform words)."""

    shape: int = 0
    size: int = 0
    colour_after: bool = False       # "a big box in red" instead of "a big red box"
    position: float | None = None    # None: no position phrase; else picks among the true ones


@dataclass(frozen=True)
class CaptionForm:
    """Every phrasing choice of a caption, independent of the scene (so it can caption an edit too)."""

    template: str = "plain"
    objects: tuple[ObjectWords, ObjectWords] = (ObjectWords(), ObjectWords())
    background: int = 0
    style: int = 0
    joiner: int = 0
    prefix: int = 0


PLAIN_FORM = CaptionForm()


def _pick(options: tuple[str, ...], k: int) -> str:
    return options[k % len(options)]


def _article(words: str) -> str:
    return "an" if words[:1] in "aeiou" else "a"


def position_phrases(o: Obj) -> list[str]:
    """Every position phrase that is true of the object (there is always at least one)."""
    h, v = o.hpos, o.vpos
    out = []
    if h != "center":
        out.append(f"on the {h}")
    if v != "middle":
        out.append(f"at the {v}")
    if h != "center" and v != "middle":
        out.append(f"in the {v} {h}")
    if h == "center" and v == "middle":
        out.append("in the center")
    return out


def sample_form(rng: np.random.Generator, p_plain: float = 0.4) -> CaptionForm:
    if rng.random() < p_plain:
        return PLAIN_FORM
    template = TEMPLATES[1 + int(rng.integers(len(TEMPLATES) - 1))]
    slots = tuple(ObjectWords(int(rng.integers(12)), int(rng.integers(12)), bool(rng.random() < 0.2),
                              float(rng.random()) if rng.random() < 0.4 else None) for _ in range(2))
    b, s, j, p = (int(v) for v in rng.integers(12, size=4))
    return CaptionForm(template, slots, b, s, j, p)


def _object_phrase(o: Obj, w: ObjectWords, plain: bool) -> str:
    shape = SHAPE_WORDS[o.shape][0] if plain else _pick(SHAPE_WORDS[o.shape], w.shape)
    size = SIZE_WORDS[o.size][0] if plain else _pick(SIZE_WORDS[o.size], w.size)
    words = f"{size} {shape} in {o.colour}" if (w.colour_after and not plain) else f"{size} {o.colour} {shape}"
    phrase = f"{_article(words)} {words}"
    if not plain and w.position is not None:
        opts = position_phrases(o)
        phrase += " " + opts[min(len(opts) - 1, int(w.position * len(opts)))]
    return phrase


def caption(scene: Scene, rng: np.random.Generator | None = None, p_plain: float = 0.4,
            form: CaptionForm | None = None) -> str:
    """A caption of the scene: the plain form with probability p_plain, else a varied phrasing.
    With `form` given, that phrasing (and no randomness) is used."""
    if form is None:
        if rng is None:
            raise ValueError("caption needs an rng or a form")
        form = sample_form(rng, p_plain)
    plain = form.template == "plain"
    n = len(scene.objects)
    joiner = " and " if plain else f" {_pick(JOINERS, form.joiner)} "
    objs = joiner.join(_object_phrase(o, w, plain) for o, w in zip(scene.objects, form.objects))
    bg, style = scene.background, scene.style
    where = BACKGROUND_PHRASES[bg][0] if plain else _pick(BACKGROUND_PHRASES[bg], form.background)
    suffix = STYLE_SUFFIXES[style][0] if plain else _pick(STYLE_SUFFIXES[style], form.style)
    sfx = f" {suffix}" if suffix else ""
    t = form.template
    if t in ("plain", "object_first"):
        text = f"{objs} {where}{sfx}"
    elif t == "background_first":
        text = f"{where}: {objs}{sfx}"
    elif t == "noun_with":
        noun = _pick(BACKGROUND_NOUNS[bg], form.background)
        if style == "snowy" and form.style % 3 == 2:  # "snowy grass", "a snowy beach"
            art, _, rest = noun.partition(" ")
            noun = f"{art} snowy {rest}" if art in ("a", "an", "the") else f"snowy {noun}"
            sfx = ""
        text = f"{noun} with {objs}{sfx}"
    elif t == "photo_of":
        if style in STYLE_PREFIXES:
            text = f"{_pick(STYLE_PREFIXES[style], form.prefix)} {objs} {where}"
        else:
            text = f"{_pick(STYLE_PREFIXES['none'], form.prefix)} {objs} {where}{sfx}"
    elif t == "count":
        text = f"{_pick(COUNT_WORDS[n], form.prefix)} {where}: {objs}{sfx}"
    elif t == "there_is":
        text = f"there {'is' if n == 1 else 'are'} {objs} {where}{sfx}"
    else:
        raise ValueError(f"unknown caption template '{t}'")
    return text


def plain_caption(scene: Scene) -> str:
    """The canonical caption, e.g. "a large red circle and a small blue square on grass at night"."""
    return caption(scene, form=PLAIN_FORM)
