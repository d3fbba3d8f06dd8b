"""Guidance combiners against hand-computed numbers, and the editing sampler's use of them.

The sampler is checked with a stub UNet that recognises its three branches from its inputs
(is the image condition zero? is the text the empty-text embedding?) and answers each with a
known, different noise, so the guided noise reaching `scheduler.step` can be recomputed by hand.
"""

from __future__ import annotations

from types import SimpleNamespace

import diffusers
import pytest
import torch

from ip2p.models.instruct_pix2pix import InstructPix2Pix
from ip2p.models.loader import DiffusionComponents
from ip2p.sampling import classifier_free_guidance, dual_guidance


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# --- the formulas, numbers typed by hand ---

def test_dual_guidance_by_hand():
    eps_ti, eps_i, eps_u = t([1.0, 2.0]), t([0.5, -1.0]), t([0.0, 1.0])
    # s_T = 2, s_I = 3: [0 + 3*0.5 + 2*0.5, 1 + 3*(-2) + 2*3] = [2.5, 1.0]
    assert torch.allclose(dual_guidance(eps_ti, eps_i, eps_u, 2.0, 3.0), t([2.5, 1.0]))
    # s_T = 7.5, s_I = 1.5: [0 + 1.5*0.5 + 7.5*0.5, 1 + 1.5*(-2) + 7.5*3] = [4.5, 20.5]
    assert torch.allclose(dual_guidance(eps_ti, eps_i, eps_u, 7.5, 1.5), t([4.5, 20.5]))
    # s_T = s_I = 1 leaves the fully conditioned prediction; both 0 the unconditioned one.
    assert torch.equal(dual_guidance(eps_ti, eps_i, eps_u, 1.0, 1.0), eps_ti)
    assert torch.equal(dual_guidance(eps_ti, eps_i, eps_u, 0.0, 0.0), eps_u)


def test_dual_guidance_per_sample_scales():
    # B = 2 samples of shape [1, 1, 2]
    eps_ti = t([[[[1.0, 2.0]]], [[[4.0, 0.0]]]])
    eps_i = t([[[[0.5, -1.0]]], [[[1.0, 1.0]]]])
    eps_u = t([[[[0.0, 1.0]]], [[[2.0, -2.0]]]])
    text_guidance = torch.tensor([2.0, 0.5], dtype=torch.float64)  # dtype is adapted to the noise
    image_guidance = torch.tensor([3.0, 1.0])
    # sample 0 as above: [2.5, 1.0]; sample 1: eps_i + 0.5 * (eps_ti - eps_i) = [1 + 1.5, 1 - 0.5] = [2.5, 0.5]
    expected = t([[[[2.5, 1.0]]], [[[2.5, 0.5]]]])
    out = dual_guidance(eps_ti, eps_i, eps_u, text_guidance, image_guidance)
    assert out.dtype == torch.float32
    assert torch.allclose(out, expected)
    # mixing a float and a tensor scale works too: s_I = 1 for both samples
    mixed = dual_guidance(eps_ti, eps_i, eps_u, text_guidance, 1.0)
    # sample 0: eps_i + 2 * (eps_ti - eps_i) = [0.5 + 1, -1 + 6] = [1.5, 5.0]
    assert torch.allclose(mixed, t([[[[1.5, 5.0]]], [[[2.5, 0.5]]]]))


def test_classifier_free_guidance_by_hand():
    eps_c, eps_u = t([1.0, 3.0]), t([0.0, 1.0])
    # 7.5: [0 + 7.5, 1 + 15] = [7.5, 16]
    assert torch.allclose(classifier_free_guidance(eps_c, eps_u, 7.5), t([7.5, 16.0]))
    assert torch.equal(classifier_free_guidance(eps_c, eps_u, 1.0), eps_c)
    assert torch.equal(classifier_free_guidance(eps_c, eps_u, 0.0), eps_u)


def test_classifier_free_guidance_per_sample_scales():
    eps_c = t([[[1.0, 3.0]], [[2.0, -1.0]]])
    eps_u = t([[[0.0, 1.0]], [[1.0, 1.0]]])
    # sample 0 at 7.5: [7.5, 16]; sample 1 at 2: [1 + 2, 1 - 4] = [3, -3]
    out = classifier_free_guidance(eps_c, eps_u, torch.tensor([7.5, 2.0]))
    assert torch.allclose(out, t([[[7.5, 16.0]], [[3.0, -3.0]]]))


# --- the sampler: one UNet call per step, three branches, guided noise to the scheduler ---

BRANCH_NOISE = {"text+image": 1.0, "empty+image": -2.0, "empty+zero": 0.5}


class BranchStubUNet(torch.nn.Module):
    """Answers each row with a noise that says which branch the row is:
    BRANCH_NOISE[branch] + 0.25 * latents, where the branch is read from the inputs."""

    def __init__(self, empty_text: torch.Tensor, latent_channels: int = 4):
        super().__init__()
        self.config = SimpleNamespace(in_channels=2 * latent_channels, out_channels=latent_channels)
        self.empty_text = empty_text
        self.latent_channels = latent_channels
        self.calls: list[dict] = []

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def forward(self, sample, timestep, encoder_hidden_states):
        c = self.latent_channels
        branches = []
        for row in range(sample.shape[0]):
            zero_image = bool((sample[row, c:] == 0).all())
            empty_text = torch.equal(encoder_hidden_states[row], self.empty_text)
            branches.append(("empty" if empty_text else "text") + "+" + ("zero" if zero_image else "image"))
        offsets = torch.tensor([BRANCH_NOISE.get(b, 100.0) for b in branches]).view(-1, 1, 1, 1)
        eps = offsets + 0.25 * sample[:, :c]
        self.calls.append(dict(branches=branches, eps=eps.clone(), image=sample[:, c:].clone(),
                               text=encoder_hidden_states.clone()))
        return SimpleNamespace(sample=eps)


