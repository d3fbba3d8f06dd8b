"""CLIP filtering of candidate pairs into the training dataset: metrics, selection and splits,
importers (released layout, diffusers-style datasets), plots, and the `ip2p filter` stage."""

from ip2p.filtering.metrics import METRICS, ClipScorer, clip_metrics
from ip2p.filtering.select import assign_splits, first_failure, select

__all__ = ["METRICS", "ClipScorer", "clip_metrics", "assign_splits", "first_failure", "select"]
