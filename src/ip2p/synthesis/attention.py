"""Prompt-to-Prompt attention control, as diffusers attention processors (`unet.set_attn_processor`).

Batch layout of every UNet call during synthesis, S samples of one caption pair, 4 branches:

    rows [0, S)    input-caption branch,  conditional   (IN_COND)
    rows [S, 2S)   output-caption branch, conditional   (OUT_COND)
    rows [2S, 3S)  input-caption branch,  unconditional (IN_UNCOND)
    rows [3S, 4S)  output-caption branch, unconditional (OUT_UNCOND)

Two modes:
  official  InstructPix2Pix's recipe: in every self-attention layer, the output branch uses the input
            branch's attention map (conditional and unconditional halves alike) for the first fraction
            p of the steps. softmax(Q_in K_in^T) V_out is the fused attention of (Q_in, K_in, V_out),
            so the map is never materialised.
  google    the original Prompt-to-Prompt: cross-attention maps of the output branch replaced
            (word swap) or refined (token alignment) from the input branch's for a fraction of the
            steps; self-attention maps copied on layers with few queries for the first fraction p;
            optional LocalBlend. Only the conditional half is edited, as in Google's code. Maps are
            materialised only in cross-attention layers, and only while they are edited or recorded.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ip2p.synthesis.p2p_alignment import TokenMap

BRANCHES = 4
IN_COND, OUT_COND, IN_UNCOND, OUT_UNCOND = range(BRANCHES)
MODES = ("official", "google")


def official_step_controlled(p: torch.Tensor, step: int, num_steps: int) -> torch.Tensor:
    """The official rule `p > i / (len(sigmas) - 2)`; k-diffusion has len(sigmas) = num_steps + 1, so
    step i is controlled while p > i / (num_steps - 1): the first fraction p of the steps."""
    if num_steps <= 1:
        return p > 0
    return p > step / (num_steps - 1)


def google_step_controlled(fraction: torch.Tensor, step: int, num_steps: int) -> torch.Tensor:
    """Google's rule: steps [0, int(fraction * num_steps)) are controlled."""
    return step < torch.floor(fraction * num_steps)


