"""The card an exported editor carries, so that the folder says what it is and how to use it.

    README.md   the model card people and model hubs read: YAML front matter with the metadata hub
                folders carry (library, pipeline type, base model, tags), then the settings the editor
                was tuned at, its training data and recipe, and what was measured
    ip2p.json   the same facts for our tools: `ip2p edit --model DIR` takes the sampling settings from
                it for every option not given on the command line

Nothing here changes the diffusers layout: StableDiffusionInstructPix2PixPipeline ignores both files.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ip2p.errors import Ip2pError
from ip2p.io.atomic import atomic_write_text

CARD_JSON = "ip2p.json"
CARD_README = "README.md"
# What `ip2p edit` may take from a card: the settings an editor is tuned at (guidance, sampler, steps, size)
SAMPLING_KEYS = ("steps", "text_guidance", "image_guidance", "scheduler", "resolution")


@dataclass
class ModelCard:
    base_model: str | None                                  # what the UNet was widened from (hub id or folder)
    sampling: dict[str, Any]                                # SAMPLING_KEYS -> the value it was tuned at
    training: dict[str, Any] = field(default_factory=dict)  # steps, data_hash, recipe
    metrics: dict[str, Any] = field(default_factory=dict)   # measured numbers, each named by what measured it
    name: str = "InstructPix2Pix editor"


def data_hash(folder: str | Path, max_bytes: int) -> dict[str, str] | None:
    """{"sha256": ..., "of": "bytes" | "names_and_sizes"}: sha256 over the sorted relative paths and the
    bytes of every file under `folder` (a dataset), so the same data gives the same hash on any machine;
    above `max_bytes` in all, over names and sizes only (reading terabytes to label a model is not worth
    it). None when the folder does not exist."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        return None
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    by_bytes = sum(p.stat().st_size for p in files) <= max_bytes
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.relative_to(root)}\0{path.stat().st_size}\0".encode())
        if by_bytes:
            with path.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    return {"sha256": digest.hexdigest(), "of": "bytes" if by_bytes else "names_and_sizes"}


def _front_matter(card: ModelCard) -> str:
    lines = ["---", "library_name: diffusers", "pipeline_tag: image-to-image"]
    if card.base_model:
        lines.append(f"base_model: {json.dumps(str(card.base_model))}")
    lines += ["tags:", "  - instruct-pix2pix", "  - image-editing", "  - ip2p", "---"]
    return "\n".join(lines)


def _table(values: dict[str, Any]) -> list[str]:
    if not values:
        return ["(none recorded)"]
    return ["| setting | value |", "|---|---|"] + [f"| {k} | {json.dumps(v) if isinstance(v, (dict, list)) else v} |"
                                                   for k, v in values.items()]


def render_readme(card: ModelCard) -> str:
    s = card.sampling
    use = (f"ip2p edit image.png \"make it snowy\" --model .   # steps {s.get('steps')}, text guidance "
           f"{s.get('text_guidance')}, image guidance {s.get('image_guidance')} unless given")
    recipe = card.training.get("recipe", {})
    training = {k: v for k, v in card.training.items() if k != "recipe"}
    parts = [_front_matter(card), "", f"# {card.name}", "",
             "An InstructPix2Pix editor (a Stable Diffusion UNet with the input image as 4 extra input channels) "
             "in the diffusers `StableDiffusionInstructPix2PixPipeline` layout, made by ip2p.", "",
             "```bash", use, "```", "",
             "## Sampling settings it was tuned at", "", *_table(s), "",
             "## Training", "", *_table(training), "", "Recipe (`train.*`):", "", *_table(recipe), "",
             "## Measured", "", *_table(card.metrics), ""]
    return "\n".join(parts)


def write_card(folder: str | Path, card: ModelCard) -> None:
    folder = Path(folder)
    atomic_write_text(folder / CARD_JSON, json.dumps(asdict(card), indent=2, sort_keys=True, default=str) + "\n")
    atomic_write_text(folder / CARD_README, render_readme(card))


def read_card(folder: str | Path) -> ModelCard | None:
    """The card of a model folder, or None (no folder, no card, or a card we cannot read: the model itself
    still loads, so a broken card only loses its defaults)."""
    path = Path(str(folder)).expanduser() / CARD_JSON
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return ModelCard(**{k: data[k] for k in ("base_model", "sampling", "training", "metrics", "name") if k in data})
    except (OSError, ValueError, TypeError, KeyError):
        return None


def sampling_defaults(folder: str | Path) -> dict[str, Any]:
    """The sampling settings a model folder's card names (only SAMPLING_KEYS with a value); {} without a card."""
    card = read_card(folder)
    if card is None or not isinstance(card.sampling, dict):
        return {}
    return {k: card.sampling[k] for k in SAMPLING_KEYS if card.sampling.get(k) is not None}


def report_numbers(path: str | Path, depth: int = 2) -> dict[str, float]:
    """The numbers of a JSON report, flattened to "<file stem>/<key>/<key>" down to `depth` levels
    (world_eval.json's editor/both, train.json's steps, ...). Raises Ip2pError for a missing or
    unreadable file: a card must not claim numbers it could not read."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise Ip2pError(f"cannot read the report '{path}' for the model card: {type(err).__name__}") from err
    out: dict[str, float] = {}

    def walk(node: Any, prefix: str, level: int) -> None:
        if isinstance(node, bool):
            return
        if isinstance(node, (int, float)):
            out[prefix] = node
        elif isinstance(node, dict) and level < depth:
            for key, value in node.items():
                walk(value, f"{prefix}/{key}", level + 1)

    walk(data, path.stem, 0)
    return out


def card_for_export(source: str, reports: list[str], steps: int | None = None) -> ModelCard | None:
    """The card of an editor being exported: its own (if the source folder has one) with the numbers of
    `reports` added as measured. `steps`: the UNet comes from another step of the same training (a saved
    checkpoint): the card counts those steps and keeps none of the source's measured numbers. None when
    there is neither a card nor a report."""
    card = read_card(source)
    if card is None and not reports:
        return None
    card = card or ModelCard(base_model=None, sampling={})
    if steps is not None:
        card.training = {**card.training, "steps": steps}
        card.metrics = {}
    for report in reports:
        card.metrics.update(report_numbers(report))
    return card
