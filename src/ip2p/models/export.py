"""Write an editor as a diffusers `StableDiffusionInstructPix2PixPipeline` folder.

`StableDiffusionInstructPix2PixPipeline.from_pretrained(OUTDIR)` loads it unchanged, and
`ip2p edit --model OUTDIR` loads it through our own loader: users move between the two freely.
"""

from __future__ import annotations

from pathlib import Path

from ip2p.io.atomic import atomic_folder
from ip2p.models.loader import DiffusionComponents
from ip2p.models.model_card import ModelCard, write_card
from ip2p.sampling.loop import make_scheduler


def export_pipeline(components: DiffusionComponents, out_dir: str | Path, scheduler: str = "euler_ancestral",
                    unet=None, card: ModelCard | None = None) -> Path:
    """Save vae, text_encoder, tokenizer, unet (or the given `unet`, e.g. EMA weights) and a scheduler
    of class `scheduler` carrying the checkpoint's noise schedule, with the model card when one is given
    (README.md + ip2p.json: ip2p.models.model_card). Written to a temp folder, then moved."""
    from diffusers import StableDiffusionInstructPix2PixPipeline

    out_dir = Path(out_dir)
    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer,
        unet=unet if unet is not None else components.unet,
        scheduler=make_scheduler(scheduler, components.scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    with atomic_folder(out_dir) as staging:
        pipe.save_pretrained(staging, safe_serialization=True)
        if card is not None:
            write_card(staging, card)
    return out_dir
