"""`ip2p captions`: every filter and rejection reason on small hand-made sources (JSONL, CSV,
LAION-style parquet), stable ids, a reproducible seeded sample, shards and resume."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ip2p.config import compose
from ip2p.data import captions
from ip2p.errors import Ip2pError

# Nonsense words that the tiny BPE tokenizer (trained on English captions) splits into many tokens.
GIBBERISH = " ".join(["zqxjkv wqpfzx"] * 12)


def stage_cfg(tmp_path: Path, cache_dir: Path, source: Path, *overrides: str):
    return compose([f"paths.cache={cache_dir}", f"paths.artifacts={tmp_path / 'artifacts'}",
                    f"paths.reports={tmp_path / 'reports'}", "progress=false",
                    f"captions.source={source}", "captions.sample=null", *overrides])


def run_stage(tmp_path, cache_dir, source, *overrides):
    cfg = stage_cfg(tmp_path, cache_dir, source, *overrides)
    out = captions.run(cfg)
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    name = "captions.json" if int(cfg.shard.count) == 1 else \
        f"captions.shard-{int(cfg.shard.index):05d}-of-{int(cfg.shard.count):05d}.json"
    summary = json.loads((tmp_path / "reports" / name).read_text())
    return out, records, summary


def write_jsonl_source(path: Path) -> Path:
    good = lambda i, cap, **kw: {"id": f"g{i}", "caption": cap, "url": f"http://x/{i}.jpg", "aesthetic": 7.0, **kw}  # noqa: E731
    rows = [
        good(1, "a red fox in the snow"),
        good(2, "an old man reading a newspaper in a cafe"),
        good(3, ""),                                                           # empty_caption
        good(4, "two cats"),                                                   # too_short (min 3 words)
        good(5, " ".join(["word"] * 30)),                                      # too_long (max 25 words)
        good(6, "a blue boat on a calm lake", aesthetic=5.0),                  # below_aesthetic
        good(7, "a green car on a country road", aesthetic=None),              # missing_aesthetic
        good(8, "a naked tree in winter"),                                     # blocklisted ("naked")
        good(1, "a completely different caption with a reused id"),            # duplicate_id
        good(9, "A  red fox, in the SNOW!"),                                   # duplicate_caption
        good(10, "a white horse running on a beach", url="http://x/1.jpg"),   # duplicate_url
        good(11, GIBBERISH),                                                   # over_token_limit
        good(12, "a bowl of soup on a wooden table", aesthetic="high"),        # malformed_row (score)
        good(13, "a lighthouse   on a rocky\ncoast"),                          # kept, whitespace squashed
    ]
    lines = [json.dumps(r).encode() for r in rows]
    lines.insert(3, b'{"id": "broken", "caption": "half a line')               # malformed_json
    lines.insert(5, b'{"id": "latin1", "caption": "caf\xe9 on a street corner"}')  # not_utf8
    lines.insert(7, b"[1, 2, 3]")                                              # not_an_object
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_jsonl_every_rejection_reason(tmp_path, cache_dir):
    source = write_jsonl_source(tmp_path / "source.jsonl")
    _, records, summary = run_stage(tmp_path, cache_dir, source, "captions.max_words=25", "captions.blocklist.words=[]")
    assert [r["id"] for r in records] == ["g1", "g2", "g13"]
    assert records[2]["caption"] == "a lighthouse on a rocky coast"
    assert records[0] == {"id": "g1", "caption": "a red fox in the snow", "url": "http://x/1.jpg", "aesthetic": 7.0}
    assert summary["rejected"] == {
        "malformed_json": 1, "not_utf8": 1, "not_an_object": 1, "empty_caption": 1, "too_short": 1,
        "too_long": 1, "below_aesthetic": 1, "missing_aesthetic": 1, "blocklisted": 1, "duplicate_id": 1,
        "duplicate_caption": 1, "duplicate_url": 1, "over_token_limit": 1, "malformed_row": 1,
    }
    assert summary["records_in"] == 17 and summary["records_out"] == 3
    assert summary["records_in"] == summary["records_out"] + summary["rejected_total"]


def test_token_limit_uses_the_clip_tokenizer(tmp_path, cache_dir, cfg):
    # Count tokens independently with the preset's CLIP tokenizer and check the stage agrees at the edge.
    from transformers import CLIPTokenizer

    from ip2p.models.loader import resolve_source

    tok = CLIPTokenizer.from_pretrained(resolve_source("tiny", "clip", cfg.model, cache_dir))
    words = "zqxjkv wqpfzx".split()
    rows, lengths = [], []
    for n in range(1, 14):
        text = "a cat and " + " ".join(words[i % 2] for i in range(n))
        rows.append({"id": f"t{n}", "caption": text, "aesthetic": 7.0})
        lengths.append(len(tok(text).input_ids))
    assert min(lengths) <= 40 < 77 < max(lengths)  # the table straddles the limit
    limit = sorted(lengths)[len(lengths) // 2]
    source = tmp_path / "tok.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, records, summary = run_stage(tmp_path, cache_dir, source, f"captions.max_tokens={limit}",
                                    "captions.max_words=100")
    assert [r["id"] for r in records] == [r["id"] for r, n in zip(rows, lengths) if n <= limit]
    assert summary["rejected"] == {"over_token_limit": sum(n > limit for n in lengths)}


def test_csv_source_without_ids_gets_caption_hashes(tmp_path, cache_dir):
    source = tmp_path / "source.csv"
    source.write_bytes(
        b"caption,url,aesthetic\n"
        b"a yellow taxi on a rainy street,http://x/a.jpg,6.9\n"
        b'"a cat, sleeping on a sofa",http://x/b.jpg,7.2\n'
        b"too,many,fields,here\n"                       # malformed_row
        b"caf\xe9 in the old town square,http://x/c.jpg,7.0\n"  # not_utf8
        b"a dog in a park,http://x/d.jpg,6.0\n"         # below_aesthetic
    )
    _, records, summary = run_stage(tmp_path, cache_dir, source, "captions.max_tokens=null")
    expect = ["a yellow taxi on a rainy street", "a cat, sleeping on a sofa"]
    assert [r["caption"] for r in records] == expect
    assert [r["id"] for r in records] == ["c" + hashlib.sha256(c.encode()).hexdigest()[:16] for c in expect]
    assert records[1]["aesthetic"] == 7.2 and records[1]["url"] == "http://x/b.jpg"
    assert summary["rejected"] == {"malformed_row": 1, "not_utf8": 1, "below_aesthetic": 1}


def write_laion_parquet(path: Path, n: int = 40) -> list[dict]:
    rows = [{"TEXT": f"photo number {i} of a quiet harbour at dawn", "URL": f"https://laion/{i}.jpg",
             "AESTHETIC_SCORE": 6.0 + (i % 10) / 5, "WIDTH": 512} for i in range(n)]
    rows[3]["TEXT"] = None                          # empty_caption
    rows[5]["URL"] = rows[4]["URL"]                 # duplicate_url
    rows[7]["TEXT"] = rows[6]["TEXT"].upper()       # duplicate_caption
    table = pa.Table.from_pylist(rows, schema=pa.schema([("TEXT", pa.string()), ("URL", pa.string()),
                                                         ("AESTHETIC_SCORE", pa.float32()), ("WIDTH", pa.int64())]))
    pq.write_table(table, path, row_group_size=7)
    return rows


LAION = ["captions.columns.caption=TEXT", "captions.columns.url=URL", "captions.columns.aesthetic=AESTHETIC_SCORE",
         "captions.max_tokens=null"]


def test_laion_parquet(tmp_path, cache_dir):
    rows = write_laion_parquet(tmp_path / "part-00000.parquet")
    _, records, summary = run_stage(tmp_path, cache_dir, tmp_path / "part-00000.parquet", *LAION)
    below = [i for i, r in enumerate(rows) if r["AESTHETIC_SCORE"] < 6.5 - 1e-6 and i not in (3, 5, 7)]
    assert summary["rejected"] == {"empty_caption": 1, "duplicate_url": 1, "duplicate_caption": 1,
                                   "below_aesthetic": len(below)}
    kept = [r for i, r in enumerate(rows) if i not in (3, 5, 7) and i not in below]
    assert [r["caption"] for r in records] == [r["TEXT"] for r in kept]
    assert all(abs(r["aesthetic"] - k["AESTHETIC_SCORE"]) < 1e-5 for r, k in zip(records, kept))
    assert all(r["id"].startswith("c") and len(r["id"]) == 17 for r in records)


def test_missing_caption_column_is_a_clear_error(tmp_path, cache_dir):
    write_laion_parquet(tmp_path / "laion.parquet")
    with pytest.raises(Ip2pError, match="caption column 'caption'"):
        captions.run(stage_cfg(tmp_path, cache_dir, tmp_path / "laion.parquet", "captions.max_tokens=null"))


def test_seeded_sample_is_reproducible_and_order_free(tmp_path, cache_dir):
    rows = [{"id": f"s{i:03d}", "caption": f"a painting of lighthouse number {i}", "aesthetic": 7.0} for i in range(60)]
    shuffled = rows[:]
    random.Random(1).shuffle(shuffled)
    sources = {}
    for name, order in (("a", rows), ("b", shuffled)):
        sources[name] = tmp_path / f"{name}.jsonl"
        sources[name].write_text("".join(json.dumps(r) + "\n" for r in order))

    def sample(name, seed):
        work = tmp_path / f"{name}-{seed}"
        _, records, summary = run_stage(work, cache_dir, sources[name], "captions.sample=10", f"seed={seed}",
                                        "captions.max_tokens=null")
        assert summary["rejected"] == {"not_sampled": 50}
        return [r["id"] for r in records]

    first = sample("a", 0)
    assert len(first) == 10 and first == sorted(first)          # source order kept
    assert sample("a", 0) == first                               # same seed, same sample
    assert sorted(sample("b", 0)) == first                       # row order does not matter
    assert sample("a", 1) != first                               # another seed, another sample


def test_shards_partition_the_unsharded_output(tmp_path, cache_dir):
    source = write_jsonl_source(tmp_path / "source.jsonl")
    common = ["captions.max_words=25", "captions.max_tokens=null"]
    _, whole, whole_summary = run_stage(tmp_path / "whole", cache_dir, source, *common)
    parts, summaries = [], []
    for i in range(3):
        _, recs, summ = run_stage(tmp_path / "sharded", cache_dir, source, *common, "shard.count=3", f"shard.index={i}")
        parts.append(recs)
        summaries.append(summ)
    merged = [r for part in parts for r in part]
    assert sorted(merged, key=lambda r: r["id"]) == sorted(whole, key=lambda r: r["id"])
    assert sum(s["records_in"] for s in summaries) == whole_summary["records_in"]
    assert sum(s["rejected_total"] for s in summaries) == whole_summary["rejected_total"]


def test_resume_after_a_kill_and_rerun_is_a_noop(tmp_path, cache_dir, capsys):
    source = write_jsonl_source(tmp_path / "source.jsonl")
    common = ["captions.max_words=25", "captions.max_tokens=null", "captions.write_batch=1"]
    full, _, _ = run_stage(tmp_path / "full", cache_dir, source, *common)
    expected = full.read_bytes()
    # A killed run: the first record complete, the second torn in the middle of its line.
    target = tmp_path / "resumed" / "artifacts" / "captions.jsonl"
    target.parent.mkdir(parents=True)
    lines = expected.splitlines(keepends=True)
    Path(str(target) + ".partial").write_bytes(lines[0] + lines[1][:10])
    resumed, _, summary = run_stage(tmp_path / "resumed", cache_dir, source, *common)
    assert resumed.read_bytes() == expected
    assert not Path(str(target) + ".partial").exists()
    assert summary["records_out"] == len(lines)
    before = resumed.stat().st_mtime_ns
    capsys.readouterr()
    run_stage(tmp_path / "resumed", cache_dir, source, *common)
    assert "nothing to do" in capsys.readouterr().out
    assert resumed.stat().st_mtime_ns == before


def test_shipped_captions_pass_with_defaults(tmp_path, cache_dir):
    shipped = Path(__file__).resolve().parents[1] / "data" / "captions.jsonl"
    _, records, summary = run_stage(tmp_path, cache_dir, shipped)
    source_ids = [json.loads(line)["id"] for line in shipped.read_text().splitlines()]
    kept = {r["id"] for r in records}
    assert [r["id"] for r in records] == [i for i in source_ids if i in kept]  # a subset, in source order
    assert len(records) > 300
    assert summary["records_in"] == len(source_ids) == summary["records_out"] + summary["rejected_total"]


def test_parquet_pushdown_selects_and_counts_as_the_row_by_row_reader(tmp_path, cache_dir):
    """The aesthetic bound applied inside the Parquet reader (scores missing, NaN, below, at the bound)
    keeps the same records and counts the same reasons as the JSONL reader, which checks row by row."""
    rng = random.Random(3)
    scores = [None, float("nan"), 6.5, 6.49, 9.0, 3.0] * 20
    rows = [{"id": f"r{i}", "caption": f"a small boat number {i % 90} on a lake", "url": f"http://u/{i % 100}",
             "aesthetic": scores[i]} for i in range(len(scores))]
    rng.shuffle(rows)
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema([("id", pa.string()), ("caption", pa.string()),
                                                                ("url", pa.string()), ("aesthetic", pa.float64())])),
                   tmp_path / "rows.parquet", row_group_size=16)
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({**r, "aesthetic": None if r["aesthetic"] != r["aesthetic"]
                                                             else r["aesthetic"]}) + "\n" for r in rows))
    _, from_parquet, s_parquet = run_stage(tmp_path / "p", cache_dir, tmp_path / "rows.parquet", "captions.max_tokens=null",
                                           "captions.read_batch_rows=10")
    _, from_jsonl, s_jsonl = run_stage(tmp_path / "j", cache_dir, tmp_path / "rows.jsonl", "captions.max_tokens=null")
    assert from_parquet == from_jsonl and s_parquet["rejected"] == s_jsonl["rejected"]
    expected_missing = sum(1 for r in rows if r["aesthetic"] is None or r["aesthetic"] != r["aesthetic"])
    expected_below = sum(1 for r in rows if r["aesthetic"] is not None and r["aesthetic"] < 6.5)
    assert s_parquet["rejected"]["missing_aesthetic"] == expected_missing
    assert s_parquet["rejected"]["below_aesthetic"] == expected_below
    assert s_parquet["records_in"] == len(rows) and len(from_parquet) > 0


@pytest.mark.parametrize("content", [b"", bytes(range(256)) * 8, "a red fox in the snow\n".encode("utf-16")],
                         ids=["empty", "random bytes", "utf-16"])
@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_a_source_without_a_usable_caption_stops_the_chain(tmp_path, cache_dir, content, suffix):
    """It used to exit 0 with an empty captions file, and every later stage passed the emptiness on."""
    source = tmp_path / f"source{suffix}"
    source.write_bytes(content)
    cfg = stage_cfg(tmp_path, cache_dir, source)
    with pytest.raises(Ip2pError) as raised:
        captions.run(cfg)
    message = str(raised.value)
    assert "\n" not in message
    # a CSV without a caption column may be named as such; anything else: nothing kept, and why
    assert message.startswith(f"captions: no captions kept from '{source}' (") or \
        (suffix == ".csv" and message.startswith("no row of the source has the caption column 'caption'")), message
    assert not any((tmp_path / "artifacts").glob("captions*")) and not (tmp_path / "reports").exists()
