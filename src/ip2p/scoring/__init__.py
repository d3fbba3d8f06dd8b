"""Scores shared by the CLIP filter, early dropping during synthesis and evaluation: the paper's four
CLIP similarities of a pair (`clip`), the filter's threshold rule (`thresholds`) and the edit metrics
against a ground truth (`edits`)."""
