"""The Parquet dataset (ip2p.io.dataset: write_split / load_split, readable by datasets.load_dataset) and
the pair-folder format (ip2p.io.pairs: its writer, and the reader shared by the candidates, the
released-layout importer and training)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ip2p.errors import Ip2pError
from ip2p.io.dataset import COLUMNS, image_struct, load_split, png_bytes, write_split
from ip2p.io.pairs import list_pair_folders, read_pair_folder


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


def test_pair_folder_writer_bytes_and_round_trip(tmp_path):
    """The one writer of the format (ip2p.io.pairs, used by `ip2p synthesize` and `ip2p world-pairs`): its
    bytes as the format says (prompt.json the three fields as indented sorted JSON and a newline, one
    sorted JSON object per metadata line, PNG or JPEG files as PIL encodes them), and what read_pair_folder
    gives back."""
    from ip2p.io.pairs import write_candidate, write_lines, write_prompt

    record = {"id": "p1", "input": "a café", "edit": "make it night", "output": "a café at night", "backend": "x"}
    images = [Image.fromarray(np.random.default_rng(k).integers(0, 255, (8, 8, 3), dtype=np.uint8)) for k in (0, 1)]
    meta = [{"seed": 7, "p": 0.5, "cfg": 7.5, "id": "p1-7"}, {"seed": 9, "p": 0.2, "cfg": 9.0, "id": "p1-9"}]
    folder = tmp_path / "p1"
    folder.mkdir()
    write_prompt(folder, record)
    write_candidate(folder, 7, *images)
    write_candidate(folder, 9, *images, fmt="jpg", quality=90)
    write_lines(folder, "metadata.jsonl", meta)
    assert (folder / "prompt.json").read_text(encoding="utf-8") == (
        '{\n  "edit": "make it night",\n  "input": "a café",\n  "output": "a café at night"\n}\n')
    assert (folder / "metadata.jsonl").read_text().splitlines() == [
        '{"cfg": 7.5, "id": "p1-7", "p": 0.5, "seed": 7}', '{"cfg": 9.0, "id": "p1-9", "p": 0.2, "seed": 9}']
    for k, image in enumerate(images):
        png, jpg = io.BytesIO(), io.BytesIO()
        image.save(png, format="PNG")
        image.save(jpg, format="JPEG", quality=90)
        assert (folder / f"7_{k}.png").read_bytes() == png.getvalue()
        assert (folder / f"9_{k}.jpg").read_bytes() == jpg.getvalue()
    pair = read_pair_folder(folder)
    assert pair.prompt == {k: record[k] for k in ("input", "edit", "output")} and not pair.problems
    assert [(c.seed, c.image_0.name, c.image_1.name, c.meta["cfg"]) for c in pair.candidates] == [
        (7, "7_0.png", "7_1.png", 7.5), (9, "9_0.jpg", "9_1.jpg", 9.0)]
