"""Images: reading user files safely, resizing them the way the original InstructPix2Pix CLI did, and
converting batches between PIL / uint8 arrays and the [-1, 1] float tensors that VAEs take (the
diffusers convention)."""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ip2p.errors import Ip2pError
from ip2p.io.atomic import atomic_write_bytes


def load_image(path: str | Path, max_pixels: int) -> Image.Image:
    """Open any Pillow-readable image as 8-bit RGB, EXIF orientation applied."""
    path = Path(path)
    if not path.is_file():
        raise Ip2pError(f"input image not found: '{path}'")
    try:
        # Pillow's own decompression-bomb guard stays on (it warns above MAX_IMAGE_PIXELS and refuses at
        # twice that); ours, from config, refuses earlier with one clear line. The warning is ours to give.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
        with img:
            width, height = img.size
            if width * height > max_pixels:
                raise Ip2pError(f"input image '{path}' is {width}x{height} = {width * height} pixels, over the "
                                f"limit of {max_pixels} (edit.max_input_pixels)")
            img.load()
            img = ImageOps.exif_transpose(img)
    except Image.DecompressionBombError as err:
        raise Ip2pError(f"input image '{path}' is too large to decode safely ({err})") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise Ip2pError(f"cannot read image '{path}': not a readable image file ({type(err).__name__})") from err
    if img.width < 1 or img.height < 1:
        raise Ip2pError(f"input image '{path}' is empty ({img.width}x{img.height})")
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any mode to RGB: transparency goes onto white, 16/32-bit and float are scaled to 8 bit."""
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode.startswith("I") or img.mode == "F":
        # Wide integer / float greyscale: map the value range to 0..255. I;16 is 0..65535; for 32-bit
        # "I" and float "F" the range is the smallest usual one that holds the data (F: 0..1, then
        # 0..255, 0..65535), so a dark image stays dark instead of being stretched to its maximum.
        values = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else _value_range(float(values.max()), img.mode == "F")
        grey = np.clip(np.round(values / top * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    return img.convert("RGB")


def _value_range(largest: float, is_float: bool) -> float:
    for top in ((1.0,) if is_float else ()) + (255.0, 65535.0):
        if largest <= top:
            return top
    return largest


def edit_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """The original CLI's rule: scale so the long side is `resolution`, round the short side UP to a
    multiple of 64, then floor both sides to multiples of 64 (any aspect ratio is kept roughly).

    Computed with integers: the original's float version lands just below a multiple of 64 for some
    sizes and loses 64 px there (49x49 at 128 gave 64x64, 47x47 at 768 gave 704x704).
    """
    if width < 1 or height < 1 or resolution < 1:
        raise Ip2pError(f"cannot resize a {width}x{height} image for resolution {resolution}")
    long_side, short_side = max(width, height), min(width, height)
    # factor = new_short / short_side, with new_short = ceil(short_side * resolution / long_side / 64) * 64
    new_short = -(-short_side * resolution // (long_side * 64)) * 64
    new_w = width * new_short // (short_side * 64) * 64
    new_h = height * new_short // (short_side * 64) * 64
    return new_w, new_h


def check_edit_area(width: int, height: int, resolution: int, max_area: float, setting: str = "") -> tuple[int, int]:
    """`edit_size`, refused in one line when it holds more than max_area x resolution^2 pixels: the rule
    keeps 64 px on the short side, so an elongated input grows without bound (a 2000 x 8 strip edits at
    16000 x 64 at resolution 256, 31x the pixels asked for: minutes a step, or out of memory)."""
    size = edit_size(width, height, resolution)
    if size[0] * size[1] > max_area * resolution * resolution:
        named = f" ({setting})" if setting else ""
        raise Ip2pError(f"a {width}x{height} image would be edited at {size[0]}x{size[1]} px, more than "
                        f"{max_area:g} x {resolution}x{resolution}{named}: too elongated for resolution {resolution} "
                        "(crop it to a squarer shape)")
    return size


def resize_for_editing(img: Image.Image, resolution: int, max_area: float | None = None,
                       setting: str = "") -> Image.Image:
    """Resize and centre-crop (ImageOps.fit, LANCZOS) to `edit_size`; with `max_area`, an edit of more
    than max_area x resolution^2 pixels is refused (`check_edit_area`; `setting` names the bound)."""
    size = edit_size(img.width, img.height, resolution) if max_area is None else \
        check_edit_area(img.width, img.height, resolution, max_area, setting)
    if img.size == size:
        return img
    return ImageOps.fit(img, size, method=Image.Resampling.LANCZOS)


def resize_short_side(img: Image.Image, short: int, size_of: Image.Image | None = None) -> Image.Image:
    """Scale so the short side of `size_of` (default `img`) is `short` px; LANCZOS as the original."""
    ref = size_of or img
    scale = short / min(ref.width, ref.height)
    size = (max(short, round(ref.width * scale)), max(short, round(ref.height * scale)))
    return img if img.size == size else img.resize(size, Image.Resampling.LANCZOS)


def decode_dataset_image(value: Any, what: str, row_id: str) -> Image.Image:
    """A `datasets` Image value ({"bytes", "path"} or an already decoded PIL image) -> RGB."""
    try:
        if isinstance(value, Image.Image):
            return to_rgb(value)
        if isinstance(value, Mapping):
            if value.get("bytes"):
                with Image.open(io.BytesIO(value["bytes"])) as img:
                    img.load()
                    return to_rgb(img)
            if value.get("path"):
                with Image.open(value["path"]) as img:
                    img.load()
                    return to_rgb(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise Ip2pError(f"dataset row '{row_id}': cannot decode {what} ({type(err).__name__})") from err
    raise Ip2pError(f"dataset row '{row_id}': {what} holds no image")


def pil_to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """RGB images -> float tensor [B, 3, H, W] in [-1, 1] (the VAE's input range)."""
    arrays = [np.asarray(im, dtype=np.float32) / 255.0 for im in images]
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return batch * 2.0 - 1.0


def tensor_to_unit(images: torch.Tensor) -> torch.Tensor:
    """VAE output in [-1, 1] -> float [0, 1], the form compared before 8-bit quantisation."""
    return (images.float() / 2 + 0.5).clamp(0, 1)


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [-1, 1] -> 8-bit RGB images (rounded, as diffusers does)."""
    unit = tensor_to_unit(images).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray((im * 255).round().astype(np.uint8)) for im in unit]


def save_image_atomic(img: Image.Image, path: str | Path) -> Path:
    """Encode in memory, then write-and-rename: a crash never leaves a half-written image."""
    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise Ip2pError(f"cannot save '{path}': unknown image extension '{path.suffix}' (use .png, .jpg, .webp)")
    buffer = io.BytesIO()
    img.save(buffer, format=fmt)
    try:
        return atomic_write_bytes(path, buffer.getvalue())
    except OSError as err:
        raise Ip2pError(f"cannot write '{path}': {err.strerror or type(err).__name__}") from err


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """[B, H, W, 3] uint8 -> [B, 3, H, W] float in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] float in [-1, 1] (clamped) -> [B, H, W, 3] uint8, rounded to the nearest level."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
