"""The world's verdict on an edit: given the oracle's readings of an image before and after, and the
instruction, did the instructed attribute change as asked (success) and did everything else stay
(preservation)? One judge for every image pair of the miniature experiment: Prompt-to-Prompt pairs,
edits of held-out renders, and baselines (docs/miniature-world.md, "Judging an edit").

Objects are compared by (shape, colour, size) as multisets, so the judge does not depend on the order
the oracle lists them in; colours are not compared where a black-and-white style hides them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

from ip2p.world.language.parsing import ParsedInstruction, _resolve, parse_instruction
from ip2p.world.oracle import Reading, read
from ip2p.world.vocab import CANVAS

Key = tuple[str, str | None, str]


@dataclass(frozen=True)
class EditVerdict:
    kind: str
    success: bool      # the instructed attribute now holds
    preserved: bool    # everything the instruction did not name is unchanged

    @property
    def both(self) -> bool:
        return self.success and self.preserved


def read_any(image: np.ndarray | Image.Image) -> Reading:
    """The oracle's reading of an RGB image of any size: resized to the world's canvas first (a model
    may draw at another resolution than the world's 64 px)."""
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    img = img.convert("RGB")
    if img.size != (CANVAS, CANVAS):
        img = img.resize((CANVAS, CANVAS), Image.Resampling.BOX)
    return read(np.asarray(img))


def _keys(r: Reading, colours_visible: bool) -> list[Key]:
    return [(o.shape, o.colour if colours_visible else None, o.size) for o in r.objects]


def judge_edit(before: Reading, after: Reading, instruction: str | ParsedInstruction) -> EditVerdict | None:
    """The verdict, or None when it cannot be judged from pixels: the instruction does not parse, names
    no single object of `before`, or recolours in black and white. Callers count those separately."""
    ins = parse_instruction(instruction) if isinstance(instruction, str) else instruction
    if ins is None:
        return None
    visible = before.style != "bw" and after.style != "bw"
    ka, kb = _keys(before, visible), _keys(after, visible)
    same_bg, same_style = after.background == before.background, after.style == before.style
    same_objects = Counter(ka) == Counter(kb)
    if ins.kind == "background":
        return EditVerdict(ins.kind, after.background == ins.value, same_style and same_objects)
    if ins.kind == "style":
        return EditVerdict(ins.kind, after.style == ins.value, same_bg and same_objects)
    scene_kept = same_bg and same_style
    if ins.kind == "add":
        new = list((Counter(kb) - Counter(ka)).elements())
        added = len(kb) == len(ka) + 1 and any(
            k[0] == ins.value and (not visible or ins.colour in (None, k[1])) and ins.size in (None, k[2])
            for k in new)
        return EditVerdict(ins.kind, added, scene_kept and not (Counter(ka) - Counter(kb)))
    if ins.kind == "recolour" and not visible:
        return None
    ref = ins.target if visible or ins.target is None else replace(ins.target, colour=None)
    t = _resolve(before.objects, ref)
    if t is None:
        return None
    others = Counter(ka[:t] + ka[t + 1:])
    others_kept = others <= Counter(kb)
    if ins.kind == "remove":
        gone = len(kb) == len(ka) - 1 and Counter(kb)[ka[t]] < Counter(ka)[ka[t]]
        return EditVerdict(ins.kind, gone, scene_kept and others_kept)
    rest = list((Counter(kb) - others).elements())
    if len(rest) != 1:  # the target vanished, or objects appeared: nothing to compare it with
        return EditVerdict(ins.kind, False, scene_kept and others_kept and len(kb) == len(ka))
    (shape, colour, size), (new_shape, new_colour, new_size) = ka[t], rest[0]
    if ins.kind == "recolour":
        ok = new_colour == ins.value
        kept = (new_shape, new_size) == (shape, size)
    elif ins.kind == "reshape":
        ok, kept = new_shape == ins.value, (new_colour, new_size) == (colour, size)
    else:  # size
        ok = new_size == ("large" if ins.value == "bigger" else "small") != size
        kept = (new_shape, new_colour) == (shape, colour)
    return EditVerdict(ins.kind, ok, scene_kept and others_kept and kept)
