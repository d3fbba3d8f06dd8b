"""`ip2p filter`: score candidates with CLIP, keep the best per caption pair, write the dataset.

    candidates (or a released / diffusers-style dataset)
      -> four CLIP scores per candidate (cached in filter.scores_dir, keyed by CLIP model and image
         files: re-filtering with new thresholds computes nothing)
      -> thresholds, then the top_k by clip_sim_dir per caption pair
      -> split train/val/test by input caption (seeded; filter.split_by)
      -> artifacts/dataset/{train,val,test}/part-NNNNN.parquet (staged, then swapped in whole)
    reports/filter.json (counts, kept fraction) and reports/clip_scores.png (score histograms).
"""

from __future__ import annotations

import io
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator

from omegaconf import DictConfig, OmegaConf
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from ip2p.data.dataset import SPLITS, image_struct, list_pair_folders, png_bytes, released_split_of, write_split
from ip2p.errors import Ip2pError
from ip2p.filtering.importers import Candidate, ScoreCache, Unit, cache_path, diffusers_units, folder_units
from ip2p.filtering.plots import plot_clip_scores
from ip2p.filtering.select import SPLIT_UNITS, assign_splits, select, split_counts, split_group
from ip2p.io import StageSummary
from ip2p.io.atomic import atomic_folder
from ip2p.io.images import to_rgb
from ip2p.models.loader import load_clip, resolve_source
from ip2p.scoring.clip import METRICS, ClipScorer, clip_id
from ip2p.scoring.thresholds import THRESHOLD_ORDER, score_column

log = logging.getLogger(__name__)

SOURCES = ("candidates", "released", "diffusers")


def thresholds_from_config(section) -> dict[str, float]:
    values = OmegaConf.to_container(section, resolve=True) if not isinstance(section, dict) else dict(section)
    unknown = sorted(set(values) - set(THRESHOLD_ORDER))
    if unknown:
        raise Ip2pError(f"unknown filter threshold(s) {', '.join(unknown)}: use {', '.join(THRESHOLD_ORDER)}")
    out = {}
    for name, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise Ip2pError(f"filter threshold {name} must be a number (got {value!r})")
        out[name] = float(value)
    return out


