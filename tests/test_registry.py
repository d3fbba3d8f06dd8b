"""Model registry: register the tiny editor in a temp sqlite MLflow store, promote, edit by alias,
and serve it with `mlflow models serve` (a real server on 127.0.0.1)."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
import os
import socket
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest
import requests
from PIL import Image

from ip2p.config import compose
from ip2p.editing.run import settings_from_config
from ip2p.errors import Ip2pError
from ip2p.io.images import resize_for_editing
from ip2p.models.export import export_pipeline
from ip2p.models.instruct_pix2pix import InstructPix2Pix
from ip2p.models.loader import load_diffusion
from ip2p.tracking.registry import promote, run_register

# The configured edit (conf/sampling, conf/edit) without a progress bar; each test changes what it needs
DEFAULTS = settings_from_config(compose(["progress=false"]))


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_editor, cache_dir):
    root = tmp_path_factory.mktemp("registry")
    model_dir = export_pipeline(tiny_editor, root / "model")
    (root / "eval.json").write_text(json.dumps({"clip_sim_dir": 0.125, "clip_sim_image": 0.875}))
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = compose([f"paths.cache={cache_dir}", f"register.model_dir={model_dir}", f"logger.mlflow.tracking_uri={uri}",
                   f"logger.mlflow.artifact_location={root / 'mlartifacts'}", f"register.eval_report={root / 'eval.json'}",
                   f"register.record={root / 'register.json'}", "register.serve.steps=2",
                   "register.serve.resolution=64"])
    first = run_register(cfg)
    second = run_register(cfg)
    return {"root": root, "uri": uri, "cfg": cfg, "first": first, "second": second}


def test_register_creates_versions_with_tags_and_alias(registry):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=registry["uri"])
    name = registry["cfg"].register.name
    assert (registry["first"]["version"], registry["second"]["version"]) == (1, 2)
    assert str(client.get_model_version_by_alias(name, "candidate").version) == "2"
    version = client.get_model_version(name, "2")
    assert float(version.tags["eval.clip_sim_dir"]) == 0.125
    assert float(version.tags["eval.clip_sim_image"]) == 0.875
    record = json.loads((registry["root"] / "register.json").read_text())
    assert record["model_uri"] == f"models:/{name}@candidate" and record["version"] == 2
    # the model card: the version's description, and an artifact holding the evaluation's numbers
    assert "library_name: diffusers" in version.description and "eval/clip_sim_dir | 0.125" in version.description
    cards = sorted((registry["root"] / "mlartifacts").rglob("card/ip2p.json"))   # one per registered version
    assert len(cards) == 2 and all(json.loads(c.read_text())["metrics"] == {"eval/clip_sim_dir": 0.125,
                                                                           "eval/clip_sim_image": 0.875} for c in cards)
    # Provenance on the version: the commit of this checkout (the tests run inside the git repo).
    import subprocess

    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert version.tags["git_commit"] == head


def test_promote_moves_alias_and_edit_by_alias(registry, cfg, noise_image, tiny_editor, monkeypatch):
    import mlflow

    name = registry["cfg"].register.name
    assert promote(registry["uri"], name, "champion", version="1") == "1"
    assert promote(registry["uri"], name, "champion") == "2"  # from the candidate alias
    client = mlflow.MlflowClient(tracking_uri=registry["uri"])
    assert str(client.get_model_version_by_alias(name, "champion").version) == "2"
    with pytest.raises(Ip2pError, match="cannot promote"):
        promote(registry["uri"], name, "champion", from_alias="no-such-alias")

    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry["uri"])
    registered = load_diffusion(f"models:/{name}@champion", "editor", cfg.model, cfg.paths.cache, "cpu", "float32")
    for key, value in tiny_editor.unet.state_dict().items():
        assert registered.unet.state_dict()[key].equal(value), key
    settings = replace(DEFAULTS, steps=2, seed=3)
    image = resize_for_editing(noise_image, 64)
    a = InstructPix2Pix(registered).edit(image, "make it snowy", settings)[0]
    b = InstructPix2Pix(tiny_editor).edit(image, "make it snowy", settings)[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(Ip2pError, match="cannot resolve"):
        load_diffusion(f"models:/{name}@nobody", "editor", cfg.model, cfg.paths.cache, "cpu", "float32")


def test_two_registries_version_one_load_their_own_editors(registry, cfg, tiny_editor, tmp_path, monkeypatch):
    """Every registry numbers its versions from 1 (each clone's sqlite store), and downloads are cached per
    user: version 1 of another registry with other weights must load those weights, not the cached ones."""
    import copy

    import torch

    name = registry["cfg"].register.name
    other = copy.deepcopy(tiny_editor)
    with torch.no_grad():
        other.unet.conv_in.weight.add_(1.0)
    model_dir = export_pipeline(other, tmp_path / "model")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_register(compose([f"paths.cache={cfg.paths.cache}", f"register.model_dir={model_dir}",
                          f"logger.mlflow.tracking_uri={uri}", f"logger.mlflow.artifact_location={tmp_path / 'mlartifacts'}",
                          f"register.eval_report={registry['root'] / 'eval.json'}",
                          f"register.record={tmp_path / 'register.json'}"]))
    loaded = {}
    for tracking in (registry["uri"], uri, registry["uri"]):  # the first registry's download is cached before
        monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
        loaded.setdefault(tracking, []).append(
            load_diffusion(f"models:/{name}/1", "editor", cfg.model, cfg.paths.cache, "cpu", "float32").unet.conv_in.weight)
    assert all(w.equal(tiny_editor.unet.conv_in.weight) for w in loaded[registry["uri"]])
    assert loaded[uri][0].equal(other.unet.conv_in.weight)
    assert not loaded[uri][0].equal(tiny_editor.unet.conv_in.weight)


def test_pyfunc_answers_a_bad_row_with_one_line_and_edits_the_others(tiny_editor, tmp_path):
    import mlflow.pyfunc
    import pandas as pd

    from ip2p.tracking.pyfunc_model import InstructPix2PixModel, image_to_b64

    model_dir = export_pipeline(tiny_editor, tmp_path / "model")
    context = mlflow.pyfunc.PythonModelContext(artifacts={"pipeline": str(model_dir)},
                                               model_config={"steps": 1, "resolution": 64})
    model = InstructPix2PixModel()
    model.load_context(context)
    good = image_to_b64(Image.new("RGB", (64, 64), (10, 200, 30)))
    request = pd.DataFrame({"image": [good, "not base64!", base64.b64encode(b"plain text").decode(), good, good],
                            "instruction": ["x", "y", "z", "   ", "w"], "steps": [1, 1, 1, 1, 0]})
    out = model.predict(context, request)
    assert list(out.columns) == ["image", "error"] and len(out) == 5
    assert out["error"].tolist() == [None, "row 1: `image` must be a base64-encoded image file (PNG, JPEG, ...)",
                                     "row 2: `image` must be a base64-encoded image file (PNG, JPEG, ...)",
                                     "row 3: `instruction` is empty", "row 4: steps must be at least 1 (got 0)"]
    assert out["image"].tolist()[1:] == [None] * 4
    edited = Image.open(io.BytesIO(base64.b64decode(out["image"][0])))
    expected = InstructPix2Pix(tiny_editor).edit(Image.new("RGB", (64, 64), (10, 200, 30)), "x",
                                                 replace(DEFAULTS, steps=1, seed=0))[0]
    assert np.array_equal(np.asarray(edited.convert("RGB")), np.asarray(expected))


def _served_model(tiny_editor, tmp_path, **serve):
    import mlflow.pyfunc

    from ip2p.tracking.pyfunc_model import InstructPix2PixModel

    context = mlflow.pyfunc.PythonModelContext(artifacts={"pipeline": str(export_pipeline(tiny_editor, tmp_path / "m"))},
                                               model_config={"resolution": 64, **serve})
    model = InstructPix2PixModel()
    model.load_context(context)
    return model, context


def test_served_requests_are_bounded_by_the_limits_of_conf(tiny_editor, tmp_path, cfg):
    """register.serve.limits (the app's limits): steps, scales, seed, instruction length, image pixels
    and rows per request; a request of too many rows edits none. A model registered without limits
    takes conf's."""
    import pandas as pd

    from ip2p.tracking.pyfunc_model import image_to_b64

    model, context = _served_model(tiny_editor, tmp_path, steps=1)  # no limits stored: conf's apply
    assert model.limits.steps == tuple(cfg.app.limits.steps) == (1, 200) and model.limits.num_images[1] == 8
    good = image_to_b64(Image.new("RGB", (64, 64), (10, 200, 30)))
    big = image_to_b64(Image.new("RGB", (8000, 6000)))  # 48 M pixels, over 40 M
    rows = pd.DataFrame({"image": [good, good, good, good, big, good],
                         "instruction": ["x", "x", "x", "y" * 301, "x", "x"],
                         "steps": [100000, 1, 1, 1, 1, 1], "text_guidance": [7.5, 21.0, 7.5, 7.5, 7.5, 7.5],
                         "seed": [0, 0, -1, 0, 0, 0]})
    errors = model.predict(context, rows)["error"].tolist()
    assert errors == ["row 0: steps must be between 1 and 200 (got 100000)",
                      "row 1: text_guidance must be between 0 and 20 (got 21.0)",
                      "row 2: seed must be between 0 and 2147483647 (got -1)",
                      "row 3: `instruction` is 301 characters long; the limit is 300",
                      "row 4: `image` is 8000x6000 = 48000000 pixels; the limit is 40000000", None]
    nine = model.predict(context, pd.DataFrame({"image": [good] * 9, "instruction": ["x"] * 9}))
    assert nine["image"].isna().all() and set(nine["error"]) == {"the request has 9 rows; the limit is 8 "
                                                                 "(limits.num_images)"}


def test_served_edits_stop_at_the_request_timeout(tiny_editor, tmp_path, monkeypatch):
    """Past the server's request timeout its client has a 504: the edits stop between two steps instead
    of computing for nobody (3 rows x 200 steps take ~6 s here)."""
    import time

    import pandas as pd

    from ip2p.tracking.pyfunc_model import image_to_b64

    model, context = _served_model(tiny_editor, tmp_path)
    monkeypatch.setenv("MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT", "1")
    good = image_to_b64(Image.new("RGB", (64, 64), (10, 200, 30)))
    start = time.monotonic()
    out = model.predict(context, pd.DataFrame({"image": [good] * 3, "instruction": ["x"] * 3, "steps": [200] * 3}))
    assert time.monotonic() - start < 3
    assert out["error"].tolist() == [f"row {i}: stopped: the request ran past the server's timeout of 1 s"
                                     for i in range(3)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_serve_round_trip(registry, noise_image, tiny_editor):
    name = registry["cfg"].register.name
    promote(registry["uri"], name, "champion", version="2")
    port = _free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": registry["uri"]}
    mlflow_cli = os.path.join(os.path.dirname(sys.executable), "mlflow")
    server = subprocess.Popen([mlflow_cli, "models", "serve", "-m", f"models:/{name}@champion", "--env-manager",
                               "local", "-h", "127.0.0.1", "-p", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if requests.get(f"http://127.0.0.1:{port}/ping", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                time.sleep(1)
        buffer = io.BytesIO()
        noise_image.save(buffer, format="PNG")
        payload = {"dataframe_split": {"columns": ["image", "instruction", "steps", "seed"],
                                       "data": [[base64.b64encode(buffer.getvalue()).decode(), "make it snowy", 2, 5],
                                                [base64.b64encode(b"GIF89a broken").decode(), "make it snowy", 2, 5]]}}
        response = requests.post(f"http://127.0.0.1:{port}/invocations", json=payload, timeout=120)
        assert response.status_code == 200, response.text[:300]
        answer = response.json()["predictions"]
        # the bad row: our one line, no stack trace or server path; the good row is still edited
        assert answer[1] == {"image": None, "error": "row 1: `image` must be a base64-encoded image file (PNG, JPEG, ...)"}
        assert answer[0]["error"] is None
        served = Image.open(io.BytesIO(base64.b64decode(answer[0]["image"])))
        expected = InstructPix2Pix(tiny_editor).edit(resize_for_editing(noise_image, 64), "make it snowy",
                                                    replace(DEFAULTS, steps=2, seed=5))[0]
        assert served.size == expected.size
        diff = np.abs(np.asarray(served.convert("RGB")).astype(int) - np.asarray(expected).astype(int))
        # the same edit; another process may sum in another order, which can flip a uint8 rounding
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.slow
def test_the_server_stops_at_sigterm_during_a_long_request(registry):
    """`mlflow models serve` (uvicorn) waits for running requests before it exits: a SIGTERM during a
    long request stops the edits between two steps, the request is answered with the reason, and the
    server is gone in seconds (the request's 8 rows x 200 steps would take ~18 s more)."""
    import signal
    import threading

    import psutil

    from ip2p.tracking.pyfunc_model import image_to_b64

    name = registry["cfg"].register.name
    port = _free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": registry["uri"], "OMP_NUM_THREADS": "1"}
    mlflow_cli = os.path.join(os.path.dirname(sys.executable), "mlflow")
    server = subprocess.Popen([mlflow_cli, "models", "serve", "-m", f"models:/{name}/2", "--env-manager", "local",
                               "-h", "127.0.0.1", "-p", str(port), "-t", "300"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if requests.get(f"http://127.0.0.1:{port}/ping", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                time.sleep(1)
        workers = psutil.Process(server.pid).children(recursive=True)
        assert workers, "no uvicorn process under `mlflow models serve`"
        good = image_to_b64(Image.new("RGB", (64, 64), (10, 200, 30)))
        payload = {"dataframe_split": {"columns": ["image", "instruction", "steps"],
                                       "data": [[good, "make it snowy", 200]] * 8}}
        answer = {}

        def ask():
            answer["response"] = requests.post(f"http://127.0.0.1:{port}/invocations", json=payload, timeout=120)

        client = threading.Thread(target=ask)
        client.start()
        time.sleep(3)  # the edits are running
        for process in workers:
            process.send_signal(signal.SIGTERM)
        start = time.monotonic()
        gone, alive = psutil.wait_procs(workers, timeout=15)
        assert not alive, f"the server still runs {time.monotonic() - start:.0f} s after SIGTERM"
        client.join(timeout=30)
        errors = [row["error"] for row in answer["response"].json()["predictions"]]
        assert "stopped: the server is shutting down" in errors[-1]
    finally:
        server.terminate()
        server.wait(timeout=30)
