"""The editor as an MLflow pyfunc model: its artifact is the diffusers-layout export.

Request (pandas DataFrame or JSON `dataframe_split`), one row per edit:
  image (base64-encoded image file), instruction (str),
  optional: steps (int), text_guidance (float), image_guidance (float), seed (int)
Response: one column `image`, the edited image as base64 PNG.
"""

from __future__ import annotations

import base64
import io

import mlflow.pyfunc
import pandas as pd
from PIL import Image

OPTIONAL_COLUMNS = {"steps": int, "text_guidance": float, "image_guidance": float, "seed": int}


def image_to_b64(img: Image.Image) -> str:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def b64_to_image(text: str) -> Image.Image:
    """A base64-encoded image file -> RGB; Ip2pError (one line) for anything else."""
    import binascii

    from PIL import UnidentifiedImageError

    from ip2p.io.images import to_rgb
    from ip2p.errors import Ip2pError

    try:
        with Image.open(io.BytesIO(base64.b64decode(str(text), validate=True))) as img:
            img.load()
            return to_rgb(img)
    except (binascii.Error, UnidentifiedImageError, OSError, ValueError) as err:
        raise Ip2pError("`image` must be a base64-encoded image file (PNG, JPEG, ...)") from err


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    inputs = Schema([ColSpec("string", "image"), ColSpec("string", "instruction"),
                     ColSpec("long", "steps", required=False), ColSpec("double", "text_guidance", required=False),
                     ColSpec("double", "image_guidance", required=False), ColSpec("long", "seed", required=False)])
    return ModelSignature(inputs=inputs, outputs=Schema([ColSpec("string", "image")]))


class InstructPix2PixModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from ip2p.models.instruct_pix2pix import InstructPix2Pix
        from ip2p.models.loader import load_diffusion

        self.defaults = dict(context.model_config or {})
        components = load_diffusion(context.artifacts["pipeline"], "editor", {"name": "registered"},
                                    "~/.cache/ip2p", "auto", "float32")
        self.editor = InstructPix2Pix(components)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from ip2p.io.images import resize_for_editing
        from ip2p.models.instruct_pix2pix import EditSettings

        from ip2p.errors import Ip2pError

        d = self.defaults
        out = []
        for number, (_, row) in enumerate(model_input.iterrows()):
            settings = dict(steps=d.get("steps", 20), text_guidance=d.get("text_guidance", 7.5),
                            image_guidance=d.get("image_guidance", 1.5), seed=d.get("seed", 0))
            for key, cast in OPTIONAL_COLUMNS.items():
                if key in row and pd.notna(row[key]):
                    settings[key] = cast(row[key])
            if settings["steps"] < 1:
                raise Ip2pError(f"row {number}: steps must be at least 1 (got {settings['steps']})")
            try:
                image = resize_for_editing(b64_to_image(row["image"]), int(d.get("resolution", 512)))
            except Ip2pError as err:
                raise Ip2pError(f"row {number}: {err}") from None
            edited = self.editor.edit(image, str(row["instruction"] or ""),
                                      EditSettings(scheduler=d.get("scheduler", "euler_ancestral"), progress=False,
                                                   num_images=1, **settings))[0]
            out.append(image_to_b64(edited))
        return pd.DataFrame({"image": out})