def _decode(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return to_rgb(img)


class Scoring:
    """Fills in Candidate.scores: those that came with the data (released metadata, synthesis' early
    drop), the cache, or CLIP in batches (loaded only if something is missing)."""

    def __init__(self, cfg: DictConfig, cache: ScoreCache):
        self.cfg = cfg
        self.cache = cache
        self.batch_size = int(cfg.filter.batch_size)
        self._scorer: ClipScorer | None = None
        self.counts = Counter()

    @property
    def scorer(self) -> ClipScorer:
        if self._scorer is None:
            clip = load_clip(self.cfg.model.clip, self.cfg.model, self.cfg.paths.cache, self.cfg.device)
            self._scorer = ClipScorer(clip, self.batch_size, str(self.cfg.filter.clip_preprocess))
        return self._scorer

    def _compute(self, candidates: list[Candidate]) -> None:
        for start in range(0, len(candidates), self.batch_size):
            chunk = candidates[start:start + self.batch_size]
            readable, images_0, images_1 = [], [], []
            for c in chunk:
                try:
                    raw_0, raw_1 = c.load_images()
                    pair = _decode(raw_0), _decode(raw_1)
                except (OSError, ValueError, UnidentifiedImageError, SyntaxError):
                    continue  # stays unscored: rejected as unreadable
                images_0.append(pair[0])
                images_1.append(pair[1])
                readable.append(c)
            for with_captions in (True, False):
                idx = [i for i, c in enumerate(readable) if c.has_captions == with_captions]
                if not idx:
                    continue
                caps_0 = [readable[i].input_caption for i in idx] if with_captions else None
                caps_1 = [readable[i].output_caption for i in idx] if with_captions else None
                results = self.scorer.score([images_0[i] for i in idx], [images_1[i] for i in idx], caps_0, caps_1)
                for i, scores in zip(idx, results):
                    readable[i].scores = scores
            self.cache.put(readable)
            self.counts["scores_computed"] += len(readable)

    def run(self, units: Iterable[Unit]) -> Iterator[Unit]:
        """Yield each unit with scores filled in where possible, buffering units until a CLIP batch
        is full."""
        buffer: list[Unit] = []
        missing: list[Candidate] = []
        for unit in units:
            for c in unit.candidates:
                if c.scores is not None:
                    self.counts[f"scores_{c.score_origin}"] += 1
                    continue
                c.scores = self.cache.get(c)
                if c.scores is not None:
                    self.counts["scores_cached"] += 1
                else:
                    missing.append(c)
            buffer.append(unit)
            if len(missing) >= self.batch_size:
                self._compute(missing)
                yield from buffer
                buffer, missing = [], []
        self._compute(missing)
        yield from buffer


def _units(cfg: DictConfig, clip_model: str):
    f = cfg.filter
    source = str(f.source)
    if source not in SOURCES:
        raise Ip2pError(f"filter.source must be one of {', '.join(SOURCES)} (got '{source}')")
    source_dir = f.source_dir
    if source_dir is None:
        if source != "candidates":
            raise Ip2pError(f"filter.source={source} needs filter.source_dir=PATH")
        synthesis = cfg.get("synthesis")
        source_dir = synthesis.out_dir if synthesis is not None else Path(cfg.paths.artifacts) / "candidates"
    source_dir = Path(str(source_dir))
    if not source_dir.exists():
        raise Ip2pError(f"filter source '{source_dir}' does not exist"
                        + (" (run `ip2p synthesize` first)" if source == "candidates" else ""))
    cache = ScoreCache(cache_path(f.scores_dir, source, source_dir), clip_model)
    if source == "diffusers":
        return diffusers_units(source_dir, OmegaConf.to_container(f.diffusers, resolve=True)), cache
    released = source == "released"
    return folder_units(source_dir, released, released and bool(f.use_released_scores), clip_model), cache


def _row(candidate: Candidate, scores: dict) -> dict:
    raw_0, raw_1 = candidate.load_images()
    return {
        "id": candidate.id, "pair_id": candidate.pair_id,
        "input_image": image_struct(png_bytes(raw_0)), "edited_image": image_struct(png_bytes(raw_1)),
        "edit_prompt": candidate.edit_prompt, "input_caption": candidate.input_caption,
        "output_caption": candidate.output_caption, "seed": int(candidate.seed),
        "p": candidate.p, "cfg": candidate.cfg, **{m: scores.get(m) for m in METRICS},
    }


def _rows(kept: list[dict], summary: StageSummary, written: Counter, split: str) -> Iterator[dict]:
    for item in kept:
        try:
            row = _row(item["candidate"], item)
        except (OSError, ValueError, UnidentifiedImageError, SyntaxError):
            summary.reject("unreadable_image")
            continue
        written[split] += 1
        yield row


def write_dataset(by_split: dict[str, list[dict]], out_dir: Path, shard_size: int, summary: StageSummary) -> Counter:
    """Write every split into a staging folder beside out_dir, then swap it in: readers see the old
    dataset or the new one, never a mix."""
    written: Counter = Counter()
    with atomic_folder(out_dir) as staging:
        for split, kept in by_split.items():
            write_split(_rows(kept, summary, written, split), staging, split, shard_size)
    return written


def run(cfg: DictConfig) -> Path:
    f = cfg.filter
    if int(cfg.shard.count) != 1:  # it reads every synthesis shard's output and writes one dataset
        raise Ip2pError(f"ip2p filter is not sharded: shard.count must be 1 (got {cfg.shard.count})")
    thresholds = thresholds_from_config(f.thresholds)
    top_k = int(f.top_k)
    if top_k < 1:
        raise Ip2pError(f"filter.top_k must be at least 1 (got {top_k})")
    fractions = {str(k): float(v) for k, v in OmegaConf.to_container(f.splits, resolve=True).items()}
    if f.split_by not in SPLIT_UNITS:
        raise Ip2pError(f"filter.split_by must be one of {', '.join(SPLIT_UNITS)} (got '{f.split_by}')")
    split_counts(0, fractions)  # bad fractions fail before any scoring
    clip_model = clip_id(resolve_source(str(cfg.model.clip), "clip", cfg.model, cfg.paths.cache),
                         str(f.clip_preprocess))
    units, cache = _units(cfg, clip_model)
    released = str(f.source) == "released"

    summary = StageSummary("filter")
    scoring = Scoring(cfg, cache)
    candidates: list[dict] = []
    seen: set[str] = set()
    pairs_in: set[str] = set()
    for unit in tqdm(scoring.run(units), desc="filter", unit="pair", disable=not cfg.progress):
        summary.records_in += sum(unit.problems.values())
        for reason, n in unit.problems.items():
            summary.reject(reason, n)
        for c in unit.candidates:
            summary.records_in += 1
            pairs_in.add(c.pair_id)
            if c.id in seen:
                summary.reject("duplicate_candidate")
                continue
            seen.add(c.id)
            if c.scores is None:
                summary.reject("unreadable_image")
                continue
            # a release keeps its own split by folder (the pair); ours are grouped by split_by
            group = c.pair_id if released else split_group(str(f.split_by), c.pair_id, c.input_caption)
            candidates.append({"candidate": c, "pair_id": c.pair_id, "seed": c.seed, **c.scores, "group": group})

    kept, rejected = select(candidates, thresholds, top_k)
    for reason, n in rejected.items():
        summary.reject(reason, n)
    # Splits are drawn over every scored group, not only the survivors: a stricter threshold then removes
    # pairs from their split but never moves one to another (test sets stay comparable across runs).
    if released:  # the release keeps its own split (sorted folders, cut in order)
        root = Path(str(f.source_dir))
        names = [str(path.relative_to(root)).replace(os.sep, "/") for path, _ in list_pair_folders(root)]
        split_of = released_split_of(names, [fractions.get(name, 0.0) for name in SPLITS])
        assignment = {name: split for name, split in split_of.items() if split in fractions}
    else:
        assignment = assign_splits([c["group"] for c in candidates], fractions, int(f.split_seed))
    by_split = {name: [k for k in kept if assignment[k["group"]] == name] for name in fractions}
    written = write_dataset(by_split, Path(f.out_dir), int(f.shard_size), summary)
    summary.records_out = sum(written.values())

    scores = {m: [c[m] for c in candidates] for m in METRICS}
    plot_clip_scores(scores, thresholds, summary.records_out, len(candidates), f.plot)
    below = {name: sum(1 for c in candidates if c[score_column(name)] is not None
                       and not c[score_column(name)] >= value) for name, value in thresholds.items()}
    summary.extra.update({
        "source": str(f.source),
        "clip_model": clip_model,
        "thresholds": thresholds,
        "top_k": top_k,
        "candidates_scored": len(candidates),
        "kept_fraction": round(summary.records_out / len(candidates), 6) if candidates else 0.0,
        "pairs_in": len(pairs_in),
        "pairs_out": len({k["pair_id"] for k in kept}),
        "below_threshold": below,  # each metric counted on its own (a candidate may fail several)
        "splits": {name: {"pairs": len({k["pair_id"] for k in by_split[name]}), "rows": written[name]}
                   for name in fractions},
        **{k: scoring.counts[k] for k in ("scores_cached", "scores_computed", "scores_released", "scores_synthesis")},
    })
    path = summary.write(cfg.paths.reports)
    log.info("filter: kept %d of %d candidates (%d caption pairs) -> %s", summary.records_out, len(candidates),
             summary.extra["pairs_out"], f.out_dir)
    return path
