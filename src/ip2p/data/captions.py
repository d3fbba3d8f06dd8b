"""`ip2p captions`: caption sourcing -> artifacts/captions.jsonl (+ reports/captions.json).

Reads a caption source (JSONL, CSV or Parquet; a file or a folder of such files, e.g. LAION metadata
parquet parts with columns TEXT, URL, AESTHETIC_SCORE) and keeps the captions worth editing:

    readable row -> non-empty caption -> word-count bounds -> aesthetic score -> blocklist
      -> first of its id / normalised caption / URL -> at most 77 CLIP tokens -> seeded sample of N

Every dropped row is counted by reason in the stage summary. Memory does not grow with the source
(a LAION-size folder): rows stream through, duplicates are looked up on disk, Parquet is read with
column projection and the aesthetic bound pushed down to the reader (a row failing it is counted under
the aesthetic reason even if it would also fail an earlier check). Output ids are the source ids, or
"c" + a hash of the caption when the source has none, so they are stable across runs.

Sharding: de-duplication and the sample need the whole source, so every shard makes the same
(deterministic) selection over all rows and writes the records whose `shard_of(id)` is its own; its
summary counts the rows of its shard (unreadable rows, which have no id, go to shard 0). The merged
shards hold exactly the records of an unsharded run.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import shutil
import sqlite3
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from omegaconf import DictConfig
from tqdm.auto import tqdm

from ip2p.data.validate import Blocklist, load_blocklist, load_token_counter, normalise_caption, word_count
from ip2p.config import first_line
from ip2p.errors import Ip2pError
from ip2p.io import ResumableJsonl, StageSummary, count_lines, read_jsonl, shard_of, stable_seed
from ip2p.io.stage import shard_suffix

log = logging.getLogger(__name__)

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv",
           ".parquet": "parquet", ".pq": "parquet"}

# Rejection reasons (also the keys of reports/captions.json "rejected").
NOT_UTF8, MALFORMED_JSON, NOT_AN_OBJECT, MALFORMED_ROW = "not_utf8", "malformed_json", "not_an_object", "malformed_row"
EMPTY_CAPTION, TOO_SHORT, TOO_LONG = "empty_caption", "too_short", "too_long"
MISSING_AESTHETIC, BELOW_AESTHETIC, BLOCKLISTED = "missing_aesthetic", "below_aesthetic", "blocklisted"
DUPLICATE_ID, DUPLICATE_CAPTION, DUPLICATE_URL = "duplicate_id", "duplicate_caption", "duplicate_url"
OVER_TOKEN_LIMIT, NOT_SAMPLED = "over_token_limit", "not_sampled"


# ----------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Columns:
    """Source column names; `id` may be null (or absent from the source): ids are then caption hashes."""

    caption: str = "caption"
    id: str | None = "id"
    url: str | None = "url"
    aesthetic: str | None = "aesthetic"


def source_files(path: str | Path, fmt: str = "auto") -> list[tuple[Path, str]]:
    """The files of a source (a file, or every readable file of a folder, sorted) and their formats."""
    path = Path(str(path)).expanduser()
    if not path.exists():
        raise Ip2pError(f"caption source not found: '{path}'")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in FORMATS) if path.is_dir() else [path]
    if not files:
        raise Ip2pError(f"no .jsonl, .csv or .parquet files in '{path}'")
    out = []
    for f in files:
        kind = FORMATS.get(f.suffix.lower()) if fmt == "auto" else fmt
        if kind not in ("jsonl", "csv", "tsv", "parquet"):
            raise Ip2pError(f"cannot tell the format of '{f}': set captions.format to jsonl, csv, tsv or parquet")
        out.append((f, kind))
    return out


def _read_csv(path: Path, delimiter: str, unreadable: Counter) -> Iterator[dict]:
    # Decode with surrogateescape so one bad byte spoils one row, not the whole file.
    with open(path, "r", encoding="utf-8", errors="surrogateescape", newline="") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter, restkey="\x00extra")
        for row in reader:
            values = [v for v in row.values() if isinstance(v, str)]
            if any("\udc80" <= ch <= "\udcff" for v in values for ch in v):
                unreadable[NOT_UTF8] += 1
            elif "\x00extra" in row or None in row.values():
                unreadable[MALFORMED_ROW] += 1  # more or fewer fields than the header
            else:
                yield row


def _read_parquet(path: Path, wanted: list[str], batch_rows: int, min_score: tuple[str, float] | None,
                  dropped: Counter) -> Iterator[dict]:
    """Rows of one Parquet file, only the `wanted` columns decoded. With `min_score` (aesthetic column,
    bound) and a numeric score column, the bound is applied while reading (filter pushdown: the text of
    a dropped row is never decoded); the rows it drops are counted in `dropped` from one scan of the
    score column (missing or NaN: missing_aesthetic, below: below_aesthetic)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    try:
        parquet = pq_file(path)
        dataset = pads.dataset(path, format="parquet")
    except Exception as err:  # pyarrow raises several types for a broken file
        raise Ip2pError(f"cannot read parquet file '{path}': {first_line(err)}") from err
    names = set(parquet.schema_arrow.names)
    columns = [c for c in wanted if c in names]
    keep = None
    if min_score is not None and min_score[0] in names:
        name, bound = min_score
        kind = parquet.schema_arrow.field(name).type
        if pa.types.is_floating(kind) or pa.types.is_integer(kind):
            keep = pc.field(name) >= bound  # null and NaN compare false: dropped
            for batch in dataset.to_batches(columns=[name], batch_size=batch_rows):
                values = batch.column(0)
                nan = pc.sum(pc.is_nan(values)).as_py() or 0 if pa.types.is_floating(kind) else 0
                dropped[MISSING_AESTHETIC] += values.null_count + nan
                dropped[BELOW_AESTHETIC] += pc.sum(pc.less(values, bound)).as_py() or 0
    for batch in dataset.to_batches(columns=columns, filter=keep, batch_size=batch_rows):
        yield from batch.to_pylist()


