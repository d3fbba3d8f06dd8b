"""The ranges of the world's own settings (conf/world: `world.*`), in the form of ip2p.checks' rule table.

They live here because one of them needs the world's vocabulary (the style names), and the layers below
the world never import it: `ip2p <stage>` hands this table to `check_config` (ip2p.cli) beside the
table of every other setting.
"""

from __future__ import annotations

from ip2p.checks import POSITIVE_INT, Rule, at_least, optional, proportions, within
from ip2p.world.vocab import STYLES

style_mix = proportions(STYLES, "style")

RULES: dict[str, Rule] = {
    "world.vae_refine.batch_size": POSITIVE_INT, "world.vae_refine.outline_weight": at_least(0),
    "world.vae_refine.outline_px": POSITIVE_INT,
    "world.vae_refine.scenes.p_two_objects": optional(within(0, 1)),
    "world.vae_refine.scenes.p_small": optional(within(0, 1)),
    "world.vae_refine.scenes.p_style": optional(style_mix),
}
