"""The world's verdict on an edit: given the oracle's readings of an image before and after, and the
instruction, did the instructed attribute change as asked (success) and did everything else stay
(preservation)? One judge for every image pair of the miniature experiment: Prompt-to-Prompt pairs,
edits of held-out renders, and baselines (docs/miniature.md, "Judging an edit").

Objects are compared by (shape, colour, size), matched one to one whatever order the oracle lists them
in; colours are not compared where a black-and-white style hides them. Preservation asks whether two
readings could describe the same scene (readings at a boundary match either way, specks may come or go);
success asks that the instructed attribute be the oracle's best reading.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

from ip2p.world.language.parsing import ParsedInstruction, _resolve, parse_instruction
from ip2p.world.oracle import FAINT_PART, SIZE_MARGIN, SNOW_MARGIN, SNOW_SHARE, Reading, ReadObject, read
from ip2p.world.vocab import CANVAS, SIZE_SPLIT

Key = tuple[str, str | None, str]
MAX_MATCH = 8   # objects in a reading up to which plausible matchings are searched (a bound on the search)


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


def _key_of(o: ReadObject, visible: bool) -> Key:
    return (o.shape, o.colour if visible else None, o.size)


# Two readings of one scene, where one or both come from a generated image, can differ where a reading
# sits at a boundary (a blob between circle and square, a blurred object between two palette colours, a
# side near the size split, a speck, a faintly speckled sky). Preservation therefore asks whether the
# two readings *could* describe the same scene: objects match when their plausible readings
# (oracle.ReadObject.shapes / .colours, sizes within SIZE_MARGIN of the split) overlap, specks
# (FAINT_PART) may come or go, and a marginal snow share reads as either style. Success stays strict:
# the instructed attribute must be the oracle's best reading.

def _sizes(o: ReadObject) -> set[str]:
    return {"small", "large"} if abs(o.side - SIZE_SPLIT) <= SIZE_MARGIN else {o.size}


def _could_match(o: ReadObject, p: ReadObject, visible: bool, attributes=("shape", "colour", "size")) -> bool:
    """Could o and p be one object, judged on `attributes`?"""
    if "shape" in attributes and not set(o.shapes or (o.shape,)) & set(p.shapes or (p.shape,)):
        return False
    if visible and "colour" in attributes and not set(o.colours or (o.colour,)) & set(p.colours or (p.colour,)):
        return False
    return "size" not in attributes or bool(_sizes(o) & _sizes(p))


def _faint(o: ReadObject) -> bool:
    return o.pixels <= FAINT_PART


def _covers(src: list[ReadObject], dst: list[ReadObject], visible: bool, exact: bool) -> bool:
    """Is there a one-to-one matching of src's objects to objects of dst they could be, leaving no
    object of src unmatched but specks, and (exact) none of dst either? Above MAX_MATCH objects (a
    reading full of specks) only the strict multiset comparison is made."""
    if max(len(src), len(dst)) > MAX_MATCH:
        a, b = Counter(_key_of(o, visible) for o in src), Counter(_key_of(o, visible) for o in dst)
        return a == b if exact else not (a - b)

    def match(i: int, used: frozenset) -> bool:
        if i == len(src):
            return not exact or all(j in used or _faint(o) for j, o in enumerate(dst))
        if _faint(src[i]) and match(i + 1, used):
            return True
        return any(match(i + 1, used | {j}) for j, o in enumerate(dst)
                   if j not in used and _could_match(src[i], o, visible))

    return match(0, frozenset())


def _same_style(a: Reading, b: Reading) -> bool:
    """The same style, or "none" against a marginally "snowy" reading (snow share below SNOW_SHARE x
    SNOW_MARGIN)."""
    if a.style == b.style:
        return True
    return {a.style, b.style} == {"none", "snowy"} and max(a.snow, b.snow) < SNOW_SHARE * SNOW_MARGIN


def judge_edit(before: Reading, after: Reading, instruction: str | ParsedInstruction) -> EditVerdict | None:
    """The verdict, or None when it cannot be judged from pixels: the instruction does not parse, names
    no single object of `before`, or recolours in black and white. Callers count those separately."""
    ins = parse_instruction(instruction) if isinstance(instruction, str) else instruction
    if ins is None:
        return None
    visible = before.style != "bw" and after.style != "bw"
    a, b = before.objects, after.objects
    same_bg = after.background == before.background
    if ins.kind == "background":
        return EditVerdict(ins.kind, after.background == ins.value,
                           _same_style(before, after) and _covers(a, b, visible, exact=True))
    if ins.kind == "style":
        return EditVerdict(ins.kind, after.style == ins.value, same_bg and _covers(a, b, visible, exact=True))
    scene_kept = same_bg and _same_style(before, after)
    if ins.kind == "add":
        added = any(not _faint(o) and o.shape == ins.value and (not visible or ins.colour in (None, o.colour))
                    and ins.size in (None, o.size) and _covers(a, b[:j] + b[j + 1:], visible, exact=True)
                    for j, o in enumerate(b))
        return EditVerdict(ins.kind, added, scene_kept and _covers(a, b, visible, exact=False))
    if ins.kind == "recolour" and not visible:
        return None
    ref = ins.target if visible or ins.target is None else replace(ins.target, colour=None)
    t = _resolve(a, ref)
    if t is None:
        return None
    target, others = a[t], a[:t] + a[t + 1:]
    if ins.kind == "remove":
        gone = (_covers(others, b, visible, exact=True)
                and sum(not _faint(o) for o in b) < sum(not _faint(o) for o in a))
        return EditVerdict(ins.kind, gone, scene_kept and _covers(others, b, visible, exact=False))
    # recolour, reshape, size: one object of `after` is the target's new version, the others are kept
    kept_attributes = {"recolour": ("shape", "size"), "reshape": ("colour", "size"), "size": ("shape", "colour")}
    options = []   # (success, kept) for each object that could be the target's new version
    for j, r in enumerate(b):
        if _faint(r) or not _covers(others, b[:j] + b[j + 1:], visible, exact=True):
            continue
        if ins.kind == "recolour":
            ok = r.colour == ins.value
        elif ins.kind == "reshape":
            ok = r.shape == ins.value
        else:
            ok = r.size == ("large" if ins.value == "bigger" else "small") != target.size
        kept = _could_match(target, r, visible, kept_attributes[ins.kind])
        options.append((ok, kept))
    # None: the target vanished, or objects appeared; several: the reading most favourable to "both"
    success, kept = max(options, key=lambda v: (v[0] and v[1], v[0], v[1]), default=(False, False))
    return EditVerdict(ins.kind, success, scene_kept and kept)
