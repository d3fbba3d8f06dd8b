"""The miniature experiment's judges (ip2p.world.cases, ip2p.world.judges): held-out cases and the
filter-vs-truth arithmetic, checked by hand."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ip2p.world.judges.world_judge import auc, filter_truth, metric_truth, rule_sweep
from ip2p.world.cases import heldout_cases
from ip2p.world.language.edits import EDIT_KINDS
from ip2p.world.language.parsing import consistent
from ip2p.world.render import render


def test_heldout_cases_cover_every_kind_and_are_visible_edits():
    cases = heldout_cases(123, 5, EDIT_KINDS)
    assert [c.kind for c in cases] == [k for k in EDIT_KINDS for _ in range(5)]
    assert len({c.id for c in cases}) == len(cases)
    for c in cases:
        assert consistent(c.input_caption, c.instruction, c.output_caption), c
        assert not (c.kind == "recolour" and c.scene.style == "bw")
        assert (render(c.scene) != render(c.edited)).any()   # the edit shows in pixels
    again = heldout_cases(123, 5, EDIT_KINDS)
    assert [c.instruction for c in again] == [c.instruction for c in cases]
    assert [c.instruction for c in heldout_cases(124, 5, EDIT_KINDS)] != [c.instruction for c in cases]


def test_filter_truth_by_hand():
    cands = pd.DataFrame({"id": list("abcdef"), "both": [True, True, False, False, True, False]})
    r = filter_truth(cands, kept={"a", "c", "e"})
    # kept a, c, e: 2 of 3 correct; correct a, b, e: 2 of 3 kept; dropped b, d, f: 1 of 3 correct
    assert r["kept"] == 3 and r["candidates"] == 6
    assert r["precision"] == round(2 / 3, 4) == r["correct_after_filter"]
    assert r["recall"] == round(2 / 3, 4)
    assert r["correct_before_filter"] == 0.5
    assert r["correct_among_dropped"] == round(1 / 3, 4)


def test_auc_against_counting_every_pair():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, 60).astype(float)  # few values: many ties
    labels = rng.random(60) < 0.3
    pos, neg = scores[labels], scores[~labels]
    counted = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg) / (len(pos) * len(neg))
    assert auc(scores, labels) == counted
    assert auc(scores, np.zeros(60, bool)) is None
    assert auc([1.0, 2.0, 3.0], [False, False, True]) == 1.0 and auc([3.0, 2.0, 1.0], [False, False, True]) == 0.0


def test_metric_truth_by_hand():
    # sim_image ranks the two correct candidates (a, b) first; sim_dir fails c at 0.5 whatever sim_image's threshold
    table = pd.DataFrame({"id": list("abcd"), "both": [True, True, False, False], "success": [True, True, True, False],
                          "preserved": [True, True, False, True],
                          "clip_sim_image": [0.9, 0.8, 0.7, 0.6], "clip_sim_dir": [0.6, 0.6, 0.1, 0.6],
                          "clip_sim_0": [0.5, 0.5, 0.5, np.nan], "clip_sim_1": [0.5, 0.5, 0.5, 0.5]})
    r = metric_truth(table, {"sim_image": 0.0, "sim_dir": 0.5}, [0.0, 0.5])
    assert r["sim_image"]["auc_both"] == 1.0 and r["sim_image"]["auc_preserved"] == round(2 / 3, 4)
    # success: a, b, c above d (0.6): 3 of 3 pairs
    assert r["sim_image"]["auc_success"] == 1.0
    low, mid = r["sim_image"]["sweep"]
    assert low["threshold"] == 0.6 and low["kept"] == 3 and low["precision"] == round(2 / 3, 4) and low["recall"] == 1.0
    assert mid["threshold"] == 0.75 and mid["kept"] == 2 and mid["precision"] == 1.0
    # sim_0 is unscored for d: its AUC uses a, b, c only (all tied: 0.5); d never passes its sweep
    assert r["sim_0"]["auc_both"] == 0.5
    assert r["sim_0"]["sweep"][0]["kept"] == 2   # a, b (c fails sim_dir, d has no sim_0)


def test_rule_sweep_by_hand():
    # two caption pairs of two candidates; the rule keeps the best by sim_dir of each pair's survivors
    table = pd.DataFrame({"id": list("abcd"), "pair_id": ["P", "P", "Q", "Q"], "seed": [1, 2, 3, 4],
                          "kind": ["size", "size", "recolour", "recolour"], "both": [True, False, True, False],
                          "clip_sim_image": [0.5] * 4, "clip_sim_dir": [0.9, 0.95, 0.85, 0.7],
                          "clip_sim_rest": [0.9, 0.5, 0.95, 0.99]})
    rows = rule_sweep(table, {"sim_image": 0.0, "sim_dir": 0.1}, 1, {"sim_dir": [0.8, 0.92], "sim_rest": [None, 0.8]})
    by_rule = {(r["sim_dir"], r["sim_rest"]): r for r in rows}
    loose = by_rule[(0.8, None)]   # P: b beats a on sim_dir; Q: c (d fails 0.8)
    assert (loose["pairs"], loose["kept"], loose["correct"]) == (2, 2, 0.5)
    assert loose["size"] == "0.00/1" and loose["recolour"] == "1.00/1"
    rest = by_rule[(0.8, 0.8)]     # b fails sim_rest: P keeps a
    assert (rest["pairs"], rest["correct"], rest["size"]) == (2, 1.0, "1.00/1")
    strict = by_rule[(0.92, None)]  # only b passes
    assert (strict["pairs"], strict["correct"]) == (1, 0.0) and "recolour" not in strict
    none = by_rule[(0.92, 0.8)]
    assert (none["pairs"], none["kept"], none["correct"]) == (0, 0, None)


def test_mini_experiment_keeps_the_papers_settings():
    """experiment=mini is the paper's chain on the world: the world's models and captions, the LM
    (not the template), official attention control with p ~ U[0.1, 0.9], real filter thresholds."""
    from ip2p.config import compose

    cfg = compose(["experiment=mini"])
    assert cfg.model.name == "mini" and cfg.instructions.backend == "hf"
    assert cfg.instructions.model == cfg.model.llm and cfg.captions.source.endswith("world/captions.jsonl")
    s = cfg.synthesis
    assert s.attention.mode == "official" and (s.p_min, s.p_max) == (0.1, 0.9)
    assert s.samples_per_pair > 1 and s.cfg_max > s.cfg_min
    assert all(v > 0 for v in cfg.filter.thresholds.values() if v is not None)   # not opened up to -1
    assert cfg.filter.thresholds.sim_rest is None                     # the paper's four scores only
    assert cfg.train.init == "base" and cfg.train.conditioning_dropout == 0.05 and not cfg.train.data.flip
    assert cfg.world.eval.seed not in (cfg.world.source.seed, cfg.world.source.edits_seed, cfg.seed)


def test_world_eval_summary_by_hand():
    from ip2p.world.judges.world_eval import summarise

    rows = pd.DataFrame({"kind": ["recolour", "recolour", "background", "size"],
                         "success": [True, False, True, True], "preserved": [True, True, False, True],
                         "both": [True, False, False, True]})
    s = summarise(rows, ["recolour", "background", "style"])
    assert s["success_recolour"] == 0.5 and s["preserved_background"] == 0.0 and s["both_size"] == 1.0
    # the headline is the unweighted mean over the headline kinds present (recolour, background)
    assert s["success"] == round((0.5 + 1.0) / 2, 4) and s["preserved"] == 0.5 and s["both"] == 0.25


def test_unseen_combinations_split_by_hand(tmp_path):
    """A case is unseen when its true edited scene holds a (colour, shape, background) that no training
    caption names; the split reads the training parquet's input and output captions."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ip2p.world.judges.world_eval import by_split, seen_combinations
    from ip2p.world.cases import caption_combinations, scene_combinations, unseen_in

    assert caption_combinations("a small red circle and a large blue star on grass") == {
        ("red", "circle", "grass"), ("blue", "star", "grass")}
    assert caption_combinations("a photo of a dog") == set()
    assert seen_combinations(tmp_path) is None                    # no training split: no split
    (tmp_path / "train").mkdir()
    pq.write_table(pa.table({"input_caption": ["a red circle on grass"],
                             "output_caption": ["a blue circle on grass"]}), tmp_path / "train" / "part-0.parquet")
    seen = seen_combinations(tmp_path)
    assert seen == {("red", "circle", "grass"), ("blue", "circle", "grass")}

    cases = heldout_cases(5, 4, ("recolour", "background"))
    for c in cases:
        assert unseen_in(c, seen) == any(k not in seen for k in scene_combinations(c.edited))
    # a hand-made seen set: everything the first case's edit holds is seen, the second's is not
    seen = scene_combinations(cases[0].edited)
    unseen_ids = {c.id for c in cases if unseen_in(c, seen)}
    assert cases[0].id not in unseen_ids
    rows = pd.DataFrame({"case": [c.id for c in cases], "success": [True] * len(cases),
                         "preserved": [c.id in unseen_ids for c in cases], "both": [False] * len(cases)})
    split = by_split(rows, cases, seen)
    assert split["seen"]["cases"] + split["unseen"]["cases"] == len(cases)
    assert split["unseen"]["cases"] == len(unseen_ids)
    assert split["seen"]["preserved"] == 0.0 and split["unseen"]["preserved"] == 1.0