def branch_rows(controlled: torch.Tensor, pairs: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """Row index [4S] for a gather over the branch layout above: for each (src, dst) pair, the rows of
    branch dst of the controlled samples ([S] bool) read those of branch src; other rows read themselves."""
    samples = len(controlled)
    rows = torch.arange(BRANCHES * samples)
    for src, dst in pairs:
        dst_rows = torch.arange(dst * samples, (dst + 1) * samples)
        rows[dst_rows] = torch.where(controlled, torch.arange(src * samples, (src + 1) * samples), dst_rows)
    return rows


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """Fused attention on [B, heads, N, d] tensors."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False, scale=scale)


def copied_self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor, scale: float,
                          mask: torch.Tensor | None = None) -> torch.Tensor:
    """Self-attention where row r attends with the map of row rows[r]: softmax(Q_src K_src^T * scale) V_r,
    computed as fused attention of (Q_src, K_src, V_r); the map is never materialised."""
    return attention(q.index_select(0, rows), k.index_select(0, rows), v, scale, mask)


def map_grid(num_queries: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of a layer's query grid: the latent grid halved (rounding up) until it has num_queries cells."""
    h, w = latent_hw
    while h * w > num_queries:
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    if h * w != num_queries:
        raise ValueError(f"{num_queries} queries do not form a grid of a {latent_hw} latent")
    return h, w


def local_blend_mask(maps: torch.Tensor, threshold: float, pool: int) -> torch.Tensor:
    """maps [S, 1, H, W] (summed attention to the chosen words) -> bool mask [S, 1, H, W]: max-pooled,
    divided by each sample's peak, above `threshold`."""
    pooled = F.max_pool2d(maps, kernel_size=2 * pool + 1, stride=1, padding=pool)
    peak = pooled.amax(dim=(2, 3), keepdim=True).clamp_min(torch.finfo(maps.dtype).tiny)
    return pooled / peak > threshold


def word_weights(words: list[tuple[list[int], list[int]]]) -> torch.Tensor:
    """Per-sample (input positions, output positions) -> [2, S, tokens] float 0/1 selector."""
    tokens = 1 + max([i for pair in words for side in pair for i in side], default=0)
    weights = torch.zeros(2, len(words), tokens)
    for s, pair in enumerate(words):
        for side, positions in enumerate(pair):
            weights[side, s, list(positions)] = 1.0
    return weights


@dataclass
class GoogleSettings:
    """Google Prompt-to-Prompt options. No defaults of its own: synthesis.attention.google in
    conf/synthesis/default.yaml is their one home, and ip2p.synthesis.run.settings_from_config builds
    this from the composed config."""

    cross: str                     # auto | replace | refine | none
    cross_steps: float             # fraction of steps with edited cross-attention
    self_max_queries: int          # self-attention maps copied only on layers with <= this many queries
    local_blend: bool
    blend_threshold: float         # LocalBlend: mask where the changed words' attention > threshold x its peak
    blend_max_queries: int         # cross-attention layers that feed the LocalBlend mask
    blend_pool: int                # max-pool radius applied to the maps before thresholding


class AttentionControl:
    """Per-step state the processors read: which samples are controlled now, and how.

    p: [S] per-sample fraction of steps with copied self-attention (both modes).
    google: google mode's settings (required there; official mode reads none of them).
    token_map: google mode's cross-attention map (None: cross-attention untouched).
    blend_words: google mode with local_blend: per sample, the token positions that differ between its
        input and output caption (input positions, output positions); the LocalBlend mask is drawn
        where those words attend. Independent of token_map, so the blend also works with cross=none
        and with several caption pairs in one batch.
    """

    def __init__(self, mode: str, p: torch.Tensor, num_steps: int, google: GoogleSettings | None = None,
                 token_map: TokenMap | None = None, latent_hw: tuple[int, int] | None = None,
                 blend_words: list[tuple[list[int], list[int]]] | None = None):
        if mode not in MODES:
            raise ValueError(f"unknown attention mode '{mode}' (use one of {', '.join(MODES)})")
        if mode == "google" and google is None:
            raise ValueError("google mode needs its GoogleSettings (synthesis.attention.google)")
        self.mode = mode
        self.p = p.double().cpu()  # float64: the official rule compares Python floats
        self.num_steps = num_steps
        self.google = google
        self.token_map = token_map if mode == "google" else None
        self.latent_hw = latent_hw
        self.self_controlled = torch.zeros(len(p), dtype=torch.bool)
        self.cross_controlled = torch.zeros(len(p), dtype=torch.bool)
        blend = mode == "google" and self.google.local_blend
        if blend and blend_words is None:
            raise ValueError("local_blend needs the changed words of every sample (blend_words)")
        if blend and len(blend_words) != len(p):
            raise ValueError(f"blend_words for {len(blend_words)} samples, p for {len(p)}")
        # [2, S, tokens] 0/1: which words of each sample's input / output caption place its mask
        self.blend_words = word_weights(blend_words) if blend else None
        if self.blend_words is not None and not bool(self.blend_words.any()):
            self.blend_words = None  # identical captions: nothing to localise
        self.blend_maps: torch.Tensor | None = None  # [2, S, 1, H, W]: input words, output words
        self._self_rows = branch_rows(self.self_controlled, ())
        self._on_device: dict[str, torch.Tensor] = {}  # per-step tensors on the UNet's device
        self._constants: dict[str, torch.Tensor] = {}

    @property
    def num_samples(self) -> int:
        return len(self.p)

    @property
    def self_pairs(self) -> tuple[tuple[int, int], ...]:
        if self.mode == "official":  # both guidance halves, as the official code does
            return (IN_COND, OUT_COND), (IN_UNCOND, OUT_UNCOND)
        return ((IN_COND, OUT_COND),)  # Google edits the conditional half only

    def begin_step(self, step: int) -> None:
        if self.mode == "official":
            self.self_controlled = official_step_controlled(self.p, step, self.num_steps)
        else:
            self.self_controlled = google_step_controlled(self.p, step, self.num_steps)
            if self.token_map is not None:
                fraction = torch.full_like(self.p, float(self.google.cross_steps))
                self.cross_controlled = google_step_controlled(fraction, step, self.num_steps)
        self._self_rows = branch_rows(self.self_controlled, self.self_pairs)
        self._on_device = {}

    def _device(self, name: str, tensor: torch.Tensor, device: torch.device, per_step: bool = True) -> torch.Tensor:
        """`tensor` on `device`, copied once (per step, or for good with per_step=False): a pinned,
        non-blocking copy on CUDA, so that the attention layers never wait for the GPU (a pageable
        copy in every layer would stall each one)."""
        store = self._on_device if per_step else self._constants
        cached = store.get(name)
        if cached is None or cached.device != device:
            if device.type == "cuda":
                pinned = tensor.pin_memory()
                store[name + ".pinned"] = pinned  # kept alive while the copy may still run
                cached = pinned.to(device, non_blocking=True)
            else:
                cached = tensor.to(device)
            store[name] = cached
        return cached

    def _samples(self, batch: int) -> int:
        if batch != BRANCHES * self.num_samples:
            raise ValueError(f"attention control expects a batch of {BRANCHES} x {self.num_samples} rows, got {batch}")
        return self.num_samples

    def self_attention(self, attn, q, k, v, mask):
        self._samples(q.shape[0])
        small_enough = self.mode == "official" or q.shape[2] <= self.google.self_max_queries
        if not (small_enough and bool(self.self_controlled.any())):
            return attention(q, k, v, attn.scale, mask)
        return copied_self_attention(q, k, v, self._device("self_rows", self._self_rows, q.device), attn.scale, mask)

    def cross_attention(self, attn, q, k, v, mask):
        samples = self._samples(q.shape[0])
        edit = self.token_map is not None and bool(self.cross_controlled.any())
        record = self.blend_words is not None and q.shape[2] <= self.google.blend_max_queries
        if not (edit or record):
            return attention(q, k, v, attn.scale, mask)
        cond = slice(0, 2 * samples)
        uncond = slice(2 * samples, 4 * samples)
        logits = (q[cond].float() @ k[cond].float().transpose(-1, -2)) * attn.scale
        if mask is not None:
            logits = logits + mask[cond].float()
        probs_in, probs_out = logits.softmax(dim=-1).chunk(2)  # [S, heads, N, tokens] each
        if record:
            self._record(probs_in, probs_out)
        if edit:
            tm = self.token_map
            mapper = self._device("mapper", tm.mapper, q.device, per_step=False)
            alphas = self._device("alphas", tm.alphas.float(), q.device, per_step=False)
            edited = probs_in[..., mapper] * alphas + probs_out * (1 - alphas)
            controlled = self._device("cross", self.cross_controlled, q.device).view(-1, 1, 1, 1)
            probs_out = torch.where(controlled, edited, probs_out)
        out_cond = torch.cat([probs_in, probs_out]).to(v.dtype) @ v[cond]
        out_uncond = attention(q[uncond], k[uncond], v[uncond], attn.scale,
                               None if mask is None else mask[uncond])
        return torch.cat([out_cond, out_uncond])

    def _record(self, probs_in: torch.Tensor, probs_out: torch.Tensor) -> None:
        """Add this layer's attention to the changed words (mean over heads) to the LocalBlend maps."""
        h, w = map_grid(probs_in.shape[2], self.latent_hw)
        weights = self._device("blend_words", self.blend_words, probs_in.device, per_step=False)
        maps = []
        for probs, words in ((probs_in, weights[0]), (probs_out, weights[1])):
            tokens = min(probs.shape[-1], words.shape[-1])
            # attention of each query to the sample's own changed words, mean over heads: [S, N]
            m = torch.einsum("shnl,sl->sn", probs[..., :tokens], words[:, :tokens]) / probs.shape[1]
            m = m.view(-1, 1, h, w)
            maps.append(F.interpolate(m, size=self.latent_hw, mode="bilinear", align_corners=False))
        stacked = torch.stack(maps).float()
        self.blend_maps = stacked if self.blend_maps is None else self.blend_maps + stacked

    def blend(self, latents: torch.Tensor) -> torch.Tensor:
        """LocalBlend after a scheduler step: latents [2S, C, H, W] = [input branch, output branch].
        Outside the mask of the changed words, the output branch takes the input branch's latents."""
        if self.blend_words is None or self.blend_maps is None:
            return latents
        x_in, x_out = latents.chunk(2)
        g = self.google
        region = local_blend_mask(self.blend_maps[0], g.blend_threshold, g.blend_pool) | \
            local_blend_mask(self.blend_maps[1], g.blend_threshold, g.blend_pool)
        region = region.to(latents.device, latents.dtype)
        return torch.cat([x_in, x_in + region * (x_out - x_in)])


class P2PAttnProcessor:
    """Attention as diffusers' AttnProcessor2_0 computes it, with the map chosen by an AttentionControl."""

    def __init__(self, control: AttentionControl):
        self.control = control

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args, **kwargs) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        is_cross = encoder_hidden_states is not None
        batch, key_length, _ = (encoder_hidden_states if is_cross else hidden_states).shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, key_length, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        context = hidden_states
        if is_cross:
            context = attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states
        key = attn.to_k(context)
        value = attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        # [B, tokens, heads * d] -> [B, heads, tokens, d]
        query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if is_cross:
            out = self.control.cross_attention(attn, query, key, value, attention_mask)
        else:
            out = self.control.self_attention(attn, query, key, value, attention_mask)

        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))  # linear projection, dropout
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


@contextmanager
def attention_control(unet, control: AttentionControl):
    """Install P2P processors on every attention layer of `unet`; restore the previous ones after."""
    saved = dict(unet.attn_processors)
    unet.set_attn_processor(P2PAttnProcessor(control))
    try:
        yield control
    finally:
        unet.set_attn_processor(saved)
