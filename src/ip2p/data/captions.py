"""`ip2p captions`: caption sourcing -> artifacts/captions.jsonl (+ reports/captions.json).

Reads a caption source (JSONL, CSV or Parquet; a file or a folder of such files, e.g. LAION metadata
parquet parts with columns TEXT, URL, AESTHETIC_SCORE) and keeps the captions worth editing:

    readable row -> non-empty caption -> word-count bounds -> aesthetic score -> blocklist
      -> first of its id / normalised caption / URL -> at most 77 CLIP tokens -> seeded sample of N

Every dropped row is counted by reason in the stage summary. Output ids are the source ids, or
"c" + a hash of the caption when the source has none, so they are stable across runs.

Sharding: de-duplication and the sample need the whole source, so every shard makes the same
(deterministic) selection over all rows and writes the records whose `shard_of(id)` is its own; its
summary counts the rows of its shard (unreadable rows, which have no id, go to shard 0). The merged
shards hold exactly the records of an unsharded run.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from omegaconf import DictConfig
from tqdm.auto import tqdm

from ip2p.data.validate import Blocklist, load_blocklist, load_token_counter, normalise_caption, word_count
from ip2p.config import first_line
from ip2p.errors import Ip2pError
from ip2p.io import ResumableJsonl, StageSummary, read_jsonl, shard_of, stable_seed
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


def _count_lines(path: Path) -> int:
    with open(path, "rb") as handle:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b""))


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


def _read_parquet(path: Path, wanted: list[str], batch_rows: int) -> Iterator[dict]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for a broken file
        raise Ip2pError(f"cannot read parquet file '{path}': {first_line(err)}") from err
    names = set(parquet.schema_arrow.names)
    for batch in parquet.iter_batches(batch_size=batch_rows, columns=[c for c in wanted if c in names]):
        yield from batch.to_pylist()


def read_rows(path: str | Path, fmt: str, columns: Columns, unreadable: Counter, progress: bool,
              batch_rows: int = 65536) -> Iterator[dict]:
    """Yield every readable row of the source as a dict; unreadable ones are counted in `unreadable`."""
    files = source_files(path, fmt)
    total = 0
    for f, kind in files:
        if kind == "parquet":
            import pyarrow.parquet as pq

            try:
                total += pq.ParquetFile(f).metadata.num_rows
            except Exception:
                pass  # reported properly when the file is read
        else:
            total += _count_lines(f)
    wanted = [c for c in (columns.id, columns.caption, columns.url, columns.aesthetic) if c]
    bar = tqdm(total=total, unit="row", desc="captions: read", disable=not progress)
    for f, kind in files:
        if kind == "jsonl":
            rows: Iterator[Any] = read_jsonl(f, unreadable)
        elif kind in ("csv", "tsv"):
            rows = _read_csv(f, "," if kind == "csv" else "\t", unreadable)
        else:
            rows = _read_parquet(f, wanted, batch_rows)
        for row in rows:
            bar.update(1)
            yield row
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


@dataclass
class Selection:
    records: list[dict] = field(default_factory=list)            # kept, in source order
    rejected: list[tuple[str | None, str]] = field(default_factory=list)  # (id or None, reason)


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


def select_captions(rows: Iterator[dict], columns: Columns, rules: CaptionFilter, blocklist: Blocklist,
                    count_tokens, progress: bool = False) -> Selection:
    """Apply every filter in order; first occurrence wins among duplicates. Pure given its inputs."""
    sel = Selection()
    seen_ids: set[str] = set()
    seen_captions: set[str] = set()
    seen_urls: set[str] = set()
    candidates: list[dict] = []
    saw_caption_column, rows_seen = False, 0
    for row in rows:
        rows_seen += 1
        saw_caption_column = saw_caption_column or columns.caption in row
        fields = _row_fields(row, columns)
        if isinstance(fields, str):
            sel.rejected.append((None, fields))
            continue
        caption, raw_id, url, aesthetic = fields
        if not caption:
            known_id = caption_id(raw_id, "") if raw_id is not None and str(raw_id).strip() else None
            sel.rejected.append((known_id, EMPTY_CAPTION))
            continue
        rid = caption_id(raw_id, caption)
        words = word_count(caption)
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
        elif rid in seen_ids:
            reason = DUPLICATE_ID
        elif normalise_caption(caption) in seen_captions:
            reason = DUPLICATE_CAPTION
        elif url is not None and url in seen_urls:
            reason = DUPLICATE_URL
        if reason is not None:
            sel.rejected.append((rid, reason))
            continue
        seen_ids.add(rid)
        seen_captions.add(normalise_caption(caption))
        if url is not None:
            seen_urls.add(url)
        candidates.append({"id": rid, "caption": caption, "url": url,
                           "aesthetic": None if aesthetic is None else round(float(aesthetic), 6)})
    if rows_seen and not saw_caption_column:
        raise Ip2pError(f"no row of the source has the caption column '{columns.caption}' "
                        f"(set captions.columns.caption; LAION metadata uses TEXT)")

    if rules.max_tokens is not None:
        kept = []
        chunk = 4096
        bar = tqdm(total=len(candidates), unit="caption", desc="captions: tokens", disable=not progress)
        for start in range(0, len(candidates), chunk):
            part = candidates[start:start + chunk]
            for record, n in zip(part, count_tokens([r["caption"] for r in part])):
                if n > rules.max_tokens:
                    sel.rejected.append((record["id"], OVER_TOKEN_LIMIT))
                else:
                    kept.append(record)
            bar.update(len(part))
        bar.close()
        candidates = kept

    if rules.sample is not None and len(candidates) > rules.sample:
        # A seeded uniform sample that does not depend on row order: the N smallest per-id draws.
        ranked = sorted(candidates, key=lambda r: (stable_seed(rules.seed, "captions-sample", r["id"]), r["id"]))
        chosen = {r["id"] for r in ranked[: rules.sample]}
        sel.rejected.extend((r["id"], NOT_SAMPLED) for r in candidates if r["id"] not in chosen)
        candidates = [r for r in candidates if r["id"] in chosen]
    sel.records = candidates
    return sel


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


def run(cfg: DictConfig) -> Path:
    index, count = _check_shard(cfg)
    out_path = output_path(cfg)
    if out_path.exists():
        print(f"captions: {out_path} is complete; nothing to do (delete it to regenerate)")
        return out_path
    summary = StageSummary("captions", index, count)
    c = cfg.captions
    columns, rules = _columns(cfg), _rules(cfg)
    blocklist = load_blocklist(c.blocklist.file, c.blocklist.words)
    count_tokens = (load_token_counter(c.tokenizer, cfg.model, cfg.paths.cache)
                    if rules.max_tokens is not None else None)

    unreadable: Counter = Counter()
    rows = read_rows(c.source, str(c.format), columns, unreadable, bool(cfg.progress), int(c.read_batch_rows))
    selection = select_captions(rows, columns, rules, blocklist, count_tokens, bool(cfg.progress))

    mine = lambda rid: (0 if rid is None else shard_of(rid, count)) == index  # noqa: E731
    if index == 0:
        for reason, n in unreadable.items():
            summary.reject(reason, n)
    for rid, reason in selection.rejected:
        if mine(rid):
            summary.reject(reason)
    records = [r for r in selection.records if mine(r["id"])]
    summary.records_out = len(records)
    summary.records_in = summary.records_out + sum(summary.rejected.values())
    summary.extra.update(source=str(c.source), max_tokens=rules.max_tokens, sample=rules.sample,
                         min_aesthetic=rules.min_aesthetic, blocklist_terms=len(blocklist))

    writer = ResumableJsonl(out_path, id_key="id").open()
    try:
        todo = [r for r in records if r["id"] not in writer.done]
        if writer.done:
            log.info("captions: resuming %s (%d of %d records already written)", writer.partial,
                     len(records) - len(todo), len(records))
        step = max(1, int(c.write_batch))
        bar = tqdm(total=len(records), initial=len(records) - len(todo), unit="caption", desc="captions: write",
                   disable=not cfg.progress)
        for start in range(0, len(todo), step):
            writer.write(todo[start:start + step])
            bar.update(len(todo[start:start + step]))
        bar.close()
    finally:
        writer.close()
    summary.write(cfg.paths.reports)
    writer.finish()
    log.info("captions: %d kept of %d rows -> %s", summary.records_out, summary.records_in, out_path)
    return out_path
