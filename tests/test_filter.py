"""CLIP filtering: the four metrics against hand computations, thresholds and top-k on a hand table,
splits, and the stage (score cache, deterministic Parquet, released and diffusers importers)."""

from __future__ import annotations

import io
import json
import math
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ip2p.errors import Ip2pError
from ip2p.filtering.select import assign_splits, select, split_counts
from ip2p.scoring.clip import ClipScorer, clip_metrics
from ip2p.scoring.thresholds import first_failure

THRESHOLDS = {"sim_image": 0.75, "sim_dir": 0.2, "sim_0": 0.2, "sim_1": 0.2}
PERMISSIVE = [f"filter.thresholds.{k}=-1" for k in THRESHOLDS]


# ---- metrics ------------------------------------------------------------------------------------


def test_four_metrics_on_fixed_embeddings_against_hand_values():
    image_0 = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    image_1 = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    text_0 = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.6, 0.8]])
    text_1 = torch.tensor([[0.6, 0.8, 0.0], [0.0, 0.8, 0.6]])
    got = clip_metrics(image_0, image_1, text_0, text_1)
    # row 0: image-text cosines read off the vectors; direction (-1, 1, 0) vs (-0.4, 0.8, 0)
    # = (0.4 + 0.8) / (sqrt(2) * sqrt(0.8)) = 1.2 / sqrt(1.6)
    assert got["clip_sim_0"][0].item() == pytest.approx(1.0)
    assert got["clip_sim_1"][0].item() == pytest.approx(0.8)
    assert got["clip_sim_image"][0].item() == pytest.approx(0.0)
    assert got["clip_sim_dir"][0].item() == pytest.approx(1.2 / math.sqrt(1.6), abs=1e-6)
    # row 1: identical images -> image similarity 1, no image change -> direction 0
    assert got["clip_sim_0"][1].item() == pytest.approx(0.8)
    assert got["clip_sim_1"][1].item() == pytest.approx(0.6)
    assert got["clip_sim_image"][1].item() == pytest.approx(1.0)
    assert got["clip_sim_dir"][1].item() == pytest.approx(0.0)


def _manual_clip_pixels(img: Image.Image, size: int, mean, std) -> torch.Tensor:
    """CLIP preprocessing by hand: bicubic resize of the short side, centre crop, [0, 1], mean/std."""
    w, h = img.size
    scale = size / min(w, h)
    resized = img.resize((max(size, int(w * scale)), max(size, int(h * scale))), Image.Resampling.BICUBIC)
    left, top = (resized.width - size) // 2, (resized.height - size) // 2
    crop = np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
    return torch.from_numpy((crop - np.array(mean, np.float32)) / np.array(std, np.float32)).permute(2, 0, 1)


def test_scorer_uses_clip_preprocessing_and_normalised_embeddings(tiny_clip):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)) for _ in range(4)]
    captions_0, captions_1 = ["a cat", "a house"], ["a dog", "a house in snow"]
    got = ClipScorer(tiny_clip).score(images[:2], images[2:], captions_0, captions_1)
    proc = tiny_clip.processor.image_processor
    size = proc.crop_size["height"]
    pixels = torch.stack([_manual_clip_pixels(im, size, proc.image_mean, proc.image_std) for im in images])
    model = tiny_clip.model
    with torch.no_grad():
        img = model.get_image_features(pixel_values=pixels)
        img = img if isinstance(img, torch.Tensor) else img.pooler_output
        tok = tiny_clip.processor.tokenizer(captions_0 + captions_1, padding="max_length", max_length=77,
                                            return_tensors="pt")
        txt = model.get_text_features(input_ids=tok.input_ids, attention_mask=tok.attention_mask)
        txt = txt if isinstance(txt, torch.Tensor) else txt.pooler_output
    img = img / img.norm(dim=-1, keepdim=True)
    txt = txt / txt.norm(dim=-1, keepdim=True)
    for i in range(2):
        e0, e1, t0, t1 = img[i], img[2 + i], txt[i], txt[2 + i]
        assert got[i]["clip_sim_0"] == pytest.approx(float(e0 @ t0), abs=1e-3)
        assert got[i]["clip_sim_1"] == pytest.approx(float(e1 @ t1), abs=1e-3)
        assert got[i]["clip_sim_image"] == pytest.approx(float(e0 @ e1), abs=1e-3)
        d_img, d_txt = e1 - e0, t1 - t0
        assert got[i]["clip_sim_dir"] == pytest.approx(float(d_img @ d_txt / (d_img.norm() * d_txt.norm())), abs=1e-3)
        # clip_sim_rest by hand in float64: both images projected off the unit caption direction, then cos
        u = (d_txt / d_txt.norm()).double().numpy()
        a, b = e0.double().numpy(), e1.double().numpy()
        a, b = a - (a @ u) * u, b - (b @ u) * u
        assert got[i]["clip_sim_rest"] == pytest.approx(float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)), abs=1e-3)


