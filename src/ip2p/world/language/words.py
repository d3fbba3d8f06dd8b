"""The world's words: the phrasings a caption may use for each attribute (the first entry of each tuple
is the plain, canonical one), the joiners, counts and caption templates. Writing (captions, edits) and
reading (parsing) both use these tables, so a phrase the writer can produce is one the parser knows."""

from __future__ import annotations


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
