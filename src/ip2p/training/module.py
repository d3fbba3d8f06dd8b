"""The InstructPix2Pix LightningModule: only the UNet trains; VAE and text encoder are frozen.

One training example (docs/method.md section 3):
    target    = VAE(edited).latent_dist.sample() * scaling_factor     (what the UNet learns to denoise)
    condition = VAE(input).latent_dist.mode()                         (NOT scaled: the released model's convention)
    text      = CLIP text encoder(instruction)
    conditioning dropout, one draw r ~ U[0, 1) per example:
        r < p: drop text only;  p <= r < 2p: drop both;  2p <= r < 3p: drop image only
    (dropped text = embedding of "", dropped image = zero latent), so the model also learns the
    unconditional predictions that classifier-free guidance needs at sampling time.
    Optional copy rows (train.copy_rows = q, 0 in the paper): a second draw s ~ U[0, 1) per example; where
    s < q the example becomes (input, "", input): no instruction, the image kept, the target the input's
    own latent. The image-only prediction then means "keep the image", and every step shows the UNet an
    exact copy, the thing generated pairs teach least cleanly.
    loss = || UNet([noisy target, condition], t, text) - (noise or velocity) ||^2
    (train.loss=huber: the pseudo-Huber loss of the same residual instead, `pseudo_huber`)
With train.data.cache_latents the posteriors and text states come precomputed (ip2p.training.latent_cache)
and the target is drawn from the cached posterior with the same generator draw.

Besides the validation loss, validation measures the copy (train.validation.copy_error): where a val pair
keeps its input (latent pixels whose edited latent lies within `tolerance` of the scaled input latent in
every channel), the mean squared error of the clean latent the UNet implies from the noised target at a
few fixed points of the schedule. An editor that redraws the scene has a large error there even when its
loss is low, and the error at the start of the schedule (pure noise) falls as it learns to copy.

Randomness (VAE sample, noise, timesteps, dropout) comes from a generator seeded by the batch's
stream position, never from global RNG state, so a resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from ip2p.config import first_line
from ip2p.errors import Ip2pError
from ip2p.io.stage import stable_seed
from ip2p.models.ema import ExponentialMovingAverage
from ip2p.models.loader import DiffusionComponents, weights_device
from ip2p.sampling.loop import predicted_clean


@dataclass
class TrainSettings:
    """The recipe knobs the module needs. No defaults of its own: conf/train/default.yaml is their one
    home, and ip2p.training.run.settings_from_config builds this from the composed config."""

    lr: float
    betas: tuple[float, float]
    weight_decay: float
    eps: float
    warmup_steps: int
    lr_schedule: str
    min_lr: float
    max_steps: int
    conditioning_dropout: float
    copy_rows: float         # share of examples turned into (input, "", input); 0: none (the paper)
    timestep_power: float
    conv_in_lr_scale: float  # conv_in (where the input image enters) learns at lr x this
    snr_gamma: float | None  # Min-SNR-gamma loss weights; None: every timestep weighs the same (the paper)
    loss: str                # mse (the paper) | huber (pseudo-Huber, per value)
    huber_c: float           # pseudo-Huber's c (at pure noise with the snr schedule)
    huber_schedule: str      # constant | snr (huber_c_per_example)
    ema_decay: float
    ema_warmup: bool
    gradient_checkpointing: bool
    seed: int
    grid: dict      # train.validation.grid: steps, text_guidance, image_guidance, scheduler, num_images
    copy_error: dict  # train.validation.copy_error: fractions (of the schedule), tolerance


# ---------------------------------------------------------------------------------------------------
# Pure pieces (tested on their own)
# ---------------------------------------------------------------------------------------------------

def conditioning_dropout_masks(r: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform draws r [B] -> (drop_text [B], drop_image [B]) booleans, the original's rule:
    r < p text only, p <= r < 2p both, 2p <= r < 3p image only, else keep both."""
    drop_text = r < 2 * p
    drop_image = (r >= p) & (r < 3 * p)
    return drop_text, drop_image