def test_world_attention_runs_the_same_candidates_under_every_mode(tmp_path, cache_dir):
    """`ip2p world-attention` on the tiny base: only world-readable triples, the candidates that `ip2p
    synthesize` would draw, one row each per mode; `none` keeps seeds and guidance but copies nothing."""
    import json

    import numpy as np

    from ip2p.config import compose
    from ip2p.world.judges.world_attention import mode_specs, run, world_triples
    from ip2p.synthesis.pipeline import draw_samples
    from ip2p.world.language.edits import world_triple
    from ip2p.world.scene import sample_scenes

    rng = np.random.default_rng(0)
    records = [{"id": f"w{i}", **world_triple(s, rng)} for i, s in enumerate(sample_scenes(3, 2))]
    records.insert(1, {"id": "dog", "input": "a cat", "edit": "make it a dog", "output": "a dog"})
    path = tmp_path / "instructions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "{broken\n")
    assert [r["id"] for r in world_triples(path, 5)] == ["w0", "w1"]
    assert [r["id"] for r in world_triples(path, 1)] == ["w0"]

    specs = draw_samples(0, "w0", 3, (0.1, 0.9), (3.0, 6.0))
    assert [s.p for s in mode_specs("none", specs)] == [0.0] * 3
    assert [(s.seed, s.cfg) for s in mode_specs("none", specs)] == [(s.seed, s.cfg) for s in specs]
    assert mode_specs("official", specs) == specs

    cfg = compose(["device=cpu", "progress=false", f"paths.cache={cache_dir}", f"synthesis.input={path}",
                   "synthesis.steps=3", "synthesis.resolution=64", f"paths.reports={tmp_path}",
                   "world.attention.pairs=2", "world.attention.candidates=2", "logger=none"])
    result = run(cfg)
    assert result["pairs"] == 2 and set(result["modes"]) == {"official", "google", "none"}
    for r in result["modes"].values():
        assert r["candidates"] == 4 and sum(b["candidates"] for b in r["by_p"]) == 4
        assert 0 <= r["both"] <= min(r["success"], r["preserved"]) <= 1
    assert json.loads((tmp_path / "world_attention.json").read_text()) == result
    assert (tmp_path / "world_attention.png").stat().st_size > 0


def test_world_pairs_are_true_edits_that_the_filter_reads(tmp_path):
    """`ip2p world-pairs`: pair folders in the synthesis layout whose two renders the world's verdict
    judges as the instructed edit (success, and the rest preserved); a rerun keeps finished folders and
    draws the same pairs."""
    import json

    import numpy as np
    from PIL import Image

    from ip2p.config import compose
    from ip2p.io.pairs import list_pair_folders, read_pair_folder
    from ip2p.world.judges.world_pairs import run
    from ip2p.world.oracle import read
    from ip2p.world.verdict import judge_edit

    cfg = compose(["experiment=mini", f"paths.reports={tmp_path}", f"world.pairs.out_dir={tmp_path}/pairs",
                   "world.pairs.pairs=30", "world.pairs.kinds=[recolour,background,reshape]", "progress=false"])
    summary = run(cfg)
    assert summary["written"] == 30 and sum(summary["by_kind"].values()) == 30
    assert set(summary["by_kind"]) <= {"recolour", "background", "reshape"}
    judged = both = 0
    for folder, _ in list_pair_folders(tmp_path / "pairs"):
        pf = read_pair_folder(folder)
        (cand,) = pf.candidates
        assert not pf.problems
        before, after = (np.asarray(Image.open(p).convert("RGB")) for p in (cand.image_0, cand.image_1))
        v = judge_edit(read(before), read(after), pf.prompt["edit"])
        judged += v is not None
        both += bool(v and v.both)
    assert judged >= 27 and both >= 0.9 * judged
    first = {p.name: (p / "prompt.json").read_text() for p in (tmp_path / "pairs").iterdir()}
    again = run(cfg)
    assert again["written"] == 0
    assert {p.name: (p / "prompt.json").read_text() for p in (tmp_path / "pairs").iterdir()} == first
    assert json.loads((tmp_path / "world_pairs.json").read_text())["pairs"] == 30


def test_world_yield_summary_by_hand():
    """Per setting: kept pairs per hour, correctness of all and of kept candidates, and what an early look
    at half the steps would drop, from a table worked out by hand."""
    from ip2p.world.judges.world_yield import summarise, wilson

    # 5 candidates; the filter keeps c1, c2, c4; c1 and c3 are correct; the early look fails c2 and c3
    # (looser margin: only c3 fails)
    rows = [{"kept": k, "correct": c, "early_pass": [e, e or i == 1]} for i, (k, c, e) in
            enumerate([(True, True, True), (True, False, False), (False, True, False), (True, False, True),
                       (False, False, True)])]
    setting = {"name": "x", "steps": 20, "scheduler": "euler_ancestral", "batch_size": 4, "pairs_per_batch": 1}
    r = summarise(rows, setting, synthesis_s=30.0, scoring_s=6.0, look_at=0.5, margins=[0.0, 0.1])
    assert r["candidates"] == 5 and r["kept"] == 3
    assert r["seconds_per_candidate"] == 6.0 and r["scoring_seconds_per_candidate"] == 1.2
    assert r["kept_per_hour"] == 300.0  # 3 kept in 36 s
    assert r["correct"] == 0.4 and r["kept_correct"] == round(1 / 3, 4)
    assert r["correct_kept_per_hour"] == 100.0
    e, loose = r["early"]
    assert e["margin"] == 0.0 and loose["margin"] == 0.1
    assert e["dropped"] == 0.4 and e["false_rejects"] == 1 and e["correct_among_dropped"] == 1
    assert e["false_reject_share_of_kept"] == round(1 / 3, 4) and e["denoising_saved"] == 0.2
    assert loose["dropped"] == 0.2 and loose["false_rejects"] == 0 and loose["denoising_saved"] == 0.1
    # textbook Wilson 95% intervals
    assert wilson(0, 10) == (0.0, 0.2775) and wilson(5, 10) == (0.2366, 0.7634) and wilson(0, 0) == (0.0, 1.0)


def test_world_yield_runs_every_setting_on_the_same_candidates(tmp_path, cache_dir):
    """`ip2p world-yield` on the tiny base: every setting synthesises the same candidates of the same true
    world caption pairs; with open thresholds the filter keeps its top_k per pair and the early look
    drops nothing; ratios are over the first setting."""
    import json

    import pytest

    from ip2p.config import compose
    from ip2p.world.judges.world_yield import run, true_triples

    triples = true_triples(5, 3)
    assert triples == true_triples(5, 3) and len({t["id"] for t in triples}) == 3
    assert all({"input", "edit", "output", "kind"} <= set(t) for t in triples)
    open_thresholds = [f"filter.thresholds.{k}=-1" for k in ("sim_image", "sim_dir", "sim_0", "sim_1")]
    settings = ("world.yield_table.settings=[{name: ref, scheduler: euler_ancestral, steps: 3, batch_size: 2, "
                "pairs_per_batch: 1}, {name: fast, scheduler: dpmpp_2m, steps: 2, batch_size: 1, pairs_per_batch: 2, "
                "autocast: bfloat16}]")
    cfg = compose(["device=cpu", "progress=false", f"paths.cache={cache_dir}", "synthesis.resolution=64",
                   f"paths.reports={tmp_path}", "world.yield_table.pairs=3", "world.yield_table.candidates=2",
                   "filter.top_k=1", "logger=none", settings, *open_thresholds])
    result = run(cfg)
    assert [s["name"] for s in result["settings"]] == ["ref", "fast"] and result["reference"] == "ref"
    for s in result["settings"]:
        assert s["candidates"] == 6 and s["kept"] == 3  # top 1 of each pair's 2 candidates
        assert all(e["dropped"] == 0 and e["false_rejects"] == 0 for e in s["early"])
        assert s["seconds_per_candidate"] > 0 and s["kept_per_hour"] > 0
    assert [s["autocast"] for s in result["settings"]] == ["None", "bfloat16"]  # the setting's own, else `autocast`
    assert result["settings"][0]["kept_per_hour_ratio"] == 1.0
    assert json.loads((tmp_path / "world_yield.json").read_text()) == result
    assert (tmp_path / "world_yield.png").stat().st_size > 0
    bad = compose(["device=cpu", f"paths.cache={cache_dir}", "logger=none",
                   "world.yield_table.settings=[{name: x, steps: 3}]"])
    with pytest.raises(ValueError, match="'x' lacks"):
        run(bad)


@pytest.mark.parametrize("experiment, expected", [
    ("mini", {"device": "cpu", "autocast": "bfloat16", "dtype": "float32"}),
    ("paper", {"device": "cuda", "dtype": "float16", "autocast": None}),
    ("tiny", {"device": "auto", "dtype": "float32", "autocast": None}),
])
def test_an_experiments_top_level_keys_win_over_the_root_config(experiment, expected):
    """The root config's own keys (device, dtype, autocast) must not override what an experiment sets
    (they did while `_self_` came after the experiment in the defaults list), and the command line
    still overrides both."""
    from ip2p.config import compose

    cfg = compose([f"experiment={experiment}"])
    assert {k: cfg[k] for k in expected} == expected
    overridden = compose([f"experiment={experiment}", "autocast=float16", "device=cuda:1"])
    assert (overridden.autocast, overridden.device) == ("float16", "cuda:1")


def test_edit_grid_seeds_follow_the_case(tiny_editor):
    """world-eval edits in two calls (the grid's kinds over every cell, the rest at the default cell): a
    case's edit must not depend on which other cases share its call or its batch."""
    import torch

    from ip2p.evaluation.grid import Cell, edit_grid
    from ip2p.models.instruct_pix2pix import InstructPix2Pix

    editor = InstructPix2Pix(tiny_editor)
    images = torch.rand(5, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    instructions = [f"make it {w}" for w in ("red", "blue", "snowy", "green", "old")]
    ids = [f"case-{i}" for i in range(5)]
    cells = [Cell(3.0, 1.5), Cell(5.0, 2.0)]
    full = edit_grid(editor, images, instructions, ids, cells, 3, "euler_ancestral", 7, batch_size=4, progress=False)
    sub = [3, 1]
    part = edit_grid(editor, images[sub], [instructions[i] for i in sub], [ids[i] for i in sub], cells[1:], 3,
                     "euler_ancestral", 7, batch_size=1, progress=False)
    assert part.shape == (2, 1, 3, 64, 64)
    torch.testing.assert_close(part[:, 0], full[sub, 1], atol=1e-4, rtol=0)
    renamed = edit_grid(editor, images[[3]], [instructions[3]], ["another-case"], cells[1:], 3, "euler_ancestral", 7,
                        batch_size=1, progress=False)
    assert (renamed[0, 0] - full[3, 1]).abs().max() > 1e-3   # the case's id is what seeds it


def test_world_eval_edits_only_the_grid_kinds_over_the_grid(cfg, tmp_path):
    import json
    import re

    from omegaconf import OmegaConf

    from ip2p.world.judges.world_eval import evaluate

    c = OmegaConf.merge(cfg, {"paths": {"reports": str(tmp_path)}, "world": {"eval": {
        "model": "tiny", "per_kind": 2, "steps": 2, "text_guidances": [2.0, 5.0], "image_guidances": [1.5],
        "default_text_guidance": 3.0, "default_image_guidance": 2.0, "training_data": None,
        "grid_kinds": ["recolour", "style"], "baselines": {"regenerate": False}}}})
    result = evaluate(c)
    kinds = list(c.world.eval.kinds)
    assert result["grid_kinds"] == ["recolour", "style"]
    assert result["cases"] == 2 * len(kinds)
    assert result["edits"] == 2 * 2 * 3 + 2 * (len(kinds) - 2)   # 2 kinds x 2 cases x 3 cells, the rest once
    # the default cell judges every kind (per-kind keys), the grid only the grid's kinds
    assert all(f"success_{k}" in result["editor"] for k in kinds)
    grid = pd.read_csv(tmp_path / "world_eval_grid.csv")
    cells = sorted(zip(grid.text_guidance, grid.image_guidance))
    assert cells == [(2.0, 1.5), (3.0, 2.0), (5.0, 1.5)]
    assert (grid.cases == 4).all()   # every cell averages the same 2 kinds x 2 cases
    # the grid's default row averages the 4 grid-kind cases: each kind's mean, weighted equally by hand
    row = grid[(grid.text_guidance == 3.0) & (grid.image_guidance == 2.0)].iloc[0]
    by_hand = np.mean([result["editor"][f"success_{k}"] for k in ("recolour", "style")])
    assert row.success == pytest.approx(by_hand, abs=1e-4)
    assert json.loads((tmp_path / "world_eval.json").read_text())["grid_kinds"] == ["recolour", "style"]
    # a grid kind that is not evaluated (a typo): one line from the settings check, before any work
    from ip2p.checks import config_problems

    problems = config_problems(OmegaConf.merge(c, {"world": {"eval": {"grid_kinds": ["recolor", "style"]}}}))
    assert any(re.fullmatch(r"world.eval.grid_kinds names kinds that world.eval.kinds lacks: \['recolor'\] .*", p)
               for p in problems), problems
    assert config_problems(c) == []


def test_world_eval_keeps_cases_and_cells_apart(cfg, tmp_path, monkeypatch):
    """The bookkeeping of the split, with an editor whose answer is known: it returns the input at the
    default cell and a black image elsewhere. At the default cell the editor must then be judged exactly as
    the identity baseline (same cases, same inputs), every kind; off it nothing is preserved; CLIP sees the
    input itself at the default cell (image similarity 1)."""
    import torch
    from omegaconf import OmegaConf

    import ip2p.world.judges.world_eval as world_eval
    from ip2p.evaluation.grid import Cell

    default = Cell(3.0, 2.0)

    def known_editor(editor, images, instructions, ids, cells, *args, **kwargs):
        out = torch.full((len(ids), len(cells), *images.shape[1:]), -1.0)
        for k, cell in enumerate(cells):
            if cell == default:
                out[:, k] = images
        return out

    monkeypatch.setattr(world_eval, "edit_grid", known_editor)
    c = OmegaConf.merge(cfg, {"paths": {"reports": str(tmp_path)}, "world": {"eval": {
        "model": "tiny", "per_kind": 3, "text_guidances": [2.0, 3.0], "image_guidances": [1.5],
        "default_text_guidance": 3.0, "default_image_guidance": 2.0, "training_data": None,
        "grid_kinds": ["reshape", "background"], "baselines": {"regenerate": False}}}})
    result = world_eval.evaluate(c)
    assert result["editor"] == result["identity"]
    assert result["identity"]["preserved"] > 0.9   # the check has teeth: renders read back as themselves
    grid = pd.read_csv(tmp_path / "world_eval_grid.csv").set_index(["text_guidance", "image_guidance"])
    assert grid.loc[(3.0, 2.0), "clip_sim_image"] == pytest.approx(1.0, abs=1e-3)
    assert grid.loc[(3.0, 2.0), "preserved"] == pytest.approx(
        np.mean([result["identity"][f"preserved_{k}"] for k in ("reshape", "background")]), abs=1e-4)
    for cell in [(2.0, 1.5), (3.0, 1.5)]:
        assert grid.loc[cell, "preserved"] == 0 and grid.loc[cell, "clip_sim_image"] < 0.99


def test_a_second_editor_is_judged_on_the_same_cases_and_drawn_under_the_first(cfg, tmp_path):
    """world.eval.baselines.reference_model and world.demo.compare: the same editor twice gives the same
    verdicts at the default cell (same cases, cell and seeds), so the wiring compares like with like."""
    from omegaconf import OmegaConf

    from ip2p.world.judges import demo
    from ip2p.world.judges.world_eval import evaluate

    c = OmegaConf.merge(cfg, {"paths": {"reports": str(tmp_path)}, "world": {"eval": {
        "model": "tiny", "per_kind": 1, "steps": 2, "text_guidances": [3.0], "image_guidances": [2.0],
        "default_text_guidance": 3.0, "default_image_guidance": 2.0, "training_data": None,
        "baselines": {"regenerate": False, "reference_model": "tiny"}}}})
    result = evaluate(c)
    assert result["reference"] == result["editor"]
    d = OmegaConf.merge(c, {"world": {"demo": {"model": "tiny", "compare": "tiny", "scenes": 1, "steps": 2,
                                               "picture": str(tmp_path / "demo.png"),
                                               "scene_png": str(tmp_path / "scene.png")}}})
    shown = demo.run(d)
    assert shown["compare"]["done"] == shown["done"] and (tmp_path / "demo.png").stat().st_size > 0
