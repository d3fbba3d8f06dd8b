"""The miniature world's language: captions and instructions round-trip through their parsers, the
vocabulary file's plain forms read as they say, edits keep scenes valid, and `consistent` accepts
exactly the triples whose output differs from the input as instructed."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from ip2p.world.language.captions import caption, plain_caption, position_phrases
from ip2p.world.language.edits import EDIT_KINDS, Edit, apply_edit, instruction, sample_edit, world_triple
from ip2p.world.language.parsing import ParsedRef, consistent, parse_caption, parse_instruction
from ip2p.world.scene import Obj, Scene, sample_scenes, valid


def one(shape="circle", colour="red", side=26.0, x=32.0, y=32.0, background="white", style="none") -> Scene:
    return Scene((Obj(shape, colour, side, x, y),), background, style, seed=7)


def two(a=("circle", "red", 12.0), b=("square", "blue", 12.0), background="grass", style="none") -> Scene:
    return Scene((Obj(*a, 16.0, 16.0), Obj(*b, 48.0, 48.0)), background, style, seed=7)


def assert_recovers(scene: Scene, text: str):
    p = parse_caption(text)
    assert p is not None, text
    assert (p.background, p.style) == (scene.background, scene.style), text
    assert len(p.objects) == len(scene.objects), text
    for o, q in zip(scene.objects, p.objects):
        assert (q.shape, q.colour, q.size) == (o.shape, o.colour, o.size), text
        assert q.hpos in (None, o.hpos) and q.vpos in (None, o.vpos), text


# ------------------------------------------------------------------------------------------ captions


@pytest.mark.parametrize("scene, text", [
    (one(), "a large red circle on a white background"),
    (one(background="gray"), "a large red circle on a gray background"),
    (one(background="black"), "a large red circle on a black background"),
    (one("star", "blue", 12.0, background="sand"), "a small blue star on sand"),
    (one("heart", "pink", background="grass"), "a large pink heart on grass"),
    (one("square", "yellow", 12.0, background="sky"), "a small yellow square in the sky"),
    (two(("circle", "red", 26.0)), "a large red circle and a small blue square on grass"),
    (one(background="sand", style="night"), "a large red circle on sand at night"),
    (one(background="sand", style="bw"), "a large red circle on sand in black and white"),
    (one(background="sand", style="snowy"), "a large red circle on sand in the snow"),
])
def test_plain_caption_is_the_vocabulary_form(scene, text):
    assert valid(scene)
    assert plain_caption(scene) == text
    assert_recovers(scene, text)


@pytest.mark.parametrize("text, objects, background", [
    ("a large red circle on a white background", [("circle", "red", "large")], "white"),
    ("a large red circle on a gray background", [("circle", "red", "large")], "gray"),
    ("a large red circle on a black background", [("circle", "red", "large")], "black"),
    ("a small blue star on sand", [("star", "blue", "small")], "sand"),
    ("a large pink heart on grass", [("heart", "pink", "large")], "grass"),
    ("a small yellow square in the sky", [("square", "yellow", "small")], "sky"),
    ("a red circle and a blue square on grass", [("circle", "red", None), ("square", "blue", None)], "grass"),
])
def test_vocabulary_file_captions_parse(text, objects, background):
    p = parse_caption(text)
    assert p is not None and p.style == "none" and p.background == background
    assert [(o.shape, o.colour, o.size) for o in p.objects] == objects


@pytest.mark.parametrize("text, objects, background, style", [
    ("grass with a tiny red ball on the left", [("circle", "red", "small", "left", None)], "grass", "none"),
    ("on sand: a big blue box", [("square", "blue", "large", None, None)], "sand", "none"),
    ("a black-and-white photo of a small green star on a lawn", [("star", "green", "small", None, None)],
     "grass", "bw"),
    ("two objects on sand: a red heart and a small blue dot",
     [("heart", "red", None, None, None), ("circle", "blue", "small", None, None)], "sand", "none"),
    ("a snowy beach with a huge box in orange in the top right", [("square", "orange", "large", "right", "top")],
     "sand", "snowy"),
    ("a little purple disc in the center against a blue sky by night",
     [("circle", "purple", "small", "center", "middle")], "sky", "night"),
])
def test_varied_phrasings_parse(text, objects, background, style):
    p = parse_caption(text)
    assert p is not None and (p.background, p.style) == (background, style)
    assert [(o.shape, o.colour, o.size, o.hpos, o.vpos) for o in p.objects] == objects


@pytest.mark.parametrize("text", [
    "a large red circle",                                   # no background
    "on a white background",                                # no object
    "a large red circle on grass in the sky",               # two backgrounds
    "a red circle wearing a hat on grass",                  # words outside the language
    "a red blue circle on grass",                           # two colours for one object
    "two objects on sand: a red heart",                     # count says two, caption has one
    "a red circle and blue on grass",                       # a chunk without a shape
    "a red circle on sand at night in the snow",            # two styles
    "a red circle on the left at the top on grass",         # two position phrases for one object
])
def test_parse_caption_rejects_what_is_not_a_world_caption(text):
    assert parse_caption(text) is None


def test_caption_round_trip_on_2000_scenes():
    seen_templates = set()
    for seed in range(4):
        rng = np.random.default_rng(100 + seed)
        for scene in sample_scenes(seed, 500):
            varied = caption(scene, rng, p_plain=0.0)
            for text in (plain_caption(scene), varied, caption(scene, rng)):
                assert text == text.lower() and len(text.split()) <= 30, text
                assert_recovers(scene, text)
            seen_templates.add(varied.split()[0])
    assert len(seen_templates) >= 6  # the varied captions really vary (first words differ by template)


def test_position_phrases_are_true():
    o = Obj("circle", "red", 12.0, 8.0, 8.0)
    assert set(position_phrases(o)) == {"on the left", "at the top", "in the top left"}
    assert position_phrases(Obj("circle", "red", 12.0, 32.0, 32.0)) == ["in the center"]
    assert position_phrases(Obj("circle", "red", 12.0, 32.0, 60.0)) == ["at the bottom"]


# --------------------------------------------------------------------------------------- instructions

R = ParsedRef


@pytest.mark.parametrize("text, kind, target, value", [
    ("make the circle blue", "recolour", R("circle"), "blue"),
    ("turn the star red", "recolour", R("star"), "red"),
    ("make it green", "recolour", None, "green"),
    ("turn the square into a heart", "reshape", R("square"), "heart"),
    ("make it a triangle", "reshape", None, "triangle"),
    ("put it on grass", "background", None, "grass"),
    ("make the background black", "background", None, "black"),
    ("change the background to sand", "background", None, "sand"),
    ("make it night", "style", None, "night"),
    ("make it black and white", "style", None, "bw"),
    ("make it snowy", "style", None, "snowy"),
    ("make the circle bigger", "size", R("circle"), "bigger"),
    ("make it smaller", "size", None, "smaller"),
    ("add a yellow star", "add", None, "star"),
    ("remove the triangle", "remove", R("triangle"), None),
    # variants
    ("paint the ball blue", "recolour", R("circle"), "blue"),
    ("recolor the box to red", "recolour", R("square"), "red"),
    ("make the red circle blue", "recolour", R("circle", "red"), "blue"),
    ("change the colour of the small star to pink", "recolour", R("star", None, "small"), "pink"),
    ("replace the background with sand", "background", None, "sand"),
    ("put them against a blue sky", "background", None, "sky"),
    ("make the background white", "background", None, "white"),
    ("let it snow", "style", None, "snowy"),
    ("turn it into night", "style", None, "night"),
    ("make it a black-and-white photo", "style", None, "bw"),
    ("shrink the star", "size", R("star"), "smaller"),
    ("enlarge the heart", "size", R("heart"), "bigger"),
    ("make the big blue box tiny", "size", R("square", "blue", "large"), "smaller"),
    ("get rid of the triangle", "remove", R("triangle"), None),
    ("take away the green dot", "remove", R("circle", "green"), None),
    ("replace the circle with a square", "reshape", R("circle"), "square"),
])
def test_instruction_forms_parse(text, kind, target, value):
    p = parse_instruction(text)
    assert p is not None, text
    assert (p.kind, p.target, p.value) == (kind, target, value)


def test_add_instruction_carries_the_new_object():
    p = parse_instruction("add a small yellow star")
    assert (p.kind, p.value, p.colour, p.size) == ("add", "star", "yellow", "small")
    p = parse_instruction("add an orange heart")
    assert (p.kind, p.value, p.colour, p.size) == ("add", "heart", "orange", None)


@pytest.mark.parametrize("text", [
    "", "make the circle blue and the square red", "remove the snow", "add a red circle on grass",
    "make it dance", "turn the square into a red heart", "make the circle blue and add a star",
    "make it bigger and smaller",
])
def test_parse_instruction_rejects_what_is_not_one_edit(text):
    assert parse_instruction(text) is None


def test_objects_sharing_a_shape_are_named_by_colour():
    scene = two(("circle", "red", 12.0), ("circle", "green", 12.0))
    rng = np.random.default_rng(0)
    assert instruction(scene, Edit("recolour", 0, "blue"), rng, p_plain=1.0) in (
        "make the red circle blue", "turn the red circle blue")
    for _ in range(30):  # variants too name the object apart from the other circle
        p = parse_instruction(instruction(scene, Edit("remove", 1), rng, p_plain=0.0))
        assert p.kind == "remove" and p.target.shape == "circle" and p.target.colour == "green"
    twins = two(("circle", "red", 12.0), ("circle", "red", 12.0))
    with pytest.raises(ValueError):
        instruction(twins, Edit("remove", 0), rng)


def test_it_only_names_the_single_object():
    rng = np.random.default_rng(0)
    scene = two(("circle", "red", 12.0), ("square", "blue", 12.0))
    texts = [instruction(scene, Edit("recolour", 0, "green"), rng) for _ in range(50)]
    assert not any(" it " in f" {t} " for t in texts)
    texts = [instruction(one(), Edit("recolour", 0, "green"), rng) for _ in range(50)]
    assert any(t.startswith(("make it", "turn it")) for t in texts)


def test_sampled_instructions_parse_to_their_edit():
    rng = np.random.default_rng(3)
    for scene in sample_scenes(11, 300):
        edit, text, edited = sample_edit(scene, rng)
        assert valid(edited)
        p = parse_instruction(text)
        assert p is not None and p.kind == edit.kind, text
        if edit.kind in ("recolour", "reshape", "background", "style"):
            assert p.value == edit.value, text
        if edit.kind == "size":
            assert p.value == edit.value
        if edit.kind == "add":
            assert (p.value, p.colour) == (edit.value, edit.colour) and p.size in (None, edit.size)
        if edit.kind in ("recolour", "reshape", "size", "remove"):
            named = [i for i, o in enumerate(scene.objects) if p.target is None and len(scene.objects) == 1
                     or p.target is not None and o.shape == p.target.shape and p.target.colour in (None, o.colour)
                     and p.target.size in (None, o.size)]
            assert named == [edit.target], text


# ------------------------------------------------------------------------------------------- edits


def test_apply_edit_rules():
    rng = np.random.default_rng(0)
    s = one(side=12.0, background="sand")
    assert apply_edit(s, Edit("recolour", 0, "blue"), rng).objects[0].colour == "blue"
    assert apply_edit(s, Edit("recolour", 0, "red"), rng) is None             # no change
    assert apply_edit(one(background="sand"), Edit("recolour", 0, "orange"), rng) is not None
    assert apply_edit(s.replace(style="bw"), Edit("recolour", 0, "yellow"), rng) is None  # invisible in b/w on sand
    assert apply_edit(s, Edit("reshape", 0, "heart"), rng).objects[0].shape == "heart"
    assert apply_edit(s, Edit("background", None, "sand"), rng) is None
    assert apply_edit(s.replace(style="snowy"), Edit("background", None, "white"), rng) is None  # no snow on white
    assert apply_edit(s, Edit("style", None, "night"), rng).style == "night"
    assert apply_edit(s.replace(style="bw"), Edit("style", None, "night"), rng) is None  # from "none" only
    big = apply_edit(s, Edit("size", 0, "bigger"), rng)
    o = big.objects[0]
    assert o.size == "large" and (o.x, o.y) == (32.0, 32.0) and valid(big)
    assert apply_edit(s, Edit("size", 0, "smaller"), rng) is None             # already small
    corner = Scene((Obj("circle", "red", 12.0, 8.0, 8.0),), "sand")
    assert apply_edit(corner, Edit("size", 0, "bigger"), rng) is None         # a large box cannot fit there
    added = apply_edit(s, Edit("add", None, "star", "yellow", "small"), rng)
    assert len(added.objects) == 2
    assert (added.objects[1].shape, added.objects[1].colour, added.objects[1].size) == ("star", "yellow", "small")
    assert valid(added) and added.objects[0] == s.objects[0]
    assert apply_edit(added, Edit("add", None, "star", "red", "small"), rng) is None  # at most two objects
    assert apply_edit(s, Edit("remove", 0), rng) is None                      # a scene keeps one object
    pair = two()
    assert apply_edit(pair, Edit("remove", 0), rng).objects == pair.objects[1:]


def test_every_kind_appears_in_300_triples():
    rng = np.random.default_rng(5)
    kinds = Counter(world_triple(s, rng)["kind"] for s in sample_scenes(21, 300))
    assert set(kinds) == set(EDIT_KINDS)


def test_world_triples_are_consistent():
    rng = np.random.default_rng(6)
    for scene in sample_scenes(31, 500):
        t = world_triple(scene, rng)
        assert consistent(t["input"], t["edit"], t["output"]), t
        assert not consistent(t["input"], t["edit"], t["input"]), t    # nothing changed
        assert not consistent(t["output"], t["edit"], t["input"]), t   # the edit undone is not the edit


def test_consistent_rejects_a_recolour_to_another_colour():
    rng = np.random.default_rng(7)
    checked = 0
    for scene in sample_scenes(61, 80):
        try:
            edit, text, edited = sample_edit(scene, rng, kinds=("recolour",))
        except ValueError:
            continue
        t = edit.target
        wrong = [c for c in ("red", "blue", "green", "yellow") if c not in (edit.value, scene.objects[t].colour)][0]
        bad = edited.replace(objects=tuple(o.__class__(o.shape, wrong, o.side, o.x, o.y) if i == t else o
                                           for i, o in enumerate(edited.objects)))
        assert consistent(plain_caption(scene), text, plain_caption(edited))
        assert not consistent(plain_caption(scene), text, plain_caption(bad)), (text, plain_caption(bad))
        checked += 1
    assert checked >= 60


def test_recolour_triples_change_one_word():
    rng = np.random.default_rng(8)
    done = 0
    for scene in sample_scenes(41, 60):
        try:
            t = world_triple(scene, rng, kinds=("recolour",))
        except ValueError:  # two identical objects: neither can be named apart, so none can be recoloured
            assert len(set(scene.objects)) == 2 and len({(o.shape, o.colour, o.size) for o in scene.objects}) == 1
            continue
        done += 1
        a, b = t["input"].split(), t["output"].split()
        assert len(a) == len(b) and sum(x != y for x, y in zip(a, b)) == 1, t
    assert done >= 50


def test_world_triples_restrict_kinds():
    rng = np.random.default_rng(9)
    for scene in sample_scenes(51, 40):
        assert world_triple(scene, rng, kinds=("background", "style"))["kind"] in ("background", "style")


@pytest.mark.parametrize("inp, edit, out", [
    ("a large red circle on grass", "make the circle blue", "a large blue circle on grass"),
    ("a large red circle on grass", "make it a triangle", "a large red triangle on grass"),
    ("a large red circle on grass", "put it on sand", "a large red circle on sand"),
    ("a large red circle on grass", "make it snowy", "snowy grass with a big red ball"),
    ("a small red circle on grass", "make it bigger", "a large red circle on grass"),
    ("a small red circle on grass", "add a yellow star", "a small red circle and a small yellow star on grass"),
    ("a small red circle and a large blue star on grass", "remove the circle", "a large blue star on grass"),
    ("a red circle and a blue square on grass", "make the square green", "a green square and a red circle on grass"),
    ("a small red circle and a small green circle on sand", "make the red circle blue",
     "a small blue circle and a small green circle on sand"),
])
def test_consistent_accepts_right_triples(inp, edit, out):
    assert consistent(inp, edit, out)


@pytest.mark.parametrize("inp, edit, out", [
    ("a large red circle on grass", "make the circle blue", "a large green circle on grass"),    # wrong colour
    ("a large red circle on grass", "make the circle blue", "a large blue circle on sand"),      # unrelated change
    ("a large red circle on grass", "make the circle blue", "a small blue circle on grass"),     # unrelated change
    ("a large red circle on grass", "make the circle blue", "a large blue circle on grass at night"),
    ("a large red circle on grass", "make the circle blue", "a large red circle on grass"),      # no change
    ("a large red circle on grass", "make the square blue", "a large blue square on grass"),     # no such object
    ("a large red circle on grass", "make it a triangle", "a large red star on grass"),
    ("a large red circle on grass", "put it on sand", "a large red circle in the sky"),
    ("a large red circle on grass", "make it white", "a large white circle on grass"),          # not a world colour
    ("a large red circle on grass", "make it white", "a white circle"),                        # no background
    ("a large red circle on sand", "make it snowy", "a large red circle on white in the snow"),
    ("a large red circle on white", "make it snowy", "a large red circle on white in the snow"),  # never snows on white
    ("a large brown circle on grass", "make it black and white", "a large brown circle on grass in black and white"),
    ("a large red circle on sand at night", "make it snowy", "a large red circle on sand in the snow"),
    ("a large red circle on grass", "make it bigger", "a large red circle on grass"),          # already large
    ("a red circle on grass", "make it bigger", "a large red circle on grass"),                 # size unknown
    ("a small red circle on grass", "add a yellow star", "a small red circle and a small blue star on grass"),
    ("a small red circle on grass", "add a small yellow star", "a small red circle and a large yellow star on grass"),
    ("a small red circle on grass", "add a yellow star", "a small red heart and a small yellow star on grass"),
    ("a small red circle and a large blue star on grass", "remove the circle", "a small red circle on grass"),
    ("a small red circle and a large blue star on grass", "make it green",                     # "it" of two
     "a small green circle and a large blue star on grass"),
    ("a small red circle and a small red circle on grass", "make the circle blue",
     "a small blue circle and a small red circle on grass"),                                   # ambiguous target
    ("a large red circle on grass", "make the circle blue please dance", "a large blue circle on grass"),
])
def test_consistent_rejects_wrong_triples(inp, edit, out):
    assert not consistent(inp, edit, out)
