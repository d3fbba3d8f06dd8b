"""Start `ip2p app`, make an edit in headless Chromium and save a screenshot of the page.

    python scripts/app_screenshot.py [--out reports/app.png] [--instruction "..."] [Hydra overrides...]
    python scripts/app_screenshot.py experiment=mini model.editor=artifacts/model   (the README's picture)

Needs Debian's chromium (scripts/setup.sh installs it) and the dev extra (playwright). The input is a
held-out world scene (the app's first example when the model works at 64 px).
"""

from __future__ import annotations

import argparse
import socket
import tempfile
from pathlib import Path

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("overrides", nargs="*")
    p.add_argument("--out", default="reports/app.png")
    p.add_argument("--instruction", default=None, help="default: the example scene's own instruction")
    p.add_argument("--variants", type=int, default=2)
    p.add_argument("--chromium", default="/usr/bin/chromium")
    args = p.parse_args()

    from omegaconf import open_dict
    from PIL import Image
    from playwright.sync_api import sync_playwright

    from ip2p.config import compose
    from ip2p.editing.app import cleanup, launch
    from ip2p.world.cases import app_examples, heldout_cases
    from ip2p.world.render import render

    cfg = compose(args.overrides)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with open_dict(cfg):
        cfg.app.port = port
    case = heldout_cases(int(cfg.app.examples_seed), 1, ("recolour",))[0]
    scene = Path(tempfile.mkdtemp()) / "scene.png"
    Image.fromarray(render(case.scene)).save(scene)
    page_app, app, url = launch(cfg, str(cfg.model.name), block=False, examples=app_examples)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            page.goto(url)
            page.locator("#input-image input[type=file]").set_input_files(str(scene))
            page.wait_for_function("document.querySelector('#status')?.innerText.includes('Image loaded')")
            box = page.locator("#instruction input, #instruction textarea").first
            box.fill(args.instruction or case.instruction)
            box.press("Tab")
            page.locator("#num-images input[type=number]").fill(str(args.variants))
            page.locator("#num-images input[type=number]").press("Tab")
            page.locator("#generate").click()
            page.wait_for_function("document.querySelector('#status')?.innerText.match(/Edited in|Error/)",
                                   timeout=600_000)
            status = page.locator("#status").inner_text()
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=args.out, full_page=False)
            browser.close()
        print(f"{args.out}: {status}")
    finally:
        page_app.close()
        cleanup(app)


if __name__ == "__main__":
    main()
