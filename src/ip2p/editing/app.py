"""`ip2p app`: the web editor (Gradio), like the original InstructPix2Pix app and more.

The original's controls (upload, instruction, steps, seed with a randomize switch, text and image
guidance with a randomize switch, generate, reset), plus: edit the result again with the history of
edits as a gallery (click one to go back to it), several variants at once with a download for each,
the model chosen from a preset, a folder or a registry alias (loaded once, shared by every user), a
progress bar per edit, a queue (concurrent users wait their turn), and world scenes one click away
when the model edits 64 px world images. Bad input is answered in the page (the status line under the
buttons) and never stops the server. Rules and the model pool live in ip2p.editing.service.
"""

# No `from __future__ import annotations`: Gradio reads the gr.SelectData annotations at runtime.
import hashlib
import logging
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import numpy as np
from omegaconf import DictConfig

from ip2p.editing.service import EditorPool, Limits, Request, model_source, native_resolution, read_upload, run_edit
from ip2p.config import first_line
from ip2p.errors import Ip2pError, one_line
from ip2p.io.images import save_image_atomic

log = logging.getLogger(__name__)

TITLE = "InstructPix2Pix: edit an image with a written instruction"
# Small images (the world's 64 px) are shown enlarged with square pixels instead of tiny or blurred.
CSS = """
#input-image img, #edited img, #history img { image-rendering: pixelated; }
#input-image img { width: 100%; height: 100%; object-fit: contain; }
"""


def _digest(path: str | None) -> str | None:
    if not path or not Path(path).is_file():
        return None
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


def uploaded_image(**kwargs):
    """A gr.Image that hands over the uploaded file's path without decoding it: ip2p's loader decodes,
    so a corrupt or huge upload gets a one-line message in the page instead of an error inside Gradio.
    (The instance's preprocess is replaced: subclassing a Gradio component writes a .pyi file next to
    this module at import time.)"""
    import types

    import gradio as gr

    image = gr.Image(type="filepath", **kwargs)
    decode = image.preprocess

    def preprocess(self, payload):
        if payload is not None and getattr(payload, "path", None) and not str(payload.url or "").startswith("data:"):
            return str(payload.path)
        return decode(payload)

    image.preprocess = types.MethodType(preprocess, image)
    return image


