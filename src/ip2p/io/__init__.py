"""Shared plumbing for every stage: atomic writes, sharding, resumable JSONL output, run summaries, and
the data formats stages hand each other (pairs: the pair folder; dataset: the Parquet dataset)."""

from ip2p.io.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from ip2p.io.jsonl import ResumableJsonl, count_lines, read_jsonl
from ip2p.io.stage import StageSummary, shard_of, stable_seed

__all__ = ["atomic_write_bytes", "atomic_write_json", "atomic_write_text", "ResumableJsonl", "count_lines", "read_jsonl",
           "StageSummary", "shard_of", "stable_seed"]
