"""What every stage shares: deterministic sharding, per-record seeds, and the frame a data stage runs in
(its counts, progress bars and report)."""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ip2p.errors import Ip2pError
from ip2p.io.atomic import atomic_write_json

log = logging.getLogger(__name__)


def shard_of(key: str, num_shards: int) -> int:
    """Shard of a record, from a stable hash of its id: the same on every machine and Python run."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % num_shards


def stable_seed(*parts: Any) -> int:
    """A 31-bit seed from (global seed, record id, ...): independent of order and of other records,
    so a resumed or sharded run draws exactly what an uninterrupted one would."""
    text = "\x1f".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:4], "big") & 0x7FFFFFFF


def shard_suffix(shard_index: int, num_shards: int) -> str:
    return "" if num_shards == 1 else f".shard-{shard_index:05d}-of-{num_shards:05d}"


@dataclass
class StageSummary:
    """The small frame a data stage runs in: counts in / out / rejected by reason and seconds, its
    progress bars (`bar`, shown unless progress=False), and its report, reports/<stage>.json (a DVC
    metric), with one log line (`write`)."""

    stage: str
    shard_index: int = 0
    num_shards: int = 1
    records_in: int = 0
    records_out: int = 0
    rejected: Counter = field(default_factory=Counter)
    extra: dict = field(default_factory=dict)
    progress: bool = True
    _start: float = field(default_factory=time.perf_counter)

    def bar(self, iterable=None, **kwargs) -> tqdm:
        """A progress bar (rate and ETA) for this stage: tqdm's arguments."""
        return tqdm(iterable, disable=not self.progress, **kwargs)

    def reject(self, reason: str, n: int = 1) -> None:
        self.rejected[reason] += n

    def as_dict(self) -> dict:
        return {
            "stage": self.stage,
            "shard_index": self.shard_index,
            "num_shards": self.num_shards,
            "records_in": self.records_in,
            "records_out": self.records_out,
            "rejected_total": sum(self.rejected.values()),
            "rejected": dict(sorted(self.rejected.items())),
            "seconds": round(time.perf_counter() - self._start, 3),
            **self.extra,
        }

    def require_output(self, what: str, source: str | Path, kept: int | None = None, hint: str = "") -> None:
        """Stop the chain in one line when an unsharded run kept nothing (`kept`, default records_out):
        every later stage would pass the emptiness on and exit 0, ending in an empty dataset. A shard may
        be empty (few records over many shards); `ip2p merge` checks the whole."""
        if self.num_shards > 1 or (self.records_out if kept is None else kept) > 0:
            return
        reasons = ", ".join(f"{k} {v}" for k, v in self.rejected.most_common(3))
        raise Ip2pError(f"{self.stage}: no {what} from '{source}' ({self.records_in} records in"
                        + (f"; rejected: {reasons}" if reasons else "") + ")" + (f"; {hint}" if hint else ""))

    def write(self, reports_dir: str | Path) -> Path:
        name = f"{self.stage}{shard_suffix(self.shard_index, self.num_shards)}.json"
        report = self.as_dict()
        path = atomic_write_json(Path(reports_dir) / name, report)
        reasons = ", ".join(f"{k} {v}" for k, v in report["rejected"].items())
        log.info("%s: %d in, %d out, %d rejected%s in %.1f s; report %s", self.stage, self.records_in,
                 self.records_out, report["rejected_total"], f" ({reasons})" if reasons else "", report["seconds"], path)
        return path
