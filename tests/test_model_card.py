"""The model card an editor carries (ip2p.models.model_card): written by training and `ip2p export`, read
by model hubs (front matter) and by `ip2p edit --model DIR` (the settings the editor was tuned at)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from ip2p.cli import main
from ip2p.errors import Ip2pError
from ip2p.models.model_card import ModelCard, data_hash, read_card, report_numbers, sampling_defaults, write_card

from test_training import compose_train, write_parquet_dataset


def front_matter(readme: Path) -> dict:
    text = readme.read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_data_hash_is_sha256_over_names_sizes_and_bytes(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "part-0.parquet").write_bytes(b"abc")
    (tmp_path / "val.parquet").write_bytes(b"de")
    by_hand = hashlib.sha256()
    for name, data in (("train/part-0.parquet", b"abc"), ("val.parquet", b"de")):
        by_hand.update(f"{name}\0{len(data)}\0".encode() + data)
    assert data_hash(tmp_path, max_bytes=10) == {"sha256": by_hand.hexdigest(), "of": "bytes"}
    big = data_hash(tmp_path, max_bytes=4)                    # 5 bytes in all: names and sizes only
    assert big["of"] == "names_and_sizes" and big["sha256"] != by_hand.hexdigest()
    (tmp_path / "val.parquet").write_bytes(b"dx")             # same size, other bytes: another hash
    assert data_hash(tmp_path, max_bytes=10)["sha256"] != by_hand.hexdigest()
    assert data_hash(tmp_path / "missing", max_bytes=10) is None


def test_report_numbers_flatten_and_refuse_unreadable_reports(tmp_path):
    report = tmp_path / "world_eval.json"
    report.write_text(json.dumps({"cases": 384, "editor": {"both": 0.5, "per": {"deep": 1}}, "met": True, "note": "x"}))
    assert report_numbers(report) == {"world_eval/cases": 384, "world_eval/editor/both": 0.5}
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(Ip2pError, match="bad.json"):
        report_numbers(tmp_path / "bad.json")


def test_training_exports_a_card_with_its_recipe_data_and_settings(tmp_path, cache_dir):
    from ip2p.training.run import run

    dataset = write_parquet_dataset(tmp_path / "dataset")
    cfg = compose_train(tmp_path, dataset, cache_dir, **{"train.max_steps": 2, "train.validation.every_n_steps": 2,
                                                        "sampling.text_guidance": 3.5, "edit.steps": 7})
    run(cfg)
    model = Path(cfg.paths.artifacts) / "model"
    card = read_card(model)
    assert card.sampling == {"steps": 7, "text_guidance": 3.5, "image_guidance": float(cfg.sampling.image_guidance),
                             "scheduler": str(cfg.sampling.scheduler), "resolution": int(cfg.edit.resolution)}
    assert card.training["steps"] == 2 and card.training["recipe"]["lr"] == float(cfg.train.lr)
    assert card.training["data_hash"] == data_hash(dataset, max_bytes=2**30)
    meta = front_matter(model / "README.md")
    assert meta["library_name"] == "diffusers" and meta["pipeline_tag"] == "image-to-image"
    assert meta["base_model"] == str(cfg.model.base)
    from diffusers import StableDiffusionInstructPix2PixPipeline

    StableDiffusionInstructPix2PixPipeline.from_pretrained(model)  # the card does not disturb the layout


def test_export_any_saved_step_of_a_training(tmp_path, cache_dir, capsys):
    """`ip2p export --unet step-N.ckpt`: the EMA UNet of that step (the checkpoint's own weights, read
    here independently), in the trained editor's folder layout; its card counts N steps, no numbers."""
    import torch
    from diffusers import UNet2DConditionModel

    from ip2p.training.run import run

    dataset = write_parquet_dataset(tmp_path / "dataset")
    cfg = compose_train(tmp_path, dataset, cache_dir, **{"train.max_steps": 2, "train.checkpoint.every_n_steps": 1,
                                                        "train.checkpoint.save_top_k": -1})
    run(cfg)
    trained = Path(cfg.paths.artifacts) / "model"
    report = tmp_path / "world_eval.json"
    report.write_text(json.dumps({"editor": {"both": 0.5}}))
    write_card(trained, ModelCard(**{**read_card(trained).__dict__, "metrics": {"world_eval/editor/both": 0.1}}))
    step_1 = sorted((Path(cfg.paths.artifacts) / "checkpoints").glob("step-*1.ckpt"))  # train.checkpoint_dir: null
    assert len(step_1) == 1
    out = tmp_path / "step1"
    assert main(["export", str(out), "--model", str(trained), "--unet", str(step_1[0]), "--metrics", str(report)]) == 0
    state = torch.load(step_1[0], map_location="cpu", weights_only=True)["state_dict"]
    exported = UNet2DConditionModel.from_pretrained(out / "unet").state_dict()
    assert {k: v.shape for k, v in exported.items()} == {k[len("ema.model."):]: v.shape for k, v in state.items()
                                                         if k.startswith("ema.model.")}
    assert all(torch.equal(v, state["ema.model." + k].float()) for k, v in exported.items())
    last = UNet2DConditionModel.from_pretrained(trained / "unet").state_dict()
    assert not all(torch.equal(v, last[k]) for k, v in exported.items())  # another step than the last
    card = read_card(out)
    assert card.training["steps"] == 1 and card.metrics == {"world_eval/editor/both": 0.5}
    assert card.training["recipe"] == read_card(trained).training["recipe"]
    # a file that is not a training checkpoint: one line, nothing written
    assert main(["export", str(tmp_path / "no"), "--model", str(trained), "--unet", str(report)]) != 0
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ip2p export:")]
    assert len(errors) == 1 and "world_eval.json" in errors[0] and "training checkpoint" in errors[0]
    assert not (tmp_path / "no").exists()


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    rng = np.random.default_rng(3)
    path = tmp_path_factory.mktemp("inputs") / "photo.png"
    Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)).save(path)
    return path


