"""The pair sampler: S samples (of one caption pair, or each with its own) in one batch -> S (input image,
edited image) pairs.

Per step ONE UNet call on 4 x S rows (layout in ip2p.synthesis.attention):
    [input cond | output cond | input uncond | output uncond]
followed by 2-way classifier-free guidance per caption, through the one loop `ip2p.sampling.denoise`.

Noise: sample s has its own generator, seeded by its seed. Its initial noise is drawn once and used by
both branches; its ancestral noise is drawn twice per step from two generators in the same state
(`PairedNoiseScheduler`), so both branches receive identical noise, and a sample's images depend on
its own seed only, never on what else shares the batch.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

from ip2p.io.stage import stable_seed
from ip2p.models.instruct_pix2pix import InstructPix2Pix
from ip2p.models.loader import DiffusionComponents, weights_device, weights_dtype
from ip2p.sampling import classifier_free_guidance, denoise, make_scheduler, predicted_clean
from ip2p.sampling.loop import unet_prediction
from ip2p.synthesis.attention import AttentionControl, GoogleSettings, attention_control
from ip2p.synthesis.p2p_alignment import AlignScores, TokenMap, refine_map, replace_map


# observe(step index, predicted clean latents [2S, C, h, w]) -> None
CleanObserver = Callable[[int, torch.Tensor], None]


@dataclass(frozen=True)
class SampleSpec:
    """One candidate: its seed (noise), self-attention fraction p and guidance scale."""

    seed: int
    p: float
    cfg: float


def draw_samples(global_seed: int, pair_id: str, count: int, p_range: tuple[float, float],
                 cfg_range: tuple[float, float]) -> list[SampleSpec]:
    """The k-th sample of a pair gets seed stable_seed(global_seed, pair_id, k) (re-hashed on the rare
    collision inside a pair); p ~ U[p_range] and cfg ~ U[cfg_range] come from that seed alone, so a
    candidate is reproducible from (seed, captions, config) and independent of every other record."""
    specs: list[SampleSpec] = []
    used: set[int] = set()
    for k in range(count):
        seed, attempt = stable_seed(global_seed, pair_id, k), 0
        while seed in used:
            attempt += 1
            seed = stable_seed(global_seed, pair_id, k, attempt)
        used.add(seed)
        u_p, u_cfg = np.random.default_rng(seed).random(2)
        specs.append(SampleSpec(seed, float(p_range[0] + u_p * (p_range[1] - p_range[0])),
                                float(cfg_range[0] + u_cfg * (cfg_range[1] - cfg_range[0]))))
    return specs


def _twin(generator: torch.Generator) -> torch.Generator:
    twin = torch.Generator(device=generator.device)
    twin.set_state(generator.get_state())
    return twin


class PairedNoiseScheduler:
    """A diffusers scheduler whose ancestral noise is shared by the two branches of each sample.

    The latents are [input branch (S), output branch (S)]. At each step the wrapped scheduler gets the
    generator list [g_0..g_{S-1}, twin(g_0)..twin(g_{S-1})] (diffusers' randn_tensor draws row r from
    generator r); a twin starts in its original's state, so rows s and S+s get the same draw and g_s
    advances exactly as in a plain single-sample run. `after_step` (LocalBlend) may edit the result.
    Everything else is the wrapped scheduler's.
    """

    def __init__(self, scheduler, generators: list[torch.Generator], after_step=None):
        self._inner = scheduler
        self._generators = generators
        self._after_step = after_step
        self._takes_generator = "generator" in inspect.signature(scheduler.step).parameters

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def step(self, model_output, timestep, sample, generator=None, return_dict=False):
        kwargs = {}
        if self._takes_generator:
            kwargs["generator"] = self._generators + [_twin(g) for g in self._generators]
        prev = self._inner.step(model_output, timestep, sample, return_dict=False, **kwargs)[0]
        if self._after_step is not None:
            prev = self._after_step(prev)
        return (prev,)


@dataclass
class SynthesisSettings:
    """How pairs are sampled. No defaults of its own: conf/synthesis/default.yaml is their one home, and
    ip2p.synthesis.run.settings_from_config builds this from the composed config."""

    steps: int
    scheduler: str
    mode: str               # official | google (see ip2p.synthesis.attention)
    caption_switch: float   # the output branch follows the input caption for this first fraction of the
                            # steps (both branches equal there), then its own: 0 = the paper
    google: GoogleSettings
    align: AlignScores
    progress: bool


@dataclass
class _Run:
    """The state of one batch of samples between two stretches of steps."""

    captions: list[tuple[str, str]]
    specs: list[SampleSpec]
    generators: list[torch.Generator]
    latents: torch.Tensor           # [2S, C, h, w]: input branch, output branch
    encoded: torch.Tensor           # [T, L, D]: each distinct caption once
    row_of: dict[str, int]
    empty: torch.Tensor
    token_map: TokenMap | None
    latent_hw: tuple[int, int]
    scheduler: object               # the diffusers scheduler, whose per-row history goes with its rows

    def subset(self, kept: list[int], latents: torch.Tensor) -> "_Run":
        """The kept samples only, at `latents` (all rows); a multistep solver's stored rows follow."""
        s = len(self.specs)
        rows = torch.tensor(kept + [k + s for k in kept], device=latents.device)
        keep_rows(self.scheduler, rows, 2 * s)
        return dataclasses.replace(self, captions=[self.captions[k] for k in kept], specs=[self.specs[k] for k in kept],
                                   generators=[self.generators[k] for k in kept], latents=latents.index_select(0, rows))


