"""Training stage: objective pieces against hand computations, data order and augmentation, exact resume,
precision modes, the optimizer's parameter set, and the exported model loading in diffusers."""

from __future__ import annotations

import io
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image


TEXT_ONLY, BOTH, IMAGE_ONLY, KEEP = "text", "both", "image", "keep"


# ---------------------------------------------------------------------------------------------------
# Test data in the dataset stage's contract format (also used by test_ddp.py and test_loggers.py)
# ---------------------------------------------------------------------------------------------------

def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_parquet_split(root: Path, split: str, count: int, seed: int, size=(40, 48)) -> list[Path]:
    """<root>/<split>/part-00000.parquet written by the dataset stage's own writer; edited = inverted input."""
    from ip2p.io.dataset import image_struct, write_split

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(count):
        image = rng.integers(0, 256, (size[0], size[1], 3), dtype=np.uint8)
        rows.append({"id": f"{split}{i:03d}-7", "pair_id": f"{split}{i:03d}",
                     "input_image": image_struct(_png(image)), "edited_image": image_struct(_png(255 - image)),
                     "edit_prompt": ["invert the colors", "make it a negative", "turn it inside out"][i % 3],
                     "input_caption": "a noisy picture", "output_caption": "an inverted noisy picture", "seed": 7,
                     "p": 0.5, "cfg": 7.5, "clip_sim_0": 0.3, "clip_sim_1": 0.3, "clip_sim_dir": 0.25,
                     "clip_sim_image": 0.8})
    return write_split(rows, root, split, shard_size=max(count, 1))


def write_parquet_dataset(root: Path, train: int = 8, val: int = 4) -> Path:
    write_parquet_split(root, "train", train, seed=1)
    write_parquet_split(root, "val", val, seed=2)
    return root


def tiny_overrides(tmp: Path, dataset: Path, cache_dir: Path, **extra) -> list[str]:
    """A 32 px, batch 2, few-step run writing everything under `tmp`."""
    values = {
        "device": "cpu", "progress": "false", "paths.cache": str(cache_dir),
        "paths.artifacts": str(tmp / "artifacts"), "paths.reports": str(tmp / "reports"),
        "paths.data": str(tmp / "data"), "train.output_dir": str(tmp / "run"),
        "train.data.dir": str(dataset), "train.data.cache_dir": str(tmp / "hf-cache"),
        "train.data.resolution": "32", "train.data.resize_min": "32", "train.data.resize_max": "40",
        "train.batch_size": "2", "train.max_steps": "4", "train.validation.every_n_steps": "2",
        "train.validation.max_batches": "1", "train.validation.grid.num_images": "2",
        "train.validation.grid.steps": "2", "train.checkpoint.every_n_steps": "2", "logger": "none",
    }
    values.update({k: str(v) for k, v in extra.items()})
    return [f"{k}={v}" for k, v in values.items()]


def compose_train(tmp: Path, dataset: Path, cache_dir: Path, **extra):
    from ip2p.config import compose

    return compose(tiny_overrides(tmp, dataset, cache_dir, **extra))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_parquet_dataset(tmp_path_factory.mktemp("dataset"))


# ---------------------------------------------------------------------------------------------------
# Conditioning dropout
# ---------------------------------------------------------------------------------------------------

def outcome(drop_text: bool, drop_image: bool) -> str:
    return {(True, False): TEXT_ONLY, (True, True): BOTH, (False, True): IMAGE_ONLY, (False, False): KEEP}[
        (bool(drop_text), bool(drop_image))]


@pytest.mark.parametrize("p", [0.05, 0.1])
def test_dropout_rule_on_chosen_draws(p):
    from ip2p.training.module import conditioning_dropout_masks

    # (r, expected) at and around each boundary of the original rule
    cases = [(0.0, TEXT_ONLY), (p * 0.99, TEXT_ONLY), (p, BOTH), (p * 1.99, BOTH), (2 * p, IMAGE_ONLY),
             (3 * p * 0.999, IMAGE_ONLY), (3 * p, KEEP), (0.5, KEEP), (0.999, KEEP)]
    r = torch.tensor([c[0] for c in cases], dtype=torch.float64)
    drop_text, drop_image = conditioning_dropout_masks(r, p)
    assert [outcome(t, i) for t, i in zip(drop_text, drop_image)] == [c[1] for c in cases]


def test_dropout_frequencies_match_the_paper():
    from ip2p.training.module import conditioning_dropout_masks

    n, p = 10_000, 0.05
    r = torch.rand(n, generator=torch.Generator().manual_seed(1234))
    drop_text, drop_image = conditioning_dropout_masks(r, p)
    counts = {TEXT_ONLY: 0, BOTH: 0, IMAGE_ONLY: 0, KEEP: 0}
    for t, i in zip(drop_text.tolist(), drop_image.tolist()):
        counts[outcome(t, i)] += 1
    for name, prob in ((TEXT_ONLY, 0.05), (BOTH, 0.05), (IMAGE_ONLY, 0.05), (KEEP, 0.85)):
        sd = math.sqrt(n * prob * (1 - prob))
        assert abs(counts[name] - n * prob) < 4 * sd, (name, counts)


def test_dropout_replaces_text_with_empty_embedding_and_zeroes_the_image():
    from ip2p.training.module import apply_conditioning_dropout

    p = 0.05
    r = torch.tensor([0.01, 0.07, 0.12, 0.5])  # text only, both, image only, keep
    text = torch.randn(4, 77, 8)
    empty = torch.randn(1, 77, 8)
    condition = torch.randn(4, 4, 2, 2)
    new_text, new_condition = apply_conditioning_dropout(text, condition, empty, r, p)
    for row, (text_dropped, image_dropped) in enumerate([(True, False), (True, True), (False, True), (False, False)]):
        assert torch.equal(new_text[row], empty[0] if text_dropped else text[row])
        assert torch.equal(new_condition[row], torch.zeros_like(condition[row]) if image_dropped else condition[row])


# ---------------------------------------------------------------------------------------------------
# Latents, EMA, optimizer
# ---------------------------------------------------------------------------------------------------

def test_latents_target_is_scaled_sample_and_condition_is_unscaled_mode(tiny_editor):
    from ip2p.training.module import encode_pair

    vae = tiny_editor.vae
    gen = torch.Generator().manual_seed(3)
    edited = torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1
    inp = torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1
    target, condition = encode_pair(vae, edited, inp, torch.Generator().manual_seed(11))

    with torch.no_grad():
        moments_edited = vae.quant_conv(vae.encoder(edited))   # the posterior's mean and log-variance
        moments_input = vae.quant_conv(vae.encoder(inp))
    mean, logvar = moments_edited.chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(11))
    assert vae.config.scaling_factor == pytest.approx(0.18215)
    torch.testing.assert_close(target, (mean + std * eps) * 0.18215)
    torch.testing.assert_close(condition, moments_input.chunk(2, dim=1)[0])  # mode = mean, NOT scaled


def test_ema_update_matches_hand_computation():
    from ip2p.models.ema import ExponentialMovingAverage, ema_decay

    model = torch.nn.Linear(3, 2)
    start = [p.detach().clone() for p in model.parameters()]
    ema = ExponentialMovingAverage(model, decay=0.9, warmup=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert ema.update(model) == pytest.approx(0.9)
    for avg, old, new in zip(ema.model.parameters(), start, model.parameters()):
        torch.testing.assert_close(avg, 0.9 * old + 0.1 * new.detach())
    assert int(ema.num_updates) == 1
    assert {"model.weight", "model.bias", "num_updates"} <= set(ema.state_dict())
    assert not any(p.requires_grad for p in ema.model.parameters())

    # warmup: d_n = min(decay, (1 + n) / (10 + n)) for update n = 1, 2, ...
    warm = ExponentialMovingAverage(model, decay=0.9999, warmup=True)
    assert warm.update(model) == pytest.approx(2 / 11)
    assert warm.update(model) == pytest.approx(3 / 12)
    assert ema_decay(10_000_000, 0.9999, True) == pytest.approx(0.9999)


def test_only_unet_parameters_are_trained(cfg):
    from ip2p.training.module import InstructPix2PixModule
    from ip2p.training.run import load_components, settings_from_config

    components = load_components(cfg)  # a fresh load: the module changes requires_grad
    module = InstructPix2PixModule(components, settings_from_config(cfg))
    optimizer = module.configure_optimizers()["optimizer"]
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in module.unet.parameters()}
    for frozen in (components.vae, components.text_encoder, module.ema.model):
        assert not any(p.requires_grad for p in frozen.parameters())
        assert not in_optimizer & {id(p) for p in frozen.parameters()}
    keys = module.state_dict().keys()
    assert any(k.startswith("ema.model.") for k in keys)
    assert not any(k.startswith(("frozen", "vae", "text_encoder")) for k in keys)  # kept out of checkpoints


