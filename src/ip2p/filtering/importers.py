"""Where candidates come from, each source turned into the same `Candidate` records:

  candidates  our synthesis output: pair folders, scores cached in <pair>/scores.jsonl
  released    the official release layout (pair folders + seeds.json, jpg images, clip scores in
              metadata.jsonl): released scores are used when all four are there, else recomputed
  diffusers   a dataset with input_image / edit_prompt / edited_image columns: Parquet file(s) or a
              `datasets.save_to_disk` folder; captions are optional (column names from config)

Sources yield "units" (a pair folder, or one dataset row) with the score store that caches them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping

from ip2p.data.dataset import list_pair_folders, read_pair_folder
from ip2p.errors import Ip2pError
from ip2p.filtering.metrics import METRICS
from ip2p.io.atomic import atomic_write_text

RELEASED_SCORES = "released"  # the clip_model recorded for scores taken from released metadata


@dataclass
class Candidate:
    """One image pair to score and maybe keep. `load_images` returns the raw bytes of both files."""

    id: str
    pair_id: str
    seed: int
    p: float | None
    cfg: float | None
    input_caption: str
    edit_prompt: str
    output_caption: str
    load_images: Callable[[], tuple[bytes, bytes]]
    has_captions: bool = True
    scores: dict | None = None


@dataclass
class Unit:
    """What a source yields: candidates that share a score-cache entry, and problems met reading them."""

    key: str
    candidates: list[Candidate]
    problems: Counter = field(default_factory=Counter)


# ---- score caches -------------------------------------------------------------------------------


def _valid_scores(line: Mapping, clip_model: str) -> dict | None:
    if line.get("clip_model") not in (clip_model, RELEASED_SCORES):
        return None
    scores = {}
    for m in METRICS:
        value = line.get(m)
        if value is not None and not isinstance(value, (int, float)):
            return None
        scores[m] = None if value is None else float(value)
    return scores


def _read_lines(path: Path) -> Iterator[dict]:
    """JSON lines, skipping a torn or unreadable line (a cache entry is only an optimisation)."""
    try:
        data = path.read_bytes()
    except OSError:
        return
    for raw in data.splitlines():
        try:
            line = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            continue
        if isinstance(line, dict) and isinstance(line.get("id"), str):
            yield line


class PairFolderScores:
    """Scores of a pair folder in <folder>/scores.jsonl (rewritten atomically when it grows)."""

    def __init__(self, root: Path, clip_model: str):
        self.root = root
        self.clip_model = clip_model

    def load(self, key: str) -> dict[str, dict]:
        found = {}
        for line in _read_lines(self.root / key / "scores.jsonl"):
            scores = _valid_scores(line, self.clip_model)
            if scores is not None:
                found[line["id"]] = scores
        return found

    def save(self, key: str, new: dict[str, dict]) -> None:
        path = self.root / key / "scores.jsonl"
        lines = {line["id"]: line for line in _read_lines(path)}
        for cid, scores in new.items():
            lines[cid] = {"id": cid, "clip_model": self.clip_model, **scores}
        atomic_write_text(path, "".join(json.dumps(lines[k], sort_keys=True) + "\n" for k in sorted(lines)))


class SingleFileScores:
    """Scores of a whole source in one append-only JSONL file (keyed by candidate id)."""

    def __init__(self, path: Path, clip_model: str):
        self.path = path
        self.clip_model = clip_model
        self._scores: dict[str, dict] = {}
        for line in _read_lines(path):
            scores = _valid_scores(line, clip_model)
            if scores is not None:
                self._scores[line["id"]] = scores

    def load(self, key: str) -> dict[str, dict]:
        return self._scores

    def save(self, key: str, new: dict[str, dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps({"id": cid, "clip_model": self.clip_model, **s}, sort_keys=True) + "\n"
                       for cid, s in new.items())
        with open(self.path, "ab") as handle:
            handle.write(text.encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())
        self._scores.update(new)


def source_digest(source_dir: str | Path) -> str:
    return hashlib.sha256(str(Path(source_dir).resolve()).encode("utf-8")).hexdigest()[:12]


# ---- pair folders (ours and released) -------------------------------------------------------------


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _released_scores(meta: Mapping) -> dict | None:
    values = {m: _number(meta.get(m)) for m in METRICS}
    return None if any(v is None for v in values.values()) else values


def folder_units(root: str | Path, released: bool, use_released_scores: bool) -> Iterator[Unit]:
    """One unit per pair folder; an unreadable folder yields an empty unit with its problem counted."""
    root = Path(root)
    for path, seeds in list_pair_folders(root):
        key = str(path.relative_to(root)).replace(os.sep, "/")
        try:
            folder = read_pair_folder(path, seeds)
        except Ip2pError:
            yield Unit(key, [], Counter({"unreadable_pair_folder": 1}))
            continue
        prompt = folder.prompt
        candidates = []
        for c in folder.candidates:
            meta = c.meta
            cand = Candidate(
                id=f"{key}-{c.seed}", pair_id=key, seed=c.seed,
                p=_number(meta.get("p", meta.get("p2p_threshold"))),
                cfg=_number(meta.get("cfg", meta.get("cfg_scale"))),
                input_caption=prompt["input"], edit_prompt=prompt["edit"], output_caption=prompt["output"],
                load_images=lambda a=c.image_0, b=c.image_1: (a.read_bytes(), b.read_bytes()),
            )
            if released and use_released_scores:
                scores = _released_scores(meta)
                if scores is not None:
                    cand.scores = scores
            candidates.append(cand)
        yield Unit(key, candidates, folder.problems)


# ---- diffusers-style datasets ---------------------------------------------------------------------


def _open_dataset(source_dir: Path):
    import datasets

    try:
        if source_dir.is_file():
            return datasets.load_dataset("parquet", data_files=[str(source_dir)], split="train")
        if (source_dir / "dataset_dict.json").is_file():
            dd = datasets.load_from_disk(str(source_dir))
            return datasets.concatenate_datasets([dd[name] for name in sorted(dd)])
        if (source_dir / "state.json").is_file():
            return datasets.load_from_disk(str(source_dir))
        files = sorted(str(p) for p in source_dir.rglob("*.parquet"))
    except (OSError, ValueError) as err:
        raise Ip2pError(f"cannot read the dataset at '{source_dir}': {type(err).__name__}: {err}") from err
    if not files:
        raise Ip2pError(f"'{source_dir}' holds no dataset: expected a .parquet file, a folder of Parquet files "
                        "or a datasets.save_to_disk folder")
    return datasets.load_dataset("parquet", data_files=files, split="train")


def _image_bytes(value, base: Path) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        if value.get("path"):
            path = Path(value["path"])
            return (path if path.is_absolute() else base / path).read_bytes()
    raise ValueError("no image bytes")


def diffusers_units(source_dir: str | Path, columns: Mapping[str, str]) -> Iterator[Unit]:
    """One unit per row. A row's caption pair (its split group) is the pair_id column if present, else
    a hash of (input caption, edit, output caption), or without captions of (edit, input image)."""
    import datasets

    source_dir = Path(source_dir)
    if not source_dir.exists():
        raise Ip2pError(f"diffusers dataset '{source_dir}' does not exist")
    ds = _open_dataset(source_dir)
    names = {k: columns[k] for k in ("input_image", "edited_image", "edit_prompt", "input_caption", "output_caption")}
    missing = [names[k] for k in ("input_image", "edited_image", "edit_prompt") if names[k] not in ds.column_names]
    if missing:
        raise Ip2pError(f"dataset '{source_dir}' lacks the column(s) {', '.join(missing)} "
                        f"(has {', '.join(ds.column_names)}; set filter.diffusers.<name> to map columns)")
    for key in ("input_image", "edited_image"):
        if isinstance(ds.features[names[key]], datasets.Image):
            ds = ds.cast_column(names[key], datasets.Image(decode=False))
    has_captions = names["input_caption"] in ds.column_names and names["output_caption"] in ds.column_names
    text_columns = [c for c in (names["edit_prompt"], names["input_caption"], names["output_caption"], "pair_id",
                                "seed", "p", "cfg") if c in ds.column_names]
    base = source_dir if source_dir.is_dir() else source_dir.parent
    for index, row in enumerate(ds.select_columns(text_columns)):
        problems: Counter = Counter()
        edit = row[names["edit_prompt"]]
        input_caption = row.get(names["input_caption"]) if has_captions else ""
        output_caption = row.get(names["output_caption"]) if has_captions else ""
        if not all(isinstance(t, str) for t in (edit, input_caption, output_caption)):
            yield Unit(f"row-{index}", [], Counter({"malformed_row": 1}))
            continue

        def load(i=index):
            item = ds[i]
            return _image_bytes(item[names["input_image"]], base), _image_bytes(item[names["edited_image"]], base)

        if isinstance(row.get("pair_id"), str) and row["pair_id"]:
            pair_id = row["pair_id"]
        elif has_captions:
            pair_id = "d" + hashlib.sha256("\x1f".join((input_caption, edit, output_caption)).encode()).hexdigest()[:16]
        else:
            try:
                image_hash = hashlib.sha256(load()[0]).hexdigest()
            except (OSError, ValueError):
                yield Unit(f"row-{index}", [], Counter({"unreadable_image": 1}))
                continue
            pair_id = "d" + hashlib.sha256(f"{edit}\x1f{image_hash}".encode()).hexdigest()[:16]
        seed = row.get("seed")
        seed = int(seed) if isinstance(seed, int) and not isinstance(seed, bool) else index
        p, cfg = _number(row.get("p")), _number(row.get("cfg"))
        cand = Candidate(id=f"{pair_id}-{seed}", pair_id=pair_id, seed=seed,
                         p=None if p is None or math.isnan(p) else p, cfg=None if cfg is None or math.isnan(cfg) else cfg,
                         input_caption=input_caption, edit_prompt=edit, output_caption=output_caption,
                         load_images=load, has_captions=has_captions)
        yield Unit(f"row-{index}", [cand], problems)