def keep_rows(scheduler, rows: torch.Tensor, batch: int) -> None:
    """Cut a scheduler's per-row state (4-D tensors of `batch` rows, alone or in lists: DPM-Solver's and
    UniPC's stored model outputs and samples) down to `rows`, in place."""
    def cut(value):
        if isinstance(value, torch.Tensor) and value.ndim == 4 and value.shape[0] == batch:
            return value.index_select(0, rows.to(value.device))
        if isinstance(value, list):
            return [cut(v) for v in value]
        return value

    for name, value in list(vars(scheduler).items()):
        setattr(scheduler, name, cut(value))


class PairSampler:
    """Holds the text-to-image components; every call is a pure function of its arguments."""

    def __init__(self, components: DiffusionComponents, settings: SynthesisSettings):
        self.c = components
        self.settings = settings
        self._text = InstructPix2Pix(components)  # text encoding and VAE decoding are shared with editing

    @property
    def device(self) -> torch.device:
        return weights_device(self.c.unet)

    @property
    def latent_scale(self) -> int:
        return 2 ** (len(self.c.vae.config.block_out_channels) - 1)

    def native_resolution(self) -> int:
        return int(self.c.unet.config.sample_size) * self.latent_scale

    def token_ids(self, caption: str) -> list[int]:
        """Token ids with BOS and EOS, not truncated (to measure a caption against the 77-token limit)."""
        return list(self.c.tokenizer(caption, truncation=False).input_ids)

    def token_map(self, input_caption: str, output_caption: str) -> TokenMap | None:
        """Google mode's cross-attention map for this pair; None in official mode or with cross=none."""
        how = self.settings.google.cross
        if self.settings.mode != "google" or how == "none":
            return None
        return self._map(input_caption, output_caption, how)

    def changed_words(self, input_caption: str, output_caption: str) -> tuple[list[int], list[int]]:
        """Token positions that differ between the two captions (input, output): where LocalBlend looks.
        Aligned as `cross` aligns them (auto when cross-attention is left alone)."""
        how = self.settings.google.cross
        token_map = self._map(input_caption, output_caption, "auto" if how == "none" else how)
        return token_map.changed_input, token_map.changed_output

    def _map(self, input_caption: str, output_caption: str, how: str) -> TokenMap:
        max_len = self.c.tokenizer.model_max_length
        # the ids the text encoder sees: truncated to max_len like encode_text (the stage rejects longer captions)
        x, y = (list(self.c.tokenizer(c, truncation=True, max_length=max_len).input_ids)
                for c in (input_caption, output_caption))
        if how == "replace" or (how == "auto" and len(x) == len(y)):
            if len(x) == len(y):
                return replace_map(x, y, max_len)
        return refine_map(x, y, max_len, self.settings.align)

    @torch.no_grad()
    def sample_latents(self, input_caption: str, output_caption: str, specs: list[SampleSpec],
                       height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Denoise S = len(specs) samples of one caption pair in one batch. Returns final latents
        (input branch, output branch), each [S, C, height/8, width/8]."""
        return self.sample_rows([(input_caption, output_caption)] * len(specs), specs, height, width)

    @torch.no_grad()
    def sample_rows(self, captions: list[tuple[str, str]], specs: list[SampleSpec], height: int, width: int,
                    observe: CleanObserver | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Denoise S samples in one batch, sample s with its own caption pair captions[s], so that the
        candidates of several caption pairs share one UNet call. A sample depends on its own seed and
        captions only, as in a batch of one pair (its self-attention copy is row to row). Google mode's
        cross-attention map belongs to one pair, so there every row must hold the same pair.
        `observe(step, x0)`, if given, sees after every step's guided prediction the clean latents it
        implies, [2S, C, h, w] (input branch, then output branch): what an early look at a candidate sees."""
        run = self._start(captions, specs, height, width)
        final = self._denoise(run, 0, self.settings.steps, observe)
        s = len(specs)
        return final[:s], final[s:]

    @torch.no_grad()
    def sample_rows_with_look(self, captions: list[tuple[str, str]], specs: list[SampleSpec], height: int,
                              width: int, look_step: int, keep: Callable[[torch.Tensor], torch.Tensor]
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`sample_rows` with one early look: after step `look_step` the clean latents of that step
        ([2S, C, h, w], input branch then output branch) go to `keep`, which answers a bool [S]; only the
        kept samples are denoised further, so a dropped candidate costs look_step + 1 steps, not all.
        Returns the final latents of the kept samples (input branch, output branch) and their indices
        into `specs`. A kept sample is what `sample_rows` makes of it: its noise generator, p, guidance
        and captions go on with it, and so do a multistep solver's stored rows."""
        if self.settings.mode != "official":
            raise ValueError("an early look mid-way needs the official attention mode")
        if not 0 <= look_step < self.settings.steps:
            raise ValueError(f"look_step must lie in [0, {self.settings.steps}) (got {look_step})")
        seen: dict[str, torch.Tensor] = {}
        run = self._start(captions, specs, height, width)
        latents = self._denoise(run, 0, look_step + 1, lambda step, x0: seen.update(x0=x0) if step == look_step else None)
        kept = torch.nonzero(torch.as_tensor(keep(seen["x0"]), dtype=torch.bool).cpu()).flatten()
        s, n = len(specs), len(kept)
        if n and look_step + 1 < self.settings.steps:
            run = run.subset(kept.tolist(), latents)
            latents = self._denoise(run, look_step + 1, self.settings.steps, None)
        else:  # nothing left to denoise: the kept rows as they are
            latents = latents.index_select(0, torch.cat([kept, kept + s]).to(latents.device))
        return latents[:n], latents[n:], kept

    def _start(self, captions: list[tuple[str, str]], specs: list[SampleSpec], height: int, width: int) -> "_Run":
        s = len(specs)
        if len(captions) != s:
            raise ValueError(f"{len(captions)} caption pairs for {s} samples")
        pairs = sorted(set(captions))
        token_map = self.token_map(*pairs[0])
        if len(pairs) > 1 and token_map is not None:
            raise ValueError("google mode edits cross-attention per caption pair: one pair per batch")
        unet = self.c.unet
        latent_hw = (height // self.latent_scale, width // self.latent_scale)
        generators = [torch.Generator("cpu").manual_seed(spec.seed) for spec in specs]
        noise = randn_tensor((s, unet.config.in_channels, *latent_hw), generator=generators,
                             device=self.device, dtype=weights_dtype(unet))
        texts = sorted({text for pair in pairs for text in pair})
        encoded = self._text.encode_text(texts)  # each distinct caption once: [T, L, D]
        row_of = {text: i for i, text in enumerate(texts)}
        return _Run(captions=list(captions), specs=list(specs), generators=generators,
                    latents=torch.cat([noise, noise]),  # [input branch, output branch]: same initial noise
                    encoded=encoded, row_of=row_of, empty=self._text.encode_text([""]), token_map=token_map,
                    latent_hw=latent_hw, scheduler=make_scheduler(self.settings.scheduler, self.c.scheduler.config))

    def _denoise(self, run: "_Run", first_step: int, stop_step: int, observe: CleanObserver | None) -> torch.Tensor:
        """Steps [first_step, stop_step) of `run` (its scheduler mid-run when first_step > 0)."""
        s, unet = len(run.specs), self.c.unet
        index = torch.tensor([run.row_of[a] for a, _ in run.captions] + [run.row_of[b] for _, b in run.captions],
                             device=run.encoded.device)
        text = torch.cat([run.encoded.index_select(0, index), run.empty.expand(2 * s, -1, -1)])
        # Before the switch both branches see the input caption: the edit starts from the input's layout.
        switch_steps = round(self.settings.caption_switch * self.settings.steps)
        text_early = torch.cat([text[:s], text[:s], text[2 * s:]])
        cfg = torch.tensor([spec.cfg for spec in run.specs], dtype=torch.float32).repeat(2).to(self.device)
        blend = self.settings.mode == "google" and self.settings.google.local_blend
        words = {pair: self.changed_words(*pair) for pair in set(run.captions)} if blend else {}
        control = AttentionControl(self.settings.mode, torch.tensor([spec.p for spec in run.specs]), self.settings.steps,
                                   self.settings.google, run.token_map, run.latent_hw,
                                   blend_words=[words[pair] for pair in run.captions] if blend else None)
        scheduler = PairedNoiseScheduler(run.scheduler, run.generators, after_step=control.blend)

        def predict_noise(model_input: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
            control.begin_step(step)
            eps = unet_prediction(unet, self.c.autocast, torch.cat([model_input, model_input]), t,
                                  text_early if step < switch_steps else text)
            eps_cond, eps_uncond = eps.chunk(2)  # each [input branch, output branch]
            guided = classifier_free_guidance(eps_cond, eps_uncond, cfg)
            if observe is not None:
                alpha_bar = scheduler.alphas_cumprod[int(round(float(t)))]
                observe(step, predicted_clean(model_input, guided, alpha_bar, scheduler.config.prediction_type))
            return guided

        with attention_control(unet, control):
            return denoise(scheduler, run.latents, predict_noise, self.settings.steps, generator=None,
                           progress=self.settings.progress, desc="synthesis", first_step=first_step,
                           stop_step=stop_step)

    @torch.no_grad()
    def decode_pairs(self, lat_in: torch.Tensor, lat_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images in [-1, 1], each [S, 3, H, W]: (input-caption images, output-caption images)."""
        images = self._text.decode(torch.cat([lat_in, lat_out]))
        return images[: len(lat_in)], images[len(lat_in):]

    @torch.no_grad()
    def sample(self, input_caption: str, output_caption: str, specs: list[SampleSpec],
               height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Images in [-1, 1], each [S, 3, height, width]: (input-caption images, output-caption images)."""
        return self.decode_pairs(*self.sample_latents(input_caption, output_caption, specs, height, width))
