"""The training dataset's format on disk: <dataset>/{train,val,test}/part-NNNNN.parquet with the columns
of COLUMNS. Images are `datasets` Image structs {"bytes": PNG bytes, "path": None}; the Hugging Face
feature metadata is stored in each file, so `datasets.load_dataset("parquet", data_dir=...)` decodes them
to PIL images and diffusers' train_instruct_pix2pix.py finds input_image / edit_prompt / edited_image.

The filter writes it, training and the judges read it: the format lives here, below all of them.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

from PIL import Image

from ip2p.config import first_line
from ip2p.errors import Ip2pError
from ip2p.io.atomic import atomic_file

COLUMNS = ("id", "pair_id", "input_image", "edited_image", "edit_prompt", "input_caption", "output_caption",
           "seed", "p", "cfg", "clip_sim_0", "clip_sim_1", "clip_sim_dir", "clip_sim_image", "clip_sim_rest")
OPTIONAL = ("clip_sim_rest",)   # scores a row may lack (e.g. imported with the released four): written as NaN
SPLITS = ("train", "val", "test")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def features():
    """The `datasets` schema of the dataset (column order = COLUMNS)."""
    import datasets

    string, f64 = datasets.Value("string"), datasets.Value("float64")
    return datasets.Features({
        "id": string, "pair_id": string,
        "input_image": datasets.Image(), "edited_image": datasets.Image(),
        "edit_prompt": string, "input_caption": string, "output_caption": string,
        "seed": datasets.Value("int64"), "p": f64, "cfg": f64,
        "clip_sim_0": f64, "clip_sim_1": f64, "clip_sim_dir": f64, "clip_sim_image": f64, "clip_sim_rest": f64,
    })


def png_bytes(data: bytes) -> bytes:
    """Image file bytes -> PNG bytes (PNG input is kept byte for byte; others are decoded to RGB)."""
    if data.startswith(PNG_SIGNATURE):
        return data
    from ip2p.io.images import to_rgb

    with Image.open(io.BytesIO(data)) as img:
        img.load()
        rgb = to_rgb(img)
    buffer = io.BytesIO()
    rgb.save(buffer, format="PNG")
    return buffer.getvalue()


def image_struct(png: bytes) -> dict:
    return {"bytes": png, "path": None}


def _float(value: Any) -> float:
    return math.nan if value is None else float(value)


def _table(rows: list[dict]):
    import pyarrow as pa

    schema = features().arrow_schema
    missing = [c for c in COLUMNS if rows and c not in rows[0] and c not in OPTIONAL]
    if missing:
        raise Ip2pError(f"dataset rows lack columns: {', '.join(missing)}")
    columns = {c: [r.get(c) for r in rows] for c in COLUMNS}
    for c in ("p", "cfg", "clip_sim_0", "clip_sim_1", "clip_sim_dir", "clip_sim_image", "clip_sim_rest"):
        columns[c] = [_float(v) for v in columns[c]]
    return pa.table(columns, schema=schema)


def _write_parquet_atomic(rows: list[dict], path: Path) -> Path:
    import pyarrow.parquet as pq

    with atomic_file(path) as tmp:
        pq.write_table(_table(rows), tmp)
    return path


def write_split(rows: Iterable[dict], out_dir: str | Path, split: str, shard_size: int) -> list[Path]:
    """Write rows (dicts with the COLUMNS; images as image_struct) to out_dir/split/part-NNNNN.parquet,
    shard_size rows per file, consuming `rows` lazily. Same rows in the same order -> byte-identical
    files. An empty split writes no file (`datasets` cannot read a Parquet file without rows);
    load_split returns it as an empty Dataset."""
    if shard_size < 1:
        raise Ip2pError(f"filter.shard_size must be at least 1 (got {shard_size})")
    folder = Path(out_dir) / split
    paths: list[Path] = []
    buffer: list[dict] = []
    for row in rows:
        buffer.append(row)
        if len(buffer) == shard_size:
            paths.append(_write_parquet_atomic(buffer, folder / f"part-{len(paths):05d}.parquet"))
            buffer = []
    if buffer:
        paths.append(_write_parquet_atomic(buffer, folder / f"part-{len(paths):05d}.parquet"))
    return paths


def check_parquet(path: str | Path) -> None:
    """Read a Parquet file's footer (cheap); a truncated or foreign file is one line naming it."""
    import pyarrow.parquet as pq

    try:
        pq.ParquetFile(path).close()
    except Exception as err:  # noqa: BLE001 - pyarrow raises several types for one cause
        raise Ip2pError(f"unreadable Parquet file '{path}': {first_line(err)} (rerun `ip2p filter`, or delete "
                        f"the file)") from err


def load_split(dataset_dir: str | Path, split: str, cache_dir: str | None = None):
    """One split as a `datasets.Dataset` (images decode to PIL on access)."""
    import datasets

    if not Path(dataset_dir).is_dir():
        raise Ip2pError(f"no dataset at '{dataset_dir}' (run `ip2p filter` first)")
    files = sorted(str(p) for p in (Path(dataset_dir) / split).glob("part-*.parquet"))
    if not files:  # an empty split
        return datasets.Dataset.from_dict({c: [] for c in COLUMNS}, features=features(), split=split)
    for f in files:  # `datasets` names neither the file nor the cause of a bad one
        check_parquet(f)
    return datasets.load_dataset("parquet", data_files={split: files}, split=split, features=features(),
                                 cache_dir=cache_dir)


def released_split_of(names: Sequence[str], fractions: Sequence[float]) -> dict[str, str]:
    """The release's own train/val/test split, as the original's dataset cuts it: folder names sorted,
    then cut at floor(cumulative fraction x count). Training on the release and importing it with
    `ip2p filter` both use this, so a folder is in the same split either way."""
    if len(fractions) != 3 or abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) < 0:
        raise Ip2pError(f"the release's split needs three fractions (train, val, test) summing to 1 (got {list(fractions)})")
    ordered = sorted(names)
    n = len(ordered)
    cuts = [0, math.floor(fractions[0] * n), math.floor((fractions[0] + fractions[1]) * n), n]
    return {name: split for i, split in enumerate(SPLITS) for name in ordered[cuts[i]:cuts[i + 1]]}
