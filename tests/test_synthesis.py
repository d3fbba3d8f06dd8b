"""Prompt-to-Prompt synthesis on the tiny model: attention processors against hand computations,
shared noise, p = 0 against diffusers' own pipeline, per-sample p, LocalBlend, and the stage
(rejections, sharding, early drop, kill-and-resume)."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from PIL import Image

from ip2p.config import compose
from ip2p.errors import Ip2pError

from ip2p.synthesis.attention import (
    IN_COND,
    OUT_COND,
    AttentionControl,
    GoogleSettings,
    P2PAttnProcessor,
    branch_rows,
    copied_self_attention,
    google_step_controlled,
    local_blend_mask,
    official_step_controlled,
)
from ip2p.synthesis.p2p_alignment import TokenMap
from ip2p.synthesis.pipeline import PairedNoiseScheduler, PairSampler, SampleSpec, draw_samples
from ip2p.synthesis.run import RECIPE_FILE, TEMP_PREFIX
from ip2p.synthesis.run import settings_from_config

REPO = Path(__file__).resolve().parents[1]
CAT, DOG = "a photo of a cat", "a photo of a dog"
SIZE, STEPS = 64, 6
# A sample computed in batches of other sizes: convolution kernels sum in another order per batch size
# and CPU, and guidance up to 14 amplifies that over the steps (1.1e-4 seen on one machine, 0 on another).
# Real mix-ups (another caption, seed or p on a row) differ by > 1e-2, which the tests also check.


def synthesis_settings(**changes):
    """conf/synthesis's settings (their one home) with `changes`."""
    return dataclasses.replace(settings_from_config(compose([])), **changes)


def google_settings(cfg, **changes) -> GoogleSettings:
    """synthesis.attention.google of the composed config (their one home) with `changes`."""
    return dataclasses.replace(settings_from_config(cfg).google, **changes)


BATCH_TOL = {"atol": 5e-4, "rtol": 1e-3}


# ---- step rules ---------------------------------------------------------------------------------


def controlled_steps(rule, value, num_steps):
    return [i for i in range(num_steps) if bool(rule(torch.tensor([value], dtype=torch.float64), i, num_steps)[0])]


def test_official_rule_controls_the_first_fraction_p_of_the_steps():
    # p > i / (n - 1), counted by hand
    assert controlled_steps(official_step_controlled, 0.5, 11) == [0, 1, 2, 3, 4]
    assert controlled_steps(official_step_controlled, 0.1, 100) == list(range(10))  # 9/99 < 0.1 < 10/99
    assert controlled_steps(official_step_controlled, 1.0, 5) == [0, 1, 2, 3]
    assert controlled_steps(official_step_controlled, 0.0, 5) == []


def test_google_rule_controls_steps_below_int_fraction_times_n():
    assert controlled_steps(google_step_controlled, 0.4, 10) == [0, 1, 2, 3]
    assert controlled_steps(google_step_controlled, 0.8, 7) == [0, 1, 2, 3, 4]  # int(5.6) = 5


# ---- attention processors -------------------------------------------------------------------------


def test_sdpa_copy_equals_materialised_attention():
    torch.manual_seed(0)
    s, heads, n, d = 3, 2, 10, 8
    q, k, v = (torch.randn(4 * s, heads, n, d) for _ in range(3))
    controlled = torch.tensor([True, False, True])
    scale = d ** -0.5
    rows = branch_rows(controlled, ((0, 1), (2, 3)))
    assert rows.tolist() == [0, 1, 2, 0, 4, 2, 6, 7, 8, 6, 10, 8]  # by hand: S = 3, samples 0 and 2 copied
    out = copied_self_attention(q, k, v, rows, scale)
    expected = torch.empty_like(out)
    for row in range(4 * s):
        group, sample = divmod(row, s)
        src = row
        if group in (1, 3) and controlled[sample]:
            src = (group - 1) * s + sample  # the input branch's queries and keys
        probs = torch.softmax(q[src] @ k[src].transpose(-1, -2) * scale, dim=-1)
        expected[row] = probs @ v[row]  # ... applied to this row's own values
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # controlled output rows really changed, uncontrolled ones did not
    plain = torch.softmax(q @ k.transpose(-1, -2) * scale, -1) @ v
    assert (out[s + 0] - plain[s + 0]).abs().max() > 1e-2
    torch.testing.assert_close(out[s + 1], plain[s + 1], atol=1e-5, rtol=1e-5)


def _attention_module(cross_dim=None, seed=0):
    torch.manual_seed(seed)
    return Attention(query_dim=16, cross_attention_dim=cross_dim, heads=2, dim_head=8).eval()


@pytest.mark.parametrize("cross", [False, True])
def test_processor_without_control_equals_diffusers_default(cross):
    attn = _attention_module(12 if cross else None)
    s = 2
    hidden = torch.randn(4 * s, 9, 16)
    context = torch.randn(4 * s, 5, 12) if cross else None
    control = AttentionControl("official", torch.zeros(s), num_steps=4)
    control.begin_step(0)
    ours = P2PAttnProcessor(control)(attn, hidden, context)
    theirs = AttnProcessor2_0()(attn, hidden, context)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)


def test_official_self_attention_copy_in_the_processor():
    """Output-branch rows of a controlled sample = to_out(softmax(Q_in K_in^T / sqrt(d)) V_out)."""
    attn = _attention_module()
    s, heads, d = 2, 2, 8
    hidden = torch.randn(4 * s, 9, 16)
    control = AttentionControl("official", torch.tensor([1.0, 0.0]), num_steps=4)
    control.begin_step(0)
    out = P2PAttnProcessor(control)(attn, hidden)

    def split(x):
        return x.view(x.shape[0], -1, heads, d).transpose(1, 2)

    q, k, v = split(attn.to_q(hidden)), split(attn.to_k(hidden)), split(attn.to_v(hidden))
    plain = AttnProcessor2_0()(attn, hidden)
    for dst, src in ((s, 0), (3 * s, 2 * s)):  # sample 0: out-cond <- in-cond, out-uncond <- in-uncond
        probs = torch.softmax(q[src] @ k[src].transpose(-1, -2) / math.sqrt(d), -1)
        expected = attn.to_out[0]((probs @ v[dst]).transpose(0, 1).reshape(9, heads * d))
        torch.testing.assert_close(out[dst], expected, atol=1e-5, rtol=1e-5)
    for row in (0, 1, s + 1, 2 * s, 3 * s + 1):  # input branches and the uncontrolled sample: untouched
        torch.testing.assert_close(out[row], plain[row], atol=1e-5, rtol=1e-5)


