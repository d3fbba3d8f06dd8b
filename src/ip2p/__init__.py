"""ip2p: InstructPix2Pix end to end, from captions to a registered instruction-based image editor."""

__version__ = "0.1.0"
