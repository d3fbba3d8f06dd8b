"""Editing: image I/O and resizing, the dual-guidance sampler, export to the diffusers layout."""

from ip2p.editing.export import export_pipeline
from ip2p.editing.pipeline import EditSettings, InstructPix2Pix

__all__ = ["EditSettings", "InstructPix2Pix", "export_pipeline"]
