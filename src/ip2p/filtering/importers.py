"""Where candidates come from, each source turned into the same `Candidate` records:

  candidates  our synthesis output: pair folders, scores cached in <pair>/scores.jsonl
  released    the official release layout (pair folders + seeds.json, jpg images, clip scores in
              metadata.jsonl): released scores are used when all four are there, else recomputed
  diffusers   a dataset with input_image / edit_prompt / edited_image columns: Parquet file(s) or a
              `datasets.save_to_disk` folder; captions are optional (column names from config); the
              clip_sim_* columns of a dataset `ip2p filter` wrote are used as its scores

Sources yield "units" (a pair folder, or one dataset row) of candidates, and read a candidate's images
again from its `ref`; scores computed by the filter are cached per source in ScoreCache.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sqlite3
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from ip2p.io.pairs import list_pair_folders, read_pair_folder
from ip2p.errors import Ip2pError, sqlite_full
from ip2p.scoring.clip import METRICS, PAPER_METRICS



@dataclass
class Candidate:
    """One image pair to score and maybe keep. `ref` says where its two images are, in plain JSON
    values; the source's `load(ref)` returns their raw bytes."""

    id: str
    pair_id: str
    seed: int
    p: float | None
    cfg: float | None
    input_caption: str
    edit_prompt: str
    output_caption: str
    fingerprint: str = ""            # identifies the image files the scores belong to
    has_captions: bool = True
    scores: dict | None = None
    score_origin: str | None = None  # "released" | "synthesis" (early drop) | "dataset" when scores came with the data
    ref: Any = None


@dataclass
class Source:
    """A source's units, and how to read a candidate's two images again from its `ref`."""

    units: Iterator["Unit"]
    load: Callable[[Any], tuple[bytes, bytes]]


@dataclass
class Unit:
    """What a source yields: candidates that share a score-cache entry, and problems met reading them."""

    key: str
    candidates: list[Candidate]
    problems: Counter = field(default_factory=Counter)


# ---- score caches -------------------------------------------------------------------------------


def _valid_scores(line: Mapping) -> dict | None:
    """Every metric of ours, as a number or null; None (score again) when one is missing or malformed,
    e.g. a line written before clip_sim_rest existed."""
    scores = {}
    for m in METRICS:
        if m not in line:
            return None
        value = line.get(m)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
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


class ScoreCache:
    """CLIP scores of one source, in one SQLite file outside the source (the candidates folder is the
    synthesis stage's output and stays untouched). Looked up per candidate on disk, so the cache of
    millions of candidates costs no memory; each `put` is one transaction, so a kill loses at most the
    batch being written, never an earlier entry. An entry is used only if it was made by the same CLIP
    and for the same image files (the candidate's fingerprint), so regenerated images are scored again."""

    def __init__(self, path: Path, clip_model: str):
        self.path = path
        self.clip_model = clip_model
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path)
        columns = ", ".join(f"{m} REAL" for m in METRICS)
        # one table per set of metrics: entries made before a metric existed are scored again, not half-used
        self.table = "scores_" + hashlib.sha256(",".join(METRICS).encode()).hexdigest()[:8]
        self.db.execute(f"CREATE TABLE IF NOT EXISTS {self.table} (id TEXT PRIMARY KEY, clip_model TEXT, "
                        f"fingerprint TEXT, {columns}, nan TEXT)")
        self.db.commit()

    def get(self, candidate: "Candidate") -> dict | None:
        row = self.db.execute(f"SELECT clip_model, fingerprint, nan, {', '.join(METRICS)} FROM {self.table} WHERE id = ?",
                              (candidate.id,)).fetchone()
        if row is None or row[0] != self.clip_model or row[1] != candidate.fingerprint:
            return None
        nan = set(json.loads(row[2]))  # SQLite stores NaN as NULL: the NaN metrics are listed apart
        return {m: math.nan if m in nan else v for m, v in zip(METRICS, row[3:])}

    def put(self, candidates: list["Candidate"]) -> None:
        rows = [(c.id, self.clip_model, c.fingerprint, *(c.scores.get(m) for m in METRICS),
                 json.dumps([m for m in METRICS if c.scores.get(m) is not None and math.isnan(c.scores[m])]))
                for c in candidates]
        try:
            with self.db:  # one transaction
                self.db.executemany(f"INSERT OR REPLACE INTO {self.table} VALUES ({', '.join('?' * (len(METRICS) + 4))})",
                                    rows)
        except sqlite3.OperationalError as err:
            full = sqlite_full(err, self.path)  # a full disk: one line naming the cache
            if full is err:
                raise
            raise full from err

    def __len__(self) -> int:
        return self.db.execute(f"SELECT COUNT(*) FROM {self.table}").fetchone()[0]


def early_drop_scores(folder: Path, clip_model: str) -> dict[str, dict]:
    """Scores `ip2p synthesize` wrote with synthesis.early_drop (<pair>/scores.jsonl, made together
    with the images), by candidate id, for the same CLIP only."""
    found = {}
    for line in _read_lines(folder / "scores.jsonl"):
        scores = _valid_scores(line)
        if line.get("clip_model") == clip_model and scores is not None:
            found[line["id"]] = scores
    return found


def cache_path(scores_dir: str | Path, source: str, source_dir: str | Path) -> Path:
    """One cache file per source folder (keyed by its absolute path)."""
    digest = hashlib.sha256(str(Path(source_dir).resolve()).encode("utf-8")).hexdigest()[:12]
    return Path(scores_dir) / f"{source}-{digest}.sqlite"


