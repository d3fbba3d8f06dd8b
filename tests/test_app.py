"""The web editor (`ip2p app`): its request rules and model pool (ip2p.editing.service), and the page
itself driven in a real headless Chromium by Playwright."""

from __future__ import annotations

import io
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from ip2p.editing.service import EditorPool, Limits, Request, model_source, read_upload, request_problem, run_edit
from ip2p.errors import Ip2pError

LIMITS = Limits(max_input_pixels=10_000, max_instruction_chars=20, steps=(1, 50), text_guidance=(0.0, 20.0),
                image_guidance=(0.0, 5.0), num_images=(1, 4), seed=(0, 1000), max_edit_area=2.0)
GOOD = Request("x.png", "make it snowy", 10, 7.5, 1.5, 2, 3)


def _with(**change) -> Request:
    return Request(**{**GOOD.__dict__, **change})


def test_request_rules_by_hand():
    assert request_problem(GOOD, LIMITS) is None
    expected = {
        "image_path": (None, "Upload an image first."),
        "instruction": ("   ", "Type an instruction"),
        "steps": (51, "Steps must be between 1 and 50 (got 51)"),
        "text_guidance": (-0.5, "Text guidance must be between 0 and 20"),
        "image_guidance": (float("nan"), "Image guidance must be between 0 and 5"),
        "num_images": (0, "Number of images must be between 1 and 4"),
        "seed": (1001, "Seed must be between 0 and 1000"),
    }
    for key, (value, message) in expected.items():
        assert request_problem(_with(**{key: value}), LIMITS).startswith(message), key
    assert "21 characters long; the limit is 20" in request_problem(_with(instruction="x" * 21), LIMITS)
    assert request_problem(_with(steps=2.5), LIMITS) == "Steps must be a whole number (got 2.5)"


def test_uploads_that_cannot_be_edited_get_one_line_without_the_server_path(tmp_path):
    corrupt = tmp_path / "upload.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(Ip2pError) as err:
        read_upload(str(corrupt), 10_000)
    assert "not a readable image file" in str(err.value) and str(tmp_path) not in str(err.value)
    big = tmp_path / "big.png"
    Image.new("RGB", (200, 100)).save(big)        # 20,000 pixels over a 10,000 limit
    with pytest.raises(Ip2pError) as err:
        read_upload(str(big), 10_000)
    assert str(err.value) == "the uploaded image is 200x100 = 20000 pixels, over the limit of 10000"
    assert str(tmp_path) not in str(err.value) and "\n" not in str(err.value)


