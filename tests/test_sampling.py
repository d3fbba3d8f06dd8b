"""Scheduler selection by name: every short name resolves, bad or unusable ones fail in one line."""

from __future__ import annotations

import pytest

from ip2p.errors import Ip2pError
from ip2p.sampling.loop import SCHEDULERS, make_scheduler, scheduler_class


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_every_short_name_makes_a_scheduler_with_the_checkpoint_schedule(name, tiny_editor):
    scheduler = make_scheduler(name, tiny_editor.scheduler.config)
    assert type(scheduler).__name__ == SCHEDULERS[name]
    assert scheduler.config.beta_start == tiny_editor.scheduler.config.beta_start
    assert scheduler.config.beta_schedule == tiny_editor.scheduler.config.beta_schedule


def test_unknown_scheduler_is_one_line():
    with pytest.raises(Ip2pError, match="unknown scheduler 'foo'"):
        scheduler_class("foo")
    with pytest.raises(Ip2pError, match="unknown scheduler"):
        scheduler_class("UNet2DConditionModel")  # a diffusers class, but not a scheduler


def test_sde_sampler_that_ignores_our_seed_is_refused():
    import diffusers

    cls = diffusers.DPMSolverSDEScheduler
    expected = "needs a package" if type(cls).__name__ == "DummyObject" else "outside the seeded generator"
    with pytest.raises(Ip2pError, match=expected):
        scheduler_class("DPMSolverSDEScheduler")


@pytest.mark.parametrize("name", ["ddim", "ddpm"])
def test_latents_are_never_clipped_when_the_checkpoint_config_is_silent(name):
    """A config saved by an Euler scheduler (the released InstructPix2Pix checkpoint's) has no
    clip_sample key; DDIM/DDPM would then clip x0 to [-1, 1] and wash out every latent beyond it."""
    import torch

    euler_config = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                    "beta_schedule": "scaled_linear", "prediction_type": "epsilon"}
    scheduler = make_scheduler(name, euler_config)
    scheduler.set_timesteps(10)
    t = scheduler.timesteps[0]
    a = scheduler.alphas_cumprod[t]
    x0 = torch.full((1, 4, 4, 4), 3.0)                     # a latent well outside [-1, 1]
    eps = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
    out = scheduler.step(eps, t, xt, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out.pred_original_sample, x0, atol=1e-3)   # (xt - sqrt(1-a) eps) / sqrt(a)
    # ...while a checkpoint that asks for clipping still gets it
    clipped = make_scheduler(name, {**euler_config, "clip_sample": True})
    clipped.set_timesteps(10)
    assert float(clipped.step(eps, t, xt, generator=torch.Generator().manual_seed(0)).pred_original_sample.max()) <= 1.0


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_predicted_clean_matches_diffusers_ddim(prediction_type):
    """Our x0 from (x_t, model output, alpha_bar) against DDIM's own pred_original_sample."""
    import torch
    from diffusers import DDIMScheduler

    from ip2p.sampling.loop import predicted_clean

    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type=prediction_type, clip_sample=False)
    scheduler.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    x_t, output = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = scheduler.timesteps[3]
    expected = scheduler.step(output, t, x_t).pred_original_sample
    ours = predicted_clean(x_t, output, scheduler.alphas_cumprod[t], prediction_type)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_predicted_clean_refuses_an_unknown_prediction_type():
    import torch

    from ip2p.sampling.loop import predicted_clean

    with pytest.raises(Ip2pError, match="prediction_type 'flow'"):
        predicted_clean(torch.zeros(1), torch.zeros(1), 0.5, "flow")
