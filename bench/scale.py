"""Memory and time of `ip2p filter` and `ip2p captions` as their input grows: flat memory, linear time.

  python bench/scale.py filter --records 100000 1000000
  python bench/scale.py captions --records 500000 5000000

Each size gets a generated source in a scratch folder (not timed), then the real stage runs in a fresh
process that samples its own memory every 50 ms. Reported per size: seconds, records per second,
peak RSS (VmHWM: everything the process touched, file-backed pages included) and peak anonymous RSS
(RssAnon: the heap, what grows if a stage holds its records in memory); then the ratio of the largest
size to the smallest for seconds (linear time: the records ratio) and for both peaks (flat: about 1).

filter: a diffusers-style Parquet dataset (`filter.source=diffusers`) whose rows carry clip_sim_*
  scores, as a dataset `ip2p filter` wrote does, so no CLIP runs and the stage's own cost shows:
  4 candidates per caption pair, tiny PNGs, the default thresholds. `datasets` converts the file into
  its cache once, during setup (a separate process, its peak RSS reported as conversion_peak_rss_bytes).
captions: a LAION-style folder of Parquet parts (TEXT, URL, AESTHETIC_SCORE and the metadata columns
  LAION also has), 2% repeated captions, 1% repeated URLs, scores uniform in [4.5, 8]; the stage's
  defaults (aesthetic >= 6.5, 3..60 words, blocklist, <= 77 CLIP tokens of the tiny preset's tokenizer),
  no sample: every kept caption (about 43%) is written.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORDS = ("red", "small", "boat", "lake", "old", "house", "river", "dog", "park", "tree", "sunset", "city",
         "street", "night", "snowy", "mountain", "cat", "window", "garden", "bridge", "yellow", "car")


# ---- sources (generated, not timed) ---------------------------------------------------------------


def _png(seed: int) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def filter_source(folder: Path, n: int, chunk: int = 100_000) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = folder / "candidates.parquet"
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([("pair_id", pa.string()), ("seed", pa.int64()), ("input_image", image),
                        ("edited_image", image), ("edit_prompt", pa.string()), ("input_caption", pa.string()),
                        ("output_caption", pa.string()),
                        *[(m, pa.float64()) for m in ("clip_sim_0", "clip_sim_1", "clip_sim_dir", "clip_sim_image")]])
    before, after = {"bytes": _png(0), "path": None}, {"bytes": _png(1), "path": None}
    rng = np.random.default_rng(0)
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, n, chunk):
            rows = range(start, min(n, start + chunk))
            pairs = [f"pair{i // 4:07d}" for i in rows]
            m = len(pairs)
            writer.write_table(pa.table({
                "pair_id": pairs, "seed": [i % 4 for i in rows], "input_image": [before] * m, "edited_image": [after] * m,
                "edit_prompt": [f"make it snowy {p}" for p in pairs], "input_caption": [f"a photo of {p}" for p in pairs],
                "output_caption": [f"a snowy photo of {p}" for p in pairs],
                "clip_sim_0": rng.uniform(0.1, 0.4, m), "clip_sim_1": rng.uniform(0.1, 0.4, m),
                "clip_sim_dir": rng.uniform(-0.2, 0.6, m), "clip_sim_image": rng.uniform(0.6, 1.0, m)}, schema=schema))
    return path


def captions_source(folder: Path, n: int, parts: int = 10) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = folder / "laion"
    out.mkdir()
    rng = np.random.default_rng(0)
    words = np.array(WORDS)
    per_part = -(-n // parts)
    for k in range(parts):
        lo, hi = k * per_part, min(n, (k + 1) * per_part)
        if lo >= hi:
            break
        ids = np.arange(lo, hi)
        picks = words[rng.integers(0, len(words), (hi - lo, 6))]
        text = [f"{' '.join(p)} number {i}" for p, i in zip(picks, ids)]
        repeat = rng.random(hi - lo) < 0.02  # a caption seen before (another row's)
        text = [f"{' '.join(p)} number {max(lo, i - 7)}" if r else t for p, i, t, r in zip(picks, ids, text, repeat)]
        url_ids = np.where(rng.random(hi - lo) < 0.01, np.maximum(ids - 3, 0), ids)
        pq.write_table(pa.table({
            "SAMPLE_ID": ids, "URL": [f"https://example.org/{u}.jpg" for u in url_ids], "TEXT": text,
            "HEIGHT": rng.integers(256, 2048, hi - lo), "WIDTH": rng.integers(256, 2048, hi - lo),
            "LICENSE": ["?"] * (hi - lo), "NSFW": ["UNLIKELY"] * (hi - lo), "similarity": rng.uniform(0.2, 0.4, hi - lo),
            "AESTHETIC_SCORE": rng.uniform(4.5, 8.0, hi - lo).astype(np.float32)}), out / f"part-{k:05d}.parquet",
            row_group_size=50_000)
    return out


# ---- one measured run (in a fresh process) --------------------------------------------------------


def _status() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "RssAnon"):
            out[key] = int(value.split()[0]) * 1024
    return out


def child(stage: str, source: Path, work: Path, cache: Path) -> dict:
    from ip2p.config import compose

    overrides = [f"paths.cache={cache}", f"paths.artifacts={work / 'artifacts'}", f"paths.reports={work / 'reports'}",
                 "progress=false"]
    if stage == "filter":
        from ip2p.filtering.run import run

        os.environ["HF_DATASETS_CACHE"] = str(work.parent / "hf")  # converted during setup (convert())
        overrides += ["filter.source=diffusers", f"filter.source_dir={source}"]
    else:
        from ip2p.data.captions import run

        overrides += [f"captions.source={source}", "captions.columns.caption=TEXT", "captions.columns.url=URL",
                      "captions.columns.aesthetic=AESTHETIC_SCORE", "captions.columns.id=SAMPLE_ID",
                      "captions.sample=null"]  # every kept caption is written
    cfg = compose(overrides)
    peak_anon = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            peak_anon[0] = max(peak_anon[0], _status()["RssAnon"])

    thread = threading.Thread(target=sample, daemon=True)
    start_anon = _status()["RssAnon"]
    thread.start()
    start = time.perf_counter()
    run(cfg)
    seconds = time.perf_counter() - start
    done.set()
    thread.join()
    report = json.loads((work / "reports" / f"{stage}.json").read_text())
    return {"seconds": seconds, "peak_rss_bytes": _status()["VmHWM"], "peak_anon_rss_bytes": max(peak_anon[0], start_anon),
            "anon_rss_at_start_bytes": start_anon, "records_in": report["records_in"],
            "records_out": report["records_out"]}


def convert(source: Path, hf_cache: Path) -> dict:
    """Setup of the filter bench: `datasets` converts the Parquet file into its cache once (a cost of the
    diffusers-style source, paid again only when the file changes); its peak is reported apart."""
    os.environ["HF_DATASETS_CACHE"] = str(hf_cache)
    import datasets

    datasets.load_dataset("parquet", data_files=[str(source)], split="train")
    return {"conversion_peak_rss_bytes": _status()["VmHWM"]}


def prefill_old_cache(source: Path, hf_cache: Path, cache: Path, work: Path) -> dict:
    """Setup of the reference run (an older checkout's filter, which cannot take scores from the data):
    its JSONL score cache filled with the source's scores, so it computes no CLIP score either."""
    os.environ["HF_DATASETS_CACHE"] = str(hf_cache)
    import datasets
    import pyarrow.parquet as pq

    from ip2p.config import compose
    from ip2p.filtering.importers import cache_path
    from ip2p.models.loader import resolve_source
    from ip2p.scoring.clip import clip_id

    cfg = compose([f"paths.cache={cache}", f"paths.artifacts={work / 'artifacts'}"])
    clip_model = clip_id(resolve_source(str(cfg.model.clip), "clip", cfg.model, cfg.paths.cache),
                         str(cfg.filter.clip_preprocess))
    fingerprint = datasets.load_dataset("parquet", data_files=[str(source)], split="train")._fingerprint
    path = cache_path(cfg.filter.scores_dir, "diffusers", source)
    path.parent.mkdir(parents=True, exist_ok=True)
    metrics = ("clip_sim_0", "clip_sim_1", "clip_sim_dir", "clip_sim_image")
    index = 0
    with open(path, "w") as out:
        for batch in pq.ParquetFile(source).iter_batches(columns=["pair_id", "seed", *metrics]):
            b = batch.to_pydict()
            for k in range(batch.num_rows):
                out.write(json.dumps({"id": f"{b['pair_id'][k]}-{b['seed'][k]}", "clip_model": clip_model,
                                      "fingerprint": f"{fingerprint}:{index}", **{m: b[m][k] for m in metrics}}) + "\n")
                index += 1
    return {}


def measure(stage: str, n: int, cache: Path, reference_src: Path | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix="ip2p-scale-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        source = filter_source(tmp, n) if stage == "filter" else captions_source(tmp, n)
        print(f"{stage} {n:,}: source made in {time.perf_counter() - t0:.0f} s", flush=True)
        setup, env = {}, dict(os.environ)
        if reference_src is not None:  # the older checkout's package first on the path
            env["PYTHONPATH"] = f"{reference_src}{os.pathsep}{env.get('PYTHONPATH', '')}"
        if stage == "filter":
            done = subprocess.run([sys.executable, __file__, "--convert", str(source), str(tmp / "hf")],
                                  check=True, capture_output=True, text=True)
            setup = json.loads(done.stdout.strip().splitlines()[-1])
            if reference_src is not None:
                subprocess.run([sys.executable, __file__, "--prefill", str(source), str(tmp / "hf"), str(cache),
                                str(tmp / "work")], check=True, capture_output=True, text=True, env=env)
        result = subprocess.run([sys.executable, __file__, "--child", stage, str(source), str(tmp / "work"), str(cache)],
                                check=True, capture_output=True, text=True, env=env)
        doc = json.loads(result.stdout.strip().splitlines()[-1])
    doc = {"records": n, **doc, **setup, "records_per_s": n / doc["seconds"]}
    print(f"{stage} {n:,}: {doc['seconds']:.1f} s, peak RSS {doc['peak_rss_bytes'] / 2**20:.0f} MiB, "
          f"peak anon {doc['peak_anon_rss_bytes'] / 2**20:.0f} MiB", flush=True)
    return doc


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--convert":
        print(json.dumps(convert(Path(sys.argv[2]), Path(sys.argv[3]))))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--prefill":
        print(json.dumps(prefill_old_cache(*map(Path, sys.argv[2:6]))))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _, _, stage, source, work, cache = sys.argv
        print(json.dumps(child(stage, Path(source), Path(work), Path(cache))))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["filter", "captions"])
    parser.add_argument("--records", type=int, nargs="+", required=True, help="input sizes, smallest first")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "ip2p",
                        help="paths.cache (tiny presets are built there)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--reference-src", type=Path, default=None,
                        help="also run an older checkout's stage (its src/ folder) on the same sources, e.g. the "
                             "in-memory filter before it streamed (git worktree add /tmp/old 6ad6a93)")
    args = parser.parse_args()
    measure(args.stage, 1000, args.cache)  # warm-up, not reported: builds the tiny presets in the cache
    runs = [measure(args.stage, n, args.cache) for n in sorted(args.records)]
    reference = [measure(args.stage, n, args.cache, args.reference_src) for n in sorted(args.records)] \
        if args.reference_src else []
    small, large = runs[0], runs[-1]

    def ratios(a: dict, b: dict) -> dict:
        return {"records": b["records"] / a["records"], "seconds": b["seconds"] / a["seconds"],
                "peak_rss": b["peak_rss_bytes"] / a["peak_rss_bytes"],
                "peak_anon_rss": b["peak_anon_rss_bytes"] / a["peak_anon_rss_bytes"]}

    doc = {
        "bench": f"scale_{args.stage}", "machine": f"cpu{os.cpu_count()}", "python": platform.python_version(),
        "date": datetime.date.today().isoformat(), "runs": runs, "largest_over_smallest": ratios(small, large),
    }
    if reference:
        doc["reference"] = {"src": str(args.reference_src), "runs": reference,
                            "largest_over_smallest": ratios(reference[0], reference[-1]),
                            "ours_over_reference": [ratios(r, o) for r, o in zip(reference, runs)]}
    text = json.dumps(doc, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
