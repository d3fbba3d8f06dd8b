"""`ip2p synthesize`: instructions.jsonl -> artifacts/candidates/<pair_id>/ (pair folders).

Each caption pair is generated in a hidden temp folder and renamed into place when complete, so a
killed run never leaves half a pair; a rerun skips finished pairs and redoes the rest exactly (every
sample's noise, p and cfg come from stable_seed(seed, pair_id, k)). Pairs are sharded by
shard_of(pair_id); reports/synthesize[.shard-...].json counts what went in, out and why not.

A rerun with a larger synthesis.samples_per_pair tops finished pairs up: the k-th sample of a pair is
the same whatever the count, so only the samples not drawn yet are (drawn.json counts them, early-dropped
ones included). They are written next to the old ones and the pair's metadata.jsonl (the list readers
go by) is replaced after them, in one atomic write, so a killed top-up leaves the pair as it was. A pair whose prompt.json no longer
matches its caption pair is redone. The out_dir keeps the recipe it was made with (RECIPE_FILE): a run
with another recipe (steps, guidance range, model, ...) stops with an error instead of mixing candidates.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from omegaconf import DictConfig, OmegaConf

from ip2p.errors import Ip2pError
from ip2p.io import StageSummary, count_lines, read_jsonl, shard_of
from ip2p.io.atomic import atomic_write_json
from ip2p.io.images import tensor_to_pil
from ip2p.io.loggers import flatten
from ip2p.io.pairs import PROMPT_KEYS, write_candidate, write_lines, write_prompt
from ip2p.models.loader import load_clip, load_diffusion, load_vae
from ip2p.sampling import make_scheduler
from ip2p.sampling.loop import scheduler_class
from ip2p.scoring.clip import ClipScorer
from ip2p.scoring.thresholds import first_failure
from ip2p.synthesis.attention import MODES, GoogleSettings
from ip2p.synthesis.p2p_alignment import AlignScores
from ip2p.synthesis.pipeline import PairSampler, SampleSpec, SynthesisSettings, draw_samples

log = logging.getLogger(__name__)

FIELDS = ("id", "input", "edit", "output")
TEMP_PREFIX = ".partial-"
MAX_ID_LENGTH = 200
RECIPE_FILE = ".synthesis-recipe.json"
DRAWN_FILE = "drawn.json"  # {"samples_drawn": n}: in each pair folder
# synthesis keys that do not change what a candidate is: where, how many, how they are batched
NOT_IN_RECIPE = ("input", "out_dir", "samples_per_pair", "batch_size", "pairs_per_batch")


def settings_from_config(cfg: DictConfig) -> SynthesisSettings:
    s = cfg.synthesis
    if s.attention.mode not in MODES:
        raise Ip2pError(f"synthesis.attention.mode must be one of {', '.join(MODES)} (got '{s.attention.mode}')")
    g = s.attention.google
    if g.cross not in ("auto", "replace", "refine", "none"):
        raise Ip2pError(f"synthesis.attention.google.cross must be auto, replace, refine or none (got '{g.cross}')")
    for key in ("steps", "samples_per_pair", "batch_size", "pairs_per_batch"):
        if int(s[key]) < 1:
            raise Ip2pError(f"synthesis.{key} must be at least 1 (got {s[key]})")
    if not 0 <= s.p_min <= s.p_max <= 1:
        raise Ip2pError(f"need 0 <= synthesis.p_min <= synthesis.p_max <= 1 (got {s.p_min}, {s.p_max})")
    if not 0 <= s.caption_switch < 1:
        raise Ip2pError(f"synthesis.caption_switch must lie in [0, 1) (got {s.caption_switch})")
    if not 0 < s.cfg_min <= s.cfg_max:
        raise Ip2pError(f"need 0 < synthesis.cfg_min <= synthesis.cfg_max (got {s.cfg_min}, {s.cfg_max})")
    scheduler_class(str(s.scheduler))  # an unknown scheduler fails before the model loads
    if s.image_format not in ("png", "jpg"):
        raise Ip2pError(f"synthesis.image_format must be png or jpg (got '{s.image_format}')")
    google = GoogleSettings(cross=str(g.cross), cross_steps=float(g.cross_steps),
                            self_max_queries=int(g.self_max_queries), local_blend=bool(g.local_blend),
                            blend_threshold=float(g.blend_threshold), blend_max_queries=int(g.blend_max_queries),
                            blend_pool=int(g.blend_pool))
    if s.early_drop.enabled and float(s.early_drop.look_at) < 1 and s.attention.mode != "official":
        raise Ip2pError("synthesis.early_drop.look_at < 1 (a look mid-way) needs attention.mode=official")
    if int(s.pairs_per_batch) > 1 and s.attention.mode == "google" and g.cross != "none":
        raise Ip2pError("synthesis.pairs_per_batch > 1 needs attention.mode=official or google.cross=none "
                        "(Google's cross-attention edit belongs to one caption pair per batch)")
    align = AlignScores(float(g.align.match), float(g.align.mismatch), float(g.align.gap))
    return SynthesisSettings(steps=int(s.steps), scheduler=str(s.scheduler), mode=str(s.attention.mode),
                             caption_switch=float(s.caption_switch),
                             google=google, align=align, progress=False)


def check_one_call_per_step(settings: SynthesisSettings, scheduler_config) -> None:
    """The P2P step rules count UNet calls as steps; a sampler with more calls than steps (Heun, PNDM's
    warm-up) would copy attention for another fraction of the denoising than p."""
    probe = make_scheduler(settings.scheduler, scheduler_config)
    probe.set_timesteps(settings.steps)
    if len(probe.timesteps) != settings.steps:
        raise Ip2pError(f"synthesis.scheduler={settings.scheduler} makes {len(probe.timesteps)} model calls for "
                        f"{settings.steps} steps; synthesis needs one model call per step "
                        f"(e.g. euler_ancestral, euler, ddim, ddpm, dpmpp_2m)")


def resolution(cfg: DictConfig, sampler: PairSampler) -> int:
    res = cfg.synthesis.resolution
    res = sampler.native_resolution() if res is None else int(res)
    if res < 8 * sampler.latent_scale or res % sampler.latent_scale:
        raise Ip2pError(f"synthesis.resolution must be a multiple of {sampler.latent_scale} and at least "
                        f"{8 * sampler.latent_scale} (got {res})")
    return res


def record_problem(record: dict, tokenizer_len, max_tokens: int) -> str | None:
    """Why a record cannot be synthesised (a rejection reason), or None."""
    if not all(isinstance(record.get(k), str) for k in FIELDS):
        return "malformed_record"
    pair_id = record["id"]
    if (not pair_id.strip() or pair_id != pair_id.strip() or pair_id.startswith(".") or len(pair_id) > MAX_ID_LENGTH
            or any(c in pair_id for c in "/\\\0") or pair_id in (".", "..")):
        return "unsafe_pair_id"
    if not record["input"].strip() or not record["output"].strip():
        return "empty_caption"
    if not record["edit"].strip():
        return "empty_instruction"
    if max(tokenizer_len(record["input"]), tokenizer_len(record["output"])) > max_tokens:
        return f"caption_over_{max_tokens}_tokens"
    return None


def shard_records(cfg: DictConfig, summary: StageSummary, tokenizer_len, max_tokens: int) -> Iterator[dict]:
    """Valid records of this shard, in file order. Rejections are counted by the shard a record
    belongs to (unparseable lines by shard 0), so merged shard summaries count each line once."""
    path = Path(cfg.synthesis.input)
    if not path.is_file():
        raise Ip2pError(f"instructions file '{path}' not found (run `ip2p instructions` first)")
    index, count = int(cfg.shard.index), int(cfg.shard.count)
    unreadable: Counter = Counter()  # lines that are not JSON objects: counted by shard 0
    seen: set[str] = set()
    for line_no, record in enumerate(read_jsonl(path, unreadable)):
        pair_id = record.get("id") if isinstance(record.get("id"), str) else None
        if shard_of(pair_id if pair_id is not None else f"line-{line_no}", count) != index:
            continue  # another shard's record (a duplicate id always lands in the same shard)
        summary.records_in += 1
        if pair_id is not None and pair_id in seen:
            summary.reject("duplicate_pair_id")
            continue
        if pair_id is not None:
            seen.add(pair_id)
        reason = record_problem(record, tokenizer_len, max_tokens)
        if reason is not None:
            summary.reject(reason)
            continue
        yield record
    if index == 0:  # so that records_in = records_out + rejected_total
        summary.records_in += sum(unreadable.values())
        summary.rejected.update(unreadable)


def expected_pairs(cfg: DictConfig) -> int | None:
    """About how many caption pairs this shard gets (the input's lines over the shard count): the
    progress bar's total, so that it shows an ETA. Rejected lines make the true count a little lower.
    None without an input file (reading the records then says what is missing)."""
    if not Path(cfg.synthesis.input).is_file():
        return None
    return max(1, round(count_lines(cfg.synthesis.input) / int(cfg.shard.count)))


def look_step(look_at: float, steps: int) -> int:
    """The index of the step that ends the first `look_at` share of `steps` (at least the first step)."""
    return max(0, min(steps - 1, round(look_at * steps) - 1))


class EarlyDrop:
    """CLIP scoring inside synthesis: candidates below synthesis.early_drop.thresholds are not written.
    With look_at < 1, candidates are also looked at mid-way (the clean images that the prediction after
    that share of the steps implies, against look_thresholds) and those failing are not denoised further."""

    def __init__(self, cfg: DictConfig):
        c = cfg.synthesis.early_drop
        clip = load_clip(cfg.model.clip, cfg.model, cfg.paths.cache, cfg.device)
        self.scorer = ClipScorer(clip, int(c.batch_size), str(c.clip_preprocess))
        self.thresholds = dict(OmegaConf.to_container(c.thresholds, resolve=True))
        self.look_thresholds = dict(OmegaConf.to_container(c.look_thresholds, resolve=True))
        self.look_at = float(c.look_at)
        if not 0 < self.look_at <= 1:
            raise Ip2pError(f"synthesis.early_drop.look_at must lie in (0, 1] (got {self.look_at})")

    def __call__(self, images_0, images_1, inputs: list[str], outputs: list[str]) -> list[dict | None]:
        """Scores of each candidate (under its own captions), or None for a candidate to drop."""
        scores = self.scorer.score(images_0, images_1, inputs, outputs)
        return [s if first_failure(s, self.thresholds) is None else None for s in scores]

    def look_step(self, steps: int) -> int | None:
        """The step after which candidates are looked at mid-way; None: only finished images are scored."""
        return None if self.look_at >= 1 else look_step(self.look_at, steps)

    def keep_mid_way(self, sampler: PairSampler, x0: torch.Tensor, captions: list[tuple[str, str]]) -> torch.Tensor:
        """bool [S]: which samples pass look_thresholds on the images their clean latents x0 [2S, ...] decode to."""
        images_0, images_1 = sampler.decode_pairs(*x0.chunk(2))
        scores = self.scorer.score(tensor_to_pil(images_0), tensor_to_pil(images_1), [c[0] for c in captions],
                                   [c[1] for c in captions])
        return torch.tensor([first_failure(s, self.look_thresholds) is None for s in scores])


def synthesis_recipe(cfg: DictConfig) -> dict:
    """What makes a candidate what it is: the models, the seed, autocast and every synthesis key but
    those in NOT_IN_RECIPE (and early drop's batch size)."""
    s = OmegaConf.to_container(cfg.synthesis, resolve=True)
    for key in NOT_IN_RECIPE:
        s.pop(key, None)
    s.get("early_drop", {}).pop("batch_size", None)
    return {"synthesis": s, "model.base": str(cfg.model.base), "seed": int(cfg.seed),
            "autocast": str(cfg.get("autocast"))}


def check_recipe(out_dir: Path, recipe: dict) -> None:
    """Stop if the out_dir was made with another recipe (one without RECIPE_FILE adopts this run's when
    it writes its first candidate)."""
    path = out_dir / RECIPE_FILE
    if not path.is_file():
        return
    try:
        before = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise Ip2pError(f"'{path}' is unreadable ({type(err).__name__}): remove it to adopt this run's recipe") from err
    if before != recipe:
        old, new = flatten(before), flatten(recipe)
        keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        raise Ip2pError(f"the candidates in '{out_dir}' were made with another recipe (differs in {', '.join(keys)}): "
                        "remove that folder or set synthesis.out_dir to a new one")


@dataclass
class PendingPair:
    """A caption pair being generated into its temp folder. `old_metadata` / `old_scores`: the lines of a
    finished pair that this one tops up (None: a new pair)."""

    record: dict
    temp: Path
    specs: list[SampleSpec]
    metadata: list[dict] = field(default_factory=list)
    scores: list[dict] = field(default_factory=list)
    dropped: int = 0
    old_metadata: list[dict] | None = None
    old_scores: list[dict] = field(default_factory=list)
    drawn: int = 0     # samples of a topped-up pair drawn before


def drawn_before(folder: Path, record: dict) -> tuple[int, list[dict], list[dict]] | None:
    """(samples drawn, metadata lines, scores lines) of a finished pair folder; None if the folder
    belongs to another caption pair (its prompt.json differs) and must be redone. Samples drawn:
    drawn.json's count, or more if metadata lists a later k (a top-up killed between its two writes).
    A folder written before drawn.json existed has its early-dropped last samples drawn again. An
    unreadable folder stops the run in one line (it is not deleted)."""
    try:
        prompt = json.loads((folder / "prompt.json").read_text(encoding="utf-8"))
        meta = list(read_jsonl(folder / "metadata.jsonl", Counter()))
        scores = list(read_jsonl(folder / "scores.jsonl", Counter())) if (folder / "scores.jsonl").is_file() else []
        recorded = json.loads((folder / DRAWN_FILE).read_text(encoding="utf-8")) if (folder / DRAWN_FILE).is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise Ip2pError(f"finished pair folder '{folder}' is unreadable ({type(err).__name__}): "
                        "remove it to synthesize it again") from err
    if not isinstance(prompt, dict) or any(prompt.get(k) != record[k] for k in PROMPT_KEYS):
        return None
    ks = [m["k"] for m in meta if isinstance(m.get("k"), int)]
    drawn = recorded.get("samples_drawn") if isinstance(recorded, dict) else None
    return max(drawn if isinstance(drawn, int) else 0, max(ks) + 1 if ks else 0), meta, scores


def start_pair(record: dict, cfg: DictConfig, out_dir: Path, before: tuple[int, list[dict], list[dict]] | None = None
               ) -> PendingPair:
    """A new pair, or (with `before`, from drawn_before) the top-up of a finished one: the samples it lacks."""
    s = cfg.synthesis
    temp = out_dir / f"{TEMP_PREFIX}{record['id']}"
    if temp.exists():
        shutil.rmtree(temp)  # left by a killed run
    temp.mkdir(parents=True)
    specs = draw_samples(int(cfg.seed), record["id"], int(s.samples_per_pair), (float(s.p_min), float(s.p_max)),
                         (float(s.cfg_min), float(s.cfg_max)))
    if before is None:
        return PendingPair(record, temp, specs)
    drawn, meta, scores = before
    return PendingPair(record, temp, specs[drawn:], old_metadata=meta, old_scores=scores, drawn=drawn)


def finish_pair(pair: PendingPair, out_dir: Path, early_drop: EarlyDrop | None) -> None:
    """A new pair: write its metadata and rename its temp folder into place (the pair is then done).
    A top-up: move the new images into the finished folder, then replace its scores.jsonl and, last,
    its metadata.jsonl (until then readers see the pair as it was)."""
    record = pair.record
    final = out_dir / record["id"]
    drawn = {"samples_drawn": len(pair.specs) + pair.drawn}
    if pair.old_metadata is None:
        write_prompt(pair.temp, record)
        write_lines(pair.temp, "metadata.jsonl", pair.metadata)
        if early_drop:
            write_lines(pair.temp, "scores.jsonl", pair.scores)
        atomic_write_json(pair.temp / DRAWN_FILE, drawn)
        os.rename(pair.temp, final)
        return
    for path in sorted(pair.temp.iterdir()):
        os.replace(path, final / path.name)
    if early_drop:
        write_lines(final, "scores.jsonl", pair.old_scores + pair.scores)
    write_lines(final, "metadata.jsonl", pair.old_metadata + pair.metadata)
    atomic_write_json(final / DRAWN_FILE, drawn)
    pair.temp.rmdir()


def write_pairs(records: list[tuple[dict, tuple | None]], sampler: PairSampler, cfg: DictConfig, size: int,
                out_dir: Path, early_drop: EarlyDrop | None) -> list[PendingPair]:
    """Generate caption pairs (record, what drawn_before found or None) into temp folders, then put each
    in place. The candidates of all `records` are cut into UNet batches of batch_size x len(records)
    samples, so several pairs share a call (synthesis.pairs_per_batch); a candidate is the same whatever
    shares its batch."""
    s = cfg.synthesis
    suffix = "jpg" if s.image_format == "jpg" else "png"
    pairs = [start_pair(record, cfg, out_dir, before) for record, before in records]
    rows = [(pair, k, spec) for pair in pairs for k, spec in enumerate(pair.specs, start=pair.drawn)]
    batch = int(s.batch_size) * len(pairs)
    look = early_drop.look_step(int(s.steps)) if early_drop else None
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        captions = [(pair.record["input"], pair.record["output"]) for pair, _, _ in chunk]
        specs = [spec for _, _, spec in chunk]
        if look is None:
            latents = sampler.sample_rows(captions, specs, size, size)
        else:  # candidates failing the look mid-way are not denoised further
            *latents, kept = sampler.sample_rows_with_look(
                captions, specs, size, size, look, functools.partial(early_drop.keep_mid_way, sampler, captions=captions))
            for i in sorted(set(range(len(chunk))) - set(kept.tolist())):
                chunk[i][0].dropped += 1
            chunk, captions = [chunk[i] for i in kept.tolist()], [captions[i] for i in kept.tolist()]
            if not chunk:
                continue
        images_0, images_1 = sampler.decode_pairs(*latents)
        pil_0, pil_1 = tensor_to_pil(images_0), tensor_to_pil(images_1)
        verdicts = (early_drop(pil_0, pil_1, [c[0] for c in captions], [c[1] for c in captions]) if early_drop
                    else [None] * len(chunk))
        for (pair, k, spec), im0, im1, verdict in zip(chunk, pil_0, pil_1, verdicts):
            if early_drop and verdict is None:
                pair.dropped += 1
                continue
            write_candidate(pair.temp, spec.seed, im0, im1, suffix, int(s.jpg_quality))
            record = pair.record
            cid = f"{record['id']}-{spec.seed}"
            pair.metadata.append({"id": cid, "pair_id": record["id"], "k": k, "seed": spec.seed, "p": spec.p,
                                  "cfg": spec.cfg, "input": record["input"], "edit": record["edit"],
                                  "output": record["output"]})
            if verdict is not None:
                pair.scores.append({"id": cid, "seed": spec.seed, "clip_model": early_drop.scorer.name, **verdict})
    for pair in pairs:
        finish_pair(pair, out_dir, early_drop)
    return pairs


def run(cfg: DictConfig) -> Path:
    # 1. settings and the text-to-image model (with the decoding VAE the original used, if set)
    settings = settings_from_config(cfg)
    out_dir = Path(cfg.synthesis.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = StageSummary("synthesize", int(cfg.shard.index), int(cfg.shard.count), progress=bool(cfg.progress))
    components = load_diffusion(cfg.model.base, "base", cfg.model, cfg.paths.cache, cfg.device, cfg.dtype,
                                cfg.get("autocast"))
    decoder = cfg.synthesis.get("vae")
    if decoder:  # the original decodes its pairs with SD's ft-MSE VAE; the latents are the base's either way
        components = dataclasses.replace(components, vae=load_vae(str(decoder), cfg.device, cfg.dtype))
    check_one_call_per_step(settings, components.scheduler.config)
    sampler = PairSampler(components, settings)
    size = resolution(cfg, sampler)
    max_tokens = int(components.tokenizer.model_max_length)
    early_drop = EarlyDrop(cfg) if cfg.synthesis.early_drop.enabled else None
    pairs_per_batch = int(cfg.synthesis.pairs_per_batch)

    # 2. one pair folder per caption pair of this shard; a folder already there is done (resume), or
    #    topped up to samples_per_pair. Pairs still to do are generated pairs_per_batch at a time (their
    #    candidates share UNet calls).
    recipe = synthesis_recipe(cfg)
    check_recipe(out_dir, recipe)
    done_before = written_pairs = topped_up = redone = candidates = dropped = 0
    wanted = int(cfg.synthesis.samples_per_pair)
    group: list[tuple[dict, tuple | None]] = []

    def flush() -> None:
        nonlocal written_pairs, topped_up, candidates, dropped
        if not (out_dir / RECIPE_FILE).is_file():
            atomic_write_json(out_dir / RECIPE_FILE, recipe)
        for pair in write_pairs(group, sampler, cfg, size, out_dir, early_drop):
            written_pairs += pair.old_metadata is None
            topped_up += pair.old_metadata is not None
            summary.records_out += 1
            candidates += len(pair.metadata)
            dropped += pair.dropped
        group.clear()

    records = shard_records(cfg, summary, lambda text: len(sampler.token_ids(text)), max_tokens)
    for record in summary.bar(records, desc="synthesize", unit="pair", total=expected_pairs(cfg)):
        folder, before = out_dir / record["id"], None
        if folder.is_dir():
            before = drawn_before(folder, record)
            if before is None:  # made for another caption pair under this id: redo it
                shutil.rmtree(folder)
                redone += 1
            elif before[0] >= wanted:
                done_before += 1
                summary.records_out += 1
                continue
        group.append((record, before))
        if len(group) == pairs_per_batch:
            flush()
    if group:
        flush()
    summary.require_output("caption pairs to synthesize", cfg.synthesis.input)
    # 3. the report
    summary.extra.update({
        "pairs_done_before": done_before,
        "pairs_written": written_pairs,
        "pairs_topped_up": topped_up,
        "pairs_redone": redone,
        "candidates_written": candidates,
        "candidates_dropped_early": dropped,
        "samples_per_pair": int(cfg.synthesis.samples_per_pair),
        "pairs_per_batch": pairs_per_batch,
        "steps": settings.steps,
        "scheduler": settings.scheduler,
        "mode": settings.mode,
        "autocast": str(cfg.get("autocast")),
        "resolution": size,
        "model": str(cfg.model.base),
    })
    path = summary.write(cfg.paths.reports)
    log.info("synthesize: %d pairs (%d already done), %d candidates -> %s", summary.records_out, done_before,
             candidates, out_dir)
    return path
