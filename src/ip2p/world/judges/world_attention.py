"""`ip2p world-attention`: Prompt-to-Prompt's attention controls side by side, judged by the truth.

The same caption pairs and the same candidates (seed, p, guidance: `draw_samples`, as `ip2p
synthesize` draws them) are synthesised under each mode in `world.attention.modes`:

- official: InstructPix2Pix's generator, the output branch copies the input branch's self-attention
  for the first p of the steps;
- google:   Prompt-to-Prompt (Hertz et al.): edited cross-attention maps (replace or refine) plus the
  self-attention copy on layers with few queries (conf/synthesis `attention.google`);
- none:     the same noise and ancestral noise for both images, no attention control (p = 0): what
  attention control adds over a shared seed (its curve over p is a control: p is drawn, not used).

The oracle reads both images of every candidate and the world's verdict says whether the instructed
attribute changed (success) and the rest stayed (preservation). Writes reports/world_attention.json
and world_attention.png (by kind and over p, one line or bar per mode). Synthesis code is the stage's
own (ip2p.synthesis); nothing here knows more of the model than `ip2p synthesize` does.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig
from tqdm.auto import tqdm

from ip2p.io.atomic import atomic_write_json
from ip2p.io.figures import finish_figure
from ip2p.io.images import to_uint8
from ip2p.io.jsonl import read_jsonl
from ip2p.io.loggers import log_metrics, start_mlflow_run
from ip2p.models.loader import load_diffusion
from ip2p.synthesis.pipeline import PairSampler, SampleSpec, draw_samples
from ip2p.synthesis.run import resolution, settings_from_config
from ip2p.world.language.parsing import parse_instruction
from ip2p.world.oracle import read
from ip2p.world.verdict import judge_edit

log = logging.getLogger(__name__)

TRUTH = ("success", "preserved", "both")
MODES = ("official", "google", "none")


def world_triples(path: Path, count: int) -> list[dict]:
    """The first `count` triples whose instruction reads as a world edit (the verdict needs its kind)."""
    problems: Counter = Counter()
    out = []
    for r in read_jsonl(path, problems):
        if all(isinstance(r.get(k), str) for k in ("id", "input", "edit", "output")) and parse_instruction(r["edit"]):
            out.append(r)
            if len(out) == count:
                break
    return out


def mode_specs(mode: str, specs: list[SampleSpec]) -> list[SampleSpec]:
    """`none` keeps each candidate's seed and guidance but copies no attention (p = 0)."""
    return [dataclasses.replace(s, p=0.0) for s in specs] if mode == "none" else specs


def judge_mode(sampler: PairSampler, triples: list[dict], mode: str, cfg: DictConfig, size: int,
               progress: bool) -> list[dict]:
    s = cfg.synthesis
    rows = []
    for r in tqdm(triples, desc=f"synthesis ({mode})", unit="pair", disable=not progress):
        specs = draw_samples(int(cfg.seed), r["id"], int(cfg.world.attention.candidates),
                             (float(s.p_min), float(s.p_max)), (float(s.cfg_min), float(s.cfg_max)))
        images_in, images_out = sampler.sample(r["input"], r["output"], mode_specs(mode, specs), size, size)
        kind = parse_instruction(r["edit"]).kind
        for spec, a, b in zip(specs, to_uint8(images_in), to_uint8(images_out)):
            v = judge_edit(read(a), read(b), r["edit"])
            rows.append({"mode": mode, "pair_id": r["id"], "kind": kind, "seed": spec.seed, "p": spec.p,
                         "cfg": spec.cfg, "judged": v is not None, "success": bool(v and v.success),
                         "preserved": bool(v and v.preserved), "both": bool(v and v.both)})
    return rows


def summarise(rows: pd.DataFrame, p_bins: int) -> dict:
    out = {}
    bins = pd.cut(rows["p"], np.linspace(0, 1, p_bins + 1), include_lowest=True)
    for mode, g in rows.groupby("mode", sort=False):
        by_kind = g.groupby("kind")[list(TRUTH)].mean().round(4)
        by_p = g.groupby(bins[g.index], observed=True)["both"].agg(["mean", "count"])
        out[mode] = {"candidates": int(len(g)), **{m: round(float(g[m].mean()), 4) for m in TRUTH},
                     "by_kind": {k: r.to_dict() for k, r in by_kind.iterrows()},
                     "by_p": [{"p_low": float(i.left), "p_high": float(i.right), "both": round(float(v["mean"]), 4),
                               "candidates": int(v["count"])} for i, v in by_p.iterrows()]}
    return out


def run(cfg: DictConfig) -> dict:
    c = cfg.world.attention
    unknown = set(c.modes) - set(MODES)
    if unknown:
        raise ValueError(f"world.attention.modes: unknown {sorted(unknown)}; choose from {', '.join(MODES)}")
    # 1. caption pairs the world can judge, and the text-to-image model synthesis uses
    triples = world_triples(Path(cfg.synthesis.input), int(c.pairs))
    if not triples:
        raise ValueError(f"no world instruction in {cfg.synthesis.input} (run `ip2p instructions` first)")
    components = load_diffusion(cfg.model.base, "base", cfg.model, cfg.paths.cache, cfg.device, cfg.dtype,
                                cfg.get("autocast"))
    with start_mlflow_run(cfg, "world-attention"):
        # 2. the same candidates under every mode
        rows = []
        for mode in c.modes:
            settings = settings_from_config(cfg)
            settings = dataclasses.replace(settings, mode="official" if mode == "none" else mode)
            sampler = PairSampler(components, settings)
            rows += judge_mode(sampler, triples, mode, cfg, resolution(cfg, sampler), bool(cfg.progress))
        # 3. the report
        table = pd.DataFrame(rows)
        result = {"pairs": len(triples), "candidates_per_pair": int(c.candidates),
                  "modes": summarise(table, int(c.p_bins))}
        log_metrics({f"{mode}/{m}": r[m] for mode, r in result["modes"].items() for m in TRUTH})
    out = Path(cfg.paths.reports)
    atomic_write_json(out / "world_attention.json", result)
    picture(result["modes"], out / "world_attention.png")
    log.info("world-attention: %s", {mode: r["both"] for mode, r in result["modes"].items()})
    return result


def picture(modes: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    kinds = sorted({k for r in modes.values() for k in r["by_kind"]})
    x = np.arange(len(kinds))
    width = 0.8 / len(modes)
    for i, (mode, r) in enumerate(modes.items()):
        left.bar(x + (i - (len(modes) - 1) / 2) * width, [r["by_kind"].get(k, {}).get("both", 0) for k in kinds],
                 width=width, label=f"{mode} ({r['both']:.0%})")
        mids = [(b["p_low"] + b["p_high"]) / 2 for b in r["by_p"]]
        right.plot(mids, [b["both"] for b in r["by_p"]], "o-", label=mode)
    left.set_xticks(x, kinds, rotation=30, fontsize=8)
    left.set(ylabel="correct pairs (oracle)", title="by edit kind", ylim=(0, 1))
    right.set(xlabel="p (fraction of steps with copied self-attention)", ylabel="correct pairs (oracle)",
              title="over p", ylim=(0, 1))
    finish_figure(fig, path, "Prompt-to-Prompt attention control, same candidates, judged by the world",
                  axes=(left, right), legend_fontsize=8)
