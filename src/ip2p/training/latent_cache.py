"""Cached latents: each training row encoded once, so no training step runs the VAE or the text encoder.

Per row of a Parquet split, stored in one safetensors file (memory-mapped when read):
    edited_mean, edited_logvar  [N, C, h, w]  the VAE posterior of the edited image (the target is a
                                              fresh sample mean + exp(logvar / 2) * noise at every visit,
                                              drawn from the step's generator, as the uncached path does)
    input_mode                  [N, C, h, w]  the posterior mode of the input image (the condition)
    *_flip                                    the same for the horizontally mirrored images (flip: true).
                                              Mirroring latents is not exact (the VAE is not equivariant),
                                              so the mirrored images are encoded too.
    text_index [N] -> texts [U, L, D]         the text encoder's output for each distinct instruction
Rows must be square images (then the only augmentation at resize_min = resize_max = resolution is the
flip); anything else trains from images.

The cache folder is named by a key over the dataset's files (names, sizes, modification times), the
VAE and text encoder (configs and a checksum of their weights), the resolution, the flip and the
storage dtype: a changed dataset or model builds a new cache instead of reading a stale one.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ip2p.errors import Ip2pError
from ip2p.io.atomic import build_once
from ip2p.io.images import decode_dataset_image, pil_to_tensor, resize_short_side

log = logging.getLogger(__name__)

CACHE_VERSION = 1
FILE = "latents.safetensors"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _weights_checksum(module: torch.nn.Module) -> list[float]:
    with torch.no_grad():
        return [round(float(p.double().sum()), 6) for p in module.parameters()]


def cache_key(dataset_dir: str | Path, split: str, components, resolution: int, flip: bool, dtype: str) -> str:
    files = sorted((Path(dataset_dir) / split).glob("*.parquet"))
    parts = {
        "version": CACHE_VERSION, "split": split, "resolution": int(resolution), "flip": bool(flip), "dtype": dtype,
        "files": [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files],
        "vae": [dict(components.vae.config), _weights_checksum(components.vae.encoder),
                _weights_checksum(components.vae.quant_conv) if components.vae.quant_conv is not None else []],
        "text_encoder": [components.text_encoder.config.to_dict(), _weights_checksum(components.text_encoder)],
        "tokenizer_max_length": int(components.tokenizer.model_max_length),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


class NotSquareError(Ip2pError):
    """A row whose images are not square: it would need random crops, which a cache cannot hold."""


def square_at(img, resolution: int, row_id: str, what: str):
    """The image as training sees it at resize_min = resize_max = resolution: only square inputs have
    no random crop left."""
    if img.width != img.height:
        raise NotSquareError(f"cached latents need square images (row '{row_id}' has a {img.width}x{img.height} "
                        f"{what}); set train.data.cache_latents=false")
    return resize_short_side(img, resolution)


@torch.no_grad()
def encode_rows(table, components, resolution: int, flip: bool, batch_size: int, dtype: torch.dtype,
                progress: bool) -> dict[str, torch.Tensor]:
    """Every row of a split (a `datasets` table with undecoded images) -> the cache's tensors."""
    from PIL import Image

    vae, device = components.vae, components.vae.device
    tok = components.tokenizer
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("edited_mean", "edited_logvar", "input_mode")}
    if flip:
        out.update({f"{k}_flip": [] for k in ("edited_mean", "edited_logvar", "input_mode")})
    prompts: dict[str, int] = {}
    text_index = []
    n = len(table)
    bar = tqdm(total=n, desc="caching latents", unit="row", disable=not progress)
    for start in range(0, n, batch_size):
        rows = table[start:start + batch_size]
        inputs, editeds = [], []
        for row_id, a, b, prompt in zip(rows["id"], rows["input_image"], rows["edited_image"], rows["edit_prompt"]):
            inputs.append(square_at(decode_dataset_image(a, "input_image", str(row_id)), resolution, str(row_id), "input_image"))
            editeds.append(square_at(decode_dataset_image(b, "edited_image", str(row_id)), resolution, str(row_id), "edited_image"))
            text_index.append(prompts.setdefault(str(prompt), len(prompts)))
        views = [("", inputs, editeds)]
        if flip:
            mirror = Image.Transpose.FLIP_LEFT_RIGHT
            views.append(("_flip", [i.transpose(mirror) for i in inputs], [e.transpose(mirror) for e in editeds]))
        for suffix, ins, eds in views:
            posterior = vae.encode(pil_to_tensor(eds).to(device, vae.dtype)).latent_dist
            out[f"edited_mean{suffix}"].append(posterior.mean.to(dtype).cpu())
            out[f"edited_logvar{suffix}"].append(posterior.logvar.to(dtype).cpu())
            out[f"input_mode{suffix}"].append(vae.encode(pil_to_tensor(ins).to(device, vae.dtype)).latent_dist.mode()
                                              .to(dtype).cpu())
        bar.update(len(inputs))
    bar.close()
    tensors = {k: torch.cat(v) for k, v in out.items()}
    texts = list(prompts)
    embeds = []
    for start in range(0, len(texts), batch_size):
        ids = tok(texts[start:start + batch_size], padding="max_length", max_length=tok.model_max_length,
                  truncation=True, return_tensors="pt").input_ids.to(components.text_encoder.device)
        embeds.append(components.text_encoder(ids)[0].to(dtype).cpu())
    tensors["texts"] = torch.cat(embeds)
    tensors["text_index"] = torch.tensor(text_index, dtype=torch.long)
    return tensors