def apply_conditioning_dropout(text: torch.Tensor, condition: torch.Tensor, empty_text: torch.Tensor,
                               r: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """text [B, L, D] -> the "" embedding [1, L, D] where text is dropped; condition [B, C, h, w] -> zeros
    where the image is dropped."""
    drop_text, drop_image = conditioning_dropout_masks(r, p)
    text = torch.where(drop_text[:, None, None], empty_text.to(text.dtype), text)
    condition = condition * (~drop_image).to(condition.dtype)[:, None, None, None]
    return text, condition


def apply_copy_rows(target: torch.Tensor, text: torch.Tensor, condition: torch.Tensor, input_latent: torch.Tensor,
                    empty_text: torch.Tensor, scaling_factor: float, s: torch.Tensor,
                    q: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Copy rows: where s [B] < q the example becomes (input, "", input): target [B, 4, h, w] -> the input's
    latent `input_latent` (unscaled, as the UNet gets it) x scaling factor, text [B, L, D] -> the ""
    embedding, condition -> `input_latent` even where conditioning dropout zeroed it. Returns
    (target, text, condition)."""
    copy = s < q
    m = copy[:, None, None, None]
    return (torch.where(m, input_latent * scaling_factor, target),
            torch.where(copy[:, None, None], empty_text.to(text.dtype), text),
            torch.where(m, input_latent, condition))


@torch.no_grad()
def encode_pair(vae, edited: torch.Tensor, inp: torch.Tensor, generator: torch.Generator | None):
    """Images in [-1, 1] -> (target latents = sample x scaling factor, condition = posterior mode, unscaled)."""
    target = vae.encode(edited.to(vae.dtype)).latent_dist.sample(generator=generator) * vae.config.scaling_factor
    condition = vae.encode(inp.to(vae.dtype)).latent_dist.mode()
    return target, condition


def sample_cached_pair(batch: dict, generator: torch.Generator | None, device, scaling_factor: float):
    """Cached posteriors -> (target latents, condition), the same draw as encode_pair's
    `latent_dist.sample(generator)`: mean + exp(logvar / 2) * noise, noise of the latents' shape."""
    from diffusers.utils.torch_utils import randn_tensor

    mean = batch["latent_mean"].to(device)
    noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    target = (mean + torch.exp(0.5 * batch["latent_logvar"].to(device)) * noise) * scaling_factor
    return target, batch["condition"].to(device)


def kept_mask(condition: torch.Tensor, target: torch.Tensor, scaling_factor: float, tolerance: float) -> torch.Tensor:
    """[B, 1, h, w], 1.0 where the edited latent `target` (scaled) lies within `tolerance` of the input's
    latent `condition` (unscaled, as the UNet gets it) in every channel: the pixels the pair keeps."""
    return ((condition * scaling_factor - target).abs().amax(dim=1, keepdim=True) < tolerance).to(target.dtype)


def masked_mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of squared differences over the pixels `mask` [B, 1, h, w] marks, every channel; the number of
    values summed): a mean that a caller can pool over batches."""
    weights = mask.expand_as(a)
    return ((a - b) ** 2 * weights).sum(), weights.sum()


def copy_error_key(fraction: float) -> str:
    """The logged name of the copy error at `fraction` of the schedule, e.g. val/copy_error_1.00."""
    return f"val/copy_error_{fraction:.2f}"


def schedule_timestep(fraction: float, num_train_timesteps: int) -> int:
    """The training timestep at `fraction` of the schedule: 1.0 = the noisiest (T - 1), 0.0 = 0."""
    return int(round(fraction * (num_train_timesteps - 1)))


def ema_unet_from_state(state: dict, unet_config):
    """A standalone UNet with the EMA weights (`ema.model.*` of the LightningModule's state dict), e.g.
    gathered from sharded training (FSDP, DeepSpeed) where the wrapped copy cannot be called directly."""
    from diffusers import UNet2DConditionModel

    prefix = "ema.model."
    weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    unet = UNet2DConditionModel.from_config(unet_config)
    unet.load_state_dict(weights, strict=True)
    return unet.to(torch.float32).eval()


def unet_from_checkpoint(path: str | Path, unet_config) -> tuple[Any, int]:
    """(EMA UNet, optimizer step) of a checkpoint `ip2p train` saved (step-N.ckpt, last.ckpt): any saved
    step can be exported and judged, not only the last. Loaded with weights_only, never unpickling code."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise Ip2pError(f"training checkpoint not found: '{path}'")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as err:  # torch and zipfile raise many types for damaged or foreign files
        raise Ip2pError(f"cannot read training checkpoint '{path}': {first_line(err)}") from err
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not any(key.startswith("ema.model.") for key in state):
        raise Ip2pError(f"'{path}' is not a checkpoint of `ip2p train` (no EMA UNet weights 'ema.model.*')")
    try:
        unet = ema_unet_from_state(state, unet_config)
    except RuntimeError as err:  # another UNet size than the model's
        raise Ip2pError(f"'{path}' does not fit the model's UNet: {first_line(err)}") from err
    return unet, int(checkpoint.get("global_step", 0))


def is_sharded(strategy) -> bool:
    """Strategies whose modules cannot be called outside their own forward (parameters sharded)."""
    return type(strategy).__name__ in ("FSDPStrategy", "DeepSpeedStrategy")


def draw_timesteps(batch_size: int, num_train_timesteps: int, power: float, generator: torch.Generator | None,
                   device) -> torch.Tensor:
    """Training timesteps [B]: t = floor((1 - u^power) * T), u ~ U[0, 1). power 1 is uniform over 0..T-1 (the
    paper; drawn with randint, so the draws are the ones uniform training always made); power > 1 leans
    towards high noise, P(t >= T / 2) = 2^(-1 / power) (3: 79%), where the layout is decided and an
    editor must read its input image (T2I-Adapter's "cubic" sampling for structure conditions)."""
    if power <= 0:
        raise ValueError(f"timestep power must be positive (got {power})")
    if power == 1.0:
        return torch.randint(0, num_train_timesteps, (batch_size,), generator=generator, device=device)
    u = torch.rand(batch_size, generator=generator, device=device, dtype=torch.float64)
    t = torch.floor((1.0 - u ** power) * num_train_timesteps).long()
    return t.clamp_(0, num_train_timesteps - 1)


def min_snr_weights(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float,
                    prediction_type: str) -> torch.Tensor:
    """Per-example loss weights [B] of Min-SNR-gamma (Hang et al. 2023), SNR(t) = a_t / (1 - a_t) with
    a_t = alphas_cumprod[t]. The weight turns either objective into an x0 loss whose weight is capped at
    gamma:
        epsilon:       w = min(SNR, gamma) / SNR
        v_prediction:  w = min(SNR, gamma) / (SNR + 1)
    so that the low-noise steps, whose targets x_t nearly gives away, stop dominating the gradient."""
    if gamma <= 0:
        raise ValueError(f"snr_gamma must be positive (got {gamma})")
    a = alphas_cumprod.to(device=timesteps.device, dtype=torch.float64)[timesteps]
    snr = a / (1.0 - a)
    capped = snr.clamp(max=gamma)
    if prediction_type == "epsilon":
        return (capped / snr).float()
    if prediction_type == "v_prediction":
        return (capped / (snr + 1.0)).float()
    raise ValueError(f"Min-SNR weights need prediction_type epsilon or v_prediction (got '{prediction_type}')")


def huber_c_per_example(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, c: float, schedule: str) -> torch.Tensor:
    """Pseudo-Huber's c for each example [B]. constant: c. snr (Khrapov et al. 2024): with the noise-to-signal
    ratio sigma_t = sqrt((1 - a_t) / a_t),
        c(t) = (1 - c) / (1 + sigma_t)^2 + c,
    about 1 at low noise (there the loss is the squared error) and c at pure noise (sigma infinite under a
    zero-terminal-SNR schedule), where the target is least determined by x_t and outlying pairs pull most."""
    if schedule == "constant":
        return torch.full(timesteps.shape, float(c), device=timesteps.device)
    if schedule != "snr":
        raise ValueError(f"huber_schedule must be constant or snr (got '{schedule}')")
    a = alphas_cumprod.to(device=timesteps.device, dtype=torch.float64)[timesteps]
    sigma = ((1.0 - a) / a).sqrt()   # inf where a = 0: c(t) = c there
    return ((1.0 - c) / (1.0 + sigma) ** 2 + c).float()


def pseudo_huber(prediction: torch.Tensor, objective: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Per-example pseudo-Huber loss [B], the mean over values of 2c (sqrt(r^2 + c^2) - c), r = prediction -
    objective and c [B] per example. The factor 2c makes it r^2 for |r| << c (the squared error's scale) and
    2c|r| for |r| >> c."""
    c = c.view(-1, *([1] * (prediction.dim() - 1)))
    r = prediction.float() - objective.float()
    return (2 * c * ((r ** 2 + c ** 2).sqrt() - c)).mean(dim=tuple(range(1, prediction.dim())))


def lr_factor(step: int, warmup_steps: int, schedule: str = "constant", max_steps: int = 0,
              min_ratio: float = 0.0) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based): a linear warmup over
    `warmup_steps`, then constant (the paper) or half a cosine from 1 down to `min_ratio` at `max_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise Ip2pError(f"train.lr_schedule must be constant or cosine (got '{schedule}')")
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------------
# LightningModule
# ---------------------------------------------------------------------------------------------------

class InstructPix2PixModule(pl.LightningModule):
    """`components` come from the model preset with an 8-channel UNet (see ip2p.training.run)."""

    def __init__(self, components: DiffusionComponents, settings: TrainSettings):
        super().__init__()
        from diffusers import DDPMScheduler

        latent_channels = components.vae.config.latent_channels
        if components.unet.config.in_channels != 2 * latent_channels:
            raise Ip2pError(f"the UNet has {components.unet.config.in_channels} input channels; training an "
                            f"editor needs {2 * latent_channels} (noisy latent + input-image latent)")
        self.settings = settings
        self.unet = components.unet.train().requires_grad_(True)
        self.ema = ExponentialMovingAverage(self.unet, settings.ema_decay, settings.ema_warmup)
        if settings.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        # Frozen parts live in a plain dataclass, not as submodules: they stay out of checkpoints and
        # out of the optimizer, and are moved to the training device on first use.
        self.frozen = components
        for module in (components.vae, components.text_encoder):
            module.eval().requires_grad_(False)
        # add_noise / get_velocity / prediction_type from the checkpoint's own noise schedule.
        self.noise_scheduler = DDPMScheduler.from_config(components.scheduler.config)
        self.prediction_type = self.noise_scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise Ip2pError(f"unsupported prediction_type '{self.prediction_type}' (epsilon or v_prediction)")
        self._empty_text: torch.Tensor | None = None
        self.last_loss: float | None = None
        self.validated_at_step: int | None = None  # the same on every rank (decides the final validation)

    # -- frozen encoders ----------------------------------------------------------------------------

    def _frozen_to_device(self) -> None:
        for module in (self.frozen.vae, self.frozen.text_encoder):
            if weights_device(module) != self.device:  # asked every step: not diffusers' slow .device
                module.to(self.device)

    @torch.no_grad()
    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B, 77] -> CLIP hidden states [B, 77, D]."""
        self._frozen_to_device()
        return self.frozen.text_encoder(input_ids.to(self.device))[0]

    def empty_text(self) -> torch.Tensor:
        """The embedding of "" [1, 77, D] (what dropped text is replaced with); computed once per device."""
        if self._empty_text is None or self._empty_text.device != self.device:
            tok = self.frozen.tokenizer
            ids = tok([""], padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids
            self._empty_text = self.encode_text(ids)
        return self._empty_text

    # -- the objective ------------------------------------------------------------------------------

    def batch_generator(self, purpose: str, key: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(stable_seed(self.settings.seed, purpose, int(key)))

    def diffusion_loss(self, batch: dict, generator: torch.Generator, dropout: float,
                       timestep_power: float = 1.0, snr_gamma: float | None = None,
                       latents: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                       copy_rows: float = 0.0, loss: str = "mse", huber_c: float = 0.1,
                       huber_schedule: str = "snr") -> torch.Tensor:
        """The UNet's loss on one batch (mean squared error, or pseudo-Huber with loss="huber"); draws in a
        fixed order from `generator`.
        `latents`: what pair_latents(batch, generator) already drew (validation shares them with copy_errors)."""
        target_latents, condition, text = latents if latents is not None else self.pair_latents(batch, generator)
        batch_size = target_latents.shape[0]
        noise = torch.randn(target_latents.shape, generator=generator, device=self.device,
                            dtype=target_latents.dtype)
        timesteps = draw_timesteps(batch_size, self.noise_scheduler.config.num_train_timesteps, timestep_power,
                                   generator, self.device)
        input_latent = condition
        if dropout > 0:
            r = torch.rand(batch_size, generator=generator, device=self.device)
            text, condition = apply_conditioning_dropout(text, condition, self.empty_text(), r, dropout)
        if copy_rows > 0:   # drawn after the paper's draws, so that copy_rows = 0 trains exactly as before
            s = torch.rand(batch_size, generator=generator, device=self.device)
            target_latents, text, condition = apply_copy_rows(target_latents, text, condition, input_latent,
                                                              self.empty_text(),
                                                              self.frozen.vae.config.scaling_factor, s, copy_rows)
        noisy = self.noise_scheduler.add_noise(target_latents, noise, timesteps)
        if self.prediction_type == "epsilon":
            objective = noise
        else:
            objective = self.noise_scheduler.get_velocity(target_latents, noise, timesteps)
        model_input = torch.cat([noisy, condition], dim=1)
        prediction = self.unet(model_input, timesteps, encoder_hidden_states=text).sample
        if loss == "mse" and snr_gamma is None:   # the paper: one mean over every value
            return F.mse_loss(prediction.float(), objective.float(), reduction="mean")
        if loss == "huber":
            c = huber_c_per_example(self.noise_scheduler.alphas_cumprod, timesteps, huber_c, huber_schedule)
            per_example = pseudo_huber(prediction, objective, c)
        else:
            per_example = F.mse_loss(prediction.float(), objective.float(), reduction="none").mean(dim=(1, 2, 3))
        if snr_gamma is None:
            return per_example.mean()
        weights = min_snr_weights(self.noise_scheduler.alphas_cumprod, timesteps, snr_gamma, self.prediction_type)
        return (weights * per_example).mean()

    def pair_latents(self, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(target latents [B, 4, h, w] scaled, condition [B, 4, h, w] unscaled, text states [B, L, D])."""
        self._frozen_to_device()
        if "latent_mean" in batch:  # cached latents (ip2p.training.latent_cache): no VAE, no text encoder
            target_latents, condition = sample_cached_pair(batch, generator, self.device,
                                                           self.frozen.vae.config.scaling_factor)
            return target_latents, condition, batch["text_embeds"].to(self.device)
        text = self.encode_text(batch["input_ids"])
        target_latents, condition = encode_pair(self.frozen.vae, batch["edited"].to(self.device),
                                                batch["input"].to(self.device), generator)
        return target_latents, condition, text

    @torch.no_grad()
    def copy_errors(self, latents: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                    generator: torch.Generator) -> dict[float, tuple[torch.Tensor, torch.Tensor]]:
        """fraction -> (sum, count) of the squared error of the implied clean latent over the kept pixels
        (module docstring) of a batch's pair_latents, one noise draw from `generator` for every fraction."""
        c = self.settings.copy_error
        target, condition, text = latents
        kept = kept_mask(condition, target, self.frozen.vae.config.scaling_factor, float(c["tolerance"]))
        noise = torch.randn(target.shape, generator=generator, device=self.device, dtype=target.dtype)
        out = {}
        for fraction in c["fractions"]:
            t = schedule_timestep(float(fraction), self.noise_scheduler.config.num_train_timesteps)
            timesteps = torch.full((target.shape[0],), t, device=self.device, dtype=torch.long)
            noisy = self.noise_scheduler.add_noise(target, noise, timesteps)
            output = self.unet(torch.cat([noisy, condition], dim=1), timesteps, encoder_hidden_states=text).sample
            clean = predicted_clean(noisy, output.to(noisy.dtype), self.noise_scheduler.alphas_cumprod[t].to(self.device),
                                    self.prediction_type)
            out[float(fraction)] = masked_mse(clean.float(), target.float(), kept)
        return out

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        generator = self.batch_generator("train-step", batch["position"][0])
        loss = self.diffusion_loss(batch, generator, self.settings.conditioning_dropout, self.settings.timestep_power,
                                   self.settings.snr_gamma, copy_rows=self.settings.copy_rows,
                                   loss=self.settings.loss, huber_c=self.settings.huber_c,
                                   huber_schedule=self.settings.huber_schedule)
        self.last_loss = float(loss.detach())
        batch_size = len(batch["id"])
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=batch_size)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False,
                 batch_size=batch_size)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        # The same noise and (uniform) timesteps at every evaluation: val losses are comparable across steps
        # and across recipes.
        generator = self.batch_generator("val-step", batch["index"][0])
        latents = self.pair_latents(batch, generator)   # encoded once, for the loss and the copy error
        loss = self.diffusion_loss(batch, generator, dropout=0.0, latents=latents)
        self.log("val/loss", loss, on_step=False, on_epoch=True, sync_dist=True, batch_size=len(batch["id"]))
        copies = self.copy_errors(latents, self.batch_generator("val-copy", batch["index"][0])) \
            if self.settings.copy_error["fractions"] else {}
        for fraction, (total, count) in copies.items():
            sums = self._copy_sums.setdefault(fraction, [0.0, 0.0])
            sums[0] += float(total)
            sums[1] += float(count)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._copy_sums: dict[float, list[float]] = {}

    def on_validation_epoch_end(self) -> None:
        self.validated_at_step = int(self.global_step)
        # pooled over every kept value of the epoch (and of every rank), not a mean of batch means
        for fraction, (total, count) in sorted(self._copy_sums.items(), reverse=True):
            pooled = self.all_gather(torch.tensor([total, count], dtype=torch.float64)).reshape(-1, 2).sum(0)
            value = float(pooled[0] / pooled[1]) if pooled[1] > 0 else float("nan")
            self.log(copy_error_key(fraction), value, on_step=False, on_epoch=True)

    def configure_optimizers(self):
        s = self.settings
        params = [p for p in self.unet.parameters() if p.requires_grad]  # this order: what old checkpoints' states follow
        if s.conv_in_lr_scale != 1:
            first = [p for n, p in self.unet.named_parameters() if p.requires_grad and n.startswith("conv_in.")]
            rest = [p for n, p in self.unet.named_parameters() if p.requires_grad and not n.startswith("conv_in.")]
            params = [{"params": rest}, {"params": first, "lr": s.lr * s.conv_in_lr_scale}]
        optimizer = torch.optim.AdamW(params, lr=s.lr, betas=tuple(s.betas), weight_decay=s.weight_decay, eps=s.eps)
        min_ratio = s.min_lr / s.lr
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, s.warmup_steps, s.lr_schedule, s.max_steps, min_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step", "frequency": 1}}

    # -- sampling with the EMA weights --------------------------------------------------------------

    @torch.no_grad()
    def sample_edits(self, batch: dict, seed: int, ema_unet=None) -> torch.Tensor:
        """Edit `batch["input"]` by `batch["input_ids"]` with the EMA UNet (the editing sampler of
        ip2p.editing); returns images [B, 3, H, W] in [-1, 1]. `ema_unet`: a standalone copy of the EMA
        weights to use instead of the module's own (sharded strategies)."""
        from ip2p.models.instruct_pix2pix import InstructPix2Pix

        self._frozen_to_device()
        unet = self.ema.model if ema_unet is None else ema_unet.to(self.device)
        ema_parts = DiffusionComponents(unet=unet, vae=self.frozen.vae,
                                        text_encoder=self.frozen.text_encoder, tokenizer=self.frozen.tokenizer,
                                        scheduler=self.frozen.scheduler, source="ema")
        editor = InstructPix2Pix(ema_parts)
        was_training = unet.training
        unet.eval()
        try:
            g = self.settings.grid
            condition = editor.encode_condition(batch["input"].to(self.device))
            text = self.encode_text(batch["input_ids"]).to(editor.dtype)
            generator = torch.Generator(device=self.device).manual_seed(int(seed))
            latents = editor.sample(condition, text, self.empty_text().to(editor.dtype), float(g["text_guidance"]),
                                    float(g["image_guidance"]), int(g["steps"]), str(g["scheduler"]), generator,
                                    progress=False)
            return editor.decode(latents)
        finally:
            unet.train(was_training)