def test_google_cross_attention_refine_in_the_processor(cfg):
    """Output-cond rows: (A_in[..., mapper] * alphas + A_out * (1 - alphas)) V_out; everything else plain."""
    attn = _attention_module(12)
    s, heads, d, tokens = 1, 2, 8, 5
    hidden = torch.randn(4 * s, 9, 16)
    context = torch.randn(4 * s, tokens, 12)
    tm = TokenMap(mapper=torch.tensor([0, 1, 0, 2, 4]), alphas=torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0]),
                  changed_input=[], changed_output=[2])
    control = AttentionControl("google", torch.zeros(s), num_steps=10,
                               google=google_settings(cfg, cross="refine", cross_steps=0.5), token_map=tm,
                               latent_hw=(3, 3))
    control.begin_step(0)
    out = P2PAttnProcessor(control)(attn, hidden, context)

    def split(x):
        return x.view(x.shape[0], -1, heads, d).transpose(1, 2)

    q, k, v = split(attn.to_q(hidden)), split(attn.to_k(context)), split(attn.to_v(context))
    a_in = torch.softmax(q[IN_COND] @ k[IN_COND].transpose(-1, -2) / math.sqrt(d), -1)
    a_out = torch.softmax(q[OUT_COND] @ k[OUT_COND].transpose(-1, -2) / math.sqrt(d), -1)
    mixed = torch.stack([a_in[..., [0, 1, 0, 2, 4][j]] if j != 2 else a_out[..., 2] for j in range(tokens)], -1)
    expected = attn.to_out[0]((mixed @ v[OUT_COND]).transpose(0, 1).reshape(9, heads * d))
    torch.testing.assert_close(out[OUT_COND], expected, atol=1e-5, rtol=1e-5)
    plain = AttnProcessor2_0()(attn, hidden, context)
    for row in (IN_COND, 2, 3):
        torch.testing.assert_close(out[row], plain[row], atol=1e-5, rtol=1e-5)
    control.begin_step(5)  # past cross_steps: plain attention again
    torch.testing.assert_close(P2PAttnProcessor(control)(attn, hidden, context), plain, atol=1e-5, rtol=1e-5)


def test_google_self_attention_copy_only_on_small_layers_and_cond_half(cfg):
    attn = _attention_module()
    s = 1
    hidden = torch.randn(4 * s, 9, 16)
    plain = AttnProcessor2_0()(attn, hidden)
    small = AttentionControl("google", torch.ones(s), 10, google_settings(cfg, self_max_queries=9))
    small.begin_step(0)
    out = P2PAttnProcessor(small)(attn, hidden)
    assert (out[OUT_COND] - plain[OUT_COND]).abs().max() > 1e-3
    torch.testing.assert_close(out[3], plain[3], atol=1e-5, rtol=1e-5)  # uncond half untouched
    big = AttentionControl("google", torch.ones(s), 10, google_settings(cfg, self_max_queries=8))
    big.begin_step(0)
    torch.testing.assert_close(P2PAttnProcessor(big)(attn, hidden), plain, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="GoogleSettings"):  # no settings of its own to fall back on
        AttentionControl("google", torch.ones(s), 10)


def test_local_blend_mask_by_hand():
    maps = torch.zeros(1, 1, 4, 4)
    maps[0, 0, 1, 1] = 4.0
    maps[0, 0, 3, 3] = 1.0
    # no pooling: keep cells above 0.5 x peak
    assert local_blend_mask(maps, 0.5, pool=0)[0, 0].nonzero().tolist() == [[1, 1]]
    # 3x3 max-pool spreads the peak to its neighbours; the weak corner stays below 0.5 x 4
    expected = {(r, c) for r in range(3) for c in range(3)}
    assert {tuple(x) for x in local_blend_mask(maps, 0.5, pool=1)[0, 0].nonzero().tolist()} == expected
    assert {tuple(x) for x in local_blend_mask(maps, 0.2, pool=1)[0, 0].nonzero().tolist()} == expected | {
        (2, 2), (2, 3), (3, 2), (3, 3)}


# ---- shared noise -------------------------------------------------------------------------------


def test_paired_noise_scheduler_gives_both_branches_the_noise_of_a_plain_run(tiny_base):
    from ip2p.sampling import make_scheduler

    s = 2
    seeds = [3, 4]
    sample = torch.randn(s, 4, 8, 8)
    model_output = torch.randn(s, 4, 8, 8)
    wrapped = PairedNoiseScheduler(make_scheduler("euler_ancestral", tiny_base.scheduler.config),
                                   [torch.Generator().manual_seed(x) for x in seeds])
    wrapped.set_timesteps(10)
    t = wrapped.timesteps[2]
    wrapped._step_index = 2
    both = wrapped.step(torch.cat([model_output, model_output]), t, torch.cat([sample, sample]))[0]
    torch.testing.assert_close(both[:s], both[s:], rtol=0, atol=0)  # identical ancestral noise
    for i, seed in enumerate(seeds):  # and each row is what a one-sample diffusers step draws
        plain = make_scheduler("euler_ancestral", tiny_base.scheduler.config)
        plain.set_timesteps(10)
        plain._step_index = 2
        ref = plain.step(model_output[i:i + 1], t, sample[i:i + 1], generator=torch.Generator().manual_seed(seed),
                         return_dict=False)[0]
        torch.testing.assert_close(both[i:i + 1], ref, rtol=0, atol=0)


# ---- the pair sampler on the tiny model ---------------------------------------------------------


@pytest.fixture(scope="module")
def sampler(tiny_base):
    return PairSampler(tiny_base, synthesis_settings(steps=STEPS))


def test_p1_identical_captions_give_identical_images(sampler):
    specs = [SampleSpec(7, 1.0, 9.0), SampleSpec(8, 1.0, 14.0)]
    images_0, images_1 = sampler.sample(CAT, CAT, specs, SIZE, SIZE)
    assert images_0.shape == (2, 3, SIZE, SIZE)
    assert torch.equal(images_0, images_1)  # same initial and ancestral noise in both branches
    assert (images_0[0] - images_0[1]).abs().max() > 1e-2  # different seeds differ


