"""The world as a caption source: `ip2p world-captions` writes what `ip2p captions` reads, with the
scene as metadata, and the LM's fine-tuning examples in the paper's format."""

from __future__ import annotations

import json

from ip2p.config import compose
from ip2p.data import captions
from ip2p.data.validate import load_human_examples
from ip2p.world import source
from ip2p.world.language.parsing import consistent, parse_caption
from ip2p.world.scene import Scene


def test_world_captions_flow_through_the_caption_stage(tmp_path, cache_dir):
    root = tmp_path / "world"
    cfg = compose([f"paths.cache={cache_dir}", f"paths.reports={tmp_path / 'reports'}", "progress=false",
                   f"world.root={root}", "world.source.captions=300", "world.source.edits=120",
                   f"captions.source={root / 'captions.jsonl'}", f"paths.artifacts={tmp_path / 'artifacts'}",
                   "captions.sample=null", "captions.min_aesthetic=null", "captions.columns.url=null",
                   "captions.columns.aesthetic=null"])
    summary = source.run(cfg)
    assert summary["captions"] == 300 and summary["edits"] == 120
    assert (tmp_path / "reports" / "world_samples.png").stat().st_size > 10_000

    rows = [json.loads(line) for line in (root / "captions.jsonl").read_text().splitlines()]
    by_id = {r["id"]: r for r in rows}
    assert len(by_id) == 300
    for r in rows:  # each caption says what its scene is
        scene, parsed = Scene.from_dict(r["scene"]), parse_caption(r["caption"])
        assert parsed is not None and parsed.background == scene.background and parsed.style == scene.style
        assert sorted((o.shape, o.colour) for o in parsed.objects) == sorted((o.shape, o.colour) for o in scene.objects)

    out = captions.run(cfg)
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    report = json.loads((tmp_path / "reports" / "captions.json").read_text())
    # only repeated captions are dropped (as LAION duplicates are); the ids lead back to the scenes
    assert set(report["rejected"]) <= {"duplicate_caption"}
    assert len(kept) == 300 - report["rejected_total"] and len(kept) > 200
    assert all(by_id[k["id"]]["caption"] == k["caption"] for k in kept)

    examples = load_human_examples(root / "edits.jsonl")
    assert len(examples) == 120
    assert all(consistent(e["input"], e["edit"], e["output"]) for e in examples)


def test_same_seed_same_files(tmp_path):
    a = source.caption_records(5, 50), source.edit_records(6, 30)
    b = source.caption_records(5, 50), source.edit_records(6, 30)
    assert a == b
    assert source.caption_records(7, 50) != a[0]


def test_edit_examples_can_oversample_two_object_scenes():
    """`p_two_objects` sets the share of examples whose input scene has two objects (the world's own
    share without it); the examples stay consistent with the world."""
    def two(records):
        return sum(len(parse_caption(r["input"]).objects) == 2 for r in records) / len(records)

    world, oversampled = source.edit_records(6, 400), source.edit_records(6, 400, p_two_objects=0.8)
    assert 0.25 < two(world) < 0.45 and two(oversampled) > 0.7
    assert all(consistent(r["input"], r["edit"], r["output"]) for r in oversampled)
