"""Training from cached latents (ip2p.training.latent_cache): the same loss as encoding every batch,
without running the VAE or the text encoder per step; the cache is keyed by data and model."""

from __future__ import annotations

import os

import pytest
import torch

from test_training import write_parquet_split


def _data_cfg(dataset, tmp_path, cache_latents, flip=True, resolution=32, resize_max=32) -> dict:
    return {"format": "parquet", "dir": str(dataset), "released_splits": [0.9, 0.05, 0.05],
            "resolution": resolution, "resize_min": resolution, "resize_max": resize_max, "flip": flip,
            "num_workers": 0, "cache_dir": str(tmp_path / "hf"), "cache_latents": cache_latents,
            "latent_cache_dir": str(tmp_path / "latents"), "cache_dtype": "float32", "cache_batch_size": 3,
            "draw_by": "pair"}


def _datamodule(data_cfg, components):
    from ip2p.training.datamodule import EditDataModule

    dm = EditDataModule(data_cfg, components.tokenizer, 4, 4, 1, seed=5, components=components)
    dm.prepare_data()
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def square_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("square")
    write_parquet_split(root, "train", 7, seed=1, size=(32, 32))
    write_parquet_split(root, "val", 3, seed=2, size=(32, 32))
    return root


class Calls:
    def __init__(self, module, name):
        self.count, self.module, self.name = 0, module, name
        self.original = getattr(module, name)

    def __enter__(self):
        def counted(*args, **kwargs):
            self.count += 1
            return self.original(*args, **kwargs)
        setattr(self.module, self.name, counted)
        return self

    def __exit__(self, *exc):
        setattr(self.module, self.name, self.original)


def test_cached_latents_give_the_loss_of_encoding_every_batch(square_dataset, tmp_path, tiny_editor):
    from ip2p.training.datamodule import collate
    from dataclasses import replace

    from ip2p.config import compose
    from ip2p.training.module import InstructPix2PixModule
    from ip2p.training.run import settings_from_config

    images = _datamodule(_data_cfg(square_dataset, tmp_path, "false"), tiny_editor)
    cached = _datamodule(_data_cfg(square_dataset, tmp_path, "true"), tiny_editor)
    assert not images.cached and cached.cached
    module = InstructPix2PixModule(tiny_editor, replace(settings_from_config(compose([])), conditioning_dropout=0.3))
    module.empty_text()  # the "" embedding: computed once per run, not per step
    keys = [(i % 7, p) for i, p in zip(range(3, 15), range(40, 52))]
    mirrored = 0
    for split in ("train", "val"):
        for start in range(0, len(keys), 4):
            batch_keys = keys[start:start + 4] if split == "train" else [(i, i) for i in range(3)]
            a = collate([images.datasets[split][k] for k in batch_keys])
            b = collate([cached.datasets[split][k] for k in batch_keys])
            assert a["id"] == b["id"] and a["prompt"] == b["prompt"]          # the same rows visited
            with Calls(tiny_editor.vae, "encode") as vae_calls, Calls(tiny_editor.text_encoder, "forward") as text_calls:
                loss_cached = module.diffusion_loss(b, torch.Generator().manual_seed(start), 0.3)
            assert vae_calls.count == 0 and text_calls.count == 0
            loss_images = module.diffusion_loss(a, torch.Generator().manual_seed(start), 0.3)
            assert torch.allclose(loss_cached, loss_images, rtol=1e-4, atol=1e-6), (split, start)
            if split == "train":
                mirrored += sum(_was_mirrored(images, k) for k in batch_keys)
    assert 0 < mirrored < len(keys)  # both branches of the flip were compared


def _was_mirrored(dm, key) -> bool:
    """Replay the item's draws: did the flip fire for this key?"""
    from ip2p.io.stage import stable_seed
    from ip2p.training.datamodule import draw_crop_and_flip, draw_short_side

    ds = dm.datasets["train"]
    g = torch.Generator().manual_seed(stable_seed(ds.seed, "train-item", key[1]))
    ds.source.pick(key[0], g)
    draw_short_side(g, ds.resize_min, ds.resize_max)
    return draw_crop_and_flip(g, 0, 0, True)[2]


def test_cache_is_built_once_and_rebuilt_for_changed_data(square_dataset, tmp_path, tiny_editor):
    cfg = _data_cfg(square_dataset, tmp_path, "auto", flip=False)
    _datamodule(cfg, tiny_editor)
    folders = sorted(p.name for p in (tmp_path / "latents").iterdir())
    assert len(folders) == 2 and folders[0].startswith("train-") and folders[1].startswith("val-")
    stamp = (tmp_path / "latents" / folders[0] / "latents.safetensors").stat().st_mtime_ns
    _datamodule(cfg, tiny_editor)
    assert sorted(p.name for p in (tmp_path / "latents").iterdir()) == folders
    assert (tmp_path / "latents" / folders[0] / "latents.safetensors").stat().st_mtime_ns == stamp
    part = next((square_dataset / "train").glob("*.parquet"))
    os.utime(part, ns=(part.stat().st_atime_ns, part.stat().st_mtime_ns + 10**9))   # the data changed
    _datamodule(cfg, tiny_editor)
    assert len(list((tmp_path / "latents").glob("train-*"))) == 2


def test_data_that_needs_images_trains_from_images_or_says_why(tmp_path, tiny_editor):
    from ip2p.errors import Ip2pError

    root = tmp_path / "wide"
    write_parquet_split(root, "train", 3, seed=1, size=(32, 40))
    write_parquet_split(root, "val", 2, seed=2, size=(32, 40))
    assert not _datamodule(_data_cfg(root, tmp_path, "auto"), tiny_editor).cached      # falls back
    with pytest.raises(Ip2pError, match=r"cached latents need square images \(row .train000-7. has a 40x32 input_image\)"):
        _datamodule(_data_cfg(root, tmp_path, "true"), tiny_editor)
    with pytest.raises(Ip2pError, match="cache_latents=true: random resized crops"):
        _datamodule(_data_cfg(root, tmp_path, "true", resize_max=40), tiny_editor)
    with pytest.raises(Ip2pError, match="must be true, false or auto"):
        _datamodule(_data_cfg(root, tmp_path, "sometimes"), tiny_editor)


def test_training_run_from_cached_latents(square_dataset, tmp_path, cache_dir):
    """`ip2p train` end to end with train.data.cache_latents=true: steps, validation, sample grid, export."""
    import json

    from test_training import compose_train

    from ip2p.training.run import run

    cfg = compose_train(tmp_path, square_dataset, cache_dir, **{
        "train.data.resize_max": 32, "train.data.cache_latents": "true",
        "train.data.latent_cache_dir": str(tmp_path / "latents")})
    report = run(cfg)
    assert report["steps"] == 4 and report["val_loss"] > 0
    assert len(list((tmp_path / "latents").glob("train-*"))) == 1
    assert (tmp_path / "artifacts" / "model" / "unet" / "config.json").is_file()
    assert json.loads((tmp_path / "reports" / "train.json").read_text())["steps"] == 4


def test_cache_reader_survives_pickling_for_dataloader_workers(square_dataset, tmp_path, tiny_editor):
    import pickle

    dm = _datamodule(_data_cfg(square_dataset, tmp_path, "true", flip=False), tiny_editor)
    ds = dm.datasets["train"]
    copy = pickle.loads(pickle.dumps(ds))          # what a spawned DataLoader worker receives
    a, b = ds[(2, 9)], copy[(2, 9)]
    assert all(torch.equal(a[k], b[k]) for k in ("latent_mean", "latent_logvar", "condition", "text_embeds"))