# ---- pair folders (ours and released) -------------------------------------------------------------


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _released_scores(meta: Mapping) -> dict | None:
    """Scores that come with the data: the paper's four must all be there; ours (clip_sim_rest) is taken
    when present, else it is not measurable (its threshold is not applied to these rows)."""
    values = {m: _number(meta.get(m)) for m in METRICS}
    return None if any(values[m] is None for m in PAPER_METRICS) else values


def _file_fingerprint(*paths: Path) -> str:
    parts = []
    for path in paths:
        st = path.stat()
        parts.append(f"{st.st_size}:{st.st_mtime_ns}")
    return "/".join(parts)


def load_files(ref) -> tuple[bytes, bytes]:
    """A pair folder candidate's ref: the paths of its two image files."""
    return Path(ref[0]).read_bytes(), Path(ref[1]).read_bytes()


def folder_source(root: str | Path, released: bool, use_released_scores: bool, clip_model: str) -> Source:
    return Source(folder_units(root, released, use_released_scores, clip_model), load_files)


def folder_units(root: str | Path, released: bool, use_released_scores: bool, clip_model: str) -> Iterator[Unit]:
    """One unit per pair folder; an unreadable folder yields an empty unit with its problem counted.
    Scores that come with the data are attached: the release's metadata (released=True and
    use_released_scores), or synthesis' early-drop scores.jsonl made with the same CLIP."""
    root = Path(root)
    for path, seeds in list_pair_folders(root):
        key = str(path.relative_to(root)).replace(os.sep, "/")
        try:
            folder = read_pair_folder(path, seeds)
        except Ip2pError:
            yield Unit(key, [], Counter({"unreadable_pair_folder": 1}))
            continue
        prompt = folder.prompt
        synthesis_scores = {} if released else early_drop_scores(path, clip_model)
        candidates = []
        for c in folder.candidates:
            meta = c.meta
            cand = Candidate(
                id=f"{key}-{c.seed}", pair_id=key, seed=c.seed,
                p=_number(meta.get("p", meta.get("p2p_threshold"))),
                cfg=_number(meta.get("cfg", meta.get("cfg_scale"))),
                input_caption=prompt["input"], edit_prompt=prompt["edit"], output_caption=prompt["output"],
                fingerprint=_file_fingerprint(c.image_0, c.image_1), ref=[str(c.image_0), str(c.image_1)],
            )
            scores = _released_scores(meta) if released and use_released_scores else synthesis_scores.get(cand.id)
            if scores is not None:
                cand.scores, cand.score_origin = scores, "released" if released else "synthesis"
            candidates.append(cand)
        yield Unit(key, candidates, folder.problems)


# ---- diffusers-style datasets ---------------------------------------------------------------------


def release_arrow_memory() -> None:
    """Arrow's allocator keeps freed memory for reuse and never hands it back on its own: converting a
    1M-row Parquet file into `datasets`' cache left ~0.4 GB held, decoding batches keeps adding."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()


def _open_dataset(source_dir: Path):
    try:
        return _load_dataset(source_dir)
    finally:
        release_arrow_memory()


def _load_dataset(source_dir: Path):
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


def diffusers_source(source_dir: str | Path, columns: Mapping[str, str], use_scores: bool) -> Source:
    """One unit per row. A row's caption pair (its split group) is the pair_id column if present, else
    a hash of (input caption, edit, output caption), or without captions of (edit, input image).
    With use_scores, a row's clip_sim_* columns (a dataset `ip2p filter` wrote) are its scores when
    all four are numbers."""
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
                                "seed", "p", "cfg", *(METRICS if use_scores else ())) if c in ds.column_names]
    base = source_dir if source_dir.is_dir() else source_dir.parent

    def load(index: int) -> tuple[bytes, bytes]:
        item = ds[index]
        return _image_bytes(item[names["input_image"]], base), _image_bytes(item[names["edited_image"]], base)

    return Source(_diffusers_units(ds, names, has_captions, text_columns, load), load)


def _rows_of(ds, batch_size: int = 4096) -> Iterator[dict]:
    """A dataset's rows as dicts, decoded a batch at a time (row by row, `datasets` formats each row
    on its own, several times slower)."""
    for k, batch in enumerate(ds.iter(batch_size=batch_size)):
        if k % 64 == 63:
            release_arrow_memory()
        names = list(batch)
        yield from (dict(zip(names, values)) for values in zip(*(batch[n] for n in names)))


def _diffusers_units(ds, names: Mapping[str, str], has_captions: bool, text_columns: list[str],
                     load: Callable[[int], tuple[bytes, bytes]]) -> Iterator[Unit]:
    dataset_fingerprint = getattr(ds, "_fingerprint", "") or ""
    for index, row in enumerate(_rows_of(ds.select_columns(text_columns))):
        problems: Counter = Counter()
        edit = row[names["edit_prompt"]]
        input_caption = row.get(names["input_caption"]) if has_captions else ""
        output_caption = row.get(names["output_caption"]) if has_captions else ""
        if not all(isinstance(t, str) for t in (edit, input_caption, output_caption)):
            yield Unit(f"row-{index}", [], Counter({"malformed_row": 1}))
            continue
        if isinstance(row.get("pair_id"), str) and row["pair_id"]:
            pair_id = row["pair_id"]
        elif has_captions:
            pair_id = "d" + hashlib.sha256("\x1f".join((input_caption, edit, output_caption)).encode()).hexdigest()[:16]
        else:
            try:
                image_hash = hashlib.sha256(load(index)[0]).hexdigest()
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
                         fingerprint=f"{dataset_fingerprint}:{index}",
                         has_captions=has_captions, ref=index)
        scores = _released_scores(row) if METRICS[0] in row else None
        if scores is not None and not any(math.isnan(v) for v in scores.values()):
            cand.scores, cand.score_origin = scores, "dataset"
        yield Unit(f"row-{index}", [cand], problems)
