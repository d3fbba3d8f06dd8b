"""The editor as an MLflow pyfunc model: its artifact is the diffusers-layout export.

Request (pandas DataFrame or JSON `dataframe_split`), one row per edit:
  image (base64-encoded image file), instruction (str),
  optional: steps (int), text_guidance (float), image_guidance (float), seed (int)
Response, one row per request row: `image` (the edited image as base64 PNG) and `error`. A row that
cannot be edited (an unreadable image, an empty instruction, steps < 1, a value outside
register.serve.limits) gets image null and a one-line reason in `error`, and the other rows are still
edited: one bad image must not cost a batch, and the caller sees our reason instead of the server's
generic message and stack trace. A request of more rows than the limits allow edits none (each row
says why); edits stop between two steps at a SIGTERM or past the server's request timeout.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import signal
import threading
import time
import warnings

import mlflow.pyfunc
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema
from PIL import Image, UnidentifiedImageError

from ip2p.errors import Ip2pError
from ip2p.io.images import resize_for_editing, to_rgb
from ip2p.models.instruct_pix2pix import EditSettings, EditStopped, InstructPix2Pix
from ip2p.models.loader import load_diffusion
from ip2p.models.request_limits import MB, Limits, out_of_range

OPTIONAL_COLUMNS = {"steps": int, "text_guidance": float, "image_guidance": float, "seed": int}


def image_to_b64(img: Image.Image) -> str:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def b64_to_image(text: str, limits: Limits | None = None) -> Image.Image:
    """A base64-encoded image file -> RGB; Ip2pError (one line) for anything else, or for a file or
    image larger than `limits` allow (checked before decoding)."""
    text = str(text)
    if limits is not None and limits.max_upload_mb is not None and len(text) * 3 / 4 > limits.max_upload_mb * MB:
        raise Ip2pError(f"`image` is {len(text) * 3 / 4 / MB:.1f} MB; the limit is {limits.max_upload_mb:g} MB")
    try:
        with warnings.catch_warnings():  # our bound, below, refuses earlier than Pillow's warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(base64.b64decode(text, validate=True)))
        with img:
            if limits is not None and img.width * img.height > limits.max_input_pixels:
                raise Ip2pError(f"`image` is {img.width}x{img.height} = {img.width * img.height} pixels; the limit "
                                f"is {limits.max_input_pixels}")
            img.load()
            return to_rgb(img)
    except (binascii.Error, UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        raise Ip2pError("`image` must be a base64-encoded image file (PNG, JPEG, ...)") from err


def signature():
    inputs = Schema([ColSpec("string", "image"), ColSpec("string", "instruction"),
                     ColSpec("long", "steps", required=False), ColSpec("double", "text_guidance", required=False),
                     ColSpec("double", "image_guidance", required=False), ColSpec("long", "seed", required=False)])
    return ModelSignature(inputs=inputs, outputs=Schema([ColSpec("string", "image", required=False),
                                                         ColSpec("string", "error", required=False)]))


def serve_settings(model_config: dict | None) -> dict:
    """The model's serving settings (register.serve, stored with the model when it was registered), with
    any key it lacks (a model registered before the key existed) taken from conf/register, the one home
    of their defaults: every bound applies to every registered model."""
    settings = dict(model_config or {})
    missing = [k for k in ("steps", "text_guidance", "image_guidance", "seed", "resolution", "scheduler", "limits")
               if k not in settings]
    if missing:
        from omegaconf import OmegaConf

        from ip2p.config import compose

        serve = OmegaConf.to_container(compose([]).register.serve, resolve=True)
        settings.update({k: serve[k] for k in missing})
    return settings


class Stop:
    """Why the edits of a request should stop now, asked between denoising steps: a SIGTERM (the server
    is shutting down: uvicorn waits for running requests, so a long edit would keep it alive), or the
    server's request timeout (its client got a 504 and no longer waits)."""

    signalled = threading.Event()
    _installed = False

    @classmethod
    def install(cls) -> None:
        """Chain a SIGTERM handler before the one in place (a server that loads the model after installing
        its handlers). Only the main thread may; elsewhere (an in-process caller) this does nothing."""
        if cls._installed or threading.current_thread() is not threading.main_thread():
            return
        previous = signal.getsignal(signal.SIGTERM)

        def handler(signum, frame):
            cls.signalled.set()
            if callable(previous):
                previous(signum, frame)
            elif previous != signal.SIG_IGN:  # the default: end the process, as without us
                signal.signal(signum, signal.SIG_DFL)
                signal.raise_signal(signum)

        signal.signal(signal.SIGTERM, handler)
        cls._installed = True

    def __init__(self) -> None:
        timeout = os.environ.get("MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT")
        self.timeout = float(timeout) if timeout else None
        self.deadline = time.monotonic() + self.timeout if self.timeout else None

    @staticmethod
    def server_exiting() -> bool:
        """uvicorn loads the app first, then installs its own SIGTERM handler over ours (restoring ours only
        after the shutdown it waits for): its Server, the owner of that handler, says a shutdown began."""
        owner = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
        return getattr(owner, "should_exit", False) is True

    def __call__(self) -> str | None:
        if self.signalled.is_set() or self.server_exiting():
            return "stopped: the server is shutting down"
        if self.deadline is not None and time.monotonic() > self.deadline:
            return f"stopped: the request ran past the server's timeout of {self.timeout:g} s"
        return None


