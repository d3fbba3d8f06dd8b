"""Edits and their instructions: drawing an edit a scene allows, applying it, and writing the
instruction (per edit kind a few plain forms and variants, naming the target object with the fewest
words that single it out); `world_edit` adds both captions in one phrasing."""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import replace as dc_replace

import numpy as np

from ip2p.world.language.captions import _article, _pick, caption, sample_form
from ip2p.world.language.words import BACKGROUND_PHRASES, SHAPE_WORDS, SIZE_WORDS
from ip2p.world.scene import Obj, Scene, place, sample_side, valid, visible
from ip2p.world.vocab import BACKGROUNDS, COLOURS, SHAPES, STYLES

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
