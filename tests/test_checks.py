"""Settings are checked for the whole composed configuration before any work (ip2p.checks): each bad
key named on one line, through the real CLI for the cases a hostile user tried."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ip2p.checks import config_problems
from ip2p.config import compose


def test_the_shipped_configurations_pass():
    for overrides in ([], ["experiment=tiny"], ["experiment=small"], ["experiment=mini"], ["experiment=paper"]):
        assert config_problems(compose(overrides)) == [], overrides


@pytest.mark.parametrize("override, key", [
    ("train.lr=-1", "train.lr"),
    ("filter.batch_size=0", "filter.batch_size"),
    ("filter.thresholds.sim_dir=5", "filter.thresholds.sim_dir"),
    ("evaluate.steps=0", "evaluate.steps"),
    ("train.validation.grid.scheduler=nosuch", "train.validation.grid.scheduler"),
    ("shard.index=2", "shard.index"),                  # with shard.count=1
    ("synthesis.p_min=0.95", "synthesis.p_min"),       # above p_max
    ("train.conditioning_dropout=0.5", "train.conditioning_dropout"),
    ("train.copy_rows=1.5", "train.copy_rows"),
    ("train.loss=l1", "train.loss"),
    ("train.huber_c=0", "train.huber_c"),
    ("filter.top_k=2.5", "filter.top_k"),
    ("evaluate.image_guidances=[]", "evaluate.image_guidances"),
    ("edit.speed.compile=nosuch", "edit.speed.compile"),
    ("filter.plot_bins=0", "filter.plot_bins"),
    # read through ${...} by edit, evaluate, register.serve and the grid: named once, at its source
    ("sampling.scheduler=nosuch", "sampling.scheduler"),
    ("filter.batch_size=-2", "filter.batch_size"),    # synthesis.early_drop.batch_size follows it
    ("synthesis.early_drop.thresholds.sim_0=1.5", "synthesis.early_drop.thresholds.sim_0"),
    ("train.lr_schedule=linear", "train.lr_schedule"),
    ("train.min_lr=1.0", "train.min_lr"),             # above train.lr
    ("world.vae_refine.outline_px=0", "world.vae_refine.outline_px"),
    ("world.vae_refine.outline_weight=-1", "world.vae_refine.outline_weight"),
    ("world.vae_refine.scenes.p_small=1.5", "world.vae_refine.scenes.p_small"),
    ("world.vae_refine.scenes.p_style={none:0.5,snowy:0.4}", "world.vae_refine.scenes.p_style"),   # adds to 0.9
    ("world.vae_refine.scenes.p_style={none:1.5,snowy:-0.5}", "world.vae_refine.scenes.p_style"),
    # bounded by edit.limits (and the app's and the served model's limits, which take it)
    ("edit.text_guidance=-3", "edit.text_guidance"),
    ("edit.image_guidance=-1", "edit.image_guidance"),
    ("edit.steps=100000", "edit.steps"),
    ("edit.num_images=1000", "edit.num_images"),
    ("edit.resolution=100000", "edit.resolution"),
    ("app.steps=100000", "app.steps"),
    ("app.resolution=100000", "app.resolution"),
    ("register.serve.steps=100000", "register.serve.steps"),
    ("register.serve.resolution=100000", "register.serve.resolution"),
    ("evaluate.resolution=100000", "evaluate.resolution"),
    ("synthesis.steps=100000", "synthesis.steps"),
    ("train.data.resize_max=100000", "train.data.resize_max"),
])
def test_each_bad_key_is_named(override, key):
    from ip2p.world.rules import RULES as WORLD_RULES   # the world's settings: its own table, as the CLI checks them

    problems = config_problems(compose([override]), rules=WORLD_RULES)
    assert len(problems) == 1 and problems[0].startswith(key), problems


def test_a_style_mix_names_only_the_worlds_styles_and_adds_up_to_one():
    from ip2p.world.rules import style_mix

    assert style_mix({"none": 0.45, "night": 0.15, "bw": 0.15, "snowy": 0.25}) is None
    assert "rainy" in style_mix({"none": 0.5, "rainy": 0.5})
    assert "add up to 1" in style_mix({"none": 0.5, "snowy": 0.4})
    assert style_mix({"none": 1.5, "snowy": -0.5}) is not None
    assert style_mix({}) is not None and style_mix([0.5, 0.5]) is not None


def test_several_bad_keys_are_all_reported():
    problems = config_problems(compose(["train.lr=0", "filter.top_k=-3", "synthesis.steps=0"]))
    assert sorted(p.split()[0].rstrip(":") for p in problems) == ["filter.top_k", "synthesis.steps", "train.lr"]


@pytest.mark.parametrize("args", [
    ["train", "train.lr=-1"],
    ["filter", "filter.batch_size=0"],
    ["synthesize", "shard.index=2", "shard.count=2"],
    ["filter", "shard.index=5", "shard.count=2"],
    ["filter", "filter.thresholds.sim_dir=5"],
    ["evaluate", "evaluate.steps=0"],
    ["train", "train.validation.grid.scheduler=nosuch"],
    ["refine-vae", "world.vae_refine.scenes.p_style={none:0.5,rainy:0.5}"],   # the world's rules, from the world
])
def test_cli_refuses_bad_settings_with_one_line_before_work(args, tmp_path):
    """Exit 1 and one line on stderr, no traceback, and nothing written (the stage never started)."""
    out = subprocess.run([sys.executable, "-m", "ip2p.cli", *args, f"paths.artifacts={tmp_path / 'a'}",
                          f"paths.reports={tmp_path / 'r'}", f"hydra.run.dir={tmp_path / 'h'}"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith(f"ip2p {args[0]}: error: 1 bad setting: "), out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "r").exists()


def test_a_full_disk_is_one_line_naming_the_file(monkeypatch, capsys):
    import errno

    from ip2p import cli
    from ip2p.errors import system_error_line

    full = OSError(errno.ENOSPC, "No space left on device", "/data/out/part-00001.parquet")
    assert system_error_line(full) == "no space left on device while writing '/data/out/part-00001.parquet'"
    try:  # wrapped by a library: the cause is found
        raise RuntimeError("write failed") from full
    except RuntimeError as wrapped:
        assert system_error_line(wrapped).startswith("no space left on device")
    assert system_error_line(OSError(errno.ENOENT, "missing", "x")) is None   # not the machine's state
    assert system_error_line(ValueError("bug")) is None

    def write_on_a_full_disk(argv):
        raise full

    monkeypatch.setitem(cli.COMMANDS, "params", write_on_a_full_disk)
    assert cli.main(["params"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["ip2p params: error: no space left on device while writing '/data/out/part-00001.parquet'"]


def test_the_trainer_presets_say_the_paper_trained_in_float32():
    """The original's configs/train.yaml sets no precision (Lightning's default, 32): no preset may say
    the paper trained in mixed precision; the GPU presets keep bf16-mixed and say how to get float32."""
    from ip2p.config import config_dir

    texts = {p.name: p.read_text() for p in (config_dir() / "trainer").glob("*.yaml")}
    texts["paper.yaml"] = (config_dir() / "experiment" / "paper.yaml").read_text()
    assert not [name for name, text in texts.items() if "paper trained in mixed precision" in text]
    assert "The paper trained in float32" in texts["gpu.yaml"] and "trainer.precision=32-true" in texts["gpu.yaml"]
    paper = compose(["experiment=paper"])
    assert paper.trainer.precision == "bf16-mixed" and "float32" in texts["paper.yaml"]
    assert config_problems(compose(["experiment=paper", "trainer.precision=32-true"])) == []


def test_training_crops_have_an_upper_bound_only():
    """A 32 px training crop (the tiny tests' and sweeps') is fine; the edit limits' upper bound still holds."""
    from ip2p.checks import config_problems
    from ip2p.config import compose

    small = ["train.data.resolution=32", "train.data.resize_min=32", "train.data.resize_max=40"]
    assert config_problems(compose(small)) == []
    assert config_problems(compose(["train.data.resolution=4096"])) == [
        "train.data.resolution must be <= 2048 (edit.limits.resolution) (got 4096)"]
