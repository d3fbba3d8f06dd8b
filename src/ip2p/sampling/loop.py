"""The one denoising loop. Guidance and attention control are supplied by the caller."""

from __future__ import annotations

import inspect
from typing import Callable

import torch
from tqdm.auto import tqdm

from ip2p.errors import Ip2pError

# Names a user may pass as --scheduler; any diffusers scheduler class name works too.
SCHEDULERS = {
    "euler_ancestral": "EulerAncestralDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "heun": "HeunDiscreteScheduler",
    "lms": "LMSDiscreteScheduler",
    "pndm": "PNDMScheduler",
    "unipc": "UniPCMultistepScheduler",
}


def scheduler_class(name: str):
    """The diffusers scheduler class for `name` (short name or class name); checked before any model loads."""
    import diffusers

    class_name = SCHEDULERS.get(name, name)
    cls = getattr(diffusers, class_name, None)
    if cls is None or not hasattr(cls, "from_config") or not class_name.endswith("Scheduler"):
        raise Ip2pError(f"unknown scheduler '{name}': use one of {', '.join(SCHEDULERS)} or a diffusers scheduler class name")
    if type(cls).__name__ == "DummyObject":  # diffusers' placeholder for a class whose extra package is missing
        raise Ip2pError(f"scheduler '{name}' needs a package that is not installed ({', '.join(cls._backends)})")
    step_params = inspect.signature(cls.step).parameters
    if "generator" not in step_params and "noise_sampler_seed" in inspect.signature(cls.__init__).parameters:
        # SDE samplers that draw their own noise cannot follow our seeds: results would not reproduce.
        raise Ip2pError(f"scheduler '{name}' draws noise outside the seeded generator; pick another sampler")
    return cls


def make_scheduler(name: str, base_config: dict):
    """A fresh scheduler of class `name` (short name or diffusers class) with the checkpoint's noise schedule.

    Latents are not bounded to [-1, 1], so x0 is never clipped unless the checkpoint's own config asks
    for it: DDIM and DDPM default to clip_sample=True, and a config saved by an Euler scheduler (as the
    released InstructPix2Pix checkpoint's is) has no such key, so from_config alone would clip."""
    return scheduler_class(name).from_config({"clip_sample": False, **dict(base_config)})


# predict_noise(model_input, t, step_index) -> guided noise prediction with the shape of the latents
NoisePredictor = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


def denoise(
    scheduler,
    latents: torch.Tensor,
    predict_noise: NoisePredictor,
    num_steps: int,
    generator: torch.Generator | None = None,
    progress: bool = True,
    desc: str = "denoising",
) -> torch.Tensor:
    """Run `num_steps` steps from pure noise `latents` (not yet scaled by the scheduler's initial sigma).

    The random draws happen in a fixed order on `generator` (initial noise is drawn by the caller,
    then one draw per ancestral step inside `scheduler.step`), the same order diffusers' pipelines use.
    """
    scheduler.set_timesteps(num_steps, device=latents.device)
    latents = latents * scheduler.init_noise_sigma
    step_kwargs = {}
    step_params = inspect.signature(scheduler.step).parameters
    if "generator" in step_params:
        step_kwargs["generator"] = generator
    for i, t in enumerate(tqdm(scheduler.timesteps, desc=desc, disable=not progress, unit="step")):
        model_input = scheduler.scale_model_input(latents, t)
        noise = predict_noise(model_input, t, i)
        latents = scheduler.step(noise, t, latents, **step_kwargs, return_dict=False)[0]
    return latents