# ---- selection and splits -----------------------------------------------------------------------


def row(pair, seed, image=0.9, direction=0.5, s0=0.3, s1=0.3):
    return {"pair_id": pair, "seed": seed, "clip_sim_image": image, "clip_sim_dir": direction,
            "clip_sim_0": s0, "clip_sim_1": s1}


def test_thresholds_and_top_k_on_a_hand_table():
    table = [
        row("a", 1, direction=0.30), row("a", 2, direction=0.50), row("a", 3, direction=0.25),
        row("a", 4, direction=0.40), row("a", 5, direction=0.45), row("a", 6, direction=0.60, image=0.74),
        row("a", 7, direction=0.19), row("b", 1, s0=0.1), row("b", 2, s1=0.199), row("b", 3, direction=0.2),
        row("b", 4, image=0.75, direction=0.2), row("c", 1, image=float("nan")),
    ]
    kept, rejected = select(table, THRESHOLDS, top_k=4)
    # by hand: a keeps seeds 2 (0.5), 5 (0.45), 4 (0.4), 1 (0.3); seed 3 (0.25) is 5th; 6 fails image,
    # 7 fails direction; b keeps 3 and 4 (ties at 0.2: lower seed first; thresholds are inclusive)
    assert [(r["pair_id"], r["seed"]) for r in kept] == [("a", 2), ("a", 5), ("a", 4), ("a", 1), ("b", 3), ("b", 4)]
    assert rejected == {"over_top_k": 1, "below_sim_image": 1, "below_sim_dir": 1, "below_sim_0": 1,
                        "below_sim_1": 1, "nan_score": 1}


def test_missing_scores_skip_their_threshold():
    scores = {"clip_sim_image": 0.8, "clip_sim_dir": None, "clip_sim_0": None, "clip_sim_1": None}
    assert first_failure(scores, THRESHOLDS) is None
    assert first_failure({**scores, "clip_sim_image": 0.7}, THRESHOLDS) == "below_sim_image"


def test_split_counts_by_hand():
    fractions = {"train": 0.9, "val": 0.05, "test": 0.05}
    assert split_counts(20, fractions) == {"train": 18, "val": 1, "test": 1}
    assert split_counts(100, fractions) == {"train": 90, "val": 5, "test": 5}
    assert split_counts(3, fractions) == {"train": 1, "val": 1, "test": 1}  # every split gets a pair
    assert split_counts(2, fractions) == {"train": 2, "val": 0, "test": 0}
    assert split_counts(10, {"train": 1.0, "val": 0.0, "test": 0.0}) == {"train": 10, "val": 0, "test": 0}
    with pytest.raises(Ip2pError, match="sum to 1"):
        split_counts(10, {"train": 0.9, "val": 0.2})


def test_assign_splits_is_seeded_by_pair_and_disjoint():
    pairs = [f"p{i}" for i in range(40)]
    fractions = {"train": 0.8, "val": 0.1, "test": 0.1}
    a = assign_splits(pairs + pairs[:5], fractions, seed=0)  # repeated ids: one entry per pair
    assert set(a) == set(pairs)
    assert sorted(a.values()).count("val") == 4 and sorted(a.values()).count("test") == 4
    assert a == assign_splits(list(reversed(pairs)), fractions, seed=0)  # input order does not matter
    assert a != assign_splits(pairs, fractions, seed=1)


# ---- the stage ----------------------------------------------------------------------------------