def test_p0_equals_independent_diffusers_generation(sampler, tiny_base):
    """With p = 0 both branches are plain 2-way CFG samples: diffusers' StableDiffusionPipeline from the
    same folder, same initial latents and the same generator must produce the same latents."""
    from diffusers import StableDiffusionPipeline

    specs = [SampleSpec(11, 0.0, 7.5), SampleSpec(12, 0.0, 12.0)]
    lat_in, lat_out = sampler.sample_latents(CAT, "a red car on the street", specs, SIZE, SIZE)
    lat_in_p1, lat_out_p1 = sampler.sample_latents(CAT, "a red car on the street",
                                                   [SampleSpec(sp.seed, 1.0, sp.cfg) for sp in specs], SIZE, SIZE)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_base.source, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    for k, spec in enumerate(specs):
        for caption, ours, ours_p1 in ((CAT, lat_in, lat_in_p1), ("a red car on the street", lat_out, lat_out_p1)):
            generator = torch.Generator().manual_seed(spec.seed)
            latents = torch.randn((1, 4, SIZE // 8, SIZE // 8), generator=generator)  # our first draw
            ref = pipe(caption, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=spec.cfg,
                       latents=latents, generator=generator, output_type="latent").images
            torch.testing.assert_close(ours[k:k + 1], ref, atol=1e-3, rtol=1e-3)
            if ours is lat_out:  # control changes the output branch by far more than the tolerance
                assert (ours_p1[k:k + 1] - ref).abs().max() > 0.1
            else:  # and never the input branch
                torch.testing.assert_close(ours_p1[k:k + 1], ref, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("mode", ["official", "google"])
def test_per_sample_p_in_one_batch_equals_separate_runs(cfg, tiny_base, mode):
    settings = synthesis_settings(steps=STEPS, mode=mode, google=google_settings(cfg, local_blend=True))
    sampler = PairSampler(tiny_base, settings)
    specs = [SampleSpec(21, 0.2, 8.0), SampleSpec(22, 0.6, 11.0), SampleSpec(23, 0.95, 14.0)]
    together = sampler.sample_latents(CAT, "a photo of a big dog", specs, SIZE, SIZE)
    for k, spec in enumerate(specs):
        alone = sampler.sample_latents(CAT, "a photo of a big dog", [spec], SIZE, SIZE)
        for branch in range(2):
            torch.testing.assert_close(together[branch][k:k + 1], alone[branch], **BATCH_TOL)
    assert (together[1][0] - together[1][2]).abs().max() > 1e-2


def test_samples_of_several_caption_pairs_in_one_batch_equal_per_pair_runs(tiny_base):
    """Several caption pairs share one UNet call (synthesis.pairs_per_batch): each sample must be what
    a batch of its own pair makes (its own captions, seed, p and guidance)."""
    sampler = PairSampler(tiny_base, synthesis_settings(steps=STEPS))
    pairs = [(CAT, DOG), ("a red car", "a blue car"), (CAT, DOG), ("a red car", "a red car at night")]
    specs = [SampleSpec(41, 0.3, 8.0), SampleSpec(42, 0.8, 12.0), SampleSpec(43, 0.5, 10.0), SampleSpec(44, 0.9, 9.0)]
    together = sampler.sample_rows(pairs, specs, SIZE, SIZE)
    for k, (pair, spec) in enumerate(zip(pairs, specs)):
        alone = sampler.sample_latents(*pair, [spec], SIZE, SIZE)
        for branch in range(2):
            torch.testing.assert_close(together[branch][k:k + 1], alone[branch], **BATCH_TOL)
    assert (together[1][0] - together[1][1]).abs().max() > 1e-2
    google = PairSampler(tiny_base, synthesis_settings(steps=STEPS, mode="google"))
    with pytest.raises(ValueError, match="one pair per batch"):
        google.sample_rows(pairs, specs, SIZE, SIZE)


def test_observer_sees_the_clean_latents_each_step_implies(tiny_base):
    """`observe` gets every step's x0 estimate for both branches. With the deterministic Euler sampler the
    last step lands on sigma = 0, where the latents are exactly the clean estimate of that step; and
    looking must not change what is made."""
    sampler = PairSampler(tiny_base, synthesis_settings(steps=STEPS, scheduler="euler"))
    specs = [SampleSpec(51, 0.5, 7.5), SampleSpec(52, 0.2, 11.0)]
    seen = []
    lat_in, lat_out = sampler.sample_rows([(CAT, DOG)] * 2, specs, SIZE, SIZE,
                                          observe=lambda step, x0: seen.append((step, x0.clone())))
    assert [step for step, _ in seen] == list(range(STEPS))
    assert seen[0][1].shape == (4, *lat_in.shape[1:])
    torch.testing.assert_close(seen[-1][1], torch.cat([lat_in, lat_out]), atol=1e-4, rtol=1e-4)
    assert (seen[0][1] - seen[-1][1]).abs().max() > 1e-2  # early estimates are not the final latents
    unobserved = sampler.sample_rows([(CAT, DOG)] * 2, specs, SIZE, SIZE)
    assert torch.equal(unobserved[0], lat_in) and torch.equal(unobserved[1], lat_out)


def test_caption_switch_keeps_the_branches_equal_until_the_switch(tiny_base):
    """With caption_switch = k / STEPS the output branch is denoised with the input caption for k steps: its
    clean estimates equal the input branch's exactly up to step k - 1 (shared noise, same text), and
    differ from step k on; without the switch they differ from the first step. The input branch and the
    sample's noise are untouched by it."""
    k, specs = 3, [SampleSpec(61, 0.5, 7.5)]
    runs = {}
    for switch in (0.0, k / STEPS):
        sampler = PairSampler(tiny_base, synthesis_settings(steps=STEPS, caption_switch=switch))
        seen = []
        final = sampler.sample_rows([(CAT, DOG)], specs, SIZE, SIZE, observe=lambda step, x0: seen.append(x0.clone()))
        runs[switch] = (final, [(x0[0] - x0[1]).abs().max().item() for x0 in seen])
    (plain_in, plain_out), plain_gap = runs[0.0]
    (sw_in, sw_out), sw_gap = runs[k / STEPS]
    assert plain_gap[0] > 1e-3                      # different captions: the branches part at once
    assert sw_gap[:k] == [0.0] * k and min(sw_gap[k:]) > 1e-3
    assert torch.equal(sw_in, plain_in)             # the input branch does not see the switch
    assert (sw_out - plain_out).abs().max() > 1e-2  # the edited image does


def test_caption_switch_is_bounded():
    cfg = compose(["synthesis.caption_switch=1.0"])
    with pytest.raises(Ip2pError, match="caption_switch"):
        settings_from_config(cfg)


@pytest.mark.parametrize("scheduler", ["euler_ancestral", "dpmpp_2m"])
def test_early_look_drops_samples_mid_way_and_keeps_the_rest_unchanged(tiny_base, scheduler):
    """A sample kept by the early look ends as it would without the look (its noise, p, guidance and a
    multistep solver's stored rows go on with it); dropped samples cost only the steps up to the look."""
    sampler = PairSampler(tiny_base, synthesis_settings(steps=STEPS, scheduler=scheduler))
    pairs = [(CAT, DOG), ("a red car", "a blue car"), (CAT, DOG), ("a red car", "a red car at night")]
    specs = [SampleSpec(61, 0.3, 8.0), SampleSpec(62, 0.8, 12.0), SampleSpec(63, 0.5, 10.0), SampleSpec(64, 0.9, 9.0)]
    seen = []
    full_in, full_out = sampler.sample_rows(pairs, specs, SIZE, SIZE, observe=lambda step, x0: seen.append(x0.clone()))
    looked = []

    def keep(x0):
        looked.append(x0)
        return torch.tensor([True, False, False, True])

    calls = []
    with unet_calls(sampler, calls):
        lat_in, lat_out, kept = sampler.sample_rows_with_look(pairs, specs, SIZE, SIZE, look_step=2, keep=keep)
    assert kept.tolist() == [0, 3]
    torch.testing.assert_close(looked[0], seen[2])  # the look sees step 2's clean estimate of every sample
    torch.testing.assert_close(lat_in, full_in[[0, 3]], **BATCH_TOL)
    torch.testing.assert_close(lat_out, full_out[[0, 3]], **BATCH_TOL)
    assert calls == [4 * 4] * 3 + [4 * 2] * (STEPS - 3)  # 4 rows per sample: two branches, cond and uncond
    everything = sampler.sample_rows_with_look(pairs, specs, SIZE, SIZE, look_step=STEPS - 1,
                                               keep=lambda x0: torch.ones(4, dtype=torch.bool))
    torch.testing.assert_close(everything[0], full_in, **BATCH_TOL)
    none = sampler.sample_rows_with_look(pairs, specs, SIZE, SIZE, look_step=1, keep=lambda x0: torch.zeros(4, dtype=torch.bool))
    assert none[0].shape[0] == 0 and none[2].numel() == 0
    with pytest.raises(ValueError, match="look_step"):
        sampler.sample_rows_with_look(pairs, specs, SIZE, SIZE, look_step=STEPS, keep=keep)


class unet_calls:
    """Records the batch size of every UNet call of a sampler."""

    def __init__(self, sampler, calls):
        self.unet, self.calls = sampler.c.unet, calls

    def __enter__(self):
        self.handle = self.unet.register_forward_pre_hook(lambda module, args: self.calls.append(args[0].shape[0]))

    def __exit__(self, *exc):
        self.handle.remove()


def test_controlled_step_count_follows_p(tiny_base, monkeypatch):
    counts = []
    original = AttentionControl.begin_step

    def spy(self, step):
        original(self, step)
        counts.append(self.self_controlled.tolist())

    monkeypatch.setattr(AttentionControl, "begin_step", spy)
    PairSampler(tiny_base, synthesis_settings(steps=5)).sample_latents(
        CAT, DOG, [SampleSpec(1, 0.3, 8.0), SampleSpec(2, 1.0, 8.0)], SIZE, SIZE)
    per_sample = [sum(step[k] for step in counts) for k in range(2)]
    assert per_sample == [2, 4]  # p=0.3: i/4 < 0.3 -> i in {0, 1};  p=1: i in {0, 1, 2, 3}


def test_google_mode_input_branch_is_untouched_and_local_blend_extremes(cfg, tiny_base):
    specs = [SampleSpec(31, 0.5, 9.0)]
    caption_out = "a photo of a black dog"  # refine: different token counts
    official = PairSampler(tiny_base, synthesis_settings(steps=STEPS)).sample_latents(CAT, caption_out, specs, SIZE, SIZE)
    google = PairSampler(tiny_base, synthesis_settings(steps=STEPS, mode="google"))
    plain = google.sample_latents(CAT, caption_out, specs, SIZE, SIZE)
    torch.testing.assert_close(plain[0], official[0], atol=1e-4, rtol=1e-4)
    assert (plain[1] - official[1]).abs().max() > 1e-2
    # threshold above 1: the mask is empty, so the output branch is reset to the input branch every step
    google.settings.google = google_settings(cfg, local_blend=True, blend_threshold=1.1)
    nowhere = google.sample_latents(CAT, caption_out, specs, SIZE, SIZE)
    torch.testing.assert_close(nowhere[1], nowhere[0], atol=0, rtol=0)
    # threshold below 0: the mask covers everything, so blending changes nothing (the recorded layers
    # then attend through a materialised softmax instead of the fused kernel: rounding differs)
    google.settings.google = google_settings(cfg, local_blend=True, blend_threshold=-0.1)
    everywhere = google.sample_latents(CAT, caption_out, specs, SIZE, SIZE)
    torch.testing.assert_close(everywhere[1], plain[1], atol=1e-4, rtol=1e-4)


def test_local_blend_without_cross_edit_and_with_several_caption_pairs_in_a_batch(cfg, tiny_base):
    """LocalBlend places its mask from each sample's own changed words, so it works with cross=none (it
    once needed the cross-attention map and silently did nothing) and with caption pairs sharing a batch."""
    pairs = [(CAT, "a photo of a black dog"), (CAT, DOG)]
    specs = [SampleSpec(31, 0.5, 9.0), SampleSpec(32, 0.5, 9.0)]
    google = PairSampler(tiny_base, synthesis_settings(steps=STEPS, mode="google",
                                                        google=google_settings(cfg, cross="none")))
    plain_in, plain_out = google.sample_rows(pairs, specs, SIZE, SIZE)
    assert (plain_out - plain_in).abs().amax(dim=(1, 2, 3)).min() > 1e-2  # the captions differ: so do the images
    # an empty mask (threshold above 1) resets every sample's output branch to its input branch each step
    google.settings.google = google_settings(cfg, cross="none", local_blend=True, blend_threshold=1.1)
    nowhere_in, nowhere_out = google.sample_rows(pairs, specs, SIZE, SIZE)
    torch.testing.assert_close(nowhere_out, nowhere_in, atol=0, rtol=0)
    # a partial mask (the tiny model's random maps are nearly flat: a high threshold, no pooling): a
    # sample blends by its own words, whoever shares its batch
    google.settings.google = google_settings(cfg, cross="none", local_blend=True, blend_threshold=0.9, blend_pool=0)
    together = google.sample_rows(pairs, specs, SIZE, SIZE)
    for k in range(2):
        alone = google.sample_rows([pairs[k]], [specs[k]], SIZE, SIZE)
        torch.testing.assert_close(together[1][k:k + 1], alone[1], atol=1e-4, rtol=1e-4)
    partly = (together[1] - plain_out).abs().amax(dim=(1, 2, 3))
    assert partly.min() > 1e-3  # the blend changed each output ...
    assert (together[1] - together[0]).abs().amax(dim=(1, 2, 3)).min() > 1e-3  # ... without copying it whole


def test_draw_samples_is_seeded_per_pair_and_in_range():
    a = draw_samples(0, "pair-a", 50, (0.1, 0.9), (7.5, 15.0))
    assert a == draw_samples(0, "pair-a", 50, (0.1, 0.9), (7.5, 15.0))
    assert a[:10] == draw_samples(0, "pair-a", 10, (0.1, 0.9), (7.5, 15.0))  # prefix-stable
    assert len({s.seed for s in a}) == 50
    assert all(0.1 <= s.p <= 0.9 and 7.5 <= s.cfg <= 15.0 for s in a)
    assert {s.seed for s in a}.isdisjoint({s.seed for s in draw_samples(0, "pair-b", 50, (0.1, 0.9), (7.5, 15.0))})


# ---- the stage ----------------------------------------------------------------------------------


def write_instructions(path: Path, records: list) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def pair(pid, inp, out, edit="change it"):
    return {"id": pid, "caption_id": f"c-{pid}", "input": inp, "edit": edit, "output": out, "backend": "test"}


GOOD = [pair("p1", CAT, DOG), pair("p2", "a red car on the street", "a blue car on the street"),
        pair("p3", "a mountain lake", "a mountain lake at night"), pair("p4", "a house", "a house in snow")]


def stage_overrides(tmp: Path, instructions: Path, out: str = "candidates", **extra) -> list[str]:
    base = {"synthesis.input": instructions, "synthesis.out_dir": tmp / out, "paths.reports": tmp / f"reports-{out}",
            "synthesis.samples_per_pair": 3, "synthesis.batch_size": 2, "synthesis.steps": 3,
            "synthesis.resolution": SIZE}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def run_stage(cfg_overrides, cache_dir):
    from ip2p.config import compose
    from ip2p.synthesis.run import run

    cfg = compose(["device=cpu", "progress=false", f"paths.cache={cache_dir}", *cfg_overrides])
    return json.loads(run(cfg).read_text())


def folder_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_stage_writes_pairs_and_counts_rejections(tmp_path, cache_dir):
    long_caption = " ".join(["word"] * 80)
    instructions = write_instructions(tmp_path / "instructions.jsonl", GOOD[:2] + [
        pair("p1", "duplicate", "duplicate id"), pair("long", long_caption, "short"), pair("empty", "  ", "x"),
        pair("noedit", "a", "b", edit=""), {"id": "broken", "input": "only"}, "{not json", pair("../x", "a", "b"),
    ])
    report = run_stage(stage_overrides(tmp_path, instructions), cache_dir)
    assert report["rejected"] == {"caption_over_77_tokens": 1, "duplicate_pair_id": 1, "empty_caption": 1,
                                  "empty_instruction": 1, "malformed_json": 1, "malformed_record": 1,
                                  "unsafe_pair_id": 1}
    assert report["records_out"] == 2 and report["records_in"] == 9 and report["candidates_written"] == 6
    out = tmp_path / "candidates"
    assert sorted(p.name for p in out.iterdir()) == [RECIPE_FILE, "p1", "p2"]
    assert json.loads((out / "p1" / "prompt.json").read_text()) == {"input": CAT, "edit": "change it", "output": DOG}
    meta = [json.loads(line) for line in (out / "p1" / "metadata.jsonl").read_text().splitlines()]
    expected_specs = draw_samples(0, "p1", 3, (0.1, 0.9), (7.5, 15.0))
    assert [(m["seed"], m["p"], m["cfg"]) for m in meta] == [(s.seed, s.p, s.cfg) for s in expected_specs]
    assert all(m["input"] == CAT and m["output"] == DOG and m["edit"] == "change it" and m["pair_id"] == "p1"
               and m["id"] == f"p1-{m['seed']}" for m in meta)
    for m in meta:
        assert (out / "p1" / f"{m['seed']}_0.png").is_file() and (out / "p1" / f"{m['seed']}_1.png").is_file()
    # a second run is a no-op that reports the pairs as done
    again = run_stage(stage_overrides(tmp_path, instructions), cache_dir)
    assert again["pairs_done_before"] == 2 and again["pairs_written"] == 0


def test_shards_partition_the_pairs_and_equal_an_unsharded_run(tmp_path, cache_dir):
    from ip2p.io import shard_of

    instructions = write_instructions(tmp_path / "instructions.jsonl", GOOD)
    run_stage(stage_overrides(tmp_path, instructions, out="all"), cache_dir)
    for index in range(2):
        report = run_stage(stage_overrides(tmp_path, instructions, out="sharded") +
                           [f"shard.index={index}", "shard.count=2"], cache_dir)
        assert report["records_in"] == sum(shard_of(p["id"], 2) == index for p in GOOD)
        assert (tmp_path / f"reports-sharded/synthesize.shard-{index:05d}-of-00002.json").is_file()
    assert folder_bytes(tmp_path / "sharded") == folder_bytes(tmp_path / "all")


def test_pairs_per_batch_writes_the_same_pair_folders(tmp_path, cache_dir):
    """Candidates of three caption pairs per UNet call: the same folders, metadata and (within PNG
    rounding of fp noise) the same images as one pair per call; google mode with cross-attention edits
    refuses it in one line."""
    instructions = write_instructions(tmp_path / "instructions.jsonl", [
        pair(f"p{k}", f"a photo of a cat number {k}", f"a photo of a dog number {k}") for k in range(4)])
    one = run_stage(stage_overrides(tmp_path, instructions, out="one"), cache_dir)
    three = run_stage(stage_overrides(tmp_path, instructions, out="three", **{"synthesis.pairs_per_batch": 3}), cache_dir)
    assert three["pairs_per_batch"] == 3 and three["records_out"] == one["records_out"] == 4
    a, b = folder_bytes(tmp_path / "one"), folder_bytes(tmp_path / "three")
    assert a.keys() == b.keys() and len(a) == 1 + 4 * (3 + 3 * 2)  # recipe; prompt, metadata, drawn, 3 x 2 images
    for name in a:
        if name.endswith(".png"):
            x = np.asarray(Image.open(io.BytesIO(a[name])), dtype=np.int16)
            y = np.asarray(Image.open(io.BytesIO(b[name])), dtype=np.int16)
            assert np.abs(x - y).max() <= 2, name
        else:
            assert a[name] == b[name], name
    with pytest.raises(Ip2pError, match="pairs_per_batch"):
        run_stage(stage_overrides(tmp_path, instructions, out="google", **{
            "synthesis.pairs_per_batch": 2, "synthesis.attention.mode": "google"}), cache_dir)


def test_early_drop_scores_and_drops(tmp_path, cache_dir, tiny_clip):
    from PIL import Image

    from ip2p.scoring.clip import ClipScorer

    instructions = write_instructions(tmp_path / "instructions.jsonl", GOOD[:1])
    keep_all = ["synthesis.early_drop.enabled=true"] + [f"synthesis.early_drop.thresholds.{k}=-1" for k in ("sim_image", "sim_dir", "sim_0", "sim_1")]
    report = run_stage(stage_overrides(tmp_path, instructions, out="kept") + keep_all, cache_dir)
    assert report["candidates_written"] == 3 and report["candidates_dropped_early"] == 0
    folder = tmp_path / "kept" / "p1"
    scores = [json.loads(line) for line in (folder / "scores.jsonl").read_text().splitlines()]
    scorer = ClipScorer(tiny_clip)
    for line in scores:
        ref = scorer.score([Image.open(folder / f"{line['seed']}_0.png").convert("RGB")],
                           [Image.open(folder / f"{line['seed']}_1.png").convert("RGB")], [CAT], [DOG])[0]
        for name, value in ref.items():
            assert line[name] == pytest.approx(value, abs=1e-5)
    drop_all = ["synthesis.early_drop.enabled=true", "synthesis.early_drop.thresholds.sim_image=2.0"]
    report = run_stage(stage_overrides(tmp_path, instructions, out="dropped") + drop_all, cache_dir)
    assert report["candidates_written"] == 0 and report["candidates_dropped_early"] == 3
    assert (tmp_path / "dropped" / "p1" / "metadata.jsonl").read_text() == ""


def test_early_drop_mid_way_stops_failing_candidates(tmp_path, cache_dir, tiny_clip):
    """synthesis.early_drop.look_at < 1: a look that passes everything writes what the look-free run
    writes; one that fails everything drops every candidate before the end."""
    instructions = write_instructions(tmp_path / "instructions.jsonl", GOOD[:1])
    open_final = ["synthesis.early_drop.enabled=true"] + [f"synthesis.early_drop.thresholds.{k}=-1" for k in ("sim_image", "sim_dir", "sim_0", "sim_1")]
    run_stage(stage_overrides(tmp_path, instructions, out="plain") + open_final, cache_dir)
    open_look = [f"synthesis.early_drop.look_thresholds.{k}=-1" for k in ("sim_image", "sim_dir", "sim_0", "sim_1")]
    report = run_stage(stage_overrides(tmp_path, instructions, out="looked") + open_final + open_look
                       + ["synthesis.early_drop.look_at=0.5"], cache_dir)
    assert report["candidates_written"] == 3 and report["candidates_dropped_early"] == 0
    looked, plain = folder_bytes(tmp_path / "looked"), folder_bytes(tmp_path / "plain")
    assert looked.pop(RECIPE_FILE) != plain.pop(RECIPE_FILE) and looked == plain  # the recipe names the look
    closed_look = open_look[:-1] + ["synthesis.early_drop.look_thresholds.sim_1=2.0"]
    report = run_stage(stage_overrides(tmp_path, instructions, out="stopped") + open_final + closed_look
                       + ["synthesis.early_drop.look_at=0.5"], cache_dir)
    assert report["candidates_written"] == 0 and report["candidates_dropped_early"] == 3
    with pytest.raises(Ip2pError, match="look_at < 1"):
        run_stage(stage_overrides(tmp_path, instructions, out="google") + open_final
                  + ["synthesis.early_drop.look_at=0.5", "synthesis.attention.mode=google"], cache_dir)


def test_more_samples_per_pair_tops_finished_pairs_up(tmp_path, cache_dir):
    """2 candidates a pair, then 3: the same folders, bytes and metadata as one run with 3; only the
    third sample of each pair is drawn. A top-up killed after it moved its images but before it replaced
    metadata.jsonl, or after metadata.jsonl but before drawn.json, ends the same when rerun."""
    instructions = write_instructions(tmp_path / "instructions.jsonl", GOOD[:2])
    run_stage(stage_overrides(tmp_path, instructions, out="direct"), cache_dir)
    run_stage(stage_overrides(tmp_path, instructions, out="grown", **{"synthesis.samples_per_pair": 2}), cache_dir)
    grown = tmp_path / "grown"
    assert len((grown / "p1" / "metadata.jsonl").read_text().splitlines()) == 2
    report = run_stage(stage_overrides(tmp_path, instructions, out="grown"), cache_dir)
    assert report["pairs_topped_up"] == 2 and report["candidates_written"] == 2 and report["pairs_written"] == 0
    assert report["records_out"] == 2
    assert folder_bytes(grown) == folder_bytes(tmp_path / "direct")
    assert json.loads((grown / "p1" / "drawn.json").read_text()) == {"samples_drawn": 3}

    # killed between the images and metadata.jsonl: the pair lists 2 candidates and holds a stray third
    run_stage(stage_overrides(tmp_path, instructions, out="killed", **{"synthesis.samples_per_pair": 2}), cache_dir)
    third = draw_samples(0, "p1", 3, (0.1, 0.9), (7.5, 15.0))[2].seed
    for k in (0, 1):
        shutil.copy(grown / "p1" / f"{third}_{k}.png", tmp_path / "killed" / "p1" / f"{third}_{k}.png")
    # and p2 killed after metadata.jsonl, before drawn.json
    shutil.copy(grown / "p2" / "metadata.jsonl", tmp_path / "killed" / "p2" / "metadata.jsonl")
    third2 = draw_samples(0, "p2", 3, (0.1, 0.9), (7.5, 15.0))[2].seed
    for k in (0, 1):
        shutil.copy(grown / "p2" / f"{third2}_{k}.png", tmp_path / "killed" / "p2" / f"{third2}_{k}.png")
    report = run_stage(stage_overrides(tmp_path, instructions, out="killed"), cache_dir)
    assert report["pairs_topped_up"] == 1 and report["pairs_done_before"] == 1 and report["candidates_written"] == 1
    assert {k: v for k, v in folder_bytes(tmp_path / "killed").items() if k != "p2/drawn.json"} == \
        {k: v for k, v in folder_bytes(grown).items() if k != "p2/drawn.json"}


def test_early_dropped_samples_count_as_drawn(tmp_path, cache_dir, tiny_clip):
    """A pair whose candidates were all dropped early is finished: a rerun draws nothing again."""
    instructions = write_instructions(tmp_path / "instructions.jsonl", GOOD[:1])
    drop_all = ["synthesis.early_drop.enabled=true", "synthesis.early_drop.thresholds.sim_image=2.0"]
    run_stage(stage_overrides(tmp_path, instructions, out="dropped") + drop_all, cache_dir)
    assert json.loads((tmp_path / "dropped" / "p1" / "drawn.json").read_text()) == {"samples_drawn": 3}
    again = run_stage(stage_overrides(tmp_path, instructions, out="dropped") + drop_all, cache_dir)
    assert again["pairs_done_before"] == 1 and again["candidates_dropped_early"] == 0


def test_another_recipe_in_the_same_folder_is_refused_and_a_changed_caption_pair_redone(tmp_path, cache_dir):
    instructions = write_instructions(tmp_path / "instructions.jsonl", GOOD[:2])
    run_stage(stage_overrides(tmp_path, instructions), cache_dir)
    before = folder_bytes(tmp_path / "candidates")
    with pytest.raises(Ip2pError, match="another recipe") as err:
        run_stage(stage_overrides(tmp_path, instructions, **{"synthesis.steps": 4, "synthesis.cfg_max": 9.0}), cache_dir)
    assert "synthesis.cfg_max, synthesis.steps" in str(err.value) and "\n" not in str(err.value)
    assert folder_bytes(tmp_path / "candidates") == before
    # batching is not part of the recipe
    again = run_stage(stage_overrides(tmp_path, instructions, **{"synthesis.batch_size": 1}), cache_dir)
    assert again["pairs_done_before"] == 2
    # p2 now stands for another caption pair: its folder is redone, p1 is kept
    changed = [GOOD[0], pair("p2", "a green bird", "a yellow bird")]
    instructions = write_instructions(tmp_path / "instructions.jsonl", changed)
    report = run_stage(stage_overrides(tmp_path, instructions), cache_dir)
    assert report["pairs_redone"] == 1 and report["pairs_written"] == 1 and report["pairs_done_before"] == 1
    fresh = write_instructions(tmp_path / "fresh.jsonl", changed)
    run_stage(stage_overrides(tmp_path, fresh, out="fresh"), cache_dir)
    assert folder_bytes(tmp_path / "candidates") == folder_bytes(tmp_path / "fresh")
    # a finished folder that cannot be read is named, not deleted
    (tmp_path / "candidates" / "p1" / "metadata.jsonl").unlink()
    with pytest.raises(Ip2pError, match=r"pair folder '.*p1' is unreadable \(FileNotFoundError\)"):
        run_stage(stage_overrides(tmp_path, instructions), cache_dir)
    assert (tmp_path / "candidates" / "p1" / "prompt.json").is_file()


@pytest.mark.slow
def test_kill_and_resume_equals_an_uninterrupted_run(tmp_path, cache_dir):
    records = [pair(f"k{i}", f"a photo of a cat number {i}", f"a photo of a dog number {i}") for i in range(6)]
    instructions = write_instructions(tmp_path / "instructions.jsonl", records)
    env = {**os.environ, "IP2P_CACHE": str(cache_dir), "HF_HUB_OFFLINE": "1"}

    def command(out):
        overrides = stage_overrides(tmp_path, instructions, out=out, **{"synthesis.steps": 6})
        return [sys.executable, "-m", "ip2p.cli", "synthesize", "device=cpu", "progress=false",
                f"paths.cache={cache_dir}", f"hydra.run.dir={tmp_path / 'hydra' / out}", *overrides]

    subprocess.run(command("full"), check=True, env=env, cwd=tmp_path, capture_output=True)

    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen(command("killed"), env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        done = [p for p in killed_dir.glob("*") if p.is_dir() and not p.name.startswith(".")] if killed_dir.exists() else []
        if len(done) >= 2 or proc.poll() is not None:
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = sorted(p.name for p in killed_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert 2 <= len(finished) < len(records), "the run must be killed part way"
    for name in finished:  # a finished pair is complete: prompt, metadata and all six images
        assert len(list((killed_dir / name).glob("*.png"))) == 6
        assert len((killed_dir / name / "metadata.jsonl").read_text().splitlines()) == 3

    subprocess.run(command("killed"), check=True, env=env, cwd=tmp_path, capture_output=True)
    assert not any(p.name.startswith(TEMP_PREFIX) for p in killed_dir.iterdir())
    assert folder_bytes(killed_dir) == folder_bytes(tmp_path / "full")
    report = json.loads((tmp_path / "reports-killed" / "synthesize.json").read_text())
    assert report["pairs_done_before"] == len(finished) and report["records_out"] == len(records)


def test_sampler_with_more_model_calls_than_steps_is_refused(tmp_path, cache_dir):
    """The step rules count UNet calls as steps: a sampler that calls the UNet more often than
    `steps` times (Heun: 2 per step) would copy attention for a different
    fraction than p. The stage refuses it in one line before writing anything."""
    from diffusers import HeunDiscreteScheduler

    heun = HeunDiscreteScheduler()
    heun.set_timesteps(3)
    assert len(heun.timesteps) != 3  # the premise: more calls than steps

    from ip2p.errors import Ip2pError

    instructions = write_instructions(tmp_path / "instructions.jsonl", GOOD[:1])
    with pytest.raises(Ip2pError, match="one model call per step") as err:
        run_stage(stage_overrides(tmp_path, instructions, **{"synthesis.scheduler": "heun"}), cache_dir)
    assert "\n" not in str(err.value)
    assert not any((tmp_path / "candidates").glob("p*"))


def test_pairs_can_be_decoded_by_another_vae(tmp_path, cache_dir, tiny_base):
    """synthesis.vae (the original decodes with SD's ft-MSE VAE): the same latents, decoded by that VAE;
    a pipeline folder's vae/ or a VAE folder both load; a folder without one is a one-line error."""
    import numpy as np
    from PIL import Image

    from ip2p.errors import Ip2pError
    from ip2p.io.images import tensor_to_pil
    from ip2p.models.instruct_pix2pix import InstructPix2Pix
    from ip2p.models.loader import load_vae

    other = type(tiny_base.vae).from_config(tiny_base.vae.config)
    other.load_state_dict(tiny_base.vae.state_dict())
    with torch.no_grad():
        other.decoder.conv_out.bias.add_(0.3)                      # a visibly different decoder
    other.save_pretrained(tmp_path / "vae-ft")
    instructions = write_instructions(tmp_path / "instructions.jsonl", GOOD[:1])
    run_stage(stage_overrides(tmp_path, instructions, out="base-vae", **{"synthesis.samples_per_pair": 1}), cache_dir)
    run_stage(stage_overrides(tmp_path, instructions, out="other-vae", **{"synthesis.samples_per_pair": 1,
                                                                          "synthesis.vae": tmp_path / "vae-ft"}), cache_dir)
    meta = json.loads((tmp_path / "other-vae" / "p1" / "metadata.jsonl").read_text().splitlines()[0])
    read = lambda folder, k: np.asarray(Image.open(tmp_path / folder / "p1" / f"{meta['seed']}_{k}.png"), dtype=int)  # noqa: E731

    # the same latents by hand, decoded with the other VAE
    spec = SampleSpec(meta["seed"], meta["p"], meta["cfg"])
    sampler = PairSampler(tiny_base, synthesis_settings(steps=3))
    lat_in, lat_out = sampler.sample_latents(CAT, DOG, [spec], SIZE, SIZE)
    import dataclasses

    decoder = InstructPix2Pix(dataclasses.replace(tiny_base, vae=load_vae(str(tmp_path / "vae-ft"))))
    expected = [np.asarray(tensor_to_pil(decoder.decode(lat))[0], dtype=int) for lat in (lat_in, lat_out)]
    for k in (0, 1):
        assert np.abs(read("other-vae", k) - expected[k]).max() <= 1
        assert np.abs(read("other-vae", k) - read("base-vae", k)).mean() > 5
    # a pipeline folder's vae/ loads too; a folder without a VAE is one line
    assert load_vae(str(tiny_base.source)).config.latent_channels == tiny_base.vae.config.latent_channels
    with pytest.raises(Ip2pError, match="holds no VAE"):
        load_vae(str(tmp_path))


def test_the_progress_bar_total_is_the_shards_share_of_the_input_lines(tmp_path):
    from omegaconf import OmegaConf

    from ip2p.synthesis.run import expected_pairs

    path = tmp_path / "instructions.jsonl"
    path.write_text("".join(f'{{"id": "p{i}"}}\n' for i in range(10)))
    cfg = OmegaConf.create({"synthesis": {"input": str(path)}, "shard": {"count": 1}})
    assert expected_pairs(cfg) == 10
    cfg.shard.count = 4
    assert expected_pairs(cfg) == round(10 / 4)
    cfg.synthesis.input = str(tmp_path / "missing.jsonl")
    assert expected_pairs(cfg) is None


def test_no_caption_pair_to_synthesize_stops_the_chain(tmp_path, cache_dir):
    """An empty or unusable instructions file used to exit 0 with an empty candidates folder."""
    from ip2p.errors import Ip2pError

    empty = tmp_path / "instructions.jsonl"
    empty.write_text("")
    with pytest.raises(Ip2pError, match=r"^synthesize: no caption pairs to synthesize from '.*instructions.jsonl' "
                                        r"\(0 records in\)$"):
        run_stage(stage_overrides(tmp_path, empty), cache_dir)
    bad = write_instructions(tmp_path / "bad.jsonl", [pair("e", "  ", "x"), "{not json"])
    with pytest.raises(Ip2pError, match=r"no caption pairs to synthesize from .* \(2 records in; rejected: "):
        run_stage(stage_overrides(tmp_path, bad), cache_dir)
    assert not list((tmp_path / "candidates").iterdir()) and not (tmp_path / "reports-candidates").exists()


def test_a_full_disk_names_the_image_being_written(tmp_path, cache_dir, tiny_base):  # the preset built before
    """Synthesis named no file when the disk refused a write; now the one line names the image."""
    from conftest import file_size_limit

    from ip2p.errors import one_line

    instructions = write_instructions(tmp_path / "instructions.jsonl", GOOD[:1])
    with file_size_limit(4000), pytest.raises(OSError) as raised:  # the recipe file fits, an image does not
        run_stage(stage_overrides(tmp_path, instructions), cache_dir)
    line = one_line(raised.value)
    assert line.startswith(f"file too large while writing '{tmp_path / 'candidates'}/") and line.endswith("_0.png'")
    assert [p.name for p in (tmp_path / "candidates").rglob("*") if p.is_file()] == [RECIPE_FILE]  # no torn file
