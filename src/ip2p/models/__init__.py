"""Model presets (tiny, sd15, ip2p), one loader, the offline CLIP tokenizer builder, conv_in widening."""

from ip2p.models.loader import (
    ClipComponents,
    DiffusionComponents,
    load_clip,
    load_diffusion,
    resolve_device,
    resolve_dtype,
    widen_conv_in,
)

__all__ = ["ClipComponents", "DiffusionComponents", "load_clip", "load_diffusion", "resolve_device",
           "resolve_dtype", "widen_conv_in"]