def test_pool_loads_each_model_once_under_concurrent_requests(cfg):
    pool = EditorPool(cfg.model, cfg.paths.cache, "cpu", "float32", keep=1)
    got = []
    threads = [threading.Thread(target=lambda: got.append(pool.get("tiny"))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert pool.loads == 1 and len(got) == 4 and all(e is got[0] for e in got)
    assert got[0].c.autocast is None
    assert EditorPool(cfg.model, cfg.paths.cache, "cpu", "float32", autocast="bfloat16").get("tiny").c.autocast is torch.bfloat16
    source, model_cfg = model_source("tiny", cfg)
    assert source == "tiny" and model_cfg.name == "tiny"
    with pytest.raises(Ip2pError, match="is not a preset"):
        model_source("no/such/folder/here", cfg)


def test_app_edit_is_the_cli_edit(cfg, tmp_path, noise_image):
    """One implementation: the app's edit and `ip2p edit`'s give the same pixels for the same request."""
    from omegaconf import open_dict

    from ip2p.editing.run import run as cli_run

    path = tmp_path / "in.png"
    noise_image.save(path)
    pool = EditorPool(cfg.model, cfg.paths.cache, "cpu", "float32")
    request = Request(str(path), "make it snowy", 3, 6.0, 1.3, 2, 11)
    limits = Limits(10**8, 300, (1, 50), (0, 20), (0, 5), (1, 4), (0, 2**31 - 1), 2.0)
    _, app_images = run_edit(pool.get("tiny"), request, limits, "euler_ancestral", 128, progress=False)
    c = cfg.copy()
    with open_dict(c):
        c.edit.update(input=str(path), instruction="make it snowy", output=str(tmp_path / "cli.png"), steps=3,
                      text_guidance=6.0, image_guidance=1.3, num_images=2, seed=11, resolution=128,
                      scheduler="euler_ancestral")
    cli_paths = cli_run(c)
    assert len(app_images) == len(cli_paths) == 2
    for img, p in zip(app_images, cli_paths):
        assert np.array_equal(np.asarray(img), np.asarray(Image.open(p)))
    assert not np.array_equal(np.asarray(app_images[0]), np.asarray(app_images[1]))  # two variants


def test_elongated_inputs_are_refused_alike_by_the_cli_the_app_and_the_served_model(cfg, tmp_path, capsys,
                                                                                   tiny_editor):
    """The original size rule keeps 64 px on the short side: a 2000 x 8 strip would edit at 16000 x 64 at
    resolution 256. edit.max_edit_area (conf) refuses it in one line, before any model work, in `ip2p edit`,
    the app and the served model; a 200 x 100 photo at the same resolution still edits."""
    import base64

    import mlflow.pyfunc
    import pandas as pd

    from ip2p.cli import main
    from ip2p.editing.service import Limits
    from ip2p.io.images import edit_size
    from ip2p.models.export import export_pipeline
    from ip2p.models.instruct_pix2pix import InstructPix2Pix
    from ip2p.tracking.pyfunc_model import InstructPix2PixModel

    assert edit_size(2000, 8, 256) == (16000, 64) and float(cfg.edit.max_edit_area) == 2
    strip, photo = tmp_path / "strip.png", tmp_path / "photo.png"
    Image.new("RGB", (2000, 8), "red").save(strip)
    Image.new("RGB", (200, 100), "red").save(photo)
    refused = "a 2000x8 image would be edited at 16000x64 px, more than 2 x 256x256"
    # the CLI: exit 1, one line naming the setting, nothing written
    out = tmp_path / "out.png"
    argv = ["edit", str(strip), "make it snowy", "-o", str(out), "--resolution", "256", "--steps", "1",
            "--device", "cpu", "--no-progress"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert refused in err and "(edit.max_edit_area)" in err and len(err.splitlines()) == 1 and not out.exists()
    # the app, with the limits of conf/app (which take edit.max_edit_area)
    limits = Limits.from_config(cfg.app.limits)
    editor = InstructPix2Pix(tiny_editor)
    with pytest.raises(Ip2pError, match=refused):
        run_edit(editor, _with(image_path=str(strip), num_images=1, steps=1), limits, "euler_ancestral", 256,
                 progress=False)
    # the served model, registered with register.serve (which takes edit.max_edit_area): a per-row error
    context = mlflow.pyfunc.PythonModelContext(
        artifacts={"pipeline": str(export_pipeline(tiny_editor, tmp_path / "model"))},
        model_config={**OmegaConf.to_container(cfg.register.serve, resolve=True), "resolution": 256, "steps": 1})
    model = InstructPix2PixModel()
    model.load_context(context)
    rows = [base64.b64encode(p.read_bytes()).decode() for p in (strip, photo)]
    answer = model.predict(context, pd.DataFrame({"image": rows, "instruction": ["make it snowy"] * 2}))
    assert answer["error"][0].startswith(f"row 0: {refused}") and answer["image"][0] is None
    assert answer["error"][1] is None and Image.open(io.BytesIO(base64.b64decode(answer["image"][1]))).size == \
        edit_size(200, 100, 256)


# ---------------------------------------------------------------------------- the page in a browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _image_bytes(page, selector: str) -> bytes:
    src = page.locator(selector).first.get_attribute("src")
    return page.request.get(src).body()


def _type(box, text: str) -> None:
    """Fill a text box and leave it, so the page's state has the value before the next click."""
    box.fill(text)
    box.press("Tab")


def _status(page, contains: str, timeout: float = 120_000) -> str:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function("([sel, text]) => (document.querySelector(sel)?.innerText || '').includes(text)",
                               arg=["#status", contains], timeout=timeout)
    except PlaywrightTimeout:
        page.screenshot(path="/tmp/app_fail.png")
        raise AssertionError(f"status never said {contains!r}; it says {page.locator('#status').inner_text()!r}") from None
    return page.locator("#status").inner_text()


@pytest.mark.slow
def test_page_edits_edits_again_goes_back_and_reports_bad_uploads(cfg, tmp_path):
    """Headless Chromium: upload a world scene, instruct, generate (the edited image appears and differs
    from the input), edit the result again, go back in the history, and a corrupt upload and an empty
    instruction are answered in the page, an upload over the size limit is refused, the edit shows its
    progress; two pages editing at once share one loaded model."""
    from omegaconf import open_dict
    from playwright.sync_api import sync_playwright

    from ip2p.editing.app import cleanup, launch
    from ip2p.world.cases import app_examples
    from ip2p.world.render import render
    from ip2p.world.scene import sample_scenes

    assert Path(CHROMIUM).is_file(), "the browser test needs Debian's chromium (scripts/setup.sh installs it)"
    scene = tmp_path / "scene.png"
    Image.fromarray(render(sample_scenes(5, 1)[0])).save(scene)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nnot really a picture")
    c = cfg.copy()
    with open_dict(c):
        c.app.port = _free_port()
        c.app.steps = 2
        c.app.limits.max_upload_mb = 1
        c.app.examples = "world"
        c.app.output_dir = str(tmp_path / "out")
    page_app, app, url = launch(c, "tiny", block=False, examples=app_examples)
    try:
        assert url.startswith("http://127.0.0.1:")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 1400})
            page.goto(url)
            instruction = page.locator("#instruction input, #instruction textarea").first

            # an empty instruction is answered, nothing runs
            page.locator("#input-image input[type=file]").set_input_files(str(scene))
            _status(page, "Image loaded")
            page.locator("#generate").click()
            _status(page, "Type an instruction")

            # generate: the edited image appears and differs from the input
            _type(instruction, "make the star blue")
            page.locator("#generate").click()
            _status(page, "Edited in")
            edited = Image.open(io.BytesIO(_image_bytes(page, "#edited img"))).convert("RGB")
            original = Image.open(scene).convert("RGB").resize(edited.size)
            assert not np.array_equal(np.asarray(edited), np.asarray(original))

            # edit the result again: it becomes the input, the history holds the original and this step
            page.locator("#again").click()
            _status(page, "Editing the result again (step 1)")
            assert page.locator("#history img").count() == 2
            now_input = Image.open(io.BytesIO(_image_bytes(page, "#input-image img"))).convert("RGB")
            assert np.array_equal(np.asarray(now_input), np.asarray(edited))
            _type(instruction, "make it snowy")
            _type(page.locator("#steps input[type=number]"), "40")
            page.locator("#generate").click()
            # the edit's progress bar (the sampler's own tqdm, followed by the page) shows steps done
            page.wait_for_function("(document.querySelector('#edited')?.innerText || '').match(/\\d+\\/40 step/)",
                                   timeout=60_000)
            _status(page, "Edited in")
            _type(page.locator("#steps input[type=number]"), "2")
            assert page.locator("#history img").count() == 2   # the same chain goes on

            # back to the original: it is the input again and later steps are dropped
            page.locator("#history img").first.click()
            _status(page, "Back to step 0")
            assert page.locator("#history img").count() == 1
            back = Image.open(io.BytesIO(_image_bytes(page, "#input-image img"))).convert("RGB")
            assert np.array_equal(np.asarray(back), np.asarray(Image.open(scene).convert("RGB")))

            # a corrupt upload is answered in the page, and so is Generate with it; the server goes on
            fresh = browser.new_page()
            fresh.goto(url)
            fresh.locator("#input-image input[type=file]").set_input_files(str(corrupt))
            assert "cannot read the uploaded image: not a readable image file" in _status(fresh, "Error")
            _type(fresh.locator("#instruction input, #instruction textarea").first, "make it snowy")
            fresh.locator("#generate").click()
            fresh.wait_for_timeout(1000)
            assert "not a readable image file" in _status(fresh, "Error")

            # an upload over app.limits.max_upload_mb is refused by the page
            noise = tmp_path / "noise.png"
            Image.fromarray(np.random.default_rng(0).integers(0, 255, (900, 900, 3), dtype=np.uint8)).save(noise)
            assert noise.stat().st_size > 1024 * 1024
            fresh.reload()
            fresh.locator("#input-image input[type=file]").set_input_files(str(noise))
            fresh.wait_for_function("document.body.innerText.includes('exceed the maximum allowed size of 1')")

            # two pages at once: the queue runs them in turn, the model was loaded once
            pages = [browser.new_page() for _ in range(2)]
            for q in pages:
                q.goto(url)
                q.locator("#input-image input[type=file]").set_input_files(str(scene))
                _status(q, "Image loaded")
                _type(q.locator("#instruction input, #instruction textarea").first, "make it night")
            _type(pages[1].locator("#num-images input[type=number]"), "2")   # two variants on the second page
            for q in pages:
                q.locator("#generate").click()
            for q in pages:
                _status(q, "Edited in")
            assert app.pool.loads == 1
            assert pages[0].locator("#edited img").count() == 1 and pages[1].locator("#edited img").count() == 2
            assert "2 variant(s)" in pages[1].locator("#status").inner_text()
            assert pages[1].locator("#downloads a").count() >= 2          # a download link for each
            a, b = (pages[1].request.get(pages[1].locator("#edited img").nth(k).get_attribute("src")).body()
                    for k in (0, 1))
            assert a != b                                                  # different variants

            # world examples: one click fills the image and the instruction
            first = app_examples(tmp_path / "examples", int(c.app.examples_seed), list(c.app.example_kinds))[0]
            _type(instruction, "")
            before = page.locator("#input-image img").first.get_attribute("src")
            page.locator("#examples tbody tr").first.click()
            page.wait_for_function("t => document.querySelector('#instruction input')?.value === t", arg=first[1])
            page.wait_for_function("s => document.querySelector('#input-image img')?.getAttribute('src') !== s",
                                   arg=before)
            shown = Image.open(io.BytesIO(_image_bytes(page, "#input-image img"))).convert("RGB")
            assert np.array_equal(np.asarray(shown), np.asarray(Image.open(first[0]).convert("RGB")))
            browser.close()
    finally:
        page_app.close()
        cleanup(app)
    # building the page wrote nothing into the package (Gradio writes .pyi stubs for component subclasses)
    assert not list((Path(__file__).resolve().parents[1] / "src").rglob("*.pyi"))
