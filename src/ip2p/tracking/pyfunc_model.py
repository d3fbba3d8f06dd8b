"""The editor as an MLflow pyfunc model: its artifact is the diffusers-layout export.

Request (pandas DataFrame or JSON `dataframe_split`), one row per edit:
  image (base64-encoded image file), instruction (str),
  optional: steps (int), text_guidance (float), image_guidance (float), seed (int)
Response, one row per request row: `image` (the edited image as base64 PNG) and `error`. A row that
cannot be edited (an unreadable image, an empty instruction, steps < 1) gets image null and a
one-line reason in `error`, and the other rows are still edited: one bad image must not cost a
batch, and the caller sees our reason instead of the server's generic message and stack trace.
"""

from __future__ import annotations

import base64
import binascii
import io

import mlflow.pyfunc
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema
from PIL import Image, UnidentifiedImageError

from ip2p.errors import Ip2pError
from ip2p.io.images import resize_for_editing, to_rgb
from ip2p.models.instruct_pix2pix import EditSettings, InstructPix2Pix
from ip2p.models.loader import load_diffusion

OPTIONAL_COLUMNS = {"steps": int, "text_guidance": float, "image_guidance": float, "seed": int}


def image_to_b64(img: Image.Image) -> str:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def b64_to_image(text: str) -> Image.Image:
    """A base64-encoded image file -> RGB; Ip2pError (one line) for anything else."""
    try:
        with Image.open(io.BytesIO(base64.b64decode(str(text), validate=True))) as img:
            img.load()
            return to_rgb(img)
    except (binascii.Error, UnidentifiedImageError, OSError, ValueError) as err:
        raise Ip2pError("`image` must be a base64-encoded image file (PNG, JPEG, ...)") from err


def signature():
    inputs = Schema([ColSpec("string", "image"), ColSpec("string", "instruction"),
                     ColSpec("long", "steps", required=False), ColSpec("double", "text_guidance", required=False),
                     ColSpec("double", "image_guidance", required=False), ColSpec("long", "seed", required=False)])
    return ModelSignature(inputs=inputs, outputs=Schema([ColSpec("string", "image", required=False),
                                                         ColSpec("string", "error", required=False)]))


def serve_settings(model_config: dict | None) -> dict:
    """The model's serving settings (register.serve, stored with the model when it was registered), with
    any key it lacks (a model registered before the key existed) taken from conf/register: every bound
    applies to every registered model."""
    settings = dict(model_config or {})
    missing = [k for k in SERVE_BOUNDS if k not in settings]
    if missing:
        from omegaconf import OmegaConf

        from ip2p.config import compose

        serve = OmegaConf.to_container(compose([]).register.serve, resolve=True)
        settings.update({k: serve[k] for k in missing})
    return settings


# register.serve keys that bound a request (conf/register/default.yaml)
SERVE_BOUNDS = ("max_edit_area",)


class InstructPix2PixModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        self.defaults = serve_settings(context.model_config)
        components = load_diffusion(context.artifacts["pipeline"], "editor", {"name": "registered"},
                                    "~/.cache/ip2p", "auto", "float32")
        self.editor = InstructPix2Pix(components)

    def read_row(self, row: pd.Series) -> tuple[Image.Image, str, dict]:
        """(input image, instruction, sampling settings) of one request row; Ip2pError says what is wrong."""
        d = self.defaults
        settings = dict(steps=d.get("steps", 20), text_guidance=d.get("text_guidance", 7.5),
                        image_guidance=d.get("image_guidance", 1.5), seed=d.get("seed", 0))
        for key, cast in OPTIONAL_COLUMNS.items():
            if key in row and pd.notna(row[key]):
                settings[key] = cast(row[key])
        if settings["steps"] < 1:
            raise Ip2pError(f"steps must be at least 1 (got {settings['steps']})")
        instruction = row.get("instruction")
        if not isinstance(instruction, str) or not instruction.strip():
            raise Ip2pError("`instruction` is empty")
        image = resize_for_editing(b64_to_image(row["image"]), int(d.get("resolution", 512)),
                                   float(d["max_edit_area"]), "max_edit_area")
        return image, instruction, settings

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        scheduler = self.defaults.get("scheduler", "euler_ancestral")
        images, errors = [], []
        for number, (_, row) in enumerate(model_input.iterrows()):
            try:
                image, instruction, settings = self.read_row(row)
            except Ip2pError as err:
                images.append(None)
                errors.append(f"row {number}: {err}")
                continue
            edited = self.editor.edit(image, instruction, EditSettings(scheduler=scheduler, progress=False,
                                                                       num_images=1, **settings))[0]
            images.append(image_to_b64(edited))
            errors.append(None)
        # object columns: a missing value stays None (JSON null), not the NaN of pandas' string dtype
        return pd.DataFrame({"image": pd.Series(images, dtype=object), "error": pd.Series(errors, dtype=object)})