@pytest.fixture
def stub_editor():
    g = torch.Generator().manual_seed(0)
    empty = torch.randn(1, 77, 16, generator=g)
    unet = BranchStubUNet(empty[0])
    scheduler = diffusers.EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                                 beta_schedule="scaled_linear", steps_offset=1)
    components = DiffusionComponents(unet=unet, vae=None, text_encoder=None, tokenizer=None,
                                     scheduler=scheduler, source="stub")
    return InstructPix2Pix(components), unet, empty


@pytest.fixture
def recorded_steps(monkeypatch):
    """Every (noise, latents) pair that reaches EulerDiscreteScheduler.step."""
    seen = []
    original = diffusers.EulerDiscreteScheduler.step

    def step(self, model_output, timestep, sample, *args, **kwargs):
        seen.append(model_output.clone())
        return original(self, model_output, timestep, sample, *args, **kwargs)

    monkeypatch.setattr(diffusers.EulerDiscreteScheduler, "step", step)
    return seen


@pytest.mark.parametrize("text_guidance,image_guidance", [(7.5, 1.5), (torch.tensor([7.5, 3.0]), torch.tensor([1.5, 1.0]))])
def test_sampler_guidance_reaches_the_scheduler(stub_editor, recorded_steps, text_guidance, image_guidance):
    editor, unet, empty = stub_editor
    batch, steps = 2, 4
    g = torch.Generator().manual_seed(1)
    condition = torch.randn(batch, 4, 8, 8, generator=g) + 3.0  # no zeros in the image condition
    text = torch.randn(batch, 77, 16, generator=g)
    editor.sample(condition, text, empty, text_guidance, image_guidance, steps, "euler", torch.Generator().manual_seed(2),
                  progress=False)

    assert len(unet.calls) == steps  # exactly one UNet call per step
    assert len(recorded_steps) == steps
    branch_order = ["text+image"] * batch + ["empty+image"] * batch + ["empty+zero"] * batch
    s_t = text_guidance.view(-1, 1, 1, 1) if isinstance(text_guidance, torch.Tensor) else text_guidance
    s_i = image_guidance.view(-1, 1, 1, 1) if isinstance(image_guidance, torch.Tensor) else image_guidance
    for call, guided in zip(unet.calls, recorded_steps):
        assert call["branches"] == branch_order  # batch of 3*B in branch order
        assert torch.equal(call["image"][: 2 * batch], torch.cat([condition, condition]))
        assert torch.equal(call["text"][:batch], text)
        eps_ti, eps_i, eps_u = call["eps"][:batch], call["eps"][batch:2 * batch], call["eps"][2 * batch:]
        # The stub's branches differ by constants (1.0, -2.0, 0.5) on the same latents, so
        # eps_ti - eps_i = 3 and eps_i - eps_u = -2.5 everywhere.
        assert torch.allclose(eps_ti - eps_i, torch.full_like(eps_ti, 3.0))
        assert torch.allclose(eps_i - eps_u, torch.full_like(eps_i, -2.5))
        expected = eps_u + s_i * (eps_i - eps_u) + s_t * (eps_ti - eps_i)
        assert torch.allclose(guided, expected, atol=1e-5)
    # And with the numbers themselves: guided - eps_u = -2.5 s_I + 3 s_T, per sample.
    per_sample = -2.5 * torch.as_tensor(image_guidance).expand(batch) + 3.0 * torch.as_tensor(text_guidance).expand(batch)
    offset = recorded_steps[-1] - unet.calls[-1]["eps"][2 * batch:]
    assert torch.allclose(offset, per_sample.float().view(-1, 1, 1, 1).expand_as(offset), atol=1e-5)


def test_sampler_draws_noise_from_the_generator(stub_editor):
    editor, unet, empty = stub_editor
    condition = torch.ones(1, 4, 8, 8)
    text = torch.randn(1, 77, 16, generator=torch.Generator().manual_seed(3))

    def run(seed):
        return editor.sample(condition, text, empty, 7.5, 1.5, 3, "euler_ancestral",
                             torch.Generator().manual_seed(seed), progress=False)

    assert torch.equal(run(5), run(5))
    assert not torch.equal(run(5), run(6))


@pytest.mark.parametrize("phi", [0.0, 0.7, 1.0])
def test_guidance_rescale_matches_diffusers(phi):
    # diffusers' own implementation of Lin et al.'s rescale is the second implementation.
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    from ip2p.sampling.guidance import rescale_guidance

    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    guided = classifier_free_guidance(cond, uncond, 7.5)
    ours = rescale_guidance(guided, cond, phi)
    assert torch.allclose(ours, rescale_noise_cfg(guided, cond, guidance_rescale=phi), atol=1e-6)
    if phi == 1.0:  # fully rescaled: each sample has the conditional prediction's spread
        assert torch.allclose(ours.std(dim=(1, 2, 3)), cond.std(dim=(1, 2, 3)), atol=1e-5)