def test_base_init_widens_conv_in_with_zero_image_channels(cfg):
    from ip2p.models.loader import load_diffusion
    from ip2p.training.run import load_components

    base = load_diffusion("tiny", "base", cfg.model, cfg.paths.cache)
    widened = load_components(cfg).unet  # train.init=base (the default)
    assert widened.config.in_channels == 8
    torch.testing.assert_close(widened.conv_in.weight[:, :4], base.unet.conv_in.weight)
    assert torch.count_nonzero(widened.conv_in.weight[:, 4:]) == 0
    torch.testing.assert_close(widened.conv_in.bias, base.unet.conv_in.bias)


# ---------------------------------------------------------------------------------------------------
# Data: order, augmentation, released layout
# ---------------------------------------------------------------------------------------------------

def test_stream_sampler_resumes_and_shards():
    from ip2p.training.datamodule import StreamSampler

    def take(sampler, n):
        it = iter(sampler)
        return [next(it) for _ in range(n)]

    full = take(StreamSampler(5, seed=3), 17)
    assert take(StreamSampler(5, seed=3, start=6), 11) == full[6:]  # resume = the same stream, later
    for epoch in range(3):  # every epoch visits every item once
        assert sorted(i for i, _ in full[5 * epoch: 5 * epoch + 5]) == list(range(5))
    assert [i for i, _ in full[:5]] != [i for i, _ in full[5:10]]  # a fresh order per epoch
    rank0, rank1 = take(StreamSampler(5, 3, 0, 2), 6), take(StreamSampler(5, 3, 1, 2), 6)
    merged = [x for pair in zip(rank0, rank1) for x in pair]
    assert merged == full[:12]  # two ranks split the one global stream


def test_augmentation_is_identical_for_both_images_and_random_across_items():
    from ip2p.training.datamodule import augment_pair

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8))
    crops = set()
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        a, b = augment_pair(image, image.copy(), 32, 36, 44, True, g)
        assert a.size == b.size == (32, 32)
        assert np.array_equal(np.asarray(a), np.asarray(b))
        crops.add(np.asarray(a).tobytes())
    assert len(crops) > 6
    # validation: centre crop of the short side resized to the resolution, no flip
    a, _ = augment_pair(image, image, 32, 32, 32, True, None)
    expected = image.resize((45, 32), Image.Resampling.LANCZOS).crop((6, 0, 38, 32))
    assert np.array_equal(np.asarray(a), np.asarray(expected))


def test_flip_switch(monkeypatch):
    from ip2p.training.datamodule import augment_pair

    image = Image.fromarray(np.tile(np.arange(32, dtype=np.uint8)[None, :, None] * 8, (32, 1, 3)))
    flipped_any = False
    for seed in range(16):
        on, _ = augment_pair(image, image, 32, 32, 32, True, torch.Generator().manual_seed(seed))
        off, _ = augment_pair(image, image, 32, 32, 32, False, torch.Generator().manual_seed(seed))
        assert np.array_equal(np.asarray(off), np.asarray(image))
        flipped_any |= np.array_equal(np.asarray(on), np.asarray(image)[:, ::-1])
    assert flipped_any


def write_released(root: Path, folders: int = 20) -> Path:
    """The official layout: seeds.json lists folders (unsorted here), each with prompt.json and seed images."""
    entries = []
    for k in reversed(range(folders)):
        name = f"{k:07d}"
        seeds = [100 + k, 200 + k]
        folder = root / name
        folder.mkdir(parents=True)
        (folder / "prompt.json").write_text(json.dumps({"input": "a cat", "edit": f"edit {name}", "output": "a dog"}))
        for seed in seeds:
            for idx, value in (("0", 10), ("1", 240)):
                Image.new("RGB", (40, 40), (value, value, value)).save(folder / f"{seed}_{idx}.jpg")
        entries.append([name, seeds])
    (root / "seeds.json").write_text(json.dumps(entries))
    return root


