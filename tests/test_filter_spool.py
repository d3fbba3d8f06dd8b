"""The filter's on-disk spool against the in-memory rules of filtering.select (a second implementation):
same kept rows in the same order, same rejections, same split of every group."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from ip2p.filtering.select import assign_splits, select
from ip2p.filtering.spool import Spool
from ip2p.scoring.thresholds import first_failure

FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}
THRESHOLDS = {"sim_image": 0.3, "sim_0": -0.5}  # sim_dir unchecked: NaN survives and ranks last


def random_candidates(seed: int, n: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        pair = int(rng.integers(0, n // 4 + 1))
        sim_dir = float(rng.choice([np.nan, 0.25, 0.5, *rng.uniform(-0.5, 1, 5)]))  # ties, NaN
        scores = {"clip_sim_0": float(rng.uniform(-1, 1)), "clip_sim_1": None if rng.random() < 0.2 else 0.3,
                  "clip_sim_dir": sim_dir, "clip_sim_image": float(rng.uniform(0, 1))}
        seed_ = int(rng.integers(0, 40))
        out.append({"id": f"p{pair:04d}-{seed_}", "pair_id": f"p{pair:04d}", "seed": seed_,
                    "group": f"caption {pair % (n // 12 + 1)}", "scores": scores})
    return out


@pytest.mark.parametrize("top_k", [1, 3])
def test_spool_keeps_ranks_and_splits_as_the_in_memory_rules(tmp_path, top_k):
    records = random_candidates(top_k, 600)
    with Spool(tmp_path / "dataset", split_seed=7) as spool:
        added = [r for r in records if spool.add(r["id"], r["pair_id"], r["seed"], r["group"],
                                                 first_failure(r["scores"], THRESHOLDS), r["scores"],
                                                 {"group": r["group"]})]
        rejected = spool.rejections(top_k)
        spool.assign_splits(FRACTIONS)
        got = {name: [(k["id"], k["group"]) for k in spool.kept(name, top_k)] for name in FRACTIONS}
        counts = {w: spool.count(w, top_k) for w in ("scored", "pairs_in", "pairs_out")}
        spool_folder = spool.folder
    assert not spool_folder.exists()  # the scratch folder is gone

    # the reference: first occurrence of an id wins, then select + assign_splits in memory
    first = {}
    for r in records:
        first.setdefault(r["id"], r)
    assert [r["id"] for r in added] == list(first)
    rows = [{"pair_id": r["pair_id"], "seed": r["seed"], "id": r["id"], "group": r["group"], **r["scores"]}
            for r in first.values()]
    kept, expected_rejected = select(rows, THRESHOLDS, top_k)
    assignment = assign_splits([r["group"] for r in rows], FRACTIONS, 7)
    expected = {name: [(k["id"], k["group"]) for k in kept if assignment[k["group"]] == name] for name in FRACTIONS}
    assert got == expected
    assert rejected == expected_rejected and sum(rejected.values()) + len(kept) == len(first)
    assert counts == {"scored": len(first), "pairs_in": len({r["pair_id"] for r in rows}),
                      "pairs_out": len({k["pair_id"] for k in kept})}
    assert expected_rejected["over_top_k"] > 0 and expected_rejected["below_sim_image"] > 0
    assert any(math.isnan(r["clip_sim_dir"]) for r in kept)  # ranked last, still kept where the pair has room


def test_spool_returns_scores_with_nan_and_none_and_skips_unscored_groups(tmp_path):
    scores = {"clip_sim_0": None, "clip_sim_1": 0.2, "clip_sim_dir": math.nan, "clip_sim_image": 0.9}
    with Spool(tmp_path / "dataset", split_seed=0) as spool:
        assert spool.add("a-1", "a", 1, "g1", None, scores, {"ref": ["x", "y"], "p": None})
        assert not spool.add("a-1", "a", 2, "g1", None, scores, {})            # same id: a duplicate
        assert spool.add("b-1", "b", 1, None, "unreadable_image", None, {})  # no scores, no split group
        spool.assign_splits({"train": 1.0})
        (row,) = spool.kept("train", 4)
        assert spool.rejections(4) == Counter({"unreadable_image": 1})
        assert spool.count("pairs_in") == 2 and spool.count("scored") == 1
    assert row["ref"] == ["x", "y"] and row["p"] is None and row["seed"] == 1
    assert row["scores"]["clip_sim_0"] is None and math.isnan(row["scores"]["clip_sim_dir"])


def test_spool_takes_a_given_split_and_drops_groups_outside_the_fractions(tmp_path):
    with Spool(tmp_path / "dataset", split_seed=0) as spool:
        for i in range(3):
            spool.add(f"f{i}-0", f"f{i}", 0, f"f{i}", None, {"clip_sim_dir": 0.5}, {})
        spool.assign_splits({"train": 0.5, "test": 0.5}, given={"f0": "train", "f1": "test", "f2": "val"})
        assert [k["id"] for k in spool.kept("train", 1)] == ["f0-0"]
        assert [k["id"] for k in spool.kept("test", 1)] == ["f1-0"]


def test_scoring_passes_units_on_without_waiting_for_the_whole_source(tmp_path):
    """Units whose scores are known (data, cache) leave the scoring step after at most max_waiting
    units: a source of any length is never held in memory."""
    from omegaconf import OmegaConf

    from ip2p.filtering.importers import Candidate, ScoreCache, Unit
    from ip2p.filtering.run import Scoring

    pulled = [0]

    def units():
        for i in range(10_000):
            pulled[0] += 1
            c = Candidate(id=f"p{i}-0", pair_id=f"p{i}", seed=0, p=None, cfg=None, input_caption="a", edit_prompt="b",
                          output_caption="c", scores={"clip_sim_dir": 0.1},
                          score_origin="dataset")
            yield Unit(f"p{i}", [c])

    scoring = Scoring(OmegaConf.create({"filter": {"batch_size": 2}}), ScoreCache(tmp_path / "c.sqlite", "m"),
                      lambda ref: (b"", b""))
    stream = scoring.run(units())
    first = next(stream)
    assert first.key == "p0" and pulled[0] <= scoring.max_waiting
    assert sum(1 for _ in stream) == 9_999 and scoring.counts["scores_dataset"] == 10_000
