"""The miniature world: procedural 64 px scenes that know their own truth.

A stand-in for LAION photos small enough that every model of the paper can be trained from scratch
on a CPU (see docs/miniature-world.md). Layers, each importing only the ones above it in this list:

  vocab     the fixed names: shapes, colours (RGB), backgrounds, styles, sizes, positions
  scene     Scene / Obj and the seeded scene sampler (with the world's visibility rule)
  render    Scene -> 64x64 RGB uint8 (anti-aliased by 4x supersampling)
  oracle    64x64 RGB -> the scene's attributes, read back from pixels
  language  captions (grammar with synonyms and word orders), edits + instructions, their parsers
            (language/: words, captions, edits, parsing)
  verdict, cases, source, rules   the truth on an edit, held-out cases, the caption source, settings

Above the core, in the same subtree: pretrain/ (the world's foundation models) and judges/ (the world's
truth on every stage's output). The world is a data source like LAION: nothing outside this subtree
imports it except the entry point, ip2p.cli (tests/test_layers.py).
"""