def test_released_layout_split_and_items(tmp_path, tiny_editor):
    from ip2p.training.datamodule import EditDataModule, ReleasedSource

    root = write_released(tmp_path / "released")
    split = {s: [name for name, _ in ReleasedSource(root, s, (0.9, 0.05, 0.05)).entries] for s in ("train", "val", "test")}
    names = [f"{k:07d}" for k in range(20)]
    assert split == {"train": names[:18], "val": names[18:19], "test": names[19:]}  # sorted, floor(0.9n), ...

    data_cfg = {"format": "released", "dir": str(root), "released_splits": [0.9, 0.05, 0.05], "resolution": 32,
                "resize_min": 32, "resize_max": 32, "flip": False, "num_workers": 0, "cache_dir": None}
    dm = EditDataModule(data_cfg, tiny_editor.tokenizer, 2, 2, 1, seed=0)
    dm.setup("fit")
    assert dm.rows == {"train": 36, "val": 2} and dm.pairs == {"train": 18, "val": 1}  # two seeds a folder
    seen_seeds = set()
    for position in range(40):
        item = dm.datasets["train"][(position % 18, position)]
        assert item["input"].shape == item["edited"].shape == (3, 32, 32)
        assert item["input"].min() >= -1 and item["edited"].max() <= 1
        assert item["input"].mean() < 0 < item["edited"].mean()  # _0 is the input, _1 the edited image
        folder, seed = item["id"].split("-")
        assert item["prompt"] == f"edit {folder}"
        assert int(seed) in (100 + int(folder), 200 + int(folder))
        seen_seeds.add(int(seed) // 100)
    assert seen_seeds == {1, 2}  # a random seed per visit
    batch = next(iter(dm.train_dataloader()))
    assert batch["input"].shape == (2, 3, 32, 32) and batch["input_ids"].shape == (2, 77)


def test_parquet_datamodule_reads_the_contract(dataset, tmp_path, tiny_editor):
    from ip2p.training.datamodule import EditDataModule

    data_cfg = {"format": "parquet", "dir": str(dataset), "released_splits": [0.9, 0.05, 0.05], "resolution": 32,
                "resize_min": 32, "resize_max": 32, "flip": False, "num_workers": 0,
                "cache_dir": str(tmp_path / "hf"), "draw_by": "pair"}
    dm = EditDataModule(data_cfg, tiny_editor.tokenizer, 2, 2, 1, seed=0)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.rows == {"train": 8, "val": 4}
    item = dm.datasets["val"][(0, 0)]
    # edited = 255 - input in the test data; after identical resizing/cropping the sum stays ~ 0 in [-1, 1]
    assert torch.allclose(item["input"] + item["edited"], torch.zeros_like(item["input"]), atol=0.05)
    ids = item["input_ids"]
    expected = tiny_editor.tokenizer(["invert the colors"], padding="max_length", max_length=77,
                                     truncation=True, return_tensors="pt").input_ids[0]
    assert torch.equal(ids, expected)


def test_resume_auto_continues_only_the_same_recipe_on_the_same_data(tmp_path, dataset, cache_dir):
    """resume=auto: last.ckpt is used when run.json's fingerprint is this run's; a changed recipe or
    changed data starts fresh and moves the old checkpoints aside; max_steps may grow."""
    from omegaconf import open_dict

    from ip2p.training.resume import record_run, resolve_resume, run_fingerprint

    cfg = compose_train(tmp_path, dataset, cache_dir)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    assert resolve_resume(cfg, ckpt) is None                                 # nothing there: fresh
    torch.save({"state_dict": {}, "global_step": 3}, ckpt / "last.ckpt")
    torch.save({"state_dict": {}, "global_step": 2}, ckpt / "step-00000002.ckpt")
    record_run(cfg, ckpt)
    assert resolve_resume(cfg, ckpt) == str(ckpt / "last.ckpt")
    longer = compose_train(tmp_path, dataset, cache_dir, **{"train.max_steps": 40, "train.export.enabled": "false"})
    assert run_fingerprint(longer) == run_fingerprint(cfg)                    # extending a run continues it
    cached = compose_train(tmp_path, dataset, cache_dir, **{"train.data.cache_latents": "true",
                                                            "train.data.num_workers": 2})
    assert run_fingerprint(cached) == run_fingerprint(cfg)                    # cached latents: the same losses
    flipless = compose_train(tmp_path, dataset, cache_dir, **{"train.data.flip": "false"})
    assert run_fingerprint(flipless) != run_fingerprint(cfg)                  # but the data recipe counts
    before_schedules = compose_train(tmp_path, dataset, cache_dir)
    with open_dict(before_schedules):
        del before_schedules.train["lr_schedule"], before_schedules.train["min_lr"]
    assert run_fingerprint(before_schedules) == run_fingerprint(cfg)          # runs from before those keys continue
    before_base_vae = compose_train(tmp_path, dataset, cache_dir)
    with open_dict(before_base_vae):
        del before_base_vae.model["base_vae"]
    assert run_fingerprint(before_base_vae) == run_fingerprint(cfg)
    before_rename = compose_train(tmp_path, dataset, cache_dir)               # train.data.draw_by was .sampling
    with open_dict(before_rename):
        before_rename.train.data["sampling"] = before_rename.train.data.pop("draw_by")
    assert run_fingerprint(before_rename) == run_fingerprint(cfg)
    before_conv_in_rate = compose_train(tmp_path, dataset, cache_dir)
    with open_dict(before_conv_in_rate):
        del before_conv_in_rate.train["conv_in_lr_scale"]
    assert run_fingerprint(before_conv_in_rate) == run_fingerprint(cfg)
    faster_conv_in = compose_train(tmp_path, dataset, cache_dir, **{"train.conv_in_lr_scale": 10})
    assert run_fingerprint(faster_conv_in) != run_fingerprint(cfg)
    before_snr_weights = compose_train(tmp_path, dataset, cache_dir)
    with open_dict(before_snr_weights):
        del before_snr_weights.train["snr_gamma"]
    assert run_fingerprint(before_snr_weights) == run_fingerprint(cfg)
    assert run_fingerprint(compose_train(tmp_path, dataset, cache_dir, **{"train.snr_gamma": 5})) != run_fingerprint(cfg)
    before_copy_rows = compose_train(tmp_path, dataset, cache_dir)
    with open_dict(before_copy_rows):
        del before_copy_rows.train["copy_rows"]
    assert run_fingerprint(before_copy_rows) == run_fingerprint(cfg)
    assert run_fingerprint(compose_train(tmp_path, dataset, cache_dir, **{"train.copy_rows": 0.2})) != run_fingerprint(cfg)
    # the preset's editor is not where a base-initialised run starts, so naming another one changes nothing
    other_editor = compose_train(tmp_path, dataset, cache_dir, **{"model.editor": str(tmp_path / "elsewhere")})
    assert run_fingerprint(other_editor) == run_fingerprint(cfg)
    from_editor = compose_train(tmp_path, dataset, cache_dir, **{"train.init": "editor"})
    from_other_editor = compose_train(tmp_path, dataset, cache_dir, **{"train.init": "editor",
                                                                       "model.editor": str(tmp_path / "elsewhere")})
    assert run_fingerprint(from_editor) != run_fingerprint(from_other_editor)
    swapped = compose_train(tmp_path, dataset, cache_dir, **{"model.base_vae": str(tmp_path / "vae-ft")})
    assert run_fingerprint(swapped) != run_fingerprint(cfg)                   # another VAE: another run
    cosine = compose_train(tmp_path, dataset, cache_dir, **{"train.lr_schedule": "cosine"})
    assert run_fingerprint(cosine) != run_fingerprint(cfg)
    other_lr = compose_train(tmp_path, dataset, cache_dir, **{"train.lr": 3e-4})
    other_seed = compose_train(tmp_path, dataset, cache_dir, seed=1)
    assert run_fingerprint(other_lr) != run_fingerprint(cfg) != run_fingerprint(other_seed)
    assert resolve_resume(other_lr, ckpt) is None                           # another recipe: fresh
    assert sorted(p.name for p in (ckpt / "superseded").iterdir()) == ["last.ckpt", "run.json", "step-00000002.ckpt"]
    assert not list(ckpt.glob("*.ckpt"))
    # data changed on disk (a rerun of the filter): fresh too
    data = tmp_path / "data-copy"
    shutil.copytree(dataset, data)
    on_copy = compose_train(tmp_path, data, cache_dir)
    torch.save({"state_dict": {}, "global_step": 3}, ckpt / "last.ckpt")
    record_run(on_copy, ckpt)
    assert resolve_resume(on_copy, ckpt) == str(ckpt / "last.ckpt")
    (data / "train" / "part-00001.parquet").write_bytes(b"x" * 10)
    assert resolve_resume(on_copy, ckpt) is None
    # last: whatever wrote it; fresh: never
    torch.save({"state_dict": {}, "global_step": 3}, ckpt / "last.ckpt")
    assert resolve_resume(compose_train(tmp_path, dataset, cache_dir, **{"train.resume": "last"}), ckpt) == \
        str(ckpt / "last.ckpt")
    assert resolve_resume(compose_train(tmp_path, dataset, cache_dir, **{"train.resume": "fresh"}), ckpt) is None
    assert not (ckpt / "last.ckpt").exists()


def test_parquet_source_draws_caption_pairs_uniformly_then_a_candidate():
    """The original's dataset: a caption pair with 3 kept candidates is seen as often as one with 1,
    and its candidates share its visits; unit=row weighs every candidate equally."""
    from ip2p.errors import Ip2pError
    from ip2p.training.datamodule import ParquetSource

    pair_ids = ["b", "a", "a", "a", "c", "c"]                       # a: 3 candidates, b: 1, c: 2
    import datasets

    table = datasets.Dataset.from_dict({"pair_id": pair_ids, "id": [f"{p}-{i}" for i, p in enumerate(pair_ids)]})
    source = ParquetSource(table, "pair")
    assert len(source) == 3 and source.groups == [[1, 2, 3], [0], [4, 5]]
    assert len(ParquetSource(table, "row")) == 6 and ParquetSource(table, "row").groups == [[i] for i in range(6)]
    for unit in ("pair", "row"):  # what a report counts does not depend on the unit drawn
        assert (ParquetSource(table, unit).num_rows, ParquetSource(table, unit).num_pairs) == (6, 3)
    with pytest.raises(Ip2pError, match="train.data.draw_by"):
        ParquetSource(table, "caption")
    # the candidate drawn for a visit: uniform over the pair's rows, from the item's generator
    picks = []
    for position in range(3000):
        g = torch.Generator().manual_seed(position)
        rows = source.groups[0]
        picks.append(rows[int(torch.randint(len(rows), (), generator=g))])
    counts = np.bincount(picks, minlength=6)[1:4] / 3000
    assert np.allclose(counts, 1 / 3, atol=0.04)
    # a full pass of a sampler over pair items sees each caption pair once, whatever its candidate count
    seen_pairs = sorted(pair_ids[source.groups[i][0]] for i in range(len(source)))
    assert seen_pairs == ["a", "b", "c"]


def test_parquet_datamodule_samples_pairs_by_default(tmp_path, tiny_editor):
    """Two kept candidates of one caption pair plus one of another: 2 training items by default."""
    from ip2p.io.dataset import image_struct, write_split
    from ip2p.training.datamodule import EditDataModule

    rng = np.random.default_rng(0)
    rows = []
    for row_id, pair_id in (("p1-1", "p1"), ("p1-2", "p1"), ("p2-1", "p2")):
        image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        rows.append({"id": row_id, "pair_id": pair_id, "input_image": image_struct(_png(image)),
                     "edited_image": image_struct(_png(255 - image)), "edit_prompt": "invert",
                     "input_caption": "x", "output_caption": "y", "seed": 1, "p": 0.5, "cfg": 7.5,
                     "clip_sim_0": 0.3, "clip_sim_1": 0.3, "clip_sim_dir": 0.2, "clip_sim_image": 0.8})
    for split in ("train", "val"):
        write_split(rows, tmp_path / "ds", split, shard_size=3)
    data_cfg = {"format": "parquet", "dir": str(tmp_path / "ds"), "resolution": 32, "resize_min": 32,
                "resize_max": 32, "flip": False, "num_workers": 0, "cache_dir": str(tmp_path / "hf"), "draw_by": "pair"}
    dm = EditDataModule(data_cfg, tiny_editor.tokenizer, 2, 2, 1, seed=0)
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 2
    assert dm.rows == {"train": 3, "val": 3} and dm.pairs == {"train": 2, "val": 2}
    ids = {dm.datasets["train"][(0, position)]["id"] for position in range(40)}
    assert ids == {"p1-1", "p1-2"}                                   # item 0 is pair p1, both candidates drawn
    dm_rows = EditDataModule({**data_cfg, "draw_by": "row"}, tiny_editor.tokenizer, 2, 2, 1, seed=0)
    dm_rows.setup("fit")
    assert len(dm_rows.datasets["train"]) == 3
    assert dm_rows.rows == dm.rows and dm_rows.pairs == dm.pairs


# ---------------------------------------------------------------------------------------------------
# Whole runs
# ---------------------------------------------------------------------------------------------------

def _checkpoint_weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)  # our own file, written by this test


