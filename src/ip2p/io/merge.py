"""`ip2p merge merge.stage=<stage>`: join the shard outputs of a JSONL stage into its final file.

After `ip2p instructions -m shard.count=N shard.index=0,...,N-1` there are
    artifacts/instructions.shard-00000-of-0000N.jsonl ... (and side files such as
    artifacts/instructions.rejected.shard-...jsonl) and reports/instructions.shard-...json.
Merge concatenates each family in shard order into artifacts/instructions[.rejected].jsonl and sums
the shard summaries into reports/instructions.json. It refuses to merge an incomplete set of shards.
Files are written atomically (temp file + rename); shard files are kept unless merge.remove_shards.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections import Counter, defaultdict
from pathlib import Path

from omegaconf import DictConfig

from ip2p.errors import Ip2pError
from ip2p.io.atomic import atomic_file, atomic_write_json

log = logging.getLogger(__name__)

COUNT_KEYS = ("records_in", "records_out", "rejected_total", "seconds")


def _shard_pattern(stem: str, ext: str) -> re.Pattern:
    # <stem>[.<tag>].shard-<index>-of-<count><ext>; the tag names a side file such as ".rejected".
    return re.compile(rf"^{re.escape(stem)}(\.[A-Za-z0-9_-]+)?\.shard-(\d{{5}})-of-(\d{{5}}){re.escape(ext)}$")


def find_shards(final: Path, num_shards: int | None = None) -> dict[str, dict[int, Path]]:
    """Shard files next to `final`, by family tag ("" for the main output) and shard index.

    All shards of one run share their count N; with several counts present `num_shards` must choose.
    """
    pattern = _shard_pattern(final.stem, final.suffix)
    found: dict[int, dict[str, dict[int, Path]]] = defaultdict(lambda: defaultdict(dict))
    for path in final.parent.glob(f"{final.stem}*.shard-*"):
        match = pattern.match(path.name)
        if match:
            tag, index, count = match.group(1) or "", int(match.group(2)), int(match.group(3))
            found[count][tag][index] = path
    if not found:
        raise Ip2pError(f"no shard files like {final.stem}.shard-00000-of-0000N{final.suffix} in {final.parent}")
    if num_shards is None:
        if len(found) > 1:
            raise Ip2pError(f"shards of several runs in {final.parent} (counts {sorted(found)}): "
                            f"choose one with merge.num_shards=N")
        num_shards = next(iter(found))
    if num_shards not in found:
        raise Ip2pError(f"no shards of count {num_shards} for {final.name} (found counts {sorted(found)})")
    families = found[num_shards]
    main = families.get("", {})
    missing = [i for i in range(num_shards) if i not in main]
    if missing:
        partial = [i for i in missing if (final.parent / f"{final.stem}.shard-{i:05d}-of-{num_shards:05d}"
                                          f"{final.suffix}.partial").exists()]
        hint = f" (unfinished: {partial}; rerun them to resume)" if partial else ""
        raise Ip2pError(f"cannot merge {final.name}: shards {missing} of {num_shards} are missing{hint}")
    for tag, shards in families.items():
        if sorted(shards) != list(range(num_shards)):
            raise Ip2pError(f"cannot merge {final.stem}{tag}{final.suffix}: shards "
                            f"{sorted(set(range(num_shards)) - set(shards))} of {num_shards} are missing")
    return {tag: families[tag] for tag in sorted(families)}


def concatenate(parts: list[Path], target: Path) -> Path:
    """Stream `parts` into `target` atomically; every part must end with a complete line."""
    with atomic_file(target) as tmp, open(tmp, "wb") as out:
        for part in parts:
            with open(part, "rb") as handle:
                shutil.copyfileobj(handle, out, 1 << 20)
                if handle.tell() > 0:
                    handle.seek(-1, os.SEEK_END)
                    if handle.read(1) != b"\n":
                        raise Ip2pError(f"shard file {part} ends in the middle of a line")
    return target


def merge_summaries(paths: list[Path]) -> dict:
    """Sum the counts of shard summaries; other keys are kept where all shards agree."""
    summaries = [json.loads(p.read_text(encoding="utf-8")) for p in paths]
    merged: dict = {}
    for key in summaries[0]:
        values = [s.get(key) for s in summaries]
        if all(v == values[0] for v in values):
            merged[key] = values[0]
    for key in COUNT_KEYS:
        merged[key] = sum(s.get(key, 0) for s in summaries)
    merged["seconds"] = round(merged["seconds"], 3)
    rejected: Counter = Counter()
    for s in summaries:
        rejected.update(s.get("rejected", {}))
    merged["rejected"] = dict(sorted(rejected.items()))
    merged["shard_index"], merged["num_shards"] = 0, 1
    merged["merged_shards"] = len(summaries)
    return merged


def run(cfg: DictConfig) -> Path:
    m = cfg.merge
    if not m.stage:
        raise Ip2pError("which stage's shards? e.g. ip2p merge merge.stage=instructions")
    stage = str(m.stage)
    group = cfg.get(stage)
    if m.output:
        final = Path(str(m.output))
    elif group is not None and group.get("output"):
        final = Path(str(group.output))
    else:
        final = Path(str(cfg.paths.artifacts)) / f"{stage}.jsonl"
    families = find_shards(final, None if m.num_shards is None else int(m.num_shards))
    num_shards = len(families[""])
    if not any(path.stat().st_size for path in families[""].values()):  # each shard may be empty, not all
        raise Ip2pError(f"merge: the {num_shards} shards of {final.name} hold no record: nothing to pass on "
                        f"(see reports/{stage}.shard-*.json for why)")
    for tag, shards in families.items():
        target = final.with_name(f"{final.stem}{tag}{final.suffix}")
        concatenate([shards[i] for i in range(num_shards)], target)
        print(f"merge: {num_shards} shards -> {target}")
    reports = Path(str(cfg.paths.reports))
    summaries = [reports / f"{stage}.shard-{i:05d}-of-{num_shards:05d}.json" for i in range(num_shards)]
    if all(p.exists() for p in summaries):
        atomic_write_json(reports / f"{stage}.json", merge_summaries(summaries))
    else:
        log.warning("merge: not every shard summary exists in %s; %s.json not written", reports, stage)
    if m.remove_shards:
        for shards in families.values():
            for path in shards.values():
                path.unlink()
        for p in summaries:
            p.unlink(missing_ok=True)
    return final
