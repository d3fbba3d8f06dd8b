"""Guidance-grid evaluation: edit held-out inputs over text x image guidance, score with CLIP, plot."""
