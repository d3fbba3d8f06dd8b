"""Reading captions and instructions back, and the consistency of a (caption, instruction, caption)
triple. Parsing is keyword spotting over the world's closed vocabulary (ip2p.world.language explains
how); any word left that is not a known filler makes the text "not of this world" (None)."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from ip2p.world.language.words import JOINERS, SHAPE_WORDS, SIZE_WORDS
from ip2p.world.scene import visible
from ip2p.world.vocab import BACKGROUNDS, COLOURS, SHAPES, STYLES

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
