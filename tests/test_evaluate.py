"""Guidance-grid evaluation end to end on the tiny preset, checked against independent computations:
the edit re-made by diffusers' own InstructPix2Pix pipeline, CLIP metrics recomputed with numpy."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageOps

from ip2p.config import compose
from ip2p.evaluation.grid import Cell, guidance_cells
from ip2p.evaluation.run import run
from ip2p.io.stage import stable_seed


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def heldout_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("dataset")
    (root / "test").mkdir()
    rng = np.random.default_rng(7)
    rows = []
    for i in range(3):
        y, x = np.mgrid[0:56, 0:72]
        base = np.stack([x * 3, y * 4, (x + y) * 2], -1) + rng.normal(0, 25, (56, 72, 3))
        img = np.clip(base, 0, 255).astype(np.uint8)
        rows.append({
            "id": f"pair{i}-{11 + i}", "pair_id": f"pair{i}",
            "input_image": {"bytes": _png(img), "path": None},
            "edited_image": {"bytes": _png(255 - img), "path": None},
            "edit_prompt": ["make it snowy", "turn the house blue", "make it a watercolor"][i],
            "input_caption": "a red house in a green field",
            "output_caption": ["a red house in a snowy field", "a blue house in a green field",
                               "a watercolor of a red house in a green field"][i],
            "seed": 11 + i, "p": 0.5, "cfg": 7.5,
            "clip_sim_0": 0.3, "clip_sim_1": 0.3, "clip_sim_dir": 0.3, "clip_sim_image": 0.8,
        })
    pq.write_table(pa.Table.from_pylist(rows), root / "test" / "part-00000.parquet")
    return root, rows


@pytest.fixture(scope="module")
def evaluated(heldout_dataset, cache_dir, tmp_path_factory):
    root, rows = heldout_dataset
    out = tmp_path_factory.mktemp("reports")
    cfg = compose(["device=cpu", "progress=false", f"paths.cache={cache_dir}", "evaluate.model=tiny",
                   f"evaluate.dataset_dir={root}", f"evaluate.out_dir={out}", "evaluate.num_samples=2",
                   "evaluate.steps=3", "evaluate.text_guidances=[5.0,7.5]", "evaluate.image_guidances=[1.0,1.6]",
                   "evaluate.batch_size=3", f"logger.mlflow.tracking_uri=sqlite:///{out / 'mlflow.db'}"])
    summary = run(cfg)
    return cfg, out, summary, rows


def test_mlflow_run_has_metrics_and_reports(evaluated):
    import mlflow

    cfg, out, summary, _ = evaluated
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(cfg.logger.experiment)
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.metrics["clip_sim_dir"] == pytest.approx(summary["clip_sim_dir"], abs=1e-6)
    assert run.data.params["evaluate.steps"] == "3"
    assert run.data.tags["stage"] == "evaluate"
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert logged == {f"evaluation/{n}" for n in ("guidance_grid.csv", "eval.json", "guidance_grid.png",
                                                    "guidance_examples.png")}


def test_guidance_cells_grid_and_default():
    cells = guidance_cells([3, 7.5], [1.0, 1.2], extra=Cell(7.5, 1.5))
    assert cells == [Cell(3, 1.0), Cell(3, 1.2), Cell(7.5, 1.0), Cell(7.5, 1.2), Cell(7.5, 1.5)]
    assert guidance_cells([7.5], [1.5], extra=Cell(7.5, 1.5)) == [Cell(7.5, 1.5)]


def test_outputs_written(evaluated):
    cfg, out, summary, _ = evaluated
    grid = pd.read_csv(out / "guidance_grid.csv")
    # 2 x 2 grid plus the default cell (7.5, 1.5) that is not on it.
    assert len(grid) == 5
    assert set(zip(grid.text_guidance, grid.image_guidance)) == {(5.0, 1.0), (5.0, 1.6), (7.5, 1.0), (7.5, 1.6), (7.5, 1.5)}
    assert (grid.num_samples == 2).all()
    for column in ["clip_sim_image", "clip_sim_dir", "clip_sim_1", "l1", "l2", "clip_i_gt"]:
        assert grid[column].between(-1.0001, 1.0001).all(), column
    headline = json.loads((out / "eval.json").read_text())
    row = grid[(grid.text_guidance == 7.5) & (grid.image_guidance == 1.5)].iloc[0]
    assert headline["clip_sim_dir"] == pytest.approx(row.clip_sim_dir, abs=1e-6)
    assert headline == summary
    for picture in ("guidance_grid.png", "guidance_examples.png"):
        with Image.open(out / picture) as img:
            assert img.width > 100 and img.height > 100


def _clip_features(clip, images: list[Image.Image], texts: list[str]):
    """Independent CLIP embedding: processor + model, normalised with numpy."""
    with torch.no_grad():
        pixels = clip.processor(images=images, return_tensors="pt")["pixel_values"]
        img = clip.model.get_image_features(pixel_values=pixels)
        tok = clip.processor(text=texts, padding=True, return_tensors="pt")
        txt = clip.model.get_text_features(**tok)
    img = getattr(img, "pooler_output", img).numpy().astype(np.float64)
    txt = getattr(txt, "pooler_output", txt).numpy().astype(np.float64)
    return img / np.linalg.norm(img, axis=1, keepdims=True), txt / np.linalg.norm(txt, axis=1, keepdims=True)


def _cos(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_one_cell_matches_independent_recomputation(evaluated, tiny_editor, tiny_clip, tmp_path):
    from diffusers import StableDiffusionInstructPix2PixPipeline

    from ip2p.models.export import export_pipeline
    from ip2p.evaluation.run import load_test_pairs

    cfg, out, _, _ = evaluated
    e = cfg.evaluate
    pairs = load_test_pairs(e.dataset_dir, "test", 2, 0, "row")
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(export_pipeline(tiny_editor, tmp_path / "pipe"))
    pipe.set_progress_bar_config(disable=True)
    text_guidance, image_guidance = 7.5, 1.6
    per_input = []
    for r in pairs:
        with Image.open(io.BytesIO(r["input_image"]["bytes"])) as im:
            inp = ImageOps.fit(im.convert("RGB"), (64, 64), method=Image.Resampling.LANCZOS)
        with Image.open(io.BytesIO(r["edited_image"]["bytes"])) as im:
            gt = ImageOps.fit(im.convert("RGB"), (64, 64), method=Image.Resampling.LANCZOS)
        edit = pipe(r["edit_prompt"], image=inp, num_inference_steps=3, guidance_scale=text_guidance,
                    image_guidance_scale=image_guidance, output_type="np",
                    generator=torch.Generator("cpu").manual_seed(stable_seed(0, r["id"]))).images[0]
        edit_pil = Image.fromarray((edit * 255).round().astype(np.uint8))
        imgs, txts = _clip_features(tiny_clip, [inp, edit_pil, gt], [r["input_caption"], r["output_caption"]])
        gt_unit = np.asarray(gt, dtype=np.float64) / 255.0
        per_input.append({
            "clip_sim_image": _cos(imgs[0], imgs[1]),
            "clip_sim_dir": _cos(imgs[1] - imgs[0], txts[1] - txts[0]),
            "clip_sim_1": _cos(imgs[1], txts[1]),
            "l1": float(np.abs(edit - gt_unit).mean()),
            "l2": float(((edit - gt_unit) ** 2).mean()),
            "clip_i_gt": _cos(imgs[1], imgs[2]),
        })
    expected = pd.DataFrame(per_input).mean()
    grid = pd.read_csv(out / "guidance_grid.csv")
    row = grid[(grid.text_guidance == text_guidance) & (grid.image_guidance == image_guidance)].iloc[0]
    for metric, value in expected.items():
        assert row[metric] == pytest.approx(value, abs=2e-3), metric


def test_load_test_pairs_reads_all_or_a_seeded_subset(heldout_dataset):
    from ip2p.evaluation.run import load_test_pairs

    root, rows = heldout_dataset
    everything = load_test_pairs(root, "test", None, 0, "row")
    assert [r["id"] for r in everything] == sorted(r["id"] for r in rows)
    assert everything[0]["input_image"]["bytes"] == next(r for r in rows if r["id"] == everything[0]["id"])["input_image"]["bytes"]
    two = load_test_pairs(root, "test", 2, 0, "row")
    assert len(two) == 2 and [r["id"] for r in two] == sorted(r["id"] for r in two)
    assert set(r["id"] for r in two) <= set(r["id"] for r in rows)
    assert [r["id"] for r in load_test_pairs(root, "test", 2, 0, "row")] == [r["id"] for r in two]


def test_the_original_draws_caption_pairs_then_one_kept_candidate(tmp_path):
    """evaluate.draw_by=pair (experiment=paper): a pair with 9 kept candidates is as likely to be tested
    as a pair with one, and is tested once; draw_by=row (the default) draws rows, as before."""
    from ip2p.config import compose
    from ip2p.evaluation.run import load_test_pairs

    (tmp_path / "test").mkdir()
    rows = [{"id": f"big-{k}", "pair_id": "big"} for k in range(9)] + [{"id": f"p{i}-0", "pair_id": f"p{i}"}
                                                                       for i in range(4)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "test" / "part-00000.parquet")
    everything = load_test_pairs(tmp_path, "test", None, 0, "pair")
    assert sorted(r["pair_id"] for r in everything) == ["big", "p0", "p1", "p2", "p3"]
    draws = {unit: [load_test_pairs(tmp_path, "test", 2, seed, unit) for seed in range(200)] for unit in ("pair", "row")}
    with_big = {unit: sum(any(r["pair_id"] == "big" for r in d) for d in draws[unit]) / 200 for unit in draws}
    assert 0.3 < with_big["pair"] < 0.5 and with_big["row"] > 0.85   # 2 of 5 pairs; 1 - C(4,2)/C(13,2) = 0.92
    assert all(len({r["pair_id"] for r in d}) == 2 for d in draws["pair"])
    picked = {r["id"] for d in draws["pair"] for r in d if r["pair_id"] == "big"}
    assert len(picked) >= 5  # the kept candidate is drawn too, not always the first
    assert load_test_pairs(tmp_path, "test", 2, 7, "pair") == load_test_pairs(tmp_path, "test", 2, 7, "pair")
    assert compose(["experiment=paper"]).evaluate.draw_by == "pair" and compose([]).evaluate.draw_by == "row"


def test_missing_split_is_one_line_error(tmp_path, cache_dir):
    from ip2p.errors import Ip2pError

    cfg = compose(["device=cpu", f"paths.cache={cache_dir}", "evaluate.model=tiny", f"evaluate.dataset_dir={tmp_path}"])
    with pytest.raises(Ip2pError, match="no test split"):
        run(cfg)


def test_no_samples_to_evaluate_is_one_line_error(heldout_dataset, tmp_path, cache_dir):
    from ip2p.errors import Ip2pError

    root, _ = heldout_dataset
    cfg = compose(["device=cpu", f"paths.cache={cache_dir}", "evaluate.model=tiny", f"evaluate.dataset_dir={root}",
                   f"evaluate.out_dir={tmp_path}", "evaluate.num_samples=0", "logger=none"])
    with pytest.raises(Ip2pError, match="evaluate.num_samples must be at least 1"):
        run(cfg)
    empty = tmp_path / "empty"
    (empty / "test").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([], schema=pq.read_schema(root / "test" / "part-00000.parquet")),
                   empty / "test" / "part-00000.parquet")
    cfg = compose(["device=cpu", f"paths.cache={cache_dir}", "evaluate.model=tiny", f"evaluate.dataset_dir={empty}",
                   f"evaluate.out_dir={tmp_path}", "logger=none"])
    with pytest.raises(Ip2pError, match="test split .* has no rows"):
        run(cfg)


def test_a_resolution_the_model_cannot_work_at_is_one_line_error(heldout_dataset, tmp_path, cache_dir):
    """65 px: the tiny VAE (factor 8) encodes 8 latent pixels and decodes 64 px, which used to end in a
    shape traceback inside the grid; now one line naming the setting, and no report written."""
    from ip2p.errors import Ip2pError

    root, _ = heldout_dataset
    cfg = compose(["device=cpu", f"paths.cache={cache_dir}", "evaluate.model=tiny", f"evaluate.dataset_dir={root}",
                   f"evaluate.out_dir={tmp_path}", "evaluate.resolution=65", "logger=none", "progress=false"])
    with pytest.raises(Ip2pError, match=r"evaluate.resolution must be a multiple of 8 \(the VAE's factor\) and at "
                                        r"least 16 for this model \(got 65\)"):
        run(cfg)
    assert not list(tmp_path.iterdir())
