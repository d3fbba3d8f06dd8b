"""CLIP filtering of candidate pairs into the training dataset: selection and splits, importers
(released layout, diffusers-style datasets), plots, and the `ip2p filter` stage. The scores are
ip2p.scoring's."""
