"""Captions and edit instructions for the miniature world, and the parsers that read them back.

Captions (all lower case, at most 30 words). Each object phrase keeps its size, colour and shape
words together, so a caption fixes every object's size, colour and shape:

  object   := ARTICLE SIZE COLOUR SHAPE [POSITION]        "a tiny red ball on the left"
            | ARTICLE SIZE SHAPE "in" COLOUR [POSITION]   "a big box in blue at the top"
  objects  := object [JOINER object]                      JOINER: "and" | "next to" | "beside"
  caption  := plain              objects BG_PLAIN [STYLE]    "a large red circle on a white background"
            | object-first       objects BG [STYLE]          "a tiny red ball on a lawn at night"
            | background-first   BG ":" objects [STYLE]      "on sand: a big blue box"
            | noun-with          BG_NOUN "with" objects [STYLE] "grass with a tiny red ball on the left"
            | photo-of           PREFIX objects BG           "a black-and-white photo of a small green star on grass"
            | count              COUNT BG ":" objects [STYLE]  "two shapes on sand: a big red heart and a tiny blue dot"
            | there-is           "there is/are" objects BG [STYLE] "there is a huge purple disc in the sky by night"

Words come from the tables below (SHAPE_WORDS, SIZE_WORDS, BACKGROUND_PHRASES, BACKGROUND_NOUNS,
STYLE_SUFFIXES, STYLE_PREFIXES); object colours are always the canonical names. A `CaptionForm`
holds every phrasing choice, so one form captions a scene and its edit alike and the two captions
differ only in the edited words.

Instructions: per edit kind a few plain forms (the vocabulary file's) and variants, naming the
target object by "it" (one-object scenes only) or by "the [colour] [size] SHAPE", with the fewest
words that single it out.

Parsing is keyword spotting over a closed vocabulary: style phrases, then background phrases are cut
out of the text; captions are split into object chunks at the joiners and each chunk must hold one
shape word, one colour word and at most one size word and one position phrase. Any word left that is
not a known filler makes the text "not of this world" (None) rather than being silently ignored.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from dataclasses import replace as dc_replace

import numpy as np

from ip2p.world.scene import Obj, Scene, place, sample_side, valid, visible
from ip2p.world.vocab import BACKGROUNDS, COLOURS, SHAPES, STYLES

__all__ = [
    "SHAPE_WORDS", "SIZE_WORDS", "BACKGROUND_PHRASES", "BACKGROUND_NOUNS", "STYLE_SUFFIXES", "STYLE_PREFIXES",
    "TEMPLATES", "EDIT_KINDS", "ObjectWords", "CaptionForm", "PLAIN_FORM", "ParsedObject", "ParsedCaption",
    "ParsedRef", "ParsedInstruction", "Edit", "position_phrases", "sample_form", "plain_caption", "caption",
    "parse_caption", "describes_world_scene", "apply_edit", "instruction", "sample_edit", "parse_instruction",
    "consistent", "world_triple",
]

# ------------------------------------------------------------------------------------- vocabulary
# The first entry of each tuple is the plain (canonical) word or phrase.

SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "ball", "disc", "dot"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle",),
    "star": ("star",),
    "heart": ("heart",),
}
SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "tiny", "little"), "large": ("large", "big", "huge")}

BACKGROUND_PHRASES: dict[str, tuple[str, ...]] = {
    "white": ("on a white background", "on white", "against white"),
    "gray": ("on a gray background", "on a grey background", "on gray", "on grey"),
    "black": ("on a black background", "on black", "against black"),
    "sand": ("on sand", "on the beach", "on sandy ground"),
    "sky": ("in the sky", "against a blue sky"),
    "grass": ("on grass", "on the grass", "on a lawn"),
}
# The background as a noun, for "grass with a red ball"; "snowy" can be put in front of it.
BACKGROUND_NOUNS: dict[str, tuple[str, ...]] = {
    "white": ("a white background",),
    "gray": ("a gray background", "a grey background"),
    "black": ("a black background",),
    "sand": ("sand", "a beach", "sandy ground"),
    "sky": ("the sky", "a blue sky"),
    "grass": ("grass", "a lawn"),
}
STYLE_SUFFIXES: dict[str, tuple[str, ...]] = {
    "none": ("",),
    "night": ("at night", "by night"),
    "bw": ("in black and white",),
    "snowy": ("in the snow", "while it snows"),
}
# "a photo of" opens the photo-of template; snow has no natural prefix, so snowy scenes take a suffix there.
STYLE_PREFIXES: dict[str, tuple[str, ...]] = {
    "none": ("a photo of", "a picture of", "an image of"),
    "night": ("a night photo of", "a nighttime picture of"),
    "bw": ("a black-and-white photo of", "a black-and-white picture of"),
}
JOINERS = ("and", "next to", "beside")
COUNT_WORDS = {1: ("one object", "a single object", "one shape"), 2: ("two objects", "two shapes")}

TEMPLATES = ("plain", "object_first", "background_first", "noun_with", "photo_of", "count", "there_is")

# Colour words the parser accepts for objects. White/gray/black are no object colours of the world,
# but reading them (rather than failing) lets `consistent` reject "a white circle on grass" as invalid.
_OFF_WORLD_COLOURS = {"white": "white", "gray": "gray", "grey": "gray", "black": "black"}
_COLOUR_OF = {**{c: c for c in COLOURS}, **_OFF_WORLD_COLOURS}
_SHAPE_OF = {w: s for s, ws in SHAPE_WORDS.items() for w in ws} | {"disk": "circle"}
_SIZE_OF = {w: s for s, ws in SIZE_WORDS.items() for w in ws}

# ------------------------------------------------------------------------------------ spotting


def _alternation(phrases) -> str:
    # Longest first: at one start position the regex takes the first alternative that matches.
    return "|".join(re.escape(p) for p in sorted(phrases, key=len, reverse=True))


def _bounded(body: str) -> re.Pattern:
    # Words may contain hyphens ("black-and-white"), so a boundary is neither a word char nor "-".
    return re.compile(rf"(?<![\w-])(?:{body})(?![\w-])")


_STYLE_SPOT = {
    "night": ("at night", "by night", "at nighttime", "nighttime", "night"),
    "bw": ("in black and white", "in black-and-white", "black-and-white", "black and white", "monochrome"),
    "snowy": ("in the snow", "while it snows", "snowy", "snowing", "snows", "snow"),
}
_STYLE_OF = {p: s for s, ps in _STYLE_SPOT.items() for p in ps}
_STYLE_RE = _bounded(rf"(?P<k>{_alternation(_STYLE_OF)})")

# Background cores that name a background on their own, with an optional preposition and article
# that are cut out with them; flat colours alone ("white") only after "on"/"against", since
# elsewhere they would be (off-world) object colours.
_BG_CORES = {
    "white background": "white", "gray background": "gray", "grey background": "gray",
    "black background": "black", "sandy ground": "sand", "sand": "sand", "beach": "sand",
    "blue sky": "sky", "sky": "sky", "grass": "grass", "lawn": "grass",
}
_BG_FLAT = {"white": "white", "gray": "gray", "grey": "gray", "black": "black"}
_BG_RE = _bounded(rf"(?:(?:on|in|against)\s+)?(?:(?:a|an|the)\s+)?(?P<k>{_alternation(_BG_CORES)})"
                  rf"|(?:on|against)\s+(?P<f>{_alternation(_BG_FLAT)})")
_BG_BARE_RE = _bounded(rf"(?P<f>{_alternation(_BG_FLAT)})")  # instructions: "make the background black"

_JOINER_RE = _bounded(_alternation(JOINERS))
_POSITION_RE = _bounded(r"(?:in|at) the (?P<v2>top|bottom)[ -](?P<h2>left|right)|on the (?P<h>left|right)"
                        r"|at the (?P<v>top|bottom)|in the (?P<c>center|centre|middle)")

_CAPTION_FILLERS = {"a", "an", "the", "of", "with", "on", "in", "at", "against", "photo", "picture", "image",
                    "there", "is", "are", "object", "objects", "shape", "shapes", "scene"}
_COUNT_OF = {"one": 1, "single": 1, "two": 2}


def _normalise(text: str) -> str:
    text = re.sub(r"[^a-z0-9\- ]+", " ", text.lower())
    return re.sub(r"\s+", " ", text).strip()


def _spot(text: str, pattern: re.Pattern, table: dict[str, str]) -> tuple[list[str], str]:
    """Values of all matches (looked up by the matched group's text) and the text with them cut out."""
    found: list[str] = []

    def cut(m: re.Match) -> str:
        key = next(g for g in m.groupdict().values() if g is not None)
        found.append(table[key])
        return " "

    return found, re.sub(r"\s+", " ", pattern.sub(cut, text)).strip()


def _spot_background(text: str) -> tuple[list[str], str]:
    return _spot(text, _BG_RE, {**_BG_CORES, **_BG_FLAT})


# --------------------------------------------------------------------------------------- captions


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


# --------------------------------------------------------------------------------- caption parser


@dataclass(frozen=True)
class ParsedObject:
    shape: str
    colour: str
    size: str | None = None     # None: the caption does not say
    hpos: str | None = None
    vpos: str | None = None


@dataclass(frozen=True)
class ParsedCaption:
    objects: list[ParsedObject]
    background: str
    style: str = "none"


def _parse_chunk(chunk: str) -> tuple[ParsedObject, list[int]] | None:
    positions = list(_POSITION_RE.finditer(chunk))
    if len(positions) > 1:
        return None
    hpos = vpos = None
    if positions:
        g = positions[0].groupdict()
        hpos, vpos = g["h"] or g["h2"], g["v"] or g["v2"]
        if g["c"]:
            hpos, vpos = "center", "middle"
        chunk = _POSITION_RE.sub(" ", chunk)
    shapes, colours, sizes, counts = [], [], [], []
    for tok in chunk.split():
        if tok in _SHAPE_OF:
            shapes.append(_SHAPE_OF[tok])
        elif tok in _COLOUR_OF:
            colours.append(_COLOUR_OF[tok])
        elif tok in _SIZE_OF:
            sizes.append(_SIZE_OF[tok])
        elif tok in _COUNT_OF:
            counts.append(_COUNT_OF[tok])
        elif tok not in _CAPTION_FILLERS:
            return None  # a word outside the world's language
    if len(shapes) != 1 or len(colours) != 1 or len(sizes) > 1:
        return None
    return ParsedObject(shapes[0], colours[0], sizes[0] if sizes else None, hpos, vpos), counts


def parse_caption(text: str) -> ParsedCaption | None:
    """The caption's objects, background and style; None unless it reads as a caption of the world."""
    t = _normalise(text)
    styles, t = _spot(t, _STYLE_RE, _STYLE_OF)
    backgrounds, t = _spot_background(t)
    if len(set(styles)) > 1 or len(set(backgrounds)) != 1:
        return None
    objects, counts = [], []
    for chunk in _JOINER_RE.split(t):
        parsed = _parse_chunk(chunk)
        if parsed is None:
            return None
        objects.append(parsed[0])
        counts += parsed[1]
    if any(c != len(objects) for c in counts):  # "two objects: a red ball" is not a caption of one
        return None
    return ParsedCaption(objects, backgrounds[0], styles[0] if styles else "none")


def describes_world_scene(p: ParsedCaption) -> bool:
    """Whether some valid scene of the world fits the parsed caption (names, count, visibility, snow)."""
    if p.background not in BACKGROUNDS or p.style not in STYLES or not 1 <= len(p.objects) <= 2:
        return False
    if p.style == "snowy" and p.background == "white":
        return False
    return all(o.shape in SHAPES and o.colour in COLOURS and visible(o.colour, p.background, p.style)
               for o in p.objects)


# ------------------------------------------------------------------------------------------- edits

EDIT_KINDS = ("recolour", "reshape", "background", "style", "size", "add", "remove")


@dataclass(frozen=True)
class Edit:
    """One edit. `target` indexes scene.objects (recolour, reshape, size, remove). `value` is the new
    colour / shape / background / style, "bigger" or "smaller" (size), or the new object's shape (add,
    with `colour` and `size`; size None lets apply_edit draw one)."""

    kind: str
    target: int | None = None
    value: str | None = None
    colour: str | None = None
    size: str | None = None


def apply_edit(scene: Scene, edit: Edit, rng: np.random.Generator, size_tries: int = 20) -> Scene | None:
    """The edited scene, or None when the edit changes nothing, does not apply, or leaves no valid scene."""
    objs = scene.objects
    k = edit.kind
    if k not in EDIT_KINDS:
        raise ValueError(f"unknown edit kind '{k}'")
    if k == "background":
        new = scene.replace(background=edit.value) if edit.value != scene.background else None
    elif k == "style":
        # One global style at a time: styles are only added to unstyled scenes.
        new = scene.replace(style=edit.value) if scene.style == "none" and edit.value != "none" else None
    elif k == "add":
        if len(objs) != 1:
            return None
        size = edit.size or ("small" if rng.random() < 0.5 else "large")
        o = place(rng, sample_side(rng, size), objs, edit.value, edit.colour)
        new = None if o is None else scene.replace(objects=objs + (o,))
    else:
        if edit.target is None or not 0 <= edit.target < len(objs):
            return None
        t, o = edit.target, objs[edit.target]
        if k == "remove":
            new = scene.replace(objects=objs[:t] + objs[t + 1:]) if len(objs) == 2 else None
        elif k == "recolour":
            new = _swap(scene, t, dc_replace(o, colour=edit.value)) if edit.value != o.colour else None
        elif k == "reshape":
            new = _swap(scene, t, dc_replace(o, shape=edit.value)) if edit.value != o.shape else None
        else:  # size: the other size range, same centre; a few draws, since a large box may not fit
            want = {"bigger": "large", "smaller": "small"}.get(edit.value or "")
            if want is None or o.size == want:
                return None
            for _ in range(size_tries):
                new = _swap(scene, t, dc_replace(o, side=sample_side(rng, want)))
                if valid(new):
                    return new
            return None
    return new if new is not None and valid(new) else None


def _swap(scene: Scene, t: int, o: Obj) -> Scene:
    return scene.replace(objects=scene.objects[:t] + (o,) + scene.objects[t + 1:])


def _ref_options(scene: Scene, t: int) -> list[tuple[bool, bool]]:
    """(with colour, with size) choices of "the [size] [colour] SHAPE" that single out object t."""
    o = scene.objects[t]
    others = [p for i, p in enumerate(scene.objects) if i != t and p.shape == o.shape]
    return [(c, s) for c, s in ((False, False), (True, False), (False, True), (True, True))
            if not any((not c or p.colour == o.colour) and (not s or p.size == o.size) for p in others)]


def _reference(scene: Scene, t: int, rng: np.random.Generator, plain: bool) -> str:
    opts = _ref_options(scene, t)
    if not opts:
        raise ValueError(f"object {t} cannot be named apart from the other one")
    if len(scene.objects) == 1 and rng.random() < 0.4:
        return "it"
    o = scene.objects[t]
    if plain:  # the fewest, canonical words
        c, s = opts[0]
        shape, size = SHAPE_WORDS[o.shape][0], SIZE_WORDS[o.size][0]
    else:
        c, s = opts[int(rng.integers(len(opts)))]
        shape = _pick(SHAPE_WORDS[o.shape], int(rng.integers(12)))
        size = _pick(SIZE_WORDS[o.size], int(rng.integers(12)))
    return " ".join(["the"] + [size] * s + [o.colour] * c + [shape])


_RECOLOUR_PLAIN = ("make {r} {c}", "turn {r} {c}")
_RECOLOUR_VARIANTS = ("paint {r} {c}", "recolor {r} to {c}", "recolour {r} {c}", "change the colour of {r} to {c}",
                      "change the color of {r} to {c}", "colour {r} {c}")
_RESHAPE_PLAIN = ("turn {r} into {n}", "make {r} {n}")
_RESHAPE_VARIANTS = ("change {r} into {n}", "replace {r} with {n}", "transform {r} into {n}", "turn {r} into {n}")
_BACKGROUND_PLAIN = ("put {it} {p}", "make the background {v}", "change the background to {v}")
_BACKGROUND_VARIANTS = ("put {it} {p}", "move {it} {p}", "replace the background with {v}",
                        "change the background to {v}", "make the background {v}")
# Background names after "background": the plain name, or a noun.
_BACKGROUND_VALUES = {"white": ("white",), "gray": ("gray", "grey"), "black": ("black",),
                      "sand": ("sand", "a beach", "sandy ground"), "sky": ("sky", "the sky", "a blue sky"),
                      "grass": ("grass", "a lawn")}
_STYLE_PLAIN = {"night": "make it night", "bw": "make it black and white", "snowy": "make it snowy"}
_STYLE_VARIANTS = {"night": ("turn it into night", "make it nighttime", "make it a night scene"),
                   "bw": ("turn it black and white", "make it a black-and-white photo", "make it black-and-white"),
                   "snowy": ("let it snow", "make it snow", "make it a snowy scene")}
_SIZE_PLAIN = {"bigger": "make {r} bigger", "smaller": "make {r} smaller"}
_SIZE_VARIANTS = {"bigger": ("enlarge {r}", "make {r} larger", "grow {r}", "make {r} big"),
                  "smaller": ("shrink {r}", "make {r} small", "make {r} tiny")}
_ADD_VARIANTS = ("add {n}", "draw {n} too", "also add {n}", "include {n}")
_REMOVE_VARIANTS = ("get rid of {r}", "delete {r}", "erase {r}", "take away {r}", "remove {r}")


def _choose(rng: np.random.Generator, options) -> str:
    return options[int(rng.integers(len(options)))]


def instruction(scene: Scene, edit: Edit, rng: np.random.Generator, p_plain: float = 0.5) -> str:
    """An instruction asking for `edit` on `scene`: a plain form with probability p_plain, else a variant.
    Raises ValueError when the edit's target cannot be named apart from the other object."""
    plain = rng.random() < p_plain
    k = edit.kind
    if k == "background":
        it = "it" if len(scene.objects) == 1 else "them"
        bg = edit.value
        if plain:
            return _choose(rng, _BACKGROUND_PLAIN).format(it=it, p=BACKGROUND_PHRASES[bg][0],
                                                           v=_BACKGROUND_VALUES[bg][0])
        return _choose(rng, _BACKGROUND_VARIANTS).format(it=it, p=_choose(rng, BACKGROUND_PHRASES[bg]),
                                                          v=_choose(rng, _BACKGROUND_VALUES[bg]))
    if k == "style":
        return _STYLE_PLAIN[edit.value] if plain else _choose(rng, _STYLE_VARIANTS[edit.value])
    if k == "add":
        if plain:
            words = f"{edit.colour} {edit.value}"
        else:
            shape = _choose(rng, SHAPE_WORDS[edit.value])
            size = f"{_choose(rng, SIZE_WORDS[edit.size])} " if edit.size and rng.random() < 0.7 else ""
            words = f"{size}{edit.colour} {shape}"
        template = "add {n}" if plain else _choose(rng, _ADD_VARIANTS)
        return template.format(n=f"{_article(words)} {words}")
    if k not in EDIT_KINDS:
        raise ValueError(f"unknown edit kind '{k}'")
    r = _reference(scene, edit.target, rng, plain)
    if k == "recolour":
        template = _choose(rng, _RECOLOUR_PLAIN if plain else _RECOLOUR_VARIANTS)
        if r == "it":
            template = template.replace("the colour of {r}", "its colour").replace("the color of {r}", "its color")
        return template.format(r=r, c=edit.value)
    if k == "reshape":
        shape = edit.value if plain else _choose(rng, SHAPE_WORDS[edit.value])
        template = _choose(rng, _RESHAPE_PLAIN if plain else _RESHAPE_VARIANTS)
        return template.format(r=r, n=f"{_article(shape)} {shape}")
    if k == "size":
        template = _SIZE_PLAIN[edit.value] if plain else _choose(rng, _SIZE_VARIANTS[edit.value])
        return template.format(r=r)
    return ("remove {r}" if plain else _choose(rng, _REMOVE_VARIANTS)).format(r=r)


def _applicable(scene: Scene, kind: str, nameable: list[int]) -> bool:
    if kind == "style":
        return scene.style == "none"
    if kind == "add":
        return len(scene.objects) == 1
    if kind == "remove":
        return len(scene.objects) == 2 and bool(nameable)
    return kind == "background" or bool(nameable)


def _draw_edit(scene: Scene, kind: str, rng: np.random.Generator, nameable: list[int]) -> Edit | None:
    """Random parameters for an edit of this kind, drawn among values that can give a valid scene."""
    bg, style = scene.background, scene.style
    if kind == "background":
        vals = [b for b in BACKGROUNDS if b != bg and valid(scene.replace(background=b))]
        return Edit(kind, value=_choose(rng, vals)) if vals else None
    if kind == "style":
        vals = [s for s in STYLES if s != "none" and valid(scene.replace(style=s))]
        return Edit(kind, value=_choose(rng, vals)) if vals else None
    if kind == "add":
        colours = [c for c in COLOURS if visible(c, bg, style)]
        size = "small" if rng.random() < 0.5 else "large"
        return Edit(kind, value=_choose(rng, SHAPES), colour=_choose(rng, colours), size=size) if colours else None
    t = _choose(rng, nameable)
    o = scene.objects[t]
    if kind == "recolour":
        vals = [c for c in COLOURS if c != o.colour and visible(c, bg, style)]
        return Edit(kind, t, _choose(rng, vals)) if vals else None
    if kind == "reshape":
        return Edit(kind, t, _choose(rng, [s for s in SHAPES if s != o.shape]))
    if kind == "size":
        return Edit(kind, t, "bigger" if o.size == "small" else "smaller")
    return Edit(kind, t)  # remove


def sample_edit(scene: Scene, rng: np.random.Generator, kinds: tuple[str, ...] = EDIT_KINDS,
                p_plain: float = 0.5, tries: int = 20) -> tuple[Edit, str, Scene]:
    """(edit, instruction, edited scene): the kind uniform among those that apply to the scene; a kind
    that gives no valid scene in `tries` draws is dropped and another drawn."""
    nameable = [i for i in range(len(scene.objects)) if _ref_options(scene, i)]
    candidates = [k for k in kinds if _applicable(scene, k, nameable)]
    while candidates:
        kind = candidates[int(rng.integers(len(candidates)))]
        for _ in range(tries):
            edit = _draw_edit(scene, kind, rng, nameable)
            if edit is None:
                break
            edited = apply_edit(scene, edit, rng)
            if edited is not None:
                return edit, instruction(scene, edit, rng, p_plain), edited
        candidates.remove(kind)
    raise ValueError(f"no edit of kinds {kinds} applies to this scene")


# ----------------------------------------------------------------------------- instruction parser


@dataclass(frozen=True)
class ParsedRef:
    """ "the [size] [colour] SHAPE" in an instruction."""

    shape: str
    colour: str | None = None
    size: str | None = None


@dataclass(frozen=True)
class ParsedInstruction:
    """kind as in EDIT_KINDS. target: the named object (None: "it", or no object for background/style).
    value: new colour / shape / background / style, "bigger"/"smaller", or the added object's shape
    (with colour and size when the instruction says them)."""

    kind: str
    target: ParsedRef | None = None
    value: str | None = None
    colour: str | None = None
    size: str | None = None


_STYLE_INSTR_FILLERS = {"make", "turn", "it", "into", "a", "an", "the", "let", "photo", "picture", "image",
                        "scene", "please", "now", "to", "change"}
_BACKGROUND_INSTR_FILLERS = {"put", "move", "place", "set", "make", "change", "replace", "turn", "it", "them",
                             "the", "a", "an", "to", "into", "with", "on", "in", "against", "background",
                             "please", "now", "its"}
_OBJECT_FILLERS = {"the", "a", "an", "it", "please", "now", "to", "of", "its"}
_KIND_FILLERS = {
    "recolour": {"make", "turn", "paint", "recolor", "recolour", "colour", "color", "change"},
    "reshape": {"make", "turn", "change", "into", "replace", "with", "transform", "convert"},
    "size": {"make", "enlarge", "grow", "shrink", "bigger", "larger", "smaller"},
    "add": {"add", "draw", "include", "also", "too", "another"},
    "remove": {"remove", "delete", "erase", "get", "rid", "take", "away"},
}
_BIGGER, _SMALLER = {"bigger", "larger", "enlarge", "grow"}, {"smaller", "shrink"}


@dataclass(frozen=True)
class _NounPhrase:
    det: str | None
    ref: ParsedRef


def _noun_phrases(tokens: list[str]) -> tuple[list[_NounPhrase], list[str]] | None:
    """[det] [size/colour words] SHAPE phrases, and the tokens left outside them; None if a phrase
    has two colours or two sizes."""
    used = [False] * len(tokens)
    nps = []
    for i, tok in enumerate(tokens):
        if tok not in _SHAPE_OF:
            continue
        colour = size = None
        j = i - 1
        while j >= 0 and not used[j] and (tokens[j] in _COLOUR_OF or tokens[j] in _SIZE_OF):
            if tokens[j] in _COLOUR_OF:
                if colour is not None:
                    return None
                colour = _COLOUR_OF[tokens[j]]
            else:
                if size is not None:
                    return None
                size = _SIZE_OF[tokens[j]]
            j -= 1
        det = tokens[j] if j >= 0 and not used[j] and tokens[j] in ("the", "a", "an") else None
        for k in range(j if det else j + 1, i + 1):
            used[k] = True
        nps.append(_NounPhrase(det, ParsedRef(_SHAPE_OF[tok], colour, size)))
    return nps, [t for t, u in zip(tokens, used) if not u]


def parse_instruction(text: str) -> ParsedInstruction | None:
    """The instruction's kind, target and new value; None unless it reads as one edit of the world."""
    t = _normalise(text)
    if not t:
        return None
    styles, rest = _spot(t, _STYLE_RE, _STYLE_OF)
    if styles:
        if len(set(styles)) != 1 or not set(rest.split()) <= _STYLE_INSTR_FILLERS:
            return None
        return ParsedInstruction("style", value=styles[0])
    backgrounds, rest = _spot_background(t)
    if not backgrounds and "background" in t.split():
        backgrounds, rest = _spot(t, _BG_BARE_RE, _BG_FLAT)
    if backgrounds:
        if len(set(backgrounds)) != 1 or not set(rest.split()) <= _BACKGROUND_INSTR_FILLERS:
            return None
        return ParsedInstruction("background", value=backgrounds[0])

    tokens = t.split()
    split = _noun_phrases(tokens)
    if split is None:
        return None
    nps, free = split
    it = "it" in free or "its" in free  # "change its colour to red"
    free_colours = [_COLOUR_OF[w] for w in free if w in _COLOUR_OF]
    free_sizes = [_SIZE_OF[w] for w in free if w in _SIZE_OF]
    words = set(free)
    flags = [words & {"remove", "delete", "erase", "rid"} or {"take", "away"} <= words,
             words & {"add", "draw", "include"},
             words & (_BIGGER | _SMALLER) or free_sizes]
    if sum(bool(f) for f in flags) > 1:
        return None
    parsed: ParsedInstruction | None = None
    if flags[0] or flags[2]:
        if free_colours or len(nps) + it != 1:
            return None
        target = nps[0].ref if nps else None
        if flags[0]:
            parsed = ParsedInstruction("remove", target)
        else:
            up = bool(words & _BIGGER) or "large" in free_sizes
            down = bool(words & _SMALLER) or "small" in free_sizes
            if up == down:
                return None
            parsed = ParsedInstruction("size", target, "bigger" if up else "smaller")
    elif flags[1]:
        if free_colours or free_sizes or it or len(nps) != 1:
            return None
        ref = nps[0].ref
        parsed = ParsedInstruction("add", None, ref.shape, ref.colour, ref.size)
    elif free_sizes == [] and free_colours == [] and (len(nps) == 2 and not it or len(nps) == 1 and it):
        # reshape: "turn the square into a heart", "make it a triangle"; the new shape has no modifiers
        new = nps[-1]
        if new.ref.colour or new.ref.size or (it and new.det not in ("a", "an")):
            return None
        parsed = ParsedInstruction("reshape", nps[0].ref if len(nps) == 2 else None, new.ref.shape)
    elif len(free_colours) == 1 and not free_sizes and len(nps) + it == 1:
        parsed = ParsedInstruction("recolour", nps[0].ref if nps else None, free_colours[0])
    if parsed is None:
        return None
    leftover = [w for w in free if w not in _COLOUR_OF and w not in _SIZE_OF]
    if not set(leftover) <= _OBJECT_FILLERS | _KIND_FILLERS[parsed.kind]:
        return None
    return parsed


# --------------------------------------------------------------------------------------- consistency


def _key(o: ParsedObject) -> tuple[str, str, str | None]:
    return (o.shape, o.colour, o.size)  # positions are ignored: edits may move nothing but need not say so


def _resolve(objects: list[ParsedObject], ref: ParsedRef | None) -> int | None:
    """The one object the reference names (an unknown size in the caption does not rule one out)."""
    if ref is None:
        return 0 if len(objects) == 1 else None
    hits = [i for i, o in enumerate(objects) if o.shape == ref.shape
            and ref.colour in (None, o.colour) and (ref.size is None or o.size in (None, ref.size))]
    return hits[0] if len(hits) == 1 else None


def consistent(input_caption: str, instruction_text: str, output_caption: str) -> bool:
    """True iff both captions and the instruction parse, the output describes a valid scene of the
    world, and the output differs from the input exactly as instructed (object attributes compared as
    multisets, so captions may list the objects in either order)."""
    a, b, ins = parse_caption(input_caption), parse_caption(output_caption), parse_instruction(instruction_text)
    if a is None or b is None or ins is None or not describes_world_scene(b):
        return False
    ka, kb = [_key(o) for o in a.objects], [_key(o) for o in b.objects]
    if ins.kind == "background":
        return Counter(ka) == Counter(kb) and a.style == b.style and b.background == ins.value != a.background
    if ins.kind == "style":
        return Counter(ka) == Counter(kb) and a.background == b.background and a.style == "none" \
            and b.style == ins.value
    if a.background != b.background or a.style != b.style:
        return False
    if ins.kind == "add":
        if len(ka) != 1 or len(kb) != 2 or Counter(ka) - Counter(kb):
            return False
        (new,) = list((Counter(kb) - Counter(ka)).elements())
        return new[0] == ins.value and ins.colour in (None, new[1]) and ins.size in (None, new[2])
    t = _resolve(a.objects, ins.target)
    if t is None:
        return False
    shape, colour, size = ka[t]
    expected = list(ka)
    if ins.kind == "remove":
        if len(ka) != 2:
            return False
        del expected[t]
    elif ins.kind == "recolour":
        if ins.value == colour:
            return False
        expected[t] = (shape, ins.value, size)
    elif ins.kind == "reshape":
        if ins.value == shape:
            return False
        expected[t] = (ins.value, colour, size)
    else:  # size: only a known size can grow or shrink
        before, after = ("small", "large") if ins.value == "bigger" else ("large", "small")
        if size != before:
            return False
        expected[t] = (shape, colour, after)
    return Counter(expected) == Counter(kb)


def world_edit(scene: Scene, rng: np.random.Generator, p_plain: float = 0.4,
               kinds: tuple[str, ...] = EDIT_KINDS) -> tuple[dict[str, str], Scene]:
    """({"input", "edit", "output", "kind"}, edited scene): a random edit of the scene, with both
    captions written in one phrasing so that they differ only in the edited words."""
    edit, text, edited = sample_edit(scene, rng, kinds)
    form = sample_form(rng, p_plain)
    after = form
    if edit.kind == "remove" and edit.target == 0:  # the kept object keeps its words
        after = dc_replace(form, objects=form.objects[::-1])
    return ({"input": caption(scene, form=form), "edit": text, "output": caption(edited, form=after),
             "kind": edit.kind}, edited)


def world_triple(scene: Scene, rng: np.random.Generator, p_plain: float = 0.4,
                 kinds: tuple[str, ...] = EDIT_KINDS) -> dict[str, str]:
    """{"input", "edit", "output", "kind"}: `world_edit` without the edited scene."""
    return world_edit(scene, rng, p_plain, kinds)[0]