def noise_png(seed: int, size: int = 32, fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    base = np.stack([x * 6, y * 6, (x + y) * 3], -1) * rng.uniform(0.2, 1.0) + rng.normal(0, 30, (size, size, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(buffer, format=fmt, quality=100)
    return buffer.getvalue()


def make_candidates(root: Path, pairs: int = 6, per_pair: int = 3, edits_per_caption: int = 1) -> None:
    """Pair folders in the layout `ip2p synthesize` writes (images of random structure); every input
    caption gets `edits_per_caption` consecutive pairs."""
    for i in range(pairs):
        pid = f"pair{i}"
        folder = root / pid
        folder.mkdir(parents=True)
        caption = i // edits_per_caption
        prompt = {"input": f"a photo of a cat {caption}", "edit": f"make it a dog {i}", "output": f"a photo of a dog {i}"}
        (folder / "prompt.json").write_text(json.dumps(prompt))
        lines = []
        for k in range(per_pair):
            seed = 1000 * i + k
            (folder / f"{seed}_0.png").write_bytes(noise_png(2 * seed))
            (folder / f"{seed}_1.png").write_bytes(noise_png(2 * seed + 1))
            lines.append(json.dumps({"id": f"{pid}-{seed}", "pair_id": pid, "seed": seed, "k": k, "p": 0.1 * k,
                                     "cfg": 8.0 + k, **prompt}))
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")


def run_filter(tmp: Path, cache_dir: Path, *overrides: str, out: str = "dataset") -> dict:
    from ip2p.config import compose
    from ip2p.filtering.run import run

    cfg = compose(["device=cpu", "progress=false", f"paths.cache={cache_dir}", f"paths.artifacts={tmp / 'artifacts'}",
                   f"paths.reports={tmp / 'reports'}", f"filter.out_dir={tmp / out}", *overrides])
    return json.loads(run(cfg).read_text())


def parquet_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.parquet"))}


def read_scores(tmp: Path) -> dict[str, dict]:
    """The filter's score cache (one file per source, outside the source folder)."""
    out = {}
    for path in (tmp / "artifacts" / "scores").glob("*.sqlite"):
        with sqlite3.connect(path) as db:
            db.row_factory = sqlite3.Row
            table, = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            out.update({row["id"]: dict(row) for row in db.execute(f"SELECT * FROM {table}")})
    return out


def test_filter_stage_end_to_end(tmp_path, cache_dir):
    import datasets

    candidates = tmp_path / "artifacts" / "candidates"
    make_candidates(candidates)
    report = run_filter(tmp_path, cache_dir, *PERMISSIVE, "filter.top_k=2", "filter.shard_size=3")
    assert report["records_in"] == 18 and report["records_out"] == 12 and report["rejected"] == {"over_top_k": 6}
    assert report["scores_computed"] == 18 and report["kept_fraction"] == pytest.approx(12 / 18, abs=1e-6)
    assert report["splits"] == {"train": {"pairs": 4, "rows": 8}, "val": {"pairs": 1, "rows": 2},
                                "test": {"pairs": 1, "rows": 2}}
    assert (tmp_path / "reports" / "clip_scores.png").stat().st_size > 1000
    scores = read_scores(tmp_path)
    assert len(scores) == 18
    assert not list(candidates.glob("*/scores.jsonl"))  # the synthesis output is left untouched

    loaded = datasets.load_dataset("parquet", data_dir=str(tmp_path / "dataset"))
    pairs_by_split = {name: set(split["pair_id"]) for name, split in loaded.items()}
    assert set(loaded) == {"train", "validation", "test"}
    names = list(pairs_by_split)
    for i, a in enumerate(names):  # no caption pair in two splits
        for b in names[i + 1:]:
            assert not pairs_by_split[a] & pairs_by_split[b]
    assert len([p for p in (tmp_path / "dataset" / "train").glob("*.parquet")]) == 3  # 8 rows, 3 per file
    for split in loaded.values():
        for r in split:
            pid, seed = r["pair_id"], r["seed"]
            assert r["id"] == f"{pid}-{seed}"
            cached = scores[r["id"]]
            for m in ("clip_sim_0", "clip_sim_1", "clip_sim_dir", "clip_sim_image"):
                assert r[m] == pytest.approx(cached[m])
            # the pair's two best candidates by sim_dir (computed from the cache)
            pair_dirs = sorted((s["clip_sim_dir"] for cid, s in scores.items() if cid.startswith(pid + "-")),
                               reverse=True)
            assert r["clip_sim_dir"] >= pair_dirs[1] - 1e-12
            k = seed % 1000
            assert r["p"] == pytest.approx(0.1 * k) and r["cfg"] == 8.0 + k
            assert r["edit_prompt"] == f"make it a dog {pid[4:]}" and r["input_caption"] == f"a photo of a cat {pid[4:]}"
            source = Image.open(candidates / pid / f"{seed}_1.png")
            assert np.array_equal(np.asarray(r["edited_image"]), np.asarray(source))

    # re-filtering with new thresholds recomputes nothing (every score comes from the cache)
    first = parquet_bytes(tmp_path / "dataset")
    again = run_filter(tmp_path, cache_dir, *PERMISSIVE, "filter.top_k=2", "filter.shard_size=3", out="again")
    assert again["scores_cached"] == 18 and again["scores_computed"] == 0
    assert parquet_bytes(tmp_path / "again") == first  # deterministic: byte-identical
    # nothing kept stops the chain in one line (it used to write an empty dataset and exit 0), and the
    # dataset already there stays
    with pytest.raises(Ip2pError, match=r"^filter: no candidate kept from '.*candidates' \(18 records in; "
                                        r"rejected: below_sim_image 18\)$"):
        run_filter(tmp_path, cache_dir, "filter.thresholds.sim_image=2.0", out="again")
    assert parquet_bytes(tmp_path / "again") == first


def test_no_input_caption_straddles_two_splits(tmp_path, cache_dir):
    """Three edits of each of 8 captions: with split_by=input_caption (the default) every caption's
    pairs share one split; split_by=pair, seeded per pair, scatters some of them."""
    import datasets

    make_candidates(tmp_path / "artifacts" / "candidates", pairs=24, per_pair=1, edits_per_caption=3)

    def splits_of_captions(folder: str) -> dict[str, set[str]]:
        loaded = datasets.load_dataset("parquet", data_dir=str(tmp_path / folder))
        out: dict[str, set[str]] = {}
        for name, split in loaded.items():
            for caption in split["input_caption"]:
                out.setdefault(caption, set()).add(name)
        return out

    report = run_filter(tmp_path, cache_dir, *PERMISSIVE, out="by_caption")
    by_caption = splits_of_captions("by_caption")
    assert len(by_caption) == 8 and all(len(names) == 1 for names in by_caption.values())
    # 8 captions cut 90/5/5 -> 6/1/1 captions, 3 pairs each
    assert {name: s["pairs"] for name, s in report["splits"].items()} == {"train": 18, "val": 3, "test": 3}
    run_filter(tmp_path, cache_dir, *PERMISSIVE, "filter.split_by=pair", out="by_pair")
    assert any(len(names) > 1 for names in splits_of_captions("by_pair").values())
    with pytest.raises(Ip2pError, match="filter.split_by"):
        run_filter(tmp_path, cache_dir, *PERMISSIVE, "filter.split_by=row", out="bad")
    with pytest.raises(Ip2pError, match="not sharded"):  # it would silently write the whole dataset
        run_filter(tmp_path, cache_dir, *PERMISSIVE, "shard.index=1", "shard.count=2", out="bad")


def test_released_split_by_hand():
    from ip2p.io.dataset import released_split_of

    names = [f"{i:07d}" for i in range(20)][::-1]                 # listed out of order: sorted first
    split = released_split_of(names, [0.9, 0.05, 0.05])
    # floor(0.9 * 20) = 18, floor(0.95 * 20) = 19: 18 / 1 / 1, in sorted order
    assert [n for n in sorted(names) if split[n] == "train"] == sorted(names)[:18]
    assert split["0000018"] == "val" and split["0000019"] == "test"
    with pytest.raises(Ip2pError, match="three fractions"):
        released_split_of(names, [0.9, 0.1])


def test_split_group_normalises_the_input_caption():
    from ip2p.filtering.select import split_group

    assert split_group("input_caption", "p1", "A Cat  on a mat.") == split_group("input_caption", "p2", "a cat on a mat")
    assert split_group("input_caption", "p1", "a cat") != split_group("input_caption", "p1", "a dog")
    assert split_group("pair", "p1", "a cat") != split_group("pair", "p2", "a cat")


def test_stricter_thresholds_never_move_a_pair_to_another_split(tmp_path, cache_dir):
    import datasets

    make_candidates(tmp_path / "artifacts" / "candidates")
    run_filter(tmp_path, cache_dir, *PERMISSIVE, "filter.top_k=2", out="loose")
    best = {}
    for cid, s in read_scores(tmp_path).items():
        pid = cid.rsplit("-", 1)[0]
        best[pid] = max(best.get(pid, -2.0), s["clip_sim_dir"])
    threshold = sorted(best.values())[len(best) // 2]  # about half the pairs lose every candidate
    others = [o for o in PERMISSIVE if "sim_dir" not in o]
    run_filter(tmp_path, cache_dir, *others, f"filter.thresholds.sim_dir={threshold}", "filter.top_k=2", out="strict")

    def split_of(folder):
        loaded = datasets.load_dataset("parquet", data_dir=str(tmp_path / folder))
        return {pid: name for name, split in loaded.items() for pid in split["pair_id"]}

    loose, strict = split_of("loose"), split_of("strict")
    assert 0 < len(strict) < len(loose)
    assert all(loose[pid] == name for pid, name in strict.items())


def test_cache_entries_of_another_clip_or_changed_images_are_recomputed(tmp_path, cache_dir):
    candidates = tmp_path / "artifacts" / "candidates"
    make_candidates(candidates, pairs=1, per_pair=2)
    assert run_filter(tmp_path, cache_dir, *PERMISSIVE)["scores_computed"] == 2
    cache_file = next((tmp_path / "artifacts" / "scores").glob("candidates-*.sqlite"))
    with sqlite3.connect(cache_file) as db:
        table, = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        db.execute(f"UPDATE {table} SET clip_model = 'some/other-clip' WHERE id = 'pair0-0'")
    # a cache made before the scores were five (one table "scores" of four) is scored again, not half-used
    with sqlite3.connect(cache_file) as db:
        db.execute("CREATE TABLE scores (id TEXT PRIMARY KEY, clip_model TEXT, fingerprint TEXT, clip_sim_0 REAL, "
                   "clip_sim_1 REAL, clip_sim_dir REAL, clip_sim_image REAL, nan TEXT)")
    report = run_filter(tmp_path, cache_dir, *PERMISSIVE)
    assert report["scores_computed"] == 1 and report["scores_cached"] == 1
    # an image regenerated in place (new bytes) is scored again
    (candidates / "pair0" / "1_1.png").write_bytes(noise_png(12345))
    report = run_filter(tmp_path, cache_dir, *PERMISSIVE)
    assert report["scores_computed"] == 1 and report["scores_cached"] == 1


def test_early_drop_scores_from_synthesis_are_used(tmp_path, cache_dir, tiny_clip):
    from ip2p.scoring.clip import clip_id

    candidates = tmp_path / "artifacts" / "candidates"
    make_candidates(candidates, pairs=1, per_pair=2)
    fake = {"clip_sim_0": 0.5, "clip_sim_1": 0.6, "clip_sim_dir": 0.7, "clip_sim_image": 0.8, "clip_sim_rest": 0.9}
    (candidates / "pair0" / "scores.jsonl").write_text("".join(
        json.dumps({"id": f"pair0-{seed}", "seed": seed, "clip_model": clip_id(tiny_clip.source),
                    **(fake if seed == 0 else {k: v for k, v in fake.items() if k != "clip_sim_rest"})}) + "\n"
        for seed in (0, 1)))
    report = run_filter(tmp_path, cache_dir)
    # seed 1's line predates clip_sim_rest: scored again rather than used with a score missing
    assert report["scores_synthesis"] == 1 and report["scores_computed"] == 1 and report["records_out"] == 2
    (candidates / "pair0" / "scores.jsonl").write_text("".join(
        json.dumps({"id": f"pair0-{seed}", "seed": seed, "clip_model": clip_id(tiny_clip.source), **fake}) + "\n"
        for seed in (0, 1)))
    shutil.rmtree(tmp_path / "artifacts" / "scores")
    report = run_filter(tmp_path, cache_dir)
    assert report["scores_synthesis"] == 2 and report["scores_computed"] == 0 and report["records_out"] == 2
    from ip2p.io.dataset import load_split

    rows = [r for split in ("train", "val", "test") for r in load_split(tmp_path / "dataset", split)]
    assert all(r["clip_sim_dir"] == 0.7 and r["clip_sim_image"] == 0.8 for r in rows)


def test_released_layout_import_round_trip(tmp_path, cache_dir):
    released = tmp_path / "released"
    for name, seeds in (("0000000", [5, 6]), ("0000001", [7])):
        folder = released / name
        folder.mkdir(parents=True)
        (folder / "prompt.json").write_text(json.dumps({"input": f"in {name}", "edit": f"edit {name}",
                                                        "output": f"out {name}"}))
        lines = []
        for seed in seeds:
            (folder / f"{seed}_0.jpg").write_bytes(noise_png(seed, fmt="JPEG"))
            (folder / f"{seed}_1.jpg").write_bytes(noise_png(seed + 50, fmt="JPEG"))
            lines.append(json.dumps({"seed": seed, "p2p_threshold": 0.1 * seed, "cfg_scale": float(seed),
                                     "clip_sim_0": 0.3, "clip_sim_1": 0.31, "clip_sim_dir": 0.2 + seed / 100,
                                     "clip_sim_image": 0.9}))
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    (released / "seeds.json").write_text(json.dumps([["0000000", [5, 6]], ["0000001", [7]]]))

    # the release keeps its own split (sorted folders cut 50/0/50 here), as training on it cuts it
    from ip2p.training.datamodule import released_entries

    cut = ["filter.splits.train=0.5", "filter.splits.val=0.0", "filter.splits.test=0.5"]
    report = run_filter(tmp_path, cache_dir, "filter.source=released", f"filter.source_dir={released}", *cut,
                        out="own_split")
    assert report["splits"] == {"train": {"pairs": 1, "rows": 2}, "val": {"pairs": 0, "rows": 0},
                                "test": {"pairs": 1, "rows": 1}}
    from ip2p.io.dataset import load_split

    assert set(load_split(tmp_path / "own_split", "train")["pair_id"]) == {"0000000"}
    assert set(load_split(tmp_path / "own_split", "test")["pair_id"]) == {"0000001"}
    assert [e[0] for e in released_entries(released, "train", (0.5, 0.0, 0.5))] == ["0000000"]
    assert [e[0] for e in released_entries(released, "test", (0.5, 0.0, 0.5))] == ["0000001"]

    report = run_filter(tmp_path, cache_dir, "filter.source=released", f"filter.source_dir={released}")
    assert report["scores_released"] == 3 and report["scores_computed"] == 0 and report["records_out"] == 3
    from ip2p.io.dataset import load_split

    rows = {r["id"]: r for split in ("train", "val", "test") for r in load_split(tmp_path / "dataset", split)}
    assert set(rows) == {"0000000-5", "0000000-6", "0000001-7"}
    r = rows["0000000-6"]
    assert r["p"] == pytest.approx(0.6) and r["cfg"] == 6.0 and r["clip_sim_dir"] == pytest.approx(0.26)
    assert r["input_caption"] == "in 0000000" and r["edit_prompt"] == "edit 0000000"
    jpeg = np.asarray(Image.open(released / "0000000" / "6_0.jpg").convert("RGB"))
    assert np.array_equal(np.asarray(r["input_image"]), jpeg)  # decoded jpg, stored losslessly as PNG

    # without the released scores they are recomputed with CLIP (and cached outside the source folder)
    recomputed = run_filter(tmp_path, cache_dir, "filter.source=released", f"filter.source_dir={released}",
                            "filter.use_released_scores=false", *PERMISSIVE, out="recomputed")
    assert recomputed["scores_computed"] == 3 and not list(released.glob("*/scores.jsonl"))
    assert len(list((tmp_path / "artifacts" / "scores").glob("released-*.sqlite"))) == 1
    recomputed_rows = {r["id"]: r for split in ("train", "val", "test") for r in load_split(tmp_path / "recomputed", split)}
    assert recomputed_rows["0000000-6"]["clip_sim_dir"] != pytest.approx(0.26)  # CLIP's value, not the metadata's


def test_diffusers_dataset_import(tmp_path, cache_dir):
    import datasets

    n = 4
    data = {"input_image": [{"bytes": noise_png(i), "path": None} for i in range(n)],
            "edited_image": [{"bytes": noise_png(100 + i), "path": None} for i in range(n)],
            "edit_prompt": [f"edit {i // 2}" for i in range(n)]}
    features = datasets.Features({"input_image": datasets.Image(), "edited_image": datasets.Image(),
                                  "edit_prompt": datasets.Value("string")})
    source = tmp_path / "hf.parquet"
    datasets.Dataset.from_dict(data, features=features).to_parquet(str(source))
    report = run_filter(tmp_path, cache_dir, "filter.source=diffusers", f"filter.source_dir={source}",
                        "filter.thresholds.sim_image=-1")
    assert report["records_in"] == n and report["records_out"] == n and report["scores_computed"] == n
    from ip2p.io.dataset import load_split

    rows = [r for split in ("train", "val", "test") for r in load_split(tmp_path / "dataset", split)]
    assert sorted(r["seed"] for r in rows) == list(range(n))  # row index as seed
    for r in rows:  # no captions: only the image similarity is measured
        assert math.isnan(r["clip_sim_dir"]) and -1 <= r["clip_sim_image"] <= 1 and r["input_caption"] == ""
        i = r["seed"]
        assert r["edit_prompt"] == f"edit {i // 2}"
        assert np.array_equal(np.asarray(r["input_image"]), np.asarray(Image.open(io.BytesIO(noise_png(i)))))

    # with caption columns (mapped from other names) all four scores are computed
    data["original_prompt"] = [f"in {i}" for i in range(n)]
    data["edited_prompt"] = [f"out {i}" for i in range(n)]
    features["original_prompt"] = datasets.Value("string")
    features["edited_prompt"] = datasets.Value("string")
    folder = tmp_path / "hf-folder"
    datasets.Dataset.from_dict(data, features=features).save_to_disk(str(folder))
    report = run_filter(tmp_path, cache_dir, "filter.source=diffusers", f"filter.source_dir={folder}",
                        "filter.diffusers.input_caption=original_prompt",
                        "filter.diffusers.output_caption=edited_prompt", *PERMISSIVE, out="captioned")
    assert report["records_out"] == n and report["pairs_in"] == n
    rows = [r for split in ("train", "val", "test") for r in load_split(tmp_path / "captioned", split)]
    assert all(not math.isnan(r["clip_sim_dir"]) and r["input_caption"].startswith("in ") for r in rows)

    with pytest.raises(Ip2pError, match="lacks the column"):
        run_filter(tmp_path, cache_dir, "filter.source=diffusers", f"filter.source_dir={folder}",
                   "filter.diffusers.edit_prompt=instruction", out="bad")


def test_bad_inputs_are_counted_or_explained(tmp_path, cache_dir):
    candidates = tmp_path / "artifacts" / "candidates"
    make_candidates(candidates, pairs=2, per_pair=2)
    (candidates / "pair0" / "1_0.png").unlink()  # seed 1 of pair0 loses an image
    (candidates / "pair1" / "1000_1.png").write_bytes(b"not an image")
    (candidates / "broken").mkdir()
    (candidates / ".partial-pair9").mkdir()  # a killed synthesis run's temp folder: ignored
    report = run_filter(tmp_path, cache_dir, *PERMISSIVE)
    assert report["rejected"] == {"missing_image": 1, "unreadable_image": 1, "unreadable_pair_folder": 1}
    assert report["records_out"] == 2 and report["records_in"] == 5
    with pytest.raises(Ip2pError, match="filter.source"):
        run_filter(tmp_path, cache_dir, "filter.source=nowhere")
    with pytest.raises(Ip2pError, match="needs filter.source_dir"):
        run_filter(tmp_path, cache_dir, "filter.source=released")
    with pytest.raises(Ip2pError, match="unknown filter threshold"):
        run_filter(tmp_path, cache_dir, "+filter.thresholds.sim_foo=0.1")


def test_score_cache_keeps_entries_across_opens_and_nan_apart_from_none(tmp_path):
    """The SQLite cache: entries persist, a later put replaces an entry, another CLIP or fingerprint
    misses, and a NaN score (SQLite would store NULL) comes back as NaN, a missing one as None."""
    from types import SimpleNamespace

    from ip2p.filtering.importers import ScoreCache

    path = tmp_path / "scores" / "candidates-x.sqlite"
    scores = {"clip_sim_0": 0.1, "clip_sim_1": None, "clip_sim_dir": math.nan, "clip_sim_image": 0.4}
    ScoreCache(path, "m").put([SimpleNamespace(id="a-1", fingerprint="f1", scores=scores),
                               SimpleNamespace(id="a-2", fingerprint="f2", scores={**scores, "clip_sim_0": 0.9})])
    cache = ScoreCache(path, "m")
    cache.put([SimpleNamespace(id="a-2", fingerprint="f2b", scores={**scores, "clip_sim_0": 0.5})])
    again = ScoreCache(path, "m")
    assert len(again) == 2
    got = again.get(SimpleNamespace(id="a-1", fingerprint="f1"))
    assert got["clip_sim_0"] == 0.1 and got["clip_sim_1"] is None and math.isnan(got["clip_sim_dir"])
    assert again.get(SimpleNamespace(id="a-2", fingerprint="f2")) is None          # replaced: new fingerprint
    assert again.get(SimpleNamespace(id="a-2", fingerprint="f2b"))["clip_sim_0"] == 0.5
    assert ScoreCache(path, "other").get(SimpleNamespace(id="a-1", fingerprint="f1")) is None


def test_refiltering_our_own_dataset_reuses_its_scores(tmp_path, cache_dir):
    """A dataset `ip2p filter` wrote carries clip_sim_* columns: filtering it again (source=diffusers)
    with a stricter sim_dir takes those scores (no CLIP) and keeps exactly the rows above the bar."""
    from ip2p.io.dataset import load_split

    make_candidates(tmp_path / "artifacts" / "candidates", pairs=6, per_pair=3)
    run_filter(tmp_path, cache_dir, *PERMISSIVE, "filter.top_k=3", "filter.splits.train=1.0",
               "filter.splits.val=0.0", "filter.splits.test=0.0")
    first = load_split(tmp_path / "dataset", "train")
    bar = float(np.median(first["clip_sim_dir"]))
    report = run_filter(tmp_path, cache_dir, "filter.source=diffusers", f"filter.source_dir={tmp_path / 'dataset'}",
                        *PERMISSIVE, f"filter.thresholds.sim_dir={bar}", "filter.splits.train=1.0",
                        "filter.splits.val=0.0", "filter.splits.test=0.0", out="again")
    assert report["scores_dataset"] == 18 and report["scores_computed"] == 0 and report["scores_cached"] == 0
    again = load_split(tmp_path / "again", "train")
    assert sorted(again["id"]) == sorted(i for i, d in zip(first["id"], first["clip_sim_dir"]) if d >= bar)
    assert report["rejected"] == {"below_sim_dir": 18 - len(again)}


def test_a_full_disk_names_the_file_the_filter_was_writing(tmp_path):
    """The dataset's Parquet files, the score cache and the spool: a write the disk refuses is one line
    naming that file (they used to name none), and no partial file is left."""
    from conftest import file_size_limit

    from ip2p.io.dataset import image_struct, write_split
    from ip2p.errors import one_line
    from ip2p.filtering.importers import Candidate, ScoreCache
    from ip2p.filtering.spool import Spool

    rows = [{"id": f"p{i}-1", "pair_id": f"p{i}", "input_image": image_struct(noise_png(i)),
             "edited_image": image_struct(noise_png(i + 100)), "edit_prompt": "x", "input_caption": "a",
             "output_caption": "b", "seed": 1, "p": 0.5, "cfg": 7.5, "clip_sim_0": 0.3, "clip_sim_1": 0.3,
             "clip_sim_dir": 0.2, "clip_sim_image": 0.8, "clip_sim_rest": 0.6} for i in range(8)]
    with file_size_limit(4000), pytest.raises(OSError) as raised:
        write_split(rows, tmp_path / "dataset", "train", shard_size=8)
    assert one_line(raised.value) == f"file too large while writing '{tmp_path / 'dataset' / 'train' / 'part-00000.parquet'}'"
    assert not list((tmp_path / "dataset" / "train").iterdir())

    # SQLite's own limit gives the error of a full disk ("database or disk is full")
    cache = ScoreCache(tmp_path / "scores.sqlite", "tiny")
    cache.db.execute("PRAGMA max_page_count = 3")
    many = [Candidate(id=f"c{i}" * 50, pair_id="p", seed=i, p=0.5, cfg=7.5, input_caption="a", edit_prompt="x",
                      output_caption="b", fingerprint="f" * 200,
                      scores={"clip_sim_0": 0.1, "clip_sim_1": 0.1, "clip_sim_dir": 0.1, "clip_sim_image": 0.1})
            for i in range(500)]
    with pytest.raises(OSError) as raised:
        cache.put(many)
    assert one_line(raised.value) == f"no space left on device while writing '{tmp_path / 'scores.sqlite'}'"
    with pytest.raises(OSError) as raised:
        with Spool(tmp_path / "dataset", 0) as spool:
            spool.db.execute("PRAGMA max_page_count = 8")
            for c in many:
                spool.add(c.id, c.pair_id, c.seed, "g", None, c.scores, {"id": c.id, "note": "y" * 500})
    assert one_line(raised.value).startswith(f"no space left on device while writing '{tmp_path}/.dataset.spool-")


def test_sim_rest_threshold_is_one_more_rule_and_off_by_default():
    from ip2p.config import compose
    from ip2p.filtering.run import thresholds_from_config
    from ip2p.scoring.thresholds import first_failure

    scores = {"clip_sim_image": 0.9, "clip_sim_dir": 0.9, "clip_sim_0": 0.9, "clip_sim_1": 0.9, "clip_sim_rest": 0.3}
    assert first_failure(scores, {"sim_dir": 0.5, "sim_rest": 0.5}) == "below_sim_rest"
    assert first_failure(scores, {"sim_dir": 0.5, "sim_rest": 0.2}) is None
    assert first_failure({**scores, "clip_sim_rest": None}, {"sim_rest": 0.5}) is None   # not measurable: not applied
    assert "sim_rest" not in thresholds_from_config(compose([]).filter.thresholds)      # the paper's rule by default
    assert "sim_rest" not in thresholds_from_config(compose(["experiment=paper"]).filter.thresholds)
