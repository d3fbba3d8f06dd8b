"""The one denoising loop. Guidance and attention control are supplied by the caller."""

from __future__ import annotations

import contextlib
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


def unet_autocast(device_type: str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """torch.autocast in `dtype` (bfloat16 / float16), or nothing when dtype is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


def unet_prediction(unet, autocast: torch.dtype | None, sample: torch.Tensor, t: torch.Tensor,
                    text: torch.Tensor) -> torch.Tensor:
    """The UNet's output for `sample`, its forward under `autocast` (None: as loaded). Only the forward
    runs in the lower precision: the prediction comes back in the sample's dtype, so weights, latents,
    guidance and the sampler's arithmetic stay in theirs."""
    with unet_autocast(sample.device.type, autocast):  # the sample's: unet.device walks every submodule
        out = unet(sample, t, encoder_hidden_states=text).sample
    return out.to(sample.dtype)


def make_scheduler(name: str, base_config: dict):
    """A fresh scheduler of class `name` (short name or diffusers class) with the checkpoint's noise schedule.

    Latents are not bounded to [-1, 1], so x0 is never clipped unless the checkpoint's own config asks
    for it: DDIM and DDPM default to clip_sample=True, and a config saved by an Euler scheduler (as the
    released InstructPix2Pix checkpoint's is) has no such key, so from_config alone would clip."""
    return scheduler_class(name).from_config({"clip_sample": False, **dict(base_config)})


def predicted_clean(x_t: torch.Tensor, model_output: torch.Tensor, alpha_bar: torch.Tensor | float,
                    prediction_type: str) -> torch.Tensor:
    """The clean latent x0 the model's output implies at a step, from the variance-preserving x_t
    (the UNet's input: `scale_model_input` of the scheduler's latents) and alpha_bar = alphas_cumprod[t]:
        epsilon:       x0 = (x_t - sqrt(1 - a) eps) / sqrt(a)
        v_prediction:  x0 = sqrt(a) x_t - sqrt(1 - a) v
        sample:        x0 = the output itself"""
    a = torch.as_tensor(alpha_bar, dtype=x_t.dtype, device=x_t.device)
    if prediction_type == "epsilon":
        return (x_t - (1 - a).sqrt() * model_output) / a.sqrt()
    if prediction_type == "v_prediction":
        return a.sqrt() * x_t - (1 - a).sqrt() * model_output
    if prediction_type == "sample":
        return model_output
    raise Ip2pError(f"unknown prediction_type '{prediction_type}'")


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
    first_step: int = 0,
    stop_step: int | None = None,
) -> torch.Tensor:
    """Run `num_steps` steps from pure noise `latents` (not yet scaled by the scheduler's initial sigma).

    The random draws happen in a fixed order on `generator` (initial noise is drawn by the caller,
    then one draw per ancestral step inside `scheduler.step`), the same order diffusers' pipelines use.
    Steps [first_step, stop_step) run; first_step > 0 continues a scheduler already mid-run (its
    timesteps set and its state that of step first_step, as an earlier call with stop_step left it).
    """
    if first_step == 0:
        scheduler.set_timesteps(num_steps, device=latents.device)
        latents = latents * scheduler.init_noise_sigma
    step_kwargs = {}
    step_params = inspect.signature(scheduler.step).parameters
    if "generator" in step_params:
        step_kwargs["generator"] = generator
    timesteps = scheduler.timesteps[first_step:stop_step]
    for i, t in enumerate(tqdm(timesteps, desc=desc, disable=not progress, unit="step"), start=first_step):
        model_input = scheduler.scale_model_input(latents, t)
        noise = predict_noise(model_input, t, i)
        latents = scheduler.step(noise, t, latents, **step_kwargs, return_dict=False)[0]
    return latents