def pq_file(path: Path):
    import pyarrow.parquet as pq

    return pq.ParquetFile(path)


def read_rows(path: str | Path, fmt: str, columns: Columns, unreadable: Counter, progress: bool,
              batch_rows: int = 65536, min_aesthetic: float | None = None) -> Iterator[dict]:
    """Yield every readable row of the source as a dict; unreadable ones are counted in `unreadable`,
    and so are Parquet rows that fail `min_aesthetic` while being read (see _read_parquet)."""
    files = source_files(path, fmt)
    total = 0
    for f, kind in files:
        if kind == "parquet":
            try:
                total += pq_file(f).metadata.num_rows
            except Exception:
                pass  # reported properly when the file is read
        else:
            total += count_lines(f)
    wanted = [c for c in (columns.id, columns.caption, columns.url, columns.aesthetic) if c]
    pushdown = (columns.aesthetic, min_aesthetic) if columns.aesthetic and min_aesthetic is not None else None
    bar = tqdm(total=total, unit="row", desc="captions: read", disable=not progress)
    for f, kind in files:
        if kind == "jsonl":
            rows: Iterator[Any] = read_jsonl(f, unreadable)
        elif kind in ("csv", "tsv"):
            rows = _read_csv(f, "," if kind == "csv" else "\t", unreadable)
        else:
            before = sum(unreadable[r] for r in (MISSING_AESTHETIC, BELOW_AESTHETIC))
            rows = _read_parquet(f, wanted, batch_rows, pushdown, unreadable)
        for row in rows:
            bar.update(1)
            yield row
        if kind == "parquet":
            bar.update(sum(unreadable[r] for r in (MISSING_AESTHETIC, BELOW_AESTHETIC)) - before)
    bar.close()


# ---------------------------------------------------------------------------------------- filtering


@dataclass(frozen=True)
class CaptionFilter:
    """The settings of conf/captions/default.yaml that decide which captions are kept."""

    min_aesthetic: float | None = 6.5
    min_words: int | None = 3
    max_words: int | None = 60
    max_tokens: int | None = 77
    sample: int | None = None
    seed: int = 0


