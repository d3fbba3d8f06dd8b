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

The modules, by what they do (each importing only those above it):

  words     the phrasing tables (the vocabulary of captions)
  captions  writing a caption of a scene in one phrasing
  edits     drawing and applying an edit, writing its instruction; world_edit / world_triple
  parsing   the caption and instruction parsers, and `consistent` on a triple
"""
