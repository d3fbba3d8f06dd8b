"""`ip2p edit` and `ip2p export` end to end on the tiny preset.

A few runs go through the installed `ip2p` command in a subprocess (exit codes, stderr as a user
sees it); the rest call `ip2p.cli.main(argv)` in-process, which is the same code without the
~8 s of imports per process.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import torch
import pytest
from PIL import Image

from ip2p.cli import _compose_for, _edit_parser, main
from ip2p.io.images import edit_size, load_image, resize_for_editing

FAST = ["--steps", "3", "--resolution", "128", "--seed", "1", "--no-progress"]


def ip2p(*args, env_cache) -> subprocess.CompletedProcess:
    """The installed console script, as a user runs it."""
    exe = os.path.join(os.path.dirname(sys.executable), "ip2p")
    # Same thread count as this process, so that an in-process edit can be compared bit for bit.
    env = dict(os.environ, IP2P_CACHE=str(env_cache), HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(torch.get_num_threads()))
    return subprocess.run([exe, *map(str, args)], capture_output=True, text=True, env=env, timeout=300)


def start(*args, env_cache) -> subprocess.Popen:
    exe = os.path.join(os.path.dirname(sys.executable), "ip2p")
    # Same thread count as this process, so that an in-process edit can be compared bit for bit.
    env = dict(os.environ, IP2P_CACHE=str(env_cache), HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(torch.get_num_threads()))
    return subprocess.Popen([exe, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A 200x100 input: at resolution 128 the rule gives f = 0.64 -> 128x64 (non-square)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:100, 0:200]
    arr = np.stack([x * 1.2, y * 2.5, (x + y) * 0.8], axis=-1) + rng.normal(0, 15, (100, 200, 3))
    path = tmp_path_factory.mktemp("inputs") / "photo.png"
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path)
    return path


def test_edit_subprocess_then_in_process_same_bytes(photo, tmp_path, cache_dir):
    out = tmp_path / "snowy.png"
    done = ip2p("edit", photo, "make it snowy", "-o", out, *FAST, env_cache=cache_dir)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines() == [str(out)]
    with Image.open(out) as img:
        assert img.size == edit_size(200, 100, 128) == (128, 64)
        assert img.mode == "RGB"
    # the same seed in another process gives the same file
    again = tmp_path / "again.png"
    assert main(["edit", str(photo), "make it snowy", "-o", str(again), *FAST]) == 0
    assert again.read_bytes() == out.read_bytes()
    # and another seed another image
    other = tmp_path / "other.png"
    assert main(["edit", str(photo), "make it snowy", "-o", str(other), *FAST[:-2], "2", "--no-progress"]) == 0
    assert other.read_bytes() != out.read_bytes()
    # --autocast bfloat16: the same edit within bf16 rounding (a few grey levels), not the same bytes
    fast = tmp_path / "bf16.png"
    assert main(["edit", str(photo), "make it snowy", "-o", str(fast), *FAST, "--autocast", "bfloat16"]) == 0
    exact, approx = (np.asarray(Image.open(p), dtype=np.float64) for p in (out, fast))
    assert 0 < np.abs(approx - exact).mean() < 3.0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left


def test_num_images_writes_numbered_files(photo, tmp_path, cache_dir):
    out = tmp_path / "variants.png"
    assert main(["edit", str(photo), "make it snowy", "-o", str(out), "--num-images", "2", *FAST]) == 0
    first, second = tmp_path / "variants_0.png", tmp_path / "variants_1.png"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["variants_0.png", "variants_1.png"]
    a, b = np.asarray(Image.open(first)), np.asarray(Image.open(second))
    assert a.shape == b.shape == (64, 128, 3)
    assert not np.array_equal(a, b)


def test_empty_instruction_writes_the_resized_input(photo, tmp_path, cache_dir):
    out = tmp_path / "same.png"
    assert main(["edit", str(photo), "", "-o", str(out), "--resolution", "128"]) == 0
    expected = resize_for_editing(load_image(photo, max_pixels=10**8), 128)
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(expected))
    blank = tmp_path / "blank.png"
    assert main(["edit", str(photo), "   ", "-o", str(blank), "--resolution", "128"]) == 0
    assert blank.read_bytes() == out.read_bytes()


def test_export_then_edit_with_the_folder(photo, tmp_path, cache_dir):
    folder = tmp_path / "exported"
    done = ip2p("export", folder, env_cache=cache_dir)
    assert done.returncode == 0, done.stderr
    assert (folder / "model_index.json").is_file() and (folder / "unet").is_dir()
    from_folder, from_preset = tmp_path / "folder.png", tmp_path / "preset.png"
    assert main(["edit", str(photo), "make it snowy", "-o", str(from_folder), "--model", str(folder), *FAST]) == 0
    assert main(["edit", str(photo), "make it snowy", "-o", str(from_preset), "--model", "tiny", *FAST]) == 0
    # same weights, same (Euler ancestral) scheduler, same seed: the same image
    assert from_folder.read_bytes() == from_preset.read_bytes()


def test_edit_with_a_single_file_checkpoint(photo, tmp_path, cache_dir, tiny_editor):
    from safetensors.torch import save_file

    from ldm_layout import to_ldm_checkpoint

    path = tmp_path / "tiny-editor.safetensors"
    save_file(to_ldm_checkpoint(tiny_editor.unet, tiny_editor.vae, tiny_editor.text_encoder), str(path))
    from_file, from_preset = tmp_path / "file.png", tmp_path / "preset.png"
    argv = ["edit", str(photo), "make it snowy", *FAST]
    assert main([*argv, "-o", str(from_file), "--model", str(path), "--model-config", "tiny"]) == 0
    assert main([*argv, "-o", str(from_preset)]) == 0
    assert from_file.read_bytes() == from_preset.read_bytes()
    # Without --model-config a single file is configured like the released editor.
    cfg = _compose_for(str(path), [])
    assert cfg.model.editor == str(path)
    assert cfg.model.single_file_config.editor == "timbrooks/instruct-pix2pix"


# --- errors: exit code 1 and exactly one line on stderr ---

def error_cases(tmp_path, photo):
    unreadable = tmp_path / "notes.png"
    unreadable.write_text("not an image\n")
    out = str(tmp_path / "never.png")
    return {
        "missing input": ["edit", str(tmp_path / "missing.png"), "make it snowy", "-o", out],
        "unreadable input": ["edit", str(unreadable), "make it snowy", "-o", out],
        "missing checkpoint": ["edit", str(photo), "make it snowy", "-o", out, "--model", str(tmp_path / "no.ckpt")],
        "missing checkpoint folder": ["edit", str(photo), "make it snowy", "-o", out, "--model", str(tmp_path / "nodir")],
        "unknown scheduler": ["edit", str(photo), "make it snowy", "-o", out, "--scheduler", "nope"],
        "steps 0": ["edit", str(photo), "make it snowy", "-o", out, "--steps", "0"],
        # the app refused these; the CLI made an image (edit.limits bound all three alike)
        "negative text guidance": ["edit", str(photo), "make it snowy", "-o", out, "--text-guidance", "-3"],
        "negative image guidance": ["edit", str(photo), "make it snowy", "-o", out, "--image-guidance", "-1"],
        "steps 100000": ["edit", str(photo), "make it snowy", "-o", out, "--steps", "100000"],
        "num images 1000": ["edit", str(photo), "make it snowy", "-o", out, "--num-images", "1000"],
        "resolution 100000": ["edit", str(photo), "make it snowy", "-o", out, "--resolution", "100000"],
        "long instruction": ["edit", str(photo), "x" * 301, "-o", out],
    }


# what each message must name so that the user knows what to fix
NAMED = {"missing input": "missing.png", "unreadable input": "notes.png", "missing checkpoint": "no.ckpt",
         "missing checkpoint folder": "nodir", "unknown scheduler": "'nope'", "steps 0": "--steps",
         "negative text guidance": "--text-guidance", "negative image guidance": "--image-guidance",
         "steps 100000": "--steps must be between 1 and 200 (edit.limits.steps)",
         "num images 1000": "--num-images must be between 1 and 8", "resolution 100000": "--resolution",
         "long instruction": "edit.limits.max_instruction_chars"}


def test_errors_in_process(photo, tmp_path, capsys, cache_dir):
    for name, argv in error_cases(tmp_path, photo).items():
        capsys.readouterr()
        assert main(argv) == 1, name
        err = capsys.readouterr().err
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("ip2p edit: error:"), (name, err)
        assert NAMED[name] in lines[0], (name, err)
        assert not (tmp_path / "never.png").exists()


def test_errors_as_a_user_sees_them(photo, tmp_path, cache_dir):
    """Real processes: nothing else (warnings, logs, progress bars) reaches stderr."""
    cases = error_cases(tmp_path, photo)
    chosen = ["missing input", "missing checkpoint", "unknown scheduler"]  # early, in the loader, late
    running = {name: start(*cases[name], env_cache=cache_dir) for name in chosen}  # side by side
    for name, proc in running.items():
        out, err = proc.communicate(timeout=300)
        lines = err.splitlines()
        assert proc.returncode == 1, (name, err)
        assert len(lines) == 1 and lines[0].startswith("ip2p edit: error:"), (name, err)
        assert NAMED[name] in lines[0] and out == ""


def test_help_mentions_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["edit", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    typed = ["input", "instruction", "-o", "--output", "--model", "--model-config", "--steps", "--text-guidance",
             "--image-guidance", "--seed", "--resolution", "--scheduler", "--num-images", "--device", "--dtype",
             "--autocast", "--no-progress"]
    for option in typed:
        assert option in text, option
    for action in _edit_parser()._actions:  # and nothing the parser knows is missing from the list
        for option in action.option_strings or [action.dest]:
            assert option in text and (option in typed or option in ("-h", "--help")), option
