"""The pair-folder format: what `ip2p synthesize` and `ip2p world-pairs` write and what the filter, the
judges and the official release's importer read. One folder per caption pair:

    prompt.json      {"input", "edit", "output"}
    {seed}_0.png|jpg image of the input caption;  {seed}_1.png|jpg image of the edited caption
    metadata.jsonl   one line per candidate: seed, p (released: p2p_threshold), cfg (released:
                     cfg_scale), and in the release clip_sim_0 / clip_sim_1 / clip_sim_dir / clip_sim_image
    scores.jsonl     (synthesis with early drop only) the CLIP scores of the written candidates
    drawn.json       (synthesis) {"samples_drawn": n}: samples drawn so far, early-dropped ones included,
                     so that a larger samples_per_pair tops the pair up with the samples it lacks
    seeds.json       (release only, at the root) [[folder, [seed, ...]], ...]

The writer (write_prompt, write_candidate, write_lines) and the readers (read_pair_folder,
list_pair_folders) live together so that the two sides cannot drift apart.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from PIL import Image

from ip2p.errors import Ip2pError
from ip2p.io.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from ip2p.io.jsonl import read_jsonl

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
PROMPT_KEYS = ("input", "edit", "output")


# ---- writing -------------------------------------------------------------------------------------


def encode_image(img: Image.Image, fmt: str, quality: int) -> bytes:
    """A candidate image's file bytes: JPEG at `quality` for fmt "jpg", else PNG."""
    buffer = io.BytesIO()
    if fmt == "jpg":
        img.save(buffer, format="JPEG", quality=quality)
    else:
        img.save(buffer, format="PNG")
    return buffer.getvalue()


def write_prompt(folder: Path, record: dict) -> Path:
    """prompt.json: the caption pair's input, edit and output (any other keys of `record` are left out)."""
    return atomic_write_json(folder / "prompt.json", {k: record[k] for k in PROMPT_KEYS})


def write_candidate(folder: Path, seed: int, image_0: Image.Image, image_1: Image.Image, fmt: str = "png",
                    quality: int = 0) -> None:
    """{seed}_0.<fmt> and {seed}_1.<fmt>: one candidate's two images (quality: JPEG only)."""
    suffix = "jpg" if fmt == "jpg" else "png"
    for k, image in enumerate((image_0, image_1)):
        atomic_write_bytes(folder / f"{seed}_{k}.{suffix}", encode_image(image, suffix, quality))


def write_lines(folder: Path, name: str, lines: Iterable[dict]) -> Path:
    """metadata.jsonl or scores.jsonl: one JSON object per candidate, keys sorted."""
    return atomic_write_text(folder / name, "".join(json.dumps(m, sort_keys=True) + "\n" for m in lines))


# ---- reading -------------------------------------------------------------------------------------


@dataclass
class CandidateFiles:
    """One candidate in a pair folder: its seed, image files and metadata line."""

    seed: int
    image_0: Path
    image_1: Path
    meta: dict


@dataclass
class PairFolder:
    pair_id: str
    path: Path
    prompt: dict
    candidates: list[CandidateFiles]
    problems: Counter = field(default_factory=Counter)  # rejected candidates by reason


def find_image(folder: Path, stem: str) -> Path | None:
    for suffix in IMAGE_SUFFIXES:
        path = folder / f"{stem}{suffix}"
        if path.is_file():
            return path
    return None


def _seed(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def read_pair_folder(folder: str | Path, seeds: Iterable[int] | None = None) -> PairFolder:
    """Read one pair folder. Candidates come from metadata.jsonl (or, for a released folder without
    it, from `seeds` or the {seed}_0 image files); a candidate without both images is counted in
    `problems`, not returned. Raises Ip2pError when prompt.json is missing or unreadable."""
    folder = Path(folder)
    try:
        prompt = json.loads((folder / "prompt.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise Ip2pError(f"'{folder}' has no readable prompt.json ({type(err).__name__})") from err
    if not isinstance(prompt, dict) or not all(isinstance(prompt.get(k), str) for k in ("input", "edit", "output")):
        raise Ip2pError(f"'{folder}/prompt.json' lacks the string fields input, edit, output")
    problems: Counter = Counter()
    metas: dict[int, dict] = {}
    meta_path = folder / "metadata.jsonl"
    if meta_path.is_file():
        for line in read_jsonl(meta_path, problems):
            seed = _seed(line.get("seed"))
            if seed is None:
                problems["metadata_without_seed"] += 1
                continue
            metas.setdefault(seed, line)
    if seeds is not None:
        wanted = [int(s) for s in seeds]
    elif metas:
        wanted = list(metas)
    else:
        wanted = sorted(int(p.name.split("_")[0]) for p in folder.iterdir()
                        if p.suffix.lower() in IMAGE_SUFFIXES and p.stem.endswith("_0") and p.stem[:-2].isdigit())
    candidates = []
    for seed in wanted:
        image_0, image_1 = find_image(folder, f"{seed}_0"), find_image(folder, f"{seed}_1")
        if image_0 is None or image_1 is None:
            problems["missing_image"] += 1
            continue
        candidates.append(CandidateFiles(seed, image_0, image_1, metas.get(seed, {"seed": seed})))
    return PairFolder(folder.name, folder, prompt, candidates, problems)


def list_pair_folders(root: str | Path) -> Iterator[tuple[Path, list[int] | None]]:
    """(folder, seeds or None) for every pair folder under root: in seeds.json order when the root has
    one (the release), else every non-hidden subfolder in sorted order."""
    root = Path(root)
    if not root.is_dir():
        raise Ip2pError(f"pair folder root '{root}' does not exist")
    seeds_file = root / "seeds.json"
    if seeds_file.is_file():
        try:
            listing = json.loads(seeds_file.read_text(encoding="utf-8"))
            entries = [(str(name), [int(s) for s in seeds]) for name, seeds in listing]
        except (ValueError, TypeError, json.JSONDecodeError) as err:
            raise Ip2pError(f"'{seeds_file}' is not a list of [folder, [seeds...]] ({type(err).__name__})") from err
        for name, seeds in entries:
            yield root / name, seeds
        return
    for path in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        yield path, None
