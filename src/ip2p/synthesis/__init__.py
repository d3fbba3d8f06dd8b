"""Prompt-to-Prompt synthesis of image pairs: attention processors, token alignment, the pair sampler
and the `ip2p synthesize` stage (ip2p.synthesis.run)."""

from ip2p.synthesis.attention import AttentionControl, GoogleSettings, P2PAttnProcessor, attention_control
from ip2p.synthesis.pipeline import PairSampler, SampleSpec, SynthesisSettings, draw_samples

__all__ = ["AttentionControl", "GoogleSettings", "P2PAttnProcessor", "attention_control", "PairSampler",
           "SampleSpec", "SynthesisSettings", "draw_samples"]