def build_latent_cache(root: str | Path, dataset_dir: str | Path, split: str, table, components, resolution: int,
                       flip: bool, batch_size: int, dtype: str, progress: bool) -> Path:
    """The split's cache folder under root (built once; a complete one is reused)."""
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise Ip2pError(f"train.data.cache_dtype must be one of {', '.join(DTYPES)} (got '{dtype}')")
    key = cache_key(dataset_dir, split, components, resolution, flip, dtype)
    folder = Path(root).expanduser() / f"{split}-{key}"

    def build(tmp: Path) -> None:
        log.info("caching the %s split's latents (%d rows) in %s", split, len(table), folder)
        tensors = encode_rows(table, components, resolution, flip, batch_size, DTYPES[dtype], progress)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / FILE))
        (tmp / "cache.json").write_text(json.dumps({"rows": len(table), "flip": flip, "resolution": resolution,
                                                    "dtype": dtype, "dataset": str(dataset_dir), "split": split}))

    return build_once(folder, build)


class LatentCache:
    """Read side: row i (optionally mirrored) -> float32 tensors, from the memory-mapped file."""

    def __init__(self, folder: str | Path):
        self.path = str(Path(folder) / FILE)
        self._file = None
        self.keys = set(self.file.keys())
        self.text_index = self.file.get_tensor("text_index")
        self.flip = "edited_mean_flip" in self.keys

    @property
    def file(self):
        """The memory-mapped file, opened once per process (DataLoader workers open their own)."""
        if self._file is None:
            from safetensors import safe_open

            self._file = safe_open(self.path, framework="pt")
        return self._file

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_file": None}

    def __len__(self) -> int:
        return len(self.text_index)

    def _row(self, name: str, i: int) -> torch.Tensor:
        return self.file.get_slice(name)[i:i + 1][0].float()

    def row(self, i: int, flipped: bool) -> dict[str, torch.Tensor]:
        if flipped and not self.flip:
            raise Ip2pError("this latent cache was built without mirrored images (flip: false)")
        s = "_flip" if flipped else ""
        return {"latent_mean": self._row(f"edited_mean{s}", i), "latent_logvar": self._row(f"edited_logvar{s}", i),
                "condition": self._row(f"input_mode{s}", i),
                "text_embeds": self._row("texts", int(self.text_index[i]))}