def test_resume_from_last_equals_an_uninterrupted_run(dataset, cache_dir, tmp_path):
    from ip2p.training.run import run

    # A: 4 steps in one go (checkpoints at steps 2 and 4); exports the EMA model
    report_a = run(compose_train(tmp_path / "a", dataset, cache_dir))
    # B: 3 steps, stop (last.ckpt at step 3, off the checkpoint interval); then a plain rerun (resume=auto:
    # the same recipe and data) continues to 4 in a fresh process
    run(compose_train(tmp_path / "b", dataset, cache_dir, **{"train.max_steps": 3, "train.export.enabled": "false"}))
    report_b = run(compose_train(tmp_path / "b", dataset, cache_dir))
    assert report_b["resumed_from_step"] == 3 and report_a["resumed_from_step"] == 0
    assert report_a["steps"] == report_b["steps"] == 4

    a = _checkpoint_weights(tmp_path / "a" / "artifacts" / "checkpoints" / "last.ckpt")
    b = _checkpoint_weights(tmp_path / "b" / "artifacts" / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 4
    assert int(a["state_dict"]["ema.num_updates"]) == 4
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key  # UNet and EMA weights, bit for bit
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"])
    # EMA really trails the weights (decay 0.9999): close to the start, not equal to the trained UNet
    unet_keys = [k for k in a["state_dict"] if k.startswith("unet.")]
    assert any(not torch.equal(a["state_dict"][k], a["state_dict"]["ema.model." + k[5:]]) for k in unet_keys)
    # the same loss curve, the resumed half appended to the first
    csv_a = (tmp_path / "a" / "reports" / "train_loss.csv").read_text()
    csv_b = (tmp_path / "b" / "reports" / "train_loss.csv").read_text()
    assert csv_a == csv_b and csv_a.splitlines()[0] == "step,loss" and len(csv_a.splitlines()) == 5
    # a rerun already at max_steps (DVC deleted its outputs first) exports and writes the curve again
    (tmp_path / "b" / "reports" / "train_loss.csv").unlink()
    run(compose_train(tmp_path / "b", dataset, cache_dir))
    assert (tmp_path / "b" / "reports" / "train_loss.csv").read_text() == csv_a
    report = json.loads((tmp_path / "a" / "reports" / "train.json").read_text())
    assert math.isfinite(report["train_loss"]) and math.isfinite(report["val_loss"])
    assert sorted(report["val_copy_error"]) == ["0.50", "0.75", "1.00"]  # the default fractions of the schedule
    assert all(math.isfinite(v) and v >= 0 for v in report["val_copy_error"].values())
    assert report["rows"] == report["pairs"] == {"train": 8, "val": 4}  # one candidate per caption pair here
    assert sorted(p.name for p in (tmp_path / "a" / "run" / "samples").glob("*.png")) == \
        ["step-00000002.png", "step-00000004.png"]
    grid = Image.open(tmp_path / "a" / "run" / "samples" / "step-00000004.png")
    assert grid.size == (3 * 32, 2 * 32)  # input | edit | target, two rows

    # The export holds the EMA weights and loads in diffusers and through `ip2p edit`
    from diffusers import StableDiffusionInstructPix2PixPipeline

    model_dir = tmp_path / "a" / "artifacts" / "model"
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(model_dir, safety_checker=None)
    exported = pipe.unet.state_dict()
    for key, value in exported.items():
        torch.testing.assert_close(value, a["state_dict"]["ema.model." + key], rtol=0, atol=0)
    out = pipe("invert the colors", image=Image.new("RGB", (64, 64), "gray"), num_inference_steps=2,
               output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()

    from ip2p.cli import main

    source = tmp_path / "in.png"
    Image.new("RGB", (64, 64), "gray").save(source)
    assert main(["edit", str(source), "invert the colors", "-o", str(tmp_path / "out.png"), "--model",
                 str(model_dir), "--steps", "2", "--resolution", "64", "--device", "cpu", "--no-progress"]) == 0
    assert Image.open(tmp_path / "out.png").size == (64, 64)


@pytest.mark.parametrize("precision,checkpointing", [("32-true", "false"), ("bf16-mixed", "true")])
def test_precision_modes_train_with_finite_loss(dataset, cache_dir, tmp_path, precision, checkpointing):
    from ip2p.training.run import run

    report = run(compose_train(tmp_path, dataset, cache_dir, **{
        "trainer.precision": precision, "train.gradient_checkpointing": checkpointing, "train.max_steps": 2,
        "train.accumulate_grad_batches": 2, "train.export.enabled": "false", "train.validation.grid.num_images": 0}))
    assert report["precision"] == precision and report["steps"] == 2
    assert report["effective_batch_size"] == 4
    assert math.isfinite(report["train_loss"]) and math.isfinite(report["val_loss"])
    rows = (tmp_path / "reports" / "train_loss.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows] == ["step", "1", "2"]  # one row per optimizer step, not per batch


def test_v_prediction_objective_is_the_velocity(cfg):
    from ip2p.training.module import InstructPix2PixModule, encode_pair
    from ip2p.training.run import load_components, settings_from_config

    components = load_components(cfg)
    components.scheduler = components.scheduler.__class__.from_config(components.scheduler.config,
                                                                      prediction_type="v_prediction")
    module = InstructPix2PixModule(components, settings_from_config(cfg))
    assert module.prediction_type == "v_prediction"
    captured = {}

    def fake_unet(sample, t, encoder_hidden_states):
        captured["t"], captured["noisy"] = t, sample[:, :4]
        return type("Out", (), {"sample": torch.zeros_like(sample[:, :4])})()

    module.unet.forward = fake_unet
    batch = {"input": torch.zeros(2, 3, 32, 32), "edited": torch.zeros(2, 3, 32, 32),
             "input_ids": torch.zeros(2, 77, dtype=torch.long)}
    loss = module.diffusion_loss(batch, torch.Generator().manual_seed(0), dropout=0.0)
    # zero prediction: the loss is the mean square of the target; recompute the target by hand
    g = torch.Generator().manual_seed(0)
    target, _ = encode_pair(components.vae, batch["edited"], batch["input"], g)
    noise = torch.randn(target.shape, generator=g)
    t = torch.randint(0, 1000, (2,), generator=g)
    alpha_bar = module.noise_scheduler.alphas_cumprod[t][:, None, None, None]
    velocity = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * target
    assert torch.equal(captured["t"], t)
    torch.testing.assert_close(loss, (velocity ** 2).mean())


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_loss_weights_each_example_by_the_capped_snr(tmp_path, dataset, cache_dir, prediction_type):
    """train.snr_gamma: each example's squared error times min(SNR, gamma) / SNR (epsilon) or
    min(SNR, gamma) / (SNR + 1) (v), SNR = a / (1 - a); recomputed here by hand from the same draws."""
    from ip2p.training.module import InstructPix2PixModule, encode_pair, min_snr_weights
    from ip2p.training.run import load_components, settings_from_config

    cfg = compose_train(tmp_path, dataset, cache_dir, **{"train.snr_gamma": 5.0})
    settings = settings_from_config(cfg)
    assert settings.snr_gamma == 5.0
    components = load_components(cfg)
    components.scheduler = components.scheduler.__class__.from_config(components.scheduler.config,
                                                                      prediction_type=prediction_type)
    module = InstructPix2PixModule(components, settings)
    module.unet.forward = lambda sample, t, encoder_hidden_states: type(
        "Out", (), {"sample": torch.zeros_like(sample[:, :4])})()
    batch = {"input": torch.zeros(6, 3, 32, 32), "edited": torch.rand(6, 3, 32, 32) * 2 - 1,
             "input_ids": torch.zeros(6, 77, dtype=torch.long)}
    loss = module.diffusion_loss(batch, torch.Generator().manual_seed(1), dropout=0.0, snr_gamma=5.0)
    g = torch.Generator().manual_seed(1)
    target, _ = encode_pair(components.vae, batch["edited"], batch["input"], g)
    noise = torch.randn(target.shape, generator=g)
    t = torch.randint(0, 1000, (6,), generator=g)
    a = module.noise_scheduler.alphas_cumprod[t].double()
    objective = noise if prediction_type == "epsilon" else (
        a.sqrt()[:, None, None, None] * noise - (1 - a).sqrt()[:, None, None, None] * target)
    snr = a / (1 - a)
    by_hand = [min(float(s), 5.0) / (float(s) if prediction_type == "epsilon" else float(s) + 1) for s in snr]
    expected = sum(w * float((objective[i] ** 2).mean()) for i, w in enumerate(by_hand)) / 6
    assert abs(float(loss) - expected) < 1e-5 * max(1.0, expected)
    # the cap: at high noise (SNR < gamma) an epsilon example keeps weight 1, at low noise it weighs gamma / SNR
    weights = min_snr_weights(module.noise_scheduler.alphas_cumprod, torch.tensor([999, 10]), 5.0, "epsilon")
    assert float(weights[0]) == 1.0 and float(weights[1]) < 0.05
    with pytest.raises(ValueError, match="positive"):
        min_snr_weights(module.noise_scheduler.alphas_cumprod, t, 0.0, "epsilon")
    # null, the default (the paper), is the plain mean, and a run made before the option keeps its fingerprint
    plain_loss = module.diffusion_loss(batch, torch.Generator().manual_seed(1), dropout=0.0, snr_gamma=None)
    assert abs(float(plain_loss) - sum(float((objective[i] ** 2).mean()) for i in range(6)) / 6) < 1e-5


@pytest.mark.parametrize("schedule", ["constant", "snr"])
def test_huber_loss_is_the_pseudo_huber_of_each_value_by_hand(tmp_path, dataset, cache_dir, schedule):
    """train.loss=huber: each value's 2c(sqrt(r^2 + c^2) - c), c per example from huber_schedule, averaged;
    recomputed here in float64 from the same draws, with c(t) written out from the formula."""
    from omegaconf import open_dict

    from ip2p.training.module import InstructPix2PixModule, encode_pair, huber_c_per_example
    from ip2p.training.run import load_components, settings_from_config

    cfg = compose_train(tmp_path, dataset, cache_dir, **{"train.loss": "huber", "train.huber_c": 0.05,
                                                          "train.huber_schedule": schedule})
    settings = settings_from_config(cfg)
    assert (settings.loss, settings.huber_c, settings.huber_schedule) == ("huber", 0.05, schedule)
    components = load_components(cfg)
    module = InstructPix2PixModule(components, settings)
    offset = 0.3   # a prediction off by a constant: residuals both below and far above c
    module.unet.forward = lambda sample, t, encoder_hidden_states: type(
        "Out", (), {"sample": torch.full_like(sample[:, :4], offset)})()
    batch = {"input": torch.zeros(6, 3, 32, 32), "edited": torch.rand(6, 3, 32, 32) * 2 - 1,
             "input_ids": torch.zeros(6, 77, dtype=torch.long)}
    loss = module.diffusion_loss(batch, torch.Generator().manual_seed(1), dropout=0.0, loss="huber", huber_c=0.05,
                                 huber_schedule=schedule)
    g = torch.Generator().manual_seed(1)
    target, _ = encode_pair(components.vae, batch["edited"], batch["input"], g)
    noise = torch.randn(target.shape, generator=g)
    t = torch.randint(0, 1000, (6,), generator=g)
    a = module.noise_scheduler.alphas_cumprod[t].double()
    objective = noise.double() if module.prediction_type == "epsilon" else (
        a.sqrt()[:, None, None, None] * noise - (1 - a).sqrt()[:, None, None, None] * target).double()
    expected = 0.0
    for i in range(6):
        ai = float(a[i])
        c = 0.05 if schedule == "constant" else (
            0.05 if ai == 0 else (1 - 0.05) / (1 + ((1 - ai) / ai) ** 0.5) ** 2 + 0.05)
        r = offset - objective[i]
        expected += float((2 * c * ((r ** 2 + c ** 2).sqrt() - c)).mean()) / 6
    assert abs(float(loss) - expected) < 1e-5 * max(1.0, expected)
    # the limits that make it robust: squared error where |r| << c, 2c|r| where |r| >> c
    from ip2p.training.module import pseudo_huber
    small, large, c = torch.full((1, 4, 2, 2), 1e-3), torch.full((1, 4, 2, 2), 10.0), torch.tensor([0.1])
    assert abs(float(pseudo_huber(small, torch.zeros_like(small), c)) - 1e-6) < 1e-8
    assert abs(float(pseudo_huber(large, torch.zeros_like(large), c)) - 2 * 0.1 * 10.0) < 0.02
    # the snr schedule: about 1 at the least noise, c at pure noise (zero terminal SNR) or near it
    cs = huber_c_per_example(module.noise_scheduler.alphas_cumprod, torch.tensor([0, 999]), 0.05, "snr")
    assert float(cs[0]) > 0.9 and abs(float(cs[1]) - 0.05) < 0.01
    # a run made before the option (no loss keys) keeps its fingerprint; huber is another recipe
    from ip2p.training.resume import run_fingerprint
    plain = compose_train(tmp_path, dataset, cache_dir)
    before = compose_train(tmp_path, dataset, cache_dir)
    with open_dict(before):
        for key in ("loss", "huber_c", "huber_schedule"):
            del before.train[key]
    assert run_fingerprint(before) == run_fingerprint(plain) != run_fingerprint(cfg)


def test_copy_rows_train_the_input_as_its_own_target_without_instruction(tmp_path, dataset, cache_dir):
    """train.copy_rows = q: where the example's second draw s < q, the UNet sees the input's latent noised
    as its target, the input as its condition (even where dropout zeroed it) and the "" embedding; other
    examples are untouched. Recomputed by hand from the same draws; q = 0 is the paper's loss."""
    from ip2p.training.module import InstructPix2PixModule, encode_pair
    from ip2p.training.run import load_components, settings_from_config

    cfg = compose_train(tmp_path, dataset, cache_dir, **{"train.copy_rows": 0.5})
    settings = settings_from_config(cfg)
    assert settings.copy_rows == 0.5
    components = load_components(cfg)
    module = InstructPix2PixModule(components, settings)
    seen = {}

    def unet(sample, t, encoder_hidden_states):
        seen.update(sample=sample, text=encoder_hidden_states)
        return type("Out", (), {"sample": torch.zeros_like(sample[:, :4])})()

    module.unet.forward = unet
    batch = {"input": torch.rand(8, 3, 32, 32) * 2 - 1, "edited": torch.rand(8, 3, 32, 32) * 2 - 1,
             "input_ids": torch.ones(8, 77, dtype=torch.long)}
    p = 0.1
    loss = module.diffusion_loss(batch, torch.Generator().manual_seed(3), dropout=p, copy_rows=0.5)
    g = torch.Generator().manual_seed(3)
    target, condition = encode_pair(components.vae, batch["edited"], batch["input"], g)
    noise = torch.randn(target.shape, generator=g)
    t = torch.randint(0, 1000, (8,), generator=g)
    r = torch.rand(8, generator=g)
    s = torch.rand(8, generator=g)
    copy = s < 0.5
    assert 0 < int(copy.sum()) < 8        # this seed draws both kinds of example
    sf = components.vae.config.scaling_factor
    a = module.noise_scheduler.alphas_cumprod[t][:, None, None, None]
    empty, text = module.empty_text()[0], module.encode_text(batch["input_ids"])
    expected = 0.0
    for i in range(8):
        clean = condition[i] * sf if copy[i] else target[i]
        noisy = a[i].sqrt() * clean + (1 - a[i]).sqrt() * noise[i]
        image_dropped = (p <= r[i] < 3 * p) and not copy[i]
        text_dropped = r[i] < 2 * p or copy[i]
        torch.testing.assert_close(seen["sample"][i, :4], noisy)
        torch.testing.assert_close(seen["sample"][i, 4:], condition[i] * (0.0 if image_dropped else 1.0))
        torch.testing.assert_close(seen["text"][i], empty if text_dropped else text[i])
        v = a[i].sqrt() * noise[i] - (1 - a[i]).sqrt() * clean          # the objective of a v-prediction preset
        objective = noise[i] if module.prediction_type == "epsilon" else v
        expected += float((objective ** 2).mean()) / 8
    assert abs(float(loss) - expected) < 1e-5 * max(1.0, expected)
    # q = 0: every example keeps its edited target, as the paper
    module.diffusion_loss(batch, torch.Generator().manual_seed(3), dropout=p, copy_rows=0.0)
    torch.testing.assert_close(seen["sample"][:, :4], a.sqrt() * target + (1 - a).sqrt() * noise)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_copy_error_by_hand(tmp_path, dataset, cache_dir, prediction_type):
    """val/copy_error: over the latent pixels where the edited latent lies within the tolerance of the scaled
    input latent, the squared error of the clean latent the UNet's output implies at the schedule's points;
    recomputed here from the same draws with the formulas written out."""
    from ip2p.training.module import InstructPix2PixModule, copy_error_key, encode_pair
    from ip2p.training.run import load_components, settings_from_config

    cfg = compose_train(tmp_path, dataset, cache_dir, **{"train.validation.copy_error.fractions": "[1.0,0.5]",
                                                         "train.validation.copy_error.tolerance": 0.5})
    settings = settings_from_config(cfg)
    assert settings.copy_error == {"fractions": [1.0, 0.5], "tolerance": 0.5}
    components = load_components(cfg)
    components.scheduler = components.scheduler.__class__.from_config(components.scheduler.config,
                                                                      prediction_type=prediction_type)
    module = InstructPix2PixModule(components, settings)
    seen = []

    def unet(sample, t, encoder_hidden_states):  # a fixed function of its input, so the test knows the output
        seen.append(int(t[0]))
        return type("Out", (), {"sample": 0.3 * sample[:, :4] - 0.2 * sample[:, 4:]})()

    module.unet.forward = unet
    edited = torch.rand(4, 3, 32, 32) * 2 - 1
    inp = edited.clone()
    inp[:, :, :16] = torch.rand(4, 3, 16, 32) * 2 - 1   # the pair keeps the lower half of the image
    batch = {"input": inp, "edited": edited, "input_ids": torch.zeros(4, 77, dtype=torch.long)}
    g = torch.Generator().manual_seed(3)
    target, condition = encode_pair(components.vae, edited, inp, g)
    noise = torch.randn(target.shape, generator=g)
    sf = components.vae.config.scaling_factor
    x0, c, n = target.double().numpy(), condition.double().numpy() * sf, noise.double().numpy()
    tolerance = float(np.median(np.abs(c - x0).max(axis=1)))  # (the tiny VAE's scale is arbitrary)
    module.settings.copy_error["tolerance"] = tolerance
    kept = np.all(np.abs(c - x0) < tolerance, axis=1)               # [B, h, w]
    assert 0 < kept.mean() < 1

    g = torch.Generator().manual_seed(3)
    errors = module.copy_errors(module.pair_latents(batch, g), g)
    assert seen == [999, 500] and list(errors) == [1.0, 0.5]
    for fraction, t in ((1.0, 999), (0.5, 500)):
        a = float(module.noise_scheduler.alphas_cumprod[t])
        z = math.sqrt(a) * x0 + math.sqrt(1 - a) * n
        out = 0.3 * z - 0.2 * condition.double().numpy()
        clean = (z - math.sqrt(1 - a) * out) / math.sqrt(a) if prediction_type == "epsilon" else \
            math.sqrt(a) * z - math.sqrt(1 - a) * out
        squared = ((clean - x0) ** 2).transpose(1, 0, 2, 3)[:, kept]   # [channels, kept pixels]
        total, count = errors[fraction]
        assert int(count) == squared.size
        assert float(total) / float(count) == pytest.approx(squared.mean(), rel=1e-4)
    assert copy_error_key(0.5) == "val/copy_error_0.50"


@pytest.mark.parametrize("power", [2.0, 3.0])
def test_timestep_draws_follow_the_power_law(power):
    from ip2p.training.module import draw_timesteps

    T = 1000
    # power 1 is the paper's uniform draw, exactly the randint draws uniform training always made
    uniform = draw_timesteps(64, T, 1.0, torch.Generator().manual_seed(3), "cpu")
    assert torch.equal(uniform, torch.randint(0, T, (64,), generator=torch.Generator().manual_seed(3)))
    t = draw_timesteps(200_000, T, power, torch.Generator().manual_seed(0), "cpu")
    assert t.dtype == torch.long and int(t.min()) >= 0 and int(t.max()) <= T - 1
    # t = floor((1 - u^p) T): P(t < k) = P(u > (1 - k/T)^(1/p)) = 1 - (1 - k/T)^(1/p), written out by hand
    for k in (100, 250, 500, 750, 900):
        expected = 1.0 - (1.0 - k / T) ** (1.0 / power)
        assert abs(float((t < k).double().mean()) - expected) < 0.005, k
    with pytest.raises(ValueError, match="positive"):
        draw_timesteps(4, T, 0.0, None, "cpu")


def test_training_draws_timesteps_with_the_configured_power(tmp_path, dataset, cache_dir):
    from ip2p.errors import Ip2pError
    from ip2p.training.module import InstructPix2PixModule, draw_timesteps, encode_pair
    from ip2p.training.run import load_components, run, settings_from_config

    cfg = compose_train(tmp_path, dataset, cache_dir, **{"train.timestep_power": 3.0})
    settings = settings_from_config(cfg)
    assert settings.timestep_power == 3.0
    module = InstructPix2PixModule(load_components(cfg), settings)
    captured = {}

    def fake_unet(sample, t, encoder_hidden_states):
        captured["t"] = t
        return type("Out", (), {"sample": torch.zeros_like(sample[:, :4])})()

    module.unet.forward = fake_unet
    # training_step outside a fit: no logging, and the one optimizer's learning rate it reads
    module.log = lambda *args, **kwargs: None
    module._trainer = SimpleNamespace(optimizers=[SimpleNamespace(param_groups=[{"lr": 1e-4}])])
    batch = {"input": torch.zeros(8, 3, 32, 32), "edited": torch.zeros(8, 3, 32, 32),
             "input_ids": torch.zeros(8, 77, dtype=torch.long), "id": list(range(8)), "position": [5] * 8}
    module.training_step(batch, 0)
    # the same draws in the same order as diffusion_loss: the VAE sample, the noise, then the timesteps
    g = module.batch_generator("train-step", 5)
    target, _ = encode_pair(module.frozen.vae, batch["edited"], batch["input"], g)
    torch.randn(target.shape, generator=g)
    assert torch.equal(captured["t"], draw_timesteps(8, 1000, 3.0, g, "cpu"))
    # the stage and the CLI ask the one rule table (ip2p.checks), which names it in one line before anything loads
    with pytest.raises(Ip2pError, match="train.timestep_power must be a number > 0"):
        run(compose_train(tmp_path, dataset, cache_dir, **{"train.timestep_power": 0}))
    from ip2p.checks import config_problems

    assert any(p.startswith("train.timestep_power") for p in
               config_problems(compose_train(tmp_path, dataset, cache_dir, **{"train.timestep_power": 0})))


def test_conv_in_learning_rate_scale(tmp_path, dataset, cache_dir):
    """train.conv_in_lr_scale: conv_in (where the input image enters) gets lr x scale, every other weight lr;
    at 1 there is one group in the order of unet.parameters(), which the optimizer states of older
    checkpoints follow. After one AdamW step from zero moments each weight moves by its group's rate
    (the update is g / |g| = +-1 where the gradient is not zero), so the moves show the rates."""
    from ip2p.training.module import InstructPix2PixModule
    from ip2p.training.run import load_components, settings_from_config

    plain_cfg = compose_train(tmp_path, dataset, cache_dir)
    plain = InstructPix2PixModule(load_components(plain_cfg), settings_from_config(plain_cfg))
    (group,) = plain.configure_optimizers()["optimizer"].param_groups
    assert [id(p) for p in group["params"]] == [id(p) for p in plain.unet.parameters() if p.requires_grad]

    cfg = compose_train(tmp_path, dataset, cache_dir, **{"train.conv_in_lr_scale": 10, "train.weight_decay": 0,
                                                         "train.warmup_steps": 0})
    module = InstructPix2PixModule(load_components(cfg), settings_from_config(cfg))
    optimizer = module.configure_optimizers()["optimizer"]
    lr = float(cfg.train.lr)
    rest, first = optimizer.param_groups
    assert rest["lr"] == lr and first["lr"] == pytest.approx(10 * lr)
    assert {id(p) for p in first["params"]} == {id(p) for p in module.unet.conv_in.parameters()}
    assert len(rest["params"]) + len(first["params"]) == sum(1 for p in module.unet.parameters() if p.requires_grad)
    before = {n: p.detach().clone() for n, p in module.unet.named_parameters()}
    for p in module.unet.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    moved = {n: float((p.detach() - before[n]).abs().max()) for n, p in module.unet.named_parameters()}
    assert moved["conv_in.weight"] == pytest.approx(10 * lr, rel=1e-3)
    assert moved["conv_out.weight"] == pytest.approx(lr, rel=1e-3)


def test_trainer_configs_build_strategies_and_read_launcher_environment(monkeypatch):
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D
    from pytorch_lightning.strategies import DDPStrategy, FSDPStrategy

    from ip2p.config import compose
    from ip2p.errors import Ip2pError
    from ip2p.training.launch import build_strategy, cluster_plugins, devices_and_nodes

    assert isinstance(build_strategy(compose(["trainer=ddp"]).trainer), DDPStrategy)
    fsdp = build_strategy(compose(["trainer=fsdp"]).trainer)
    assert isinstance(fsdp, FSDPStrategy)
    assert fsdp.kwargs["use_orig_params"] is True  # frozen EMA copy beside trainable weights
    assert fsdp.kwargs["auto_wrap_policy"]._module_classes == {BasicTransformerBlock, ResnetBlock2D}
    assert fsdp.sharding_strategy.name == "SHARD_GRAD_OP"
    with pytest.raises(Ip2pError, match="needs GPUs"):
        build_strategy(compose(["trainer=fsdp", "trainer.accelerator=cpu"]).trainer)

    slurm = compose(["trainer=slurm"]).trainer
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "4(x2)")
    monkeypatch.setenv("SLURM_NNODES", "2")
    assert devices_and_nodes(slurm) == (4, 2)
    (plugin,) = cluster_plugins(slurm)
    assert type(plugin).__name__ == "SLURMEnvironment"
    torchrun = compose(["trainer=multinode_torchrun"]).trainer
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setenv("WORLD_SIZE", "16")
    assert devices_and_nodes(torchrun) == (8, 2)
    assert devices_and_nodes(compose([]).trainer) == (1, 1)  # cpu: as configured


def test_missing_or_broken_data_gives_one_line_errors(tmp_path, tiny_editor):
    from ip2p.errors import Ip2pError
    from ip2p.training.datamodule import EditDataModule

    def module(**changes):
        data_cfg = {"format": "parquet", "dir": str(tmp_path / "nothing"), "released_splits": [0.9, 0.05, 0.05],
                    "resolution": 32, "resize_min": 32, "resize_max": 32, "flip": True, "num_workers": 0,
                    "cache_dir": str(tmp_path / "hf"), "draw_by": "pair", **changes}
        return EditDataModule(data_cfg, tiny_editor.tokenizer, 2, 2, 1, seed=0)

    with pytest.raises(Ip2pError, match="no dataset at"):
        module().setup("fit")
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(Ip2pError, match="no training pairs"):
        module(dir=str(tmp_path / "empty")).setup("fit")
    (tmp_path / "broken" / "train").mkdir(parents=True)
    (tmp_path / "broken" / "train" / "part-00000.parquet").write_bytes(b"not parquet")
    with pytest.raises(Ip2pError, match=r"unreadable Parquet file '.*broken/train/part-00000.parquet': .*magic"):
        module(dir=str(tmp_path / "broken")).setup("fit")
    # a file cut short (a copy or a write interrupted) among good ones: that file is named
    cut = write_parquet_dataset(tmp_path / "cut", train=4)
    good = cut / "train" / "part-00000.parquet"
    (cut / "train" / "part-00001.parquet").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(Ip2pError, match=r"unreadable Parquet file '.*cut/train/part-00001.parquet'"):
        module(dir=str(cut)).setup("fit")
    with pytest.raises(Ip2pError, match="seeds.json is missing"):
        module(format="released", dir=str(tmp_path)).setup("fit")
    with pytest.raises(Ip2pError, match="resolution <= resize_min"):
        module(resize_min=16)
    from ip2p.io.images import decode_dataset_image

    with pytest.raises(Ip2pError, match="row 'x-1': cannot decode input_image"):
        decode_dataset_image({"bytes": b"\x89PNG broken", "path": None}, "input_image", "x-1")


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_learning_rate_schedule_against_torch_schedulers(tiny_editor, schedule):
    """Warmup then constant (the paper) or half a cosine to min_lr at max_steps: the optimizer's rate per step,
    checked against a linear ramp and torch's own CosineAnnealingLR started where the warmup ends."""
    from dataclasses import replace

    from ip2p.config import compose
    from ip2p.training.module import InstructPix2PixModule
    from ip2p.training.run import settings_from_config

    lr, min_lr, warmup, max_steps = 1e-3, 1e-4, 5, 25
    module = InstructPix2PixModule(tiny_editor, replace(settings_from_config(compose([])), lr=lr, min_lr=min_lr,
                                                             warmup_steps=warmup, lr_schedule=schedule,
                                                             max_steps=max_steps))
    opt = module.configure_optimizers()
    optimizer, scheduler = opt["optimizer"], opt["lr_scheduler"]["scheduler"]
    ours = []
    for _ in range(max_steps + 3):  # past max_steps the cosine stays at its floor
        ours.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()

    reference = [lr * (k + 1) / warmup for k in range(warmup)]
    if schedule == "constant":
        reference += [lr] * (max_steps + 3 - warmup)
    else:
        probe = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(probe, T_max=max_steps - warmup, eta_min=min_lr)
        for _ in range(max_steps - warmup + 1):
            reference.append(probe.param_groups[0]["lr"])
            probe.step()
            cosine.step()
        reference += [min_lr] * 2
    assert ours == pytest.approx(reference, rel=1e-6)
    assert (ours[-1] == pytest.approx(min_lr)) == (schedule == "cosine")


def test_default_ema_follows_the_original_warmup_rule():
    """The original (LitEma with num_updates) and diffusers' script both cap the decay at (1+n)/(10+n).
    A constant 0.9999 would leave e^-1 = 37% of the untrained UNet in the EMA after the paper's 10k steps
    (98% after the tiny preset's 200): the exported editor would barely show the training."""
    from ip2p.config import compose
    from ip2p.models.ema import ExponentialMovingAverage
    from ip2p.training.run import settings_from_config

    settings = settings_from_config(compose([]))  # conf/train is the one home of the defaults
    model = torch.nn.Linear(2, 2)
    ema = ExponentialMovingAverage(model, settings.ema_decay, settings.ema_warmup)
    decays = [ema.update(model) for _ in range(3)]
    assert decays == pytest.approx([min(0.9999, (1 + n) / (10 + n)) for n in (1, 2, 3)])
    retained = math.prod(min(0.9999, (1 + n) / (10 + n)) for n in range(1, 10_001))
    assert retained < 1e-3  # the start's share of the average after 10k steps


def test_unreadable_checkpoint_to_resume_is_a_one_line_error(tmp_path, cache_dir):
    from ip2p.errors import Ip2pError
    from ip2p.training.resume import resolve_resume

    cfg = compose_train(tmp_path, tmp_path / "dataset", cache_dir)
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    cfg.train.resume = str(bad)
    with pytest.raises(Ip2pError, match="cannot resume from .*bad.ckpt"):
        resolve_resume(cfg, tmp_path / "checkpoints")
    not_lightning = tmp_path / "weights.ckpt"
    torch.save({"weight": torch.zeros(2)}, not_lightning)
    cfg.train.resume = str(not_lightning)
    with pytest.raises(Ip2pError, match="not a checkpoint of `ip2p train`"):
        resolve_resume(cfg, tmp_path / "checkpoints")


def test_validation_shards_are_equal_sized_and_cover_every_item():
    from ip2p.training.datamodule import ShardSampler

    for num_items, world in [(1, 2), (5, 2), (3, 4), (8, 4), (0, 2)]:
        shards = [[i for i, _ in ShardSampler(num_items, rank, world)] for rank in range(world)]
        assert len({len(s) for s in shards}) == 1, (num_items, world, shards)  # no rank left without batches
        assert set().union(*shards) == set(range(num_items))
        assert len(shards[0]) == -(-num_items // world)
    assert [i for i, _ in ShardSampler(5, 0, 1)] == [0, 1, 2, 3, 4]


def test_checkpoints_are_renamed_into_place(tmp_path, cfg):
    """A save that fails half-way (the filesystem refuses the file's growth, as a full disk does) leaves
    the previous checkpoint and no partial file, and the one-line error names the checkpoint (Lightning's
    own writer went through a temp file in the system temp folder and named that); the trainer writes
    through this plugin."""
    from conftest import file_size_limit

    from ip2p.errors import one_line
    from ip2p.io.checkpoints import atomic_checkpoint_io
    from ip2p.training.launch import build_trainer
    from ip2p.training.run import resolve_paths

    io_plugin = atomic_checkpoint_io()
    target = tmp_path / "last.ckpt"
    io_plugin.save_checkpoint({"global_step": 1}, target)
    before = target.read_bytes()
    assert torch.load(target, weights_only=True)["global_step"] == 1

    with file_size_limit(len(before) + 1000), pytest.raises(OSError) as raised:
        io_plugin.save_checkpoint({"global_step": 2, "weights": torch.zeros(100_000)}, target)
    assert one_line(raised.value) == f"file too large while writing '{target}'"
    assert target.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]

    trainer = build_trainer(cfg, resolve_paths(cfg), [], [])
    assert type(trainer.strategy.checkpoint_io).__name__ == "AtomicCheckpointIO"


def test_the_trainer_shows_a_tqdm_bar_that_reaches_redirected_logs(cfg):
    """Lightning picks a Rich bar when rich is installed, which prints only its last frame into a log
    file: the stage asks for tqdm's, and for none when progress is off."""
    from omegaconf import OmegaConf
    from pytorch_lightning.callbacks import TQDMProgressBar

    from ip2p.training.launch import build_trainer
    from ip2p.training.run import resolve_paths

    shown = build_trainer(OmegaConf.merge(cfg, {"progress": True}), resolve_paths(cfg), [], [])
    assert type(shown.progress_bar_callback) is TQDMProgressBar
    hidden = build_trainer(OmegaConf.merge(cfg, {"progress": False}), resolve_paths(cfg), [], [])
    assert hidden.progress_bar_callback is None


def test_ema_tracks_the_live_unet_through_a_fit_and_its_resume(dataset, cache_dir, tmp_path):
    """The EMA callback takes the UNet's tensor lists once per fit: at decay 0 (no warmup) the average
    must equal the trained UNet after every step, also after a resume, which starts a new fit."""
    from ip2p.training.run import run

    extra = {"train.ema.decay": 0.0, "train.ema.warmup": "false", "train.export.enabled": "false"}
    for steps in (3, 5):
        run(compose_train(tmp_path, dataset, cache_dir, **{"train.max_steps": steps, **extra}))
        state = _checkpoint_weights(tmp_path / "artifacts" / "checkpoints" / "last.ckpt")["state_dict"]
        assert int(state["ema.num_updates"]) == steps
        unet = {k[5:]: v for k, v in state.items() if k.startswith("unet.")}
        assert unet and all(torch.equal(v, state["ema.model." + k]) for k, v in unet.items())


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_failed_runs_never_move_a_finished_runs_checkpoints(tmp_path, dataset, cache_dir):
    """Bad data or a bad recipe fails before the resume decision and the run record: the finished run's
    checkpoints stay, byte for byte, however many runs fail; a run of another recipe that dies before
    its first checkpoint leaves them in superseded/, and the plain rerun moves them back and resumes."""
    from ip2p.io.dataset import image_struct, write_split
    from ip2p.errors import Ip2pError
    from ip2p.training.run import run

    done = {"train.max_steps": 2, "train.export.enabled": "false"}
    run(compose_train(tmp_path, dataset, cache_dir, **done))
    ckpt = tmp_path / "artifacts" / "checkpoints"
    finished = _snapshot(ckpt)
    assert {"last.ckpt", "step-00000002.ckpt", "run.json"} <= set(finished)

    broken = tmp_path / "broken"
    shutil.copytree(dataset, broken)
    (broken / "train" / "part-00000.parquet").write_bytes(b"not parquet")
    # only the first row decodes: the checks pass, training fails at its first batch
    later_rows = tmp_path / "later-rows"
    write_parquet_split(later_rows, "val", 2, seed=2)
    good = write_parquet_split(tmp_path / "one", "train", 1, seed=1)
    import pyarrow.parquet as pq

    rows = pq.read_table(good[0]).to_pylist()
    rows += [{**rows[0], "id": f"train{i:03d}-7", "pair_id": f"train{i:03d}",
              "input_image": image_struct(b"\x89PNG cut")} for i in range(1, 8)]
    write_split(rows, later_rows, "train", shard_size=8)

    failures = [({"train.data.dir": tmp_path / "typo"}, "no dataset at"),
                ({"train.data.dir": broken}, "unreadable Parquet file"),
                ({"train.data.resolution": 65, "train.data.resize_min": 65, "train.data.resize_max": 65},
                 r"train.data.resolution must be a multiple of 8"),
                ({"train.data.dir": tmp_path / "typo"}, "no dataset at")]
    for overrides, message in failures:
        with pytest.raises(Ip2pError, match=message):
            run(compose_train(tmp_path, dataset, cache_dir, **done, **overrides))
        assert _snapshot(ckpt) == finished, overrides
    # another recipe that fails after it started, twice: the finished run waits in superseded/
    for _ in range(2):
        with pytest.raises(Ip2pError, match="cannot decode input_image"):
            run(compose_train(tmp_path, dataset, cache_dir, **done, **{"train.data.dir": later_rows}))
        assert {name: data for name, data in _snapshot(ckpt / "superseded").items()} == finished
    # the plain rerun, extended by one step, continues the finished run
    report = run(compose_train(tmp_path, dataset, cache_dir, **{**done, "train.max_steps": 3}))
    assert report["resumed_from_step"] == 2 and report["steps"] == 3
    assert not (ckpt / "superseded").exists()
