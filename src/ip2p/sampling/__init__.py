"""The one denoising loop shared by editing, synthesis and evaluation, and its guidance combiners."""

from ip2p.sampling.guidance import classifier_free_guidance, dual_guidance
from ip2p.sampling.loop import denoise, make_scheduler, predicted_clean, SCHEDULERS

__all__ = ["classifier_free_guidance", "dual_guidance", "denoise", "make_scheduler", "predicted_clean", "SCHEDULERS"]
