"""`ip2p filter`: score candidates with CLIP, keep the best per caption pair, write the dataset.

    candidates (or a released / diffusers-style dataset)
      -> four CLIP scores per candidate (cached in filter.scores_dir, keyed by CLIP model and image
         files: re-filtering with new thresholds computes nothing)
      -> thresholds, then the top_k by clip_sim_dir per caption pair
      -> split train/val/test by input caption (seeded; filter.split_by)
      -> artifacts/dataset/{train,val,test}/part-NNNNN.parquet (staged, then swapped in whole)
    reports/filter.json (counts, kept fraction) and reports/clip_scores.png (score histograms).

Memory does not grow with the number of candidates: units stream through scoring onto an on-disk spool
(filtering/spool.py) that dedups, ranks and splits; the score cache is an SQLite file; the plot keeps
histograms, not scores.
"""

from __future__ import annotations

import io
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from omegaconf import DictConfig, OmegaConf
from PIL import Image, UnidentifiedImageError

from ip2p.io.dataset import SPLITS, image_struct, png_bytes, released_split_of, write_split
from ip2p.io.pairs import list_pair_folders
from ip2p.errors import Ip2pError
from ip2p.filtering.importers import (Candidate, ScoreCache, Source, Unit, cache_path, diffusers_source,
                                      folder_source, release_arrow_memory)
from ip2p.filtering.plots import plot_clip_scores
from ip2p.filtering.select import SPLIT_UNITS, split_counts, split_group
from ip2p.filtering.spool import Spool
from ip2p.io import StageSummary
from ip2p.io.atomic import atomic_folder
from ip2p.io.images import to_rgb
from ip2p.models.loader import load_clip, resolve_source
from ip2p.scoring.clip import METRICS, ClipScorer, clip_id
from ip2p.scoring.thresholds import THRESHOLD_ORDER, first_failure, score_column

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
    drop), the cache, or CLIP in batches (loaded only if something is missing); `load` is the
    source's reader of a candidate's images (Source.load)."""

    def __init__(self, cfg: DictConfig, cache: ScoreCache, load):
        self.cfg = cfg
        self.cache = cache
        self.load = load
        self.batch_size = int(cfg.filter.batch_size)
        self._scorer: ClipScorer | None = None
        self.counts = Counter()
        self.max_waiting = 16 * self.batch_size  # units held while a CLIP batch fills

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
                    raw_0, raw_1 = self.load(c.ref)
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
        is full (or many units wait: memory stays bounded when scores are mostly known)."""
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
            if len(missing) >= self.batch_size or len(buffer) >= self.max_waiting:
                self._compute(missing)
                yield from buffer
                buffer, missing = [], []
        self._compute(missing)
        yield from buffer


def source_dir_of(cfg: DictConfig) -> Path:
    """filter.source_dir, or the synthesis stage's output for source=candidates."""
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
    return Path(str(source_dir))


def _source(cfg: DictConfig, clip_model: str) -> tuple[Source, ScoreCache]:
    f = cfg.filter
    source = str(f.source)
    source_dir = source_dir_of(cfg)
    if not source_dir.exists():
        raise Ip2pError(f"filter source '{source_dir}' does not exist"
                        + (" (run `ip2p synthesize` first)" if source == "candidates" else ""))
    cache = ScoreCache(cache_path(f.scores_dir, source, source_dir), clip_model)
    if source == "diffusers":
        columns = OmegaConf.to_container(f.diffusers, resolve=True)
        return diffusers_source(source_dir, columns, bool(f.use_released_scores)), cache
    released = source == "released"
    return folder_source(source_dir, released, released and bool(f.use_released_scores), clip_model), cache


def _clip_model(cfg: DictConfig) -> str:
    return clip_id(resolve_source(str(cfg.model.clip), "clip", cfg.model, cfg.paths.cache), str(cfg.filter.clip_preprocess))


def scored_candidates(cfg: DictConfig) -> Iterator[Candidate]:
    """Every candidate of filter.source with its four CLIP scores (None when its images are unreadable),
    through the score cache `run` fills: after `ip2p filter` this computes nothing."""
    source, cache = _source(cfg, _clip_model(cfg))
    for unit in Scoring(cfg, cache, source.load).run(source.units):
        yield from unit.candidates


def _record(c: Candidate) -> dict:
    """What a dataset row needs besides id, pair_id, seed, scores and the images (read again by `ref`)."""
    return {"ref": c.ref, "edit_prompt": c.edit_prompt, "input_caption": c.input_caption,
            "output_caption": c.output_caption, "p": c.p, "cfg": c.cfg}


def _rows(kept: Iterator[dict], load, summary: StageSummary, written: Counter, split: str) -> Iterator[dict]:
    for item in kept:
        try:
            raw_0, raw_1 = load(item["ref"])
        except (OSError, ValueError, UnidentifiedImageError, SyntaxError):
            summary.reject("unreadable_image")
            continue
        written[split] += 1
        if written[split] % 4096 == 0:
            release_arrow_memory()
        yield {
            "id": item["id"], "pair_id": item["pair_id"],
            "input_image": image_struct(png_bytes(raw_0)), "edited_image": image_struct(png_bytes(raw_1)),
            "edit_prompt": item["edit_prompt"], "input_caption": item["input_caption"],
            "output_caption": item["output_caption"], "seed": int(item["seed"]),
            "p": item["p"], "cfg": item["cfg"], **{m: item["scores"].get(m) for m in METRICS},
        }