class App:
    """The page's handlers, over one EditorPool. Each returns values for its outputs; problems become
    the status line's message, never an exception that reaches Gradio."""

    def __init__(self, cfg: DictConfig, default_model: str):
        a = cfg.app
        self.cfg, self.a = cfg, a
        self.default_model = default_model
        self.limits = Limits.from_config(a.limits)
        self.pool = EditorPool(cfg.model, cfg.paths.cache, cfg.device, cfg.dtype, int(a.keep_models),
                                cfg.get("autocast"))
        self.out_dir = Path(a.output_dir) if a.output_dir else Path(tempfile.mkdtemp(prefix="ip2p-app-"))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.rng = np.random.default_rng()
        self.sources: dict[str, tuple] = {}  # model as named on the page -> (loader source, model config)

    # ---- helpers
    def editor_for(self, spec: str | None):
        spec = spec or self.default_model
        if spec not in self.sources:  # composing a preset's config costs a Hydra compose: once per name
            self.sources[spec] = model_source(spec, self.cfg)
        return self.pool.get(*self.sources[spec])

    def save_variants(self, images) -> list[str]:
        folder = self.out_dir / uuid.uuid4().hex[:12]
        return [str(save_image_atomic(img, folder / f"edit_{k}.png")) for k, img in enumerate(images)]

    def random_settings(self, seed, text_guidance, image_guidance, randomize_seed, randomize_guidance):
        if randomize_seed:
            seed = int(self.rng.integers(0, int(self.a.random_seed_max)))
        if randomize_guidance:
            text_guidance = round(float(self.rng.uniform(*self.a.random_text_guidance)), 2)
            image_guidance = round(float(self.rng.uniform(*self.a.random_image_guidance)), 2)
        return seed, text_guidance, image_guidance

    # ---- handlers
    def generate(self, model, image_path, instruction, steps, seed, randomize_seed, text_guidance,
                 image_guidance, randomize_guidance, num_images, history):
        """-> variants gallery, variant paths, seed, text guidance, image guidance, status, downloads,
        history, history gallery."""
        import gradio as gr

        history = list(history or [])
        seed, text_guidance, image_guidance = self.random_settings(seed, text_guidance, image_guidance,
                                                                   randomize_seed, randomize_guidance)
        try:
            request = Request(image_path, str(instruction or ""), steps, text_guidance, image_guidance, num_images, seed)
            started = time.perf_counter()
            editor = self.editor_for(model)
            _, images = run_edit(editor, request, self.limits, str(self.a.scheduler), self.a.resolution, progress=True)
            paths = self.save_variants(images)
        except Exception as err:  # the page answers; the server goes on
            message = one_line(err) or f"unexpected error ({type(err).__name__}: {first_line(err)})"
            if one_line(err) is None:
                log.exception("app: edit failed")
            return (gr.skip(), gr.skip(), seed, text_guidance, image_guidance, f"**Error:** {message}", gr.skip(),
                    history, gr.skip())
        digest = _digest(image_path)
        if not history or history[-1][2] != digest:  # a new input image starts a new history
            history = [[image_path, "original", digest]]
        status = (f"Edited in {time.perf_counter() - started:.1f} s: {len(paths)} variant(s), seed {seed}, "
                  f"text guidance {text_guidance:g}, image guidance {image_guidance:g}.")
        return (paths, paths, seed, text_guidance, image_guidance, status, paths, history, self.history_items(history))

    @staticmethod
    def history_items(history) -> list[tuple[str, str]]:
        return [(path, f"{k}: {label}") for k, (path, label, _) in enumerate(history)]

    def edit_again(self, variants, selected, instruction, history):
        """The chosen variant becomes the input; the instruction that made it joins the history."""
        import gradio as gr

        variants, history = list(variants or []), list(history or [])
        if not variants:
            return gr.skip(), gr.skip(), history, gr.skip(), "**Error:** generate an edit first.", gr.skip(), []
        path = variants[min(int(selected or 0), len(variants) - 1)]
        history.append([path, str(instruction or "edit"), _digest(path)])
        return (path, "", history, self.history_items(history),
                f"Editing the result again (step {len(history) - 1}). Type the next instruction.", None, [])

    def go_back(self, history, evt: Any):
        """Click on a history image: it becomes the input and later steps are dropped."""
        import gradio as gr

        history = list(history or [])
        index = evt.index if isinstance(evt.index, int) else (evt.index or [0])[0]
        if not 0 <= index < len(history):
            return gr.skip(), history, gr.skip(), gr.skip()
        history = history[:index + 1]
        return history[index][0], history, self.history_items(history), f"Back to step {index}."

    def check_upload(self, image_path):
        """On upload: say at once whether the file can be edited; a new image starts a new history."""
        if not image_path:
            return "", []
        try:
            read_upload(image_path, self.limits.max_input_pixels)
        except Ip2pError as err:
            return f"**Error:** {err}", []
        return "Image loaded. Type an instruction and press Generate.", [[image_path, "original", _digest(image_path)]]

    def reset(self):
        e = self.cfg.edit
        return ("", int(self.a.steps), int(e.seed), False, float(e.text_guidance), float(e.image_guidance), False,
                1, None, [], "", None)

    def native_size(self) -> int | None:
        try:
            return native_resolution(self.editor_for(self.default_model))
        except Exception as err:  # a missing model is reported on the page at the first edit
            log.warning("app: %s", one_line(err) or err)
            return None


# (folder, seed, kinds) -> [[image path, instruction], ...]: example inputs, made by the caller's data
# source (the CLI passes the world's, ip2p.world.cases.app_examples), so the app imports no data source
Examples = Callable[[Path, int, list[str]], list[list[str]]]


