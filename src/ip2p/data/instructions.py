"""`ip2p instructions`: captions -> (edit instruction, edited caption) -> artifacts/instructions.jsonl.

    for each caption (x edits_per_caption) in this shard, in batches of `batch_size`:
        completion = backend.complete(caption)             template | hf | openai
        verdict    = validator.check(caption, completion)   the one parser/validator
        rejected -> retried with a fresh per-record seed, up to `retries` times
    accepted -> artifacts/instructions[.shard-i-of-n].jsonl
    rejected -> artifacts/instructions.rejected[.shard-i-of-n].jsonl   (id, reason, attempts, last completion)
    counts   -> reports/instructions[.shard-i-of-n].json

Resume: both outputs are ResumableJsonl files. Batches are fixed slices of the shard's work list and
every draw is seeded from (seed, record id, attempt), so a batch recomputed after a kill gives the same
results; only records not yet on disk are written. The summary is recounted from the files, so it is
right after any number of restarts. A finished shard (final file present) is not run again.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from ip2p.data.backends import Backend, Request, make_backend
from ip2p.data.validate import EditValidator, Limits, load_blocklist, load_token_counter
from ip2p.errors import Ip2pError
from ip2p.io import ResumableJsonl, StageSummary, read_jsonl, shard_of, stable_seed
from ip2p.io.stage import shard_suffix

log = logging.getLogger(__name__)

MAX_SAVED_COMPLETION = 1000  # characters of a rejected completion kept for inspection


@dataclass(frozen=True)
class WorkItem:
    id: str          # pair id: "<caption id>-e<k>"
    caption_id: str
    caption: str


def pair_id(caption_id: str, k: int) -> str:
    return f"{caption_id}-e{k}"


def shard_paths(cfg: DictConfig) -> tuple[Path, Path]:
    """(accepted, rejected) output paths of this shard."""
    out = Path(str(cfg.instructions.output))
    suffix = shard_suffix(int(cfg.shard.index), int(cfg.shard.count))
    return (out.with_name(f"{out.stem}{suffix}{out.suffix}"),
            out.with_name(f"{out.stem}.rejected{suffix}{out.suffix}"))


def load_work(path: str | Path, edits_per_caption: int, index: int, count: int,
              input_rejected: Counter) -> list[WorkItem]:
    """Work items of this shard, in input order. Unusable input lines are counted (by the shard of
    their id, or shard 0 when they have none) as input_<reason>."""
    path = Path(str(path))
    if not path.is_file():
        raise Ip2pError(f"captions file not found: '{path}' (run `ip2p captions` first, or set instructions.input)")
    unreadable: Counter = Counter()
    seen: set[str] = set()
    work = []
    for record in read_jsonl(path, unreadable):
        cid, caption = record.get("id"), record.get("caption")
        if not isinstance(cid, (str, int)) or not isinstance(caption, str) or not caption.strip():
            owner = shard_of(str(cid), count) if isinstance(cid, (str, int)) else 0
            if owner == index:
                input_rejected["input_missing_field"] += 1
            continue
        cid = str(cid)
        if cid in seen:
            if shard_of(cid, count) == index:
                input_rejected["input_duplicate_id"] += 1
            continue
        seen.add(cid)
        for k in range(edits_per_caption):
            item = WorkItem(pair_id(cid, k), cid, " ".join(caption.split()))
            if shard_of(item.id, count) == index:
                work.append(item)
    if index == 0:
        for reason, n in unreadable.items():
            input_rejected[f"input_{reason}"] += n
    return work


def make_validator(cfg: DictConfig) -> EditValidator:
    v = cfg.instructions.validate
    limits = Limits(
        max_edit_words=None if v.max_edit_words is None else int(v.max_edit_words),
        max_output_words=None if v.max_output_words is None else int(v.max_output_words),
        max_output_tokens=None if v.max_output_tokens is None else int(v.max_output_tokens),
    )
    counter = (load_token_counter(v.tokenizer, cfg.model, cfg.paths.cache)
               if limits.max_output_tokens is not None else None)
    return EditValidator(limits, load_blocklist(v.blocklist.file, v.blocklist.words), counter)


def process_batch(batch: list[WorkItem], backend: Backend, validator: EditValidator, seed: int,
                  retries: int) -> tuple[list[dict], list[dict]]:
    """Accepted records and rejection records of one batch (in batch order); retries re-ask the
    backend for the rejected ones with a fresh per-record seed."""
    accepted: dict[str, dict] = {}
    reasons: dict[str, list[str]] = {item.id: [] for item in batch}
    last: dict[str, str | None] = {}
    pending = list(batch)
    for attempt in range(retries + 1):
        requests = [Request(item.id, item.caption, stable_seed(seed, item.id, attempt), attempt) for item in pending]
        completions = backend.complete(requests)
        if len(completions) != len(requests):
            raise Ip2pError(f"backend {backend.name} returned {len(completions)} completions for {len(requests)} requests")
        still = []
        for item, text in zip(pending, completions):
            verdict = validator.check(item.caption, text)
            if verdict.ok:
                accepted[item.id] = {"id": item.id, "caption_id": item.caption_id, "input": item.caption,
                                     "edit": verdict.edit, "output": verdict.output, "backend": backend.name}
            else:
                reasons[item.id].append(verdict.reason)
                last[item.id] = text
                still.append(item)
        pending = still
        if not pending:
            break
    rejected = [{"id": item.id, "caption_id": item.caption_id, "input": item.caption, "reason": reasons[item.id][-1],
                 "attempts": reasons[item.id], "completion": (last[item.id] or "")[:MAX_SAVED_COMPLETION],
                 "backend": backend.name}
                for item in batch if item.id not in accepted]
    return [accepted[item.id] for item in batch if item.id in accepted], rejected


def _count_file(path: Path, reasons: Counter | None = None) -> int:
    n = 0
    for record in read_jsonl(path):
        n += 1
        if reasons is not None:
            reasons[record["reason"]] += 1
    return n


def run(cfg: DictConfig) -> Path:
    # 1. settings, the work list of this shard, the validator and the LM backend
    index, count = int(cfg.shard.index), int(cfg.shard.count)
    if count < 1 or not 0 <= index < count:
        raise Ip2pError(f"shard.index must be in [0, shard.count) (got index {index}, count {count})")
    icfg = cfg.instructions
    out_path, rejected_path = shard_paths(cfg)
    if out_path.exists():
        print(f"instructions: {out_path} is complete; nothing to do (delete it to regenerate)")
        return out_path
    summary = StageSummary("instructions", index, count, progress=bool(cfg.progress))
    retries, batch_size = int(icfg.retries), int(icfg.batch_size)
    if retries < 0 or batch_size < 1 or int(icfg.edits_per_caption) < 1:
        raise Ip2pError("instructions.retries must be >= 0, batch_size and edits_per_caption >= 1")

    input_rejected: Counter = Counter()
    work = load_work(icfg.input, int(icfg.edits_per_caption), index, count, input_rejected)
    if not work:  # before the LM loads
        summary.records_in = sum(input_rejected.values())
        for reason, n in input_rejected.items():
            summary.reject(reason, n)
        summary.require_output("captions to instruct", icfg.input)
    validator = make_validator(cfg)
    backend = make_backend(cfg)

    # 2. generate in batches, appending accepted and rejected records (resumable). A kill between
    # finishing the side file and the main file: put the side file back in progress.
    rejected_out = ResumableJsonl(rejected_path)
    if rejected_path.exists() and not rejected_out.partial.exists():
        os.replace(rejected_path, rejected_out.partial)
    accepted_out = ResumableJsonl(out_path).open()
    rejected_out.open()
    try:
        done = accepted_out.done | rejected_out.done
        if done:
            log.info("instructions: resuming %s (%d of %d records done)", accepted_out.partial, len(done), len(work))
        bar = summary.bar(total=len(work), initial=sum(item.id in done for item in work), unit="caption",
                          desc=f"instructions ({backend.name})")
        for start in range(0, len(work), batch_size):
            batch = work[start:start + batch_size]
            if all(item.id in done for item in batch):
                continue
            accepted, rejected = process_batch(batch, backend, validator, int(cfg.seed), retries)
            new_accepted = [r for r in accepted if r["id"] not in accepted_out.done]
            new_rejected = [r for r in rejected if r["id"] not in rejected_out.done]
            accepted_out.write(new_accepted)
            rejected_out.write(new_rejected)
            done.update(r["id"] for r in new_accepted + new_rejected)
            bar.update(len(new_accepted) + len(new_rejected))
            if float(icfg.delay_s) > 0:
                time.sleep(float(icfg.delay_s))
        bar.close()
    finally:
        accepted_out.close()
        rejected_out.close()
        backend.close()

    # 3. the report: counts from the files themselves, so a resumed run reports what an uninterrupted
    # one would
    reasons: Counter = Counter()
    summary.records_out = _count_file(accepted_out.partial)
    _count_file(rejected_out.partial, reasons)
    for reason, n in sorted((input_rejected + reasons).items()):
        summary.reject(reason, n)
    summary.records_in = len(work) + sum(input_rejected.values())
    summary.extra.update(backend=backend.name, input=str(icfg.input), retries=retries,
                         edits_per_caption=int(icfg.edits_per_caption))
    if hasattr(backend, "num_requests"):  # HTTP requests this run sent (cache hits send none)
        summary.extra["http_requests"] = backend.num_requests
    if summary.records_out + sum(reasons.values()) != len(work):
        raise Ip2pError(f"instructions: {out_path.name}.partial and its side file do not cover the work list "
                        f"(were they written by a different configuration? delete them to start over)")
    rejected_out.finish()
    summary.write(cfg.paths.reports)
    accepted_out.finish()
    log.info("instructions: -> %s", out_path)
    return out_path
