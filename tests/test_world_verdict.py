"""The world's edit verdict (ip2p.world.verdict) on renders whose truth is known: the true edit of a
scene passes, returning the input (identity) keeps everything but changes nothing, and an edit of
another kind or another value fails."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from ip2p.world.language.edits import EDIT_KINDS, sample_edit
from ip2p.world.oracle import read
from ip2p.world.render import render
from ip2p.world.scene import sample_scenes
from ip2p.world.verdict import judge_edit


@pytest.fixture(scope="module")
def cases():
    rng = np.random.default_rng(5)
    out = []
    for scene in sample_scenes(424242, 210):
        edit, text, edited = sample_edit(scene, rng)
        out.append((scene, edit, text, edited, read(render(scene)), read(render(edited))))
    return out


def test_true_edits_pass_for_every_kind(cases):
    verdicts = [judge_edit(before, after, text) for _, _, text, _, before, after in cases]
    judged = [v for v in verdicts if v is not None]
    assert len(judged) >= 0.97 * len(cases)     # every instruction the world writes can be judged
    assert Counter(v.kind for v in judged).keys() == set(EDIT_KINDS)
    assert np.mean([v.both for v in judged]) >= 0.97
    for kind in EDIT_KINDS:
        assert np.mean([v.both for v in judged if v.kind == kind]) >= 0.9, kind


def test_identity_preserves_but_never_succeeds(cases):
    verdicts = [judge_edit(before, before, text) for _, _, text, _, before, _ in cases]
    judged = [v for v in verdicts if v is not None]
    assert not any(v.success for v in judged)
    assert np.mean([v.preserved for v in judged]) >= 0.99


def test_the_wrong_edit_fails(cases):
    """The after image of case k judged against the instruction of another kind (same scene) fails."""
    rng = np.random.default_rng(6)
    wrong = 0
    judged = 0
    for scene, edit, _, edited, before, after in cases:
        kinds = tuple(k for k in EDIT_KINDS if k != edit.kind)
        try:
            _, other_text, _ = sample_edit(scene, rng, kinds)
        except ValueError:
            continue
        v = judge_edit(before, after, other_text)
        if v is not None:
            judged += 1
            wrong += not v.both
    assert judged >= 100 and wrong / judged >= 0.97


def test_unparseable_instruction_is_not_judged(cases):
    _, _, _, _, before, after = cases[0]
    assert judge_edit(before, after, "do something nice") is None


def test_images_of_other_sizes_are_read_at_the_canvas_size(cases):
    from PIL import Image

    from ip2p.world.verdict import read_any

    for scene, *_ in cases[:20]:
        small = render(scene)
        big = np.asarray(Image.fromarray(small).resize((128, 128), Image.Resampling.NEAREST))
        a, b = read(small), read_any(big)
        assert (a.background, a.style, [(o.shape, o.colour) for o in a.objects]) == \
            (b.background, b.style, [(o.shape, o.colour) for o in b.objects])