def build(cfg: DictConfig, default_model: str, examples: Examples | None = None):
    """The Gradio Blocks page (not launched) and its App; `examples` (app.examples says when) or none."""
    import gradio as gr

    a = cfg.app
    app = App(cfg, default_model)
    lim = app.limits
    examples_on = examples is not None and (
        a.examples == "world" or (a.examples == "auto" and app.native_size() == int(a.world_canvas)))
    from ip2p.config import available_presets

    choices = list(dict.fromkeys([default_model, *available_presets("model")]))
    with gr.Blocks(title="ip2p editor", analytics_enabled=False) as page:
        gr.Markdown(f"## {TITLE}\nUpload an image, type an edit (\"make it snowy\", \"turn the circle red\") and press "
                    "**Generate**. Text guidance: how strongly to follow the instruction; image guidance: how "
                    "closely to keep the input.")
        history = gr.State([])
        variants = gr.State([])
        selected = gr.State(0)
        with gr.Row():
            model = gr.Dropdown(choices, value=default_model, allow_custom_value=True, label="Model",
                                info="preset, diffusers folder, checkpoint file or models:/NAME@ALIAS",
                                elem_id="model")
        with gr.Row():
            generate = gr.Button("Generate", variant="primary", elem_id="generate")
            again = gr.Button("Edit this result again", elem_id="again")
            reset = gr.Button("Reset", elem_id="reset")
        status = gr.Markdown("", elem_id="status")
        with gr.Row():
            image = uploaded_image(label="Input image", sources=["upload", "clipboard"],
                                  elem_id="input-image", height=int(a.image_height))
            gallery = gr.Gallery(label="Edited", columns=2, elem_id="edited", interactive=False,
                                 height=int(a.image_height), buttons=["download", "download_all", "fullscreen"])
        instruction = gr.Textbox(label="Edit instruction", placeholder="make it snowy", max_lines=1,
                                 elem_id="instruction")
        with gr.Row():
            steps = gr.Slider(lim.steps[0], lim.steps[1], value=int(a.steps), step=1, label="Steps", elem_id="steps")
            num_images = gr.Slider(lim.num_images[0], lim.num_images[1], value=1, step=1, label="Variants",
                                   elem_id="num-images")
        with gr.Row():
            randomize_seed = gr.Checkbox(False, label="Randomize seed", elem_id="randomize-seed")
            seed = gr.Number(int(cfg.edit.seed), precision=0, label="Seed", elem_id="seed")
            randomize_guidance = gr.Checkbox(False, label="Randomize guidance", elem_id="randomize-guidance")
            text_guidance = gr.Slider(*lim.text_guidance, value=float(cfg.edit.text_guidance), step=0.1,
                                      label="Text guidance", elem_id="text-guidance")
            image_guidance = gr.Slider(*lim.image_guidance, value=float(cfg.edit.image_guidance), step=0.05,
                                       label="Image guidance", elem_id="image-guidance")
        downloads = gr.File(label="Download the variants", file_count="multiple", interactive=False,
                            elem_id="downloads")
        history_gallery = gr.Gallery(label="History (click an image to go back to it)", columns=6,
                                     allow_preview=False, interactive=False, elem_id="history", height=160)
        if examples_on:
            gr.Examples(examples(app.out_dir / "examples", int(a.examples_seed), list(a.example_kinds)),
                        inputs=[image, instruction], label="World scenes (64 px) with instructions", elem_id="examples")

        def on_generate(model_, image_, instruction_, steps_, seed_, rs, tg, ig, rg, n, history_,
                        progress=gr.Progress(track_tqdm=True)):
            # `progress` is Gradio's: declared here, it follows the sampler's tqdm bar on the page
            return app.generate(model_, image_, instruction_, steps_, seed_, rs, tg, ig, rg, n, history_)

        def on_select(evt: gr.SelectData):
            return evt.index if isinstance(evt.index, int) else 0

        def on_back(history_, evt: gr.SelectData):
            return app.go_back(history_, evt)

        # always_last: a click while an edit runs is answered after it (the default drops it)
        generate.click(on_generate, [model, image, instruction, steps, seed, randomize_seed, text_guidance,
                                     image_guidance, randomize_guidance, num_images, history],
                       [gallery, variants, seed, text_guidance, image_guidance, status, downloads, history,
                        history_gallery], concurrency_id="edit", trigger_mode="always_last")
        instruction.submit(on_generate, [model, image, instruction, steps, seed, randomize_seed, text_guidance,
                                         image_guidance, randomize_guidance, num_images, history],
                           [gallery, variants, seed, text_guidance, image_guidance, status, downloads, history,
                            history_gallery], concurrency_id="edit", trigger_mode="always_last")
        gallery.select(on_select, None, selected)
        again.click(app.edit_again, [variants, selected, instruction, history],
                    [image, instruction, history, history_gallery, status, gallery, variants])
        history_gallery.select(on_back, [history], [image, history, history_gallery, status])
        image.upload(app.check_upload, [image], [status, history])
        reset.click(app.reset, None, [instruction, steps, seed, randomize_seed, text_guidance, image_guidance,
                                      randomize_guidance, num_images, gallery, variants, status, downloads])
    page.queue(default_concurrency_limit=int(a.concurrency), max_size=int(a.queue_size))
    return page, app


def launch(cfg: DictConfig, default_model: str, block: bool = True, examples: Examples | None = None):
    """Start the server (127.0.0.1 unless app.host says otherwise); returns (page, app, url)."""
    a = cfg.app
    page, app = build(cfg, default_model, examples)
    _, url, _ = page.launch(server_name=str(a.host), server_port=int(a.port) if a.port else None,
                            max_file_size=f"{int(a.limits.max_upload_mb)}mb", allowed_paths=[str(app.out_dir)],
                            prevent_thread_lock=not block, quiet=not block, show_error=False, ssr_mode=False,
                            footer_links=[], css=CSS)
    return page, app, url


def cleanup(app: App) -> None:
    if not app.a.output_dir:
        shutil.rmtree(app.out_dir, ignore_errors=True)