class InstructPix2PixModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        self.defaults = serve_settings(context.model_config)
        self.limits = Limits.from_config(self.defaults["limits"])
        Stop.install()
        components = load_diffusion(context.artifacts["pipeline"], "editor", {"name": "registered"},
                                    "~/.cache/ip2p", "auto", "float32")
        self.editor = InstructPix2Pix(components)

    def read_row(self, row: pd.Series) -> tuple[Image.Image, str, dict]:
        """(input image, instruction, sampling settings) of one request row; Ip2pError says what is wrong."""
        d, lim = self.defaults, self.limits
        settings = {key: d[key] for key in ("steps", "text_guidance", "image_guidance", "seed")}
        for key, cast in OPTIONAL_COLUMNS.items():
            if key in row and pd.notna(row[key]):
                settings[key] = cast(row[key])
        if settings["steps"] < 1:
            raise Ip2pError(f"steps must be at least 1 (got {settings['steps']})")
        for key in OPTIONAL_COLUMNS:
            problem = out_of_range(key, settings[key], getattr(lim, key))
            if problem:
                raise Ip2pError(problem)
        instruction = row.get("instruction")
        if not isinstance(instruction, str) or not instruction.strip():
            raise Ip2pError("`instruction` is empty")
        if len(instruction) > lim.max_instruction_chars:
            raise Ip2pError(f"`instruction` is {len(instruction)} characters long; the limit is "
                            f"{lim.max_instruction_chars}")
        image = resize_for_editing(b64_to_image(row["image"], lim), int(d["resolution"]),
                                   lim.max_edit_area, "max_edit_area")
        return image, instruction, settings

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        scheduler = self.defaults["scheduler"]
        most = int(self.limits.num_images[1])
        if len(model_input) > most:  # every row answered, none edited: the request as a whole is too big
            error = f"the request has {len(model_input)} rows; the limit is {most} (limits.num_images)"
            return pd.DataFrame({"image": pd.Series([None] * len(model_input), dtype=object),
                                 "error": pd.Series([error] * len(model_input), dtype=object)})
        stop = Stop()
        images, errors = [], []
        for number, (_, row) in enumerate(model_input.iterrows()):
            try:
                reason = stop()
                if reason:
                    raise EditStopped(reason)
                image, instruction, settings = self.read_row(row)
                edited = self.editor.edit(image, instruction, EditSettings(
                    scheduler=scheduler, progress=False, num_images=1, should_stop=stop, **settings))[0]
            except Ip2pError as err:
                images.append(None)
                errors.append(f"row {number}: {err}")
                continue
            images.append(image_to_b64(edited))
            errors.append(None)
        # object columns: a missing value stays None (JSON null), not the NaN of pandas' string dtype
        return pd.DataFrame({"image": pd.Series(images, dtype=object), "error": pd.Series(errors, dtype=object)})
