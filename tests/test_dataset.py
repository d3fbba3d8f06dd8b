"""The Parquet dataset (write_split / load_split, readable by datasets.load_dataset) and the pair-folder
reader shared by the candidates, the released-layout importer and training."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ip2p.data.dataset import (
    COLUMNS,
    image_struct,
    list_pair_folders,
    load_split,
    png_bytes,
    read_pair_folder,
    write_split,
)
from ip2p.errors import Ip2pError


def make_png(seed: int, size=(16, 12)) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def make_row(pair: str, seed: int) -> dict:
    return {"id": f"{pair}-{seed}", "pair_id": pair, "input_image": image_struct(make_png(seed)),
            "edited_image": image_struct(make_png(seed + 1000)), "edit_prompt": f"edit {pair}",
            "input_caption": f"in {pair}", "output_caption": f"out {pair}", "seed": seed, "p": 0.5, "cfg": 9.0,
            "clip_sim_0": 0.3, "clip_sim_1": 0.31, "clip_sim_dir": 0.25, "clip_sim_image": None}


def test_write_split_shards_and_loads_with_datasets(tmp_path):
    import datasets

    rows = {"train": [make_row("a", s) for s in range(5)], "val": [make_row("b", 7)], "test": [make_row("c", 9)]}
    for split, split_rows in rows.items():
        paths = write_split(iter(split_rows), tmp_path, split, shard_size=2)
        assert [p.name for p in paths] == [f"part-{i:05d}.parquet" for i in range((len(split_rows) + 1) // 2)]
    loaded = datasets.load_dataset("parquet", data_dir=str(tmp_path))
    assert set(loaded) == {"train", "validation", "test"}  # datasets names the val folder "validation"
    train = loaded["train"]
    assert train.column_names == list(COLUMNS)
    assert isinstance(train.features["input_image"], datasets.Image)
    assert [r["id"] for r in train] == [f"a-{s}" for s in range(5)]
    first = train[0]
    assert isinstance(first["input_image"], Image.Image)
    expected = np.asarray(Image.open(io.BytesIO(make_png(0))))
    assert np.array_equal(np.asarray(first["input_image"]), expected)
    assert first["seed"] == 0 and first["p"] == 0.5 and np.isnan(first["clip_sim_image"])  # None -> NaN
    # the contract: Image structs with PNG bytes and no path, raw in the file
    import pyarrow.parquet as pq

    raw = pq.read_table(tmp_path / "train" / "part-00000.parquet").to_pylist()[0]["input_image"]
    assert raw == {"bytes": make_png(0), "path": None}
    # load_split gives the same split
    assert load_split(tmp_path, "val")[0]["id"] == "b-7"


def test_rewriting_gives_byte_identical_files(tmp_path):
    rows = [make_row("a", s) for s in range(3)]
    first = [p.read_bytes() for p in write_split(rows, tmp_path / "one", "train", 2)]
    second = [p.read_bytes() for p in write_split(rows, tmp_path / "two", "train", 2)]
    assert first == second


def test_empty_split_loads_as_an_empty_dataset(tmp_path):
    write_split([make_row("a", 1)], tmp_path, "train", 10)
    assert write_split([], tmp_path, "test", 10) == []
    empty = load_split(tmp_path, "test")
    assert len(empty) == 0 and empty.column_names == list(COLUMNS)
    with pytest.raises(Ip2pError, match="no dataset"):
        load_split(tmp_path / "missing", "train")


def test_rows_missing_columns_are_refused(tmp_path):
    row = make_row("a", 1)
    del row["cfg"]
    with pytest.raises(Ip2pError, match="cfg"):
        write_split([row], tmp_path, "train", 10)


def test_png_bytes_keeps_png_and_converts_jpeg():
    png = make_png(3)
    assert png_bytes(png) is png
    buffer = io.BytesIO()
    Image.open(io.BytesIO(png)).save(buffer, format="JPEG", quality=95)
    converted = png_bytes(buffer.getvalue())
    assert converted.startswith(b"\x89PNG")
    decoded_jpeg = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(converted))), decoded_jpeg)


def make_released(root: Path) -> None:
    """Two folders of the official layout, listed in seeds.json (not in sorted order)."""
    for name, seeds in (("0000001", [11, 12]), ("0000000", [5])):
        folder = root / name
        folder.mkdir(parents=True)
        (folder / "prompt.json").write_text(json.dumps({"input": f"in {name}", "edit": f"edit {name}",
                                                        "output": f"out {name}", "url": None}))
        lines = []
        for seed in seeds:
            for side in (0, 1):
                Image.open(io.BytesIO(make_png(seed * 10 + side))).save(folder / f"{seed}_{side}.jpg", quality=100)
            lines.append(json.dumps({"seed": seed, "p2p_threshold": 0.3, "cfg_scale": 8.0, "clip_sim_0": 0.21,
                                     "clip_sim_1": 0.22, "clip_sim_dir": 0.23 + seed / 100, "clip_sim_image": 0.8}))
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    (root / "seeds.json").write_text(json.dumps([["0000001", [11, 12]], ["0000000", [5]]]))


def test_released_layout_reading(tmp_path):
    make_released(tmp_path)
    listing = list(list_pair_folders(tmp_path))
    assert [(p.name, s) for p, s in listing] == [("0000001", [11, 12]), ("0000000", [5])]
    folder = read_pair_folder(*listing[0])
    assert folder.pair_id == "0000001" and folder.prompt["edit"] == "edit 0000001"
    assert [c.seed for c in folder.candidates] == [11, 12]
    assert folder.candidates[0].image_0.name == "11_0.jpg" and folder.candidates[0].meta["cfg_scale"] == 8.0
    # a missing image is counted, not raised; the remaining candidate is still read
    (tmp_path / "0000001" / "12_1.jpg").unlink()
    folder = read_pair_folder(*listing[0])
    assert [c.seed for c in folder.candidates] == [11] and folder.problems["missing_image"] == 1
    # without seeds.json every non-hidden folder is listed, sorted
    (tmp_path / "seeds.json").unlink()
    (tmp_path / ".partial-x").mkdir()
    assert [p.name for p, s in list_pair_folders(tmp_path)] == ["0000000", "0000001"]


def test_pair_folder_without_metadata_uses_image_files(tmp_path):
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "prompt.json").write_text(json.dumps({"input": "a", "edit": "b", "output": "c"}))
    for seed in (3, 1):
        for side in (0, 1):
            (folder / f"{seed}_{side}.png").write_bytes(make_png(seed + side))
    assert [c.seed for c in read_pair_folder(folder).candidates] == [1, 3]
    (folder / "prompt.json").write_text("{broken")
    with pytest.raises(Ip2pError, match="prompt.json"):
        read_pair_folder(folder)
