"""Pretraining the miniature world's foundation models from scratch (docs/miniature-world.md).

  loop      the one resumable training loop (schedule, EMA, checkpoints, progress, metrics)
  vae       AutoencoderKL on renders                       -> stand-in for SD's VAE
  clip      CLIPModel, contrastive on (render, caption)    -> stand-in for CLIP ViT-L/14
  t2i       UNet2DConditionModel on cached VAE latents,    -> stand-in for Stable Diffusion 1.5
            conditioned on the frozen CLIP text tower
  report    the oracle's verdict on all of them -> reports/pretrain.json and pictures

These are data-source-specific stages (like a LAION crawler would be): they import the world; the
pipeline stages (synthesis, filter, train, ...) only ever see the saved diffusers/transformers folders.
"""