def test_edit_uses_the_card_settings_unless_given(photo, tmp_path, cache_dir):
    folder = tmp_path / "editor"
    report = tmp_path / "world_eval.json"
    report.write_text(json.dumps({"editor": {"both": 0.25}}))
    assert main(["export", str(folder), "--metrics", str(report)]) == 0
    assert read_card(folder).metrics == {"world_eval/editor/both": 0.25}
    tuned = {"steps": 2, "text_guidance": 4.0, "image_guidance": 1.2, "scheduler": "euler", "resolution": 64}
    write_card(folder, ModelCard(base_model="tiny", sampling=tuned))
    assert sampling_defaults(folder) == tuned

    def edit(name, *flags):
        out = tmp_path / name
        assert main(["edit", str(photo), "make it snowy", "-o", str(out), "--model", str(folder), "--seed", "1",
                     "--no-progress", *flags]) == 0
        return np.asarray(Image.open(out))

    from_card = edit("card.png")
    explicit = edit("explicit.png", "--steps", "2", "--text-guidance", "4", "--image-guidance", "1.2",
                    "--scheduler", "euler", "--resolution", "64")
    assert from_card.shape == (64, 64, 3) and np.array_equal(from_card, explicit)
    overridden = edit("other.png", "--text-guidance", "9")        # a flag wins over the card
    assert not np.array_equal(overridden, from_card)
    (folder / "ip2p.json").write_text("{broken")                   # a broken card loses its defaults only
    assert sampling_defaults(folder) == {}


def test_continuing_an_editor_counts_its_earlier_steps(tmp_path, cache_dir):
    """train.init=editor from a carded editor (the reference run continued on another machine): the new
    card counts the earlier steps and keeps the base the first run was widened from."""
    from ip2p.training.run import run

    dataset = write_parquet_dataset(tmp_path / "dataset")
    first = compose_train(tmp_path / "a", dataset, cache_dir, **{"train.max_steps": 2})
    run(first)
    earlier = Path(first.paths.artifacts) / "model"
    later = compose_train(tmp_path / "b", dataset, cache_dir, **{"train.max_steps": 2, "train.init": "editor",
                                                                "model.editor": str(earlier)})
    run(later)
    card = read_card(Path(later.paths.artifacts) / "model")
    assert card.training["steps"] == 4 and card.training["steps_before"] == 2
    assert card.training["continued_from"] == str(earlier) and card.base_model == str(first.model.base)
