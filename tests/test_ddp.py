"""Distributed data parallel on CPU: `ip2p train trainer=ddp` with 2 gloo processes on the tiny model.

Lightning starts rank 1 by re-running the command line; this proves that re-run works from our CLI,
that both ranks train one job (world size 2, effective batch 4) and that only rank 0 writes outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from test_training import tiny_overrides, write_parquet_dataset


@pytest.mark.slow
def test_ddp_two_cpu_processes(cache_dir, tmp_path):
    from diffusers import StableDiffusionInstructPix2PixPipeline

    dataset = write_parquet_dataset(tmp_path / "dataset")
    run_dir = tmp_path / "hydra-run"
    overrides = [o for o in tiny_overrides(tmp_path, dataset, cache_dir, **{"train.max_steps": 3})
                 if not o.startswith("train.output_dir=")]  # the Hydra run folder holds grids and logs
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "IP2P_CACHE": str(cache_dir)}
    env.pop("LOCAL_RANK", None)
    result = subprocess.run(
        [sys.executable, "-m", "ip2p.cli", "train", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
         "trainer.precision=32-true", *overrides, f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    report = json.loads((tmp_path / "reports" / "train.json").read_text())
    assert report["world_size"] == 2 and report["effective_batch_size"] == 4 and report["steps"] == 3
    assert report["samples_seen_this_run"] == 12
    rows = (tmp_path / "reports" / "train_loss.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows] == ["step", "1", "2", "3"]

    # rank 1 ran in the same Hydra folder with its own log; no config of its own, no stray run folders
    assert "GLOBAL_RANK: 1" in (run_dir / "train_rank1.log").read_text()
    assert sorted(p.name for p in (run_dir / "samples").glob("*.png")) == ["step-00000002.png", "step-00000003.png"]
    assert not (tmp_path / "outputs").exists()

    checkpoint = torch.load(tmp_path / "artifacts" / "checkpoints" / "last.ckpt", map_location="cpu",
                            weights_only=False)  # our own file
    assert checkpoint["global_step"] == 3 and int(checkpoint["state_dict"]["ema.num_updates"]) == 3
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(tmp_path / "artifacts" / "model",
                                                                  safety_checker=None)
    for key, value in pipe.unet.state_dict().items():
        assert torch.equal(value, checkpoint["state_dict"]["ema.model." + key]), key