def caption_id(raw_id: Any, caption: str) -> str:
    if raw_id is not None and str(raw_id).strip() and not (isinstance(raw_id, float) and math.isnan(raw_id)):
        return str(raw_id).strip()
    return "c" + hashlib.sha256(caption.encode("utf-8")).hexdigest()[:16]


def _float_or_none(value: Any) -> float | None | str:
    """The score as a float, None when absent, or "bad" when it is not a number."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return "bad"
    return None if math.isnan(number) else number


def _row_fields(row: dict, columns: Columns) -> tuple[str | None, Any, Any, Any] | str:
    """(caption, raw id, url, aesthetic) of one row, or a rejection reason."""
    caption = row.get(columns.caption)
    if caption is not None and not isinstance(caption, str):
        if isinstance(caption, float) and math.isnan(caption):
            caption = None
        else:
            return MALFORMED_ROW
    caption = " ".join((caption or "").split())  # one line, single spaces
    raw_id = row.get(columns.id) if columns.id else None
    url = row.get(columns.url) if columns.url else None
    url = str(url).strip() if url is not None and str(url).strip() and url == url else None  # url == url: not NaN
    aesthetic = _float_or_none(row.get(columns.aesthetic)) if columns.aesthetic else None
    return caption, raw_id, url, aesthetic


class FirstSeen:
    """First-occurrence de-duplication on disk: a SQLite table of 16-byte digests of (kind, value), so a
    source of millions of rows costs no memory."""

    def __init__(self, path: Path):
        self.db = sqlite3.connect(path)
        self.db.execute("PRAGMA journal_mode=OFF")
        self.db.execute("PRAGMA synchronous=OFF")
        self.db.execute("CREATE TABLE IF NOT EXISTS seen (key BLOB PRIMARY KEY) WITHOUT ROWID")

    @staticmethod
    def _key(kind: str, value: str) -> bytes:
        return hashlib.blake2b(f"{kind}\x1f{value}".encode("utf-8", "surrogateescape"), digest_size=16).digest()

    def __contains__(self, item: tuple[str, str]) -> bool:
        return self.db.execute("SELECT 1 FROM seen WHERE key = ?", (self._key(*item),)).fetchone() is not None

    def add(self, *items: tuple[str, str]) -> None:
        self.db.executemany("INSERT OR IGNORE INTO seen VALUES (?)", ((self._key(*i),) for i in items))

    def close(self) -> None:
        self.db.close()


# What the selection yields: (id or None, rejection reason, None) or (id, None, kept record).
Event = tuple[str | None, str | None, dict | None]


def _row_checks(rows: Iterator[dict], columns: Columns, rules: CaptionFilter, blocklist: Blocklist,
                seen: FirstSeen) -> Iterator[Event]:
    saw_caption_column, rows_seen = False, 0
    for row in rows:
        rows_seen += 1
        saw_caption_column = saw_caption_column or columns.caption in row
        fields = _row_fields(row, columns)
        if isinstance(fields, str):
            yield None, fields, None
            continue
        caption, raw_id, url, aesthetic = fields
        if not caption:
            known_id = caption_id(raw_id, "") if raw_id is not None and str(raw_id).strip() else None
            yield known_id, EMPTY_CAPTION, None
            continue
        rid = caption_id(raw_id, caption)
        words = word_count(caption)
        normalised = normalise_caption(caption)
        reason = None
        if rules.min_words is not None and words < rules.min_words:
            reason = TOO_SHORT
        elif rules.max_words is not None and words > rules.max_words:
            reason = TOO_LONG
        elif aesthetic == "bad":
            reason = MALFORMED_ROW
        elif rules.min_aesthetic is not None and aesthetic is None:
            reason = MISSING_AESTHETIC
        elif rules.min_aesthetic is not None and aesthetic < rules.min_aesthetic:
            reason = BELOW_AESTHETIC
        elif blocklist.find(caption):
            reason = BLOCKLISTED
        elif ("id", rid) in seen:
            reason = DUPLICATE_ID
        elif ("caption", normalised) in seen:
            reason = DUPLICATE_CAPTION
        elif url is not None and ("url", url) in seen:
            reason = DUPLICATE_URL
        if reason is not None:
            yield rid, reason, None
            continue
        seen.add(("id", rid), ("caption", normalised), *((("url", url),) if url is not None else ()))
        yield rid, None, {"id": rid, "caption": caption, "url": url,
                          "aesthetic": None if aesthetic is None else round(float(aesthetic), 6)}
    if rows_seen and not saw_caption_column:
        raise Ip2pError(f"no row of the source has the caption column '{columns.caption}' "
                        f"(set captions.columns.caption; LAION metadata uses TEXT)")


def _token_check(events: Iterator[Event], count_tokens, max_tokens: int, chunk: int) -> Iterator[Event]:
    """Kept records are tokenized a chunk at a time (the tokenizer is fast in batches)."""
    pending: list[dict] = []

    def flush() -> Iterator[Event]:
        for record, n in zip(pending, count_tokens([r["caption"] for r in pending])):
            yield (record["id"], OVER_TOKEN_LIMIT, None) if n > max_tokens else (record["id"], None, record)
        pending.clear()

    for event in events:
        if event[2] is None:
            yield event
            continue
        pending.append(event[2])
        if len(pending) >= chunk:
            yield from flush()
    if pending:
        yield from flush()


def _sample(events: Iterator[Event], size: int, seed: int, workdir: Path) -> Iterator[Event]:
    """A seeded uniform sample that does not depend on row order: the `size` smallest per-id draws.
    Kept records wait in an on-disk spool until the last one is in, then leave in source order."""
    db = sqlite3.connect(workdir / "sample.sqlite")
    try:
        db.execute("PRAGMA journal_mode=OFF")
        db.execute("CREATE TABLE kept (seq INTEGER PRIMARY KEY, id TEXT, draw INTEGER, record TEXT)")
        for rid, reason, record in events:
            if record is None:
                yield rid, reason, None
            else:
                db.execute("INSERT INTO kept (id, draw, record) VALUES (?, ?, ?)",
                           (rid, stable_seed(seed, "captions-sample", rid), json.dumps(record)))
        db.execute("CREATE TABLE chosen AS SELECT seq FROM kept ORDER BY draw, id LIMIT ?", (size,))
        db.execute("CREATE UNIQUE INDEX chosen_seq ON chosen (seq)")
        rows = db.execute("SELECT k.id, k.record, c.seq IS NOT NULL FROM kept AS k LEFT JOIN chosen AS c "
                          "ON c.seq = k.seq ORDER BY k.seq")
        for rid, record, chosen in rows:
            yield (rid, None, json.loads(record)) if chosen else (rid, NOT_SAMPLED, None)
    finally:
        db.close()


def select_captions(rows: Iterator[dict], columns: Columns, rules: CaptionFilter, blocklist: Blocklist,
                    count_tokens, workdir: Path, token_chunk: int = 4096) -> Iterator[Event]:
    """Apply every filter in order, streaming: (id or None, reason, None) for each rejected row and
    (id, None, record) for each kept one, kept records in source order; the first occurrence wins
    among duplicates. Memory does not grow with the source (duplicates are looked up on disk, tokens
    counted a chunk at a time, the sample drawn from a spool in `workdir`). Pure given its inputs."""
    seen = FirstSeen(workdir / "seen.sqlite")
    try:
        events = _row_checks(rows, columns, rules, blocklist, seen)
        if rules.max_tokens is not None:
            events = _token_check(events, count_tokens, rules.max_tokens, token_chunk)
        if rules.sample is not None:
            events = _sample(events, rules.sample, rules.seed, workdir)
        yield from events
    finally:
        seen.close()


# -------------------------------------------------------------------------------------------- stage


def _columns(cfg: DictConfig) -> Columns:
    c = cfg.captions.columns
    return Columns(caption=str(c.caption), id=c.get("id"), url=c.get("url"), aesthetic=c.get("aesthetic"))


def _rules(cfg: DictConfig) -> CaptionFilter:
    c = cfg.captions
    for key in ("min_words", "max_words", "max_tokens", "sample"):
        if c.get(key) is not None and int(c[key]) < 0:
            raise Ip2pError(f"captions.{key} must be >= 0 (got {c[key]})")
    opt = lambda v, kind: None if v is None else kind(v)  # noqa: E731
    return CaptionFilter(min_aesthetic=opt(c.min_aesthetic, float), min_words=opt(c.min_words, int),
                         max_words=opt(c.max_words, int), max_tokens=opt(c.max_tokens, int),
                         sample=opt(c.sample, int), seed=int(cfg.seed))


def output_path(cfg: DictConfig) -> Path:
    out = Path(str(cfg.captions.output))
    suffix = shard_suffix(int(cfg.shard.index), int(cfg.shard.count))
    return out.with_name(out.stem + suffix + out.suffix)


def _check_shard(cfg: DictConfig) -> tuple[int, int]:
    index, count = int(cfg.shard.index), int(cfg.shard.count)
    if count < 1 or not 0 <= index < count:
        raise Ip2pError(f"shard.index must be in [0, shard.count) (got index {index}, count {count})")
    return index, count


def _drop_if_empty(writer: ResumableJsonl) -> None:
    writer.close()
    if writer.partial.exists() and writer.partial.stat().st_size == 0:
        writer.partial.unlink()


def run(cfg: DictConfig) -> Path:
    index, count = _check_shard(cfg)
    out_path = output_path(cfg)
    if out_path.exists():
        print(f"captions: {out_path} is complete; nothing to do (delete it to regenerate)")
        return out_path
    # 1. settings, blocklist and tokenizer
    summary = StageSummary("captions", index, count, progress=bool(cfg.progress))
    c = cfg.captions
    columns, rules = _columns(cfg), _rules(cfg)
    blocklist = load_blocklist(c.blocklist.file, c.blocklist.words)
    count_tokens = (load_token_counter(c.tokenizer, cfg.model, cfg.paths.cache)
                    if rules.max_tokens is not None else None)

    # 2. read and select, streaming into the writer of this shard's records; each rejection is counted
    # by the shard its id belongs to
    unreadable: Counter = Counter()
    rows = read_rows(c.source, str(c.format), columns, unreadable, bool(cfg.progress), int(c.read_batch_rows),
                     rules.min_aesthetic)
    mine = lambda rid: (0 if rid is None else shard_of(rid, count)) == index  # noqa: E731
    writer = ResumableJsonl(out_path, id_key="id", track_written=False).open()
    workdir = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.work-", dir=out_path.parent))
    try:
        if writer.done:
            log.info("captions: resuming %s (%d records already written)", writer.partial, len(writer.done))
        step, pending = max(1, int(c.write_batch)), []
        for rid, reason, record in select_captions(rows, columns, rules, blocklist, count_tokens, workdir):
            if not mine(rid):
                continue
            if reason is not None:
                summary.reject(reason)
                continue
            summary.records_out += 1
            if rid not in writer.done:
                pending.append(record)
            if len(pending) >= step:
                writer.write(pending)
                pending = []
        writer.write(pending)
    except Ip2pError:
        _drop_if_empty(writer)  # a source it cannot read: no trace of a run that wrote nothing
        raise
    finally:
        writer.close()
        shutil.rmtree(workdir, ignore_errors=True)
    # 3. the summary: rows the reader could not use (no id: shard 0) and the rest
    if index == 0:
        for reason, n in unreadable.items():
            if n:
                summary.reject(reason, n)
    summary.records_in = summary.records_out + sum(summary.rejected.values())
    summary.extra.update(source=str(c.source), max_tokens=rules.max_tokens, sample=rules.sample,
                         min_aesthetic=rules.min_aesthetic, blocklist_terms=len(blocklist))
    try:
        summary.require_output("captions kept", c.source)
    except Ip2pError:
        _drop_if_empty(writer)
        raise
    summary.write(cfg.paths.reports)
    writer.finish()
    log.info("captions: -> %s", out_path)
    return out_path