class ScoreStats:
    """What the report and plot need of every score, in constant memory: histograms on [-1, 1] and the
    count below each threshold (NaN counts as below)."""

    def __init__(self, thresholds: dict[str, float], bins: int):
        self.thresholds = thresholds
        self.edges = np.linspace(-1.0, 1.0, bins + 1)
        self.histograms = {m: np.zeros(bins, dtype=np.int64) for m in METRICS}
        self.below = Counter({name: 0 for name in thresholds})
        self._pending: dict[str, list[float]] = {m: [] for m in METRICS}

    def add(self, scores: dict) -> None:
        for m in METRICS:
            value = scores.get(m)
            if value is not None:
                self._pending[m].append(value)
        for name, value in self.thresholds.items():
            score = scores.get(score_column(name))
            if score is not None and not score >= value:
                self.below[name] += 1
        if len(self._pending[METRICS[0]]) >= 65536:
            self.flush()

    def flush(self) -> None:
        for m, values in self._pending.items():
            if values:
                v = np.asarray(values, dtype=np.float64)
                self.histograms[m] += np.histogram(v[~np.isnan(v)], bins=self.edges)[0]
            self._pending[m] = []


def run(cfg: DictConfig) -> Path:
    f = cfg.filter
    # 1. validate the settings before reading anything
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
    clip_model = _clip_model(cfg)
    source, cache = _source(cfg, clip_model)
    released = str(f.source) == "released"
    out_dir = Path(f.out_dir)

    summary = StageSummary("filter", progress=bool(cfg.progress))
    scoring = Scoring(cfg, cache, source.load)
    stats = ScoreStats(thresholds, int(f.plot_bins))
    with Spool(out_dir, int(f.split_seed)) as spool:
        # 2. score every candidate (cache, data or CLIP) as it streams by, onto the on-disk spool
        for unit in summary.bar(scoring.run(source.units), desc="filter", unit="pair"):
            summary.records_in += sum(unit.problems.values())
            for reason, n in unit.problems.items():
                summary.reject(reason, n)
            for c in unit.candidates:
                summary.records_in += 1
                # a release keeps its own split by folder (the pair); ours are grouped by split_by
                group = c.pair_id if released else split_group(str(f.split_by), c.pair_id, c.input_caption)
                failure = "unreadable_image" if c.scores is None else first_failure(c.scores, thresholds)
                if not spool.add(c.id, c.pair_id, c.seed, None if c.scores is None else group, failure, c.scores,
                                 _record(c)):
                    summary.reject("duplicate_candidate")
                elif c.scores is not None:
                    stats.add(c.scores)
        stats.flush()
        # 3. select: thresholds, then top_k per caption pair
        for reason, n in spool.rejections(top_k).items():
            summary.reject(reason, n)
        # 4. splits, drawn over every scored group, not only the survivors: a stricter threshold then removes
        # pairs from their split but never moves one to another (test sets stay comparable across runs)
        if released:  # the release keeps its own split (sorted folders, cut in order)
            root = Path(str(f.source_dir))
            names = [str(path.relative_to(root)).replace(os.sep, "/") for path, _ in list_pair_folders(root)]
            spool.assign_splits(fractions, released_split_of(names, [fractions.get(name, 0.0) for name in SPLITS]))
        else:
            spool.assign_splits(fractions)
        # 5. write every split into a staging folder, then swap it in whole: readers see the old dataset or
        # the new one, never a mix
        written: Counter = Counter()
        pairs_by_split: dict[str, int] = {}
        with atomic_folder(out_dir) as staging:
            for name in fractions:
                pairs: set[str] = set()
                kept = (pairs.add(k["pair_id"]) or k for k in spool.kept(name, top_k))
                write_split(_rows(kept, source.load, summary, written, name), staging, name, int(f.shard_size))
                pairs_by_split[name] = len(pairs)
                release_arrow_memory()
            # nothing kept: stop here, and the dataset already in out_dir stays (the staging folder is dropped)
            summary.require_output("candidate kept", source_dir_of(cfg), kept=sum(written.values()))
        scored, pairs_in, pairs_out = (spool.count(w, top_k) for w in ("scored", "pairs_in", "pairs_out"))
    summary.records_out = sum(written.values())

    # 6. report
    plot_clip_scores(stats.histograms, stats.edges, thresholds, summary.records_out, scored, f.plot)
    summary.extra.update({
        "source": str(f.source),
        "clip_model": clip_model,
        "thresholds": thresholds,
        "top_k": top_k,
        "candidates_scored": scored,
        "kept_fraction": round(summary.records_out / scored, 6) if scored else 0.0,
        "pairs_in": pairs_in,
        "pairs_out": pairs_out,
        "below_threshold": dict(stats.below),  # each metric counted on its own (a candidate may fail several)
        "splits": {name: {"pairs": pairs_by_split[name], "rows": written[name]} for name in fractions},
        **{k: scoring.counts[k] for k in ("scores_cached", "scores_computed", "scores_released", "scores_synthesis",
                                           "scores_dataset")},
    })
    path = summary.write(cfg.paths.reports)
    log.info("filter: %d caption pairs of %d -> %s", pairs_out, pairs_in, out_dir)
    return path
