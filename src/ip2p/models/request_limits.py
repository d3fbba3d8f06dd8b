"""What one edit request may ask for: conf/app's `limits`, which the served model carries too
(register.serve.limits). The web app (ip2p.editing.service) and the MLflow model
(ip2p.tracking.pyfunc_model) check their requests against the same bounds, here."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

MB = 2 ** 20  # as the app's upload limit ("20mb" to Gradio) counts


@dataclass(frozen=True)
class Limits:
    """conf/app: limits. num_images bounds the images one request makes (the app's variants, the
    served model's rows)."""

    max_input_pixels: int
    max_instruction_chars: int
    steps: tuple[int, int]
    text_guidance: tuple[float, float]
    image_guidance: tuple[float, float]
    num_images: tuple[int, int]
    seed: tuple[int, int]
    max_edit_area: float  # the edit's pixels at most this x resolution^2 (edit.max_edit_area)
    max_upload_mb: float | None = None  # the app leaves this to Gradio; the served model checks it

    @classmethod
    def from_config(cls, c: Mapping[str, Any]) -> "Limits":
        return cls(int(c["max_input_pixels"]), int(c["max_instruction_chars"]),
                   *(tuple(c[k]) for k in ("steps", "text_guidance", "image_guidance", "num_images", "seed")),
                   float(c["max_edit_area"]), float(c["max_upload_mb"]) if "max_upload_mb" in c else None)


def out_of_range(name: str, value: float | None, bounds: tuple[float, float]) -> str | None:
    """'<name> must be between low and high (got value)', or None when it is within."""
    low, high = bounds
    if value is None or not math.isfinite(value) or not low <= value <= high:
        return f"{name} must be between {_number(low)} and {_number(high)} (got {value})"
    return None


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"  # a seed bound of 2147483647, not 2.14748e+09
