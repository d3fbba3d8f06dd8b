"""`ip2p world-judge`: the world's truth on what the data stages made, after `ip2p filter`.

1. instructions: the share of the LM's triples that are valid and consistent with the world (the
   edited caption describes a valid scene that differs from the input exactly as instructed);
2. synthesis: for every candidate pair, the oracle reads both images and the world's verdict says
   whether the instructed attribute changed (success) and the rest stayed (preservation): by edit kind
   and as a curve over p (the fraction of steps with shared self-attention);
3. filter: correctness of the kept vs the dropped candidates, i.e. the CLIP filter's precision and
   recall against the truth; filtering must raise the share of correct pairs;
4. which CLIP score knows the truth: for each of the four scores, how well it ranks correct above wrong
   candidates (AUC, for "both", "success" and "preserved" apart) and the precision and recall of the
   filter as that score's threshold rises through its quantiles (the other three at their settings);
5. which rule to choose: the filter's whole rule (thresholds, then top_k per caption pair, by the
   filter's own `select`) with a grid of thresholds put in (`world.judge.rules`): kept caption pairs
   and their correct share, by kind (filter_rules.csv).

Writes reports/world_judge.json (DVC metrics) and world_synthesis.png (correctness over p; kept vs
dropped by kind; precision against kept share for each score's threshold). The stages themselves
know nothing of the world: this reads their outputs, as a person would look at them.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig
from PIL import Image
from tqdm.auto import tqdm

from ip2p.io.dataset import SPLITS
from ip2p.io.pairs import list_pair_folders, read_pair_folder
from ip2p.filtering.run import scored_candidates, thresholds_from_config
from ip2p.filtering.select import select
from ip2p.io.atomic import atomic_write_json, atomic_write_text
from ip2p.io.figures import save_figure
from ip2p.io.jsonl import read_jsonl
from ip2p.scoring.clip import METRICS
from ip2p.scoring.thresholds import first_failure
from ip2p.world.language.parsing import consistent, parse_instruction
from ip2p.world.verdict import judge_edit, read_any

log = logging.getLogger(__name__)


def judge_instructions(path: Path) -> dict:
    problems: Counter = Counter()
    rows = list(read_jsonl(path, problems))
    ok = [consistent(r["input"], r["edit"], r["output"]) for r in rows]
    kinds = Counter(p.kind for r in rows if (p := parse_instruction(r["edit"])) is not None)
    return {"triples": len(rows), "valid_and_consistent": round(float(np.mean(ok)), 4) if rows else 0.0,
            "by_kind": dict(sorted(kinds.items()))}


def _rgb(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def judge_candidates(root: Path, progress: bool) -> pd.DataFrame:
    """One row per candidate: id, kind, p, cfg, judged, success, preserved, both."""
    rows = []
    for folder, seeds in tqdm(list(list_pair_folders(root)), desc="judging pairs", unit="pair", disable=not progress):
        pair = read_pair_folder(folder, seeds)
        parsed = parse_instruction(pair.prompt["edit"])
        for cand in pair.candidates:
            v = judge_edit(read_any(_rgb(cand.image_0)), read_any(_rgb(cand.image_1)), pair.prompt["edit"])
            m = cand.meta
            rows.append({"id": m.get("id", f"{pair.pair_id}-{cand.seed}"), "pair_id": pair.pair_id, "seed": cand.seed,
                         "kind": parsed.kind if parsed else "unparsed", "p": m.get("p", np.nan), "cfg": m.get("cfg", np.nan),
                         "judged": v is not None, "success": bool(v and v.success),
                         "preserved": bool(v and v.preserved), "both": bool(v and v.both)})
    return pd.DataFrame(rows)


def kept_ids(dataset: Path) -> set[str]:
    import pyarrow.parquet as pq

    ids: set[str] = set()
    for split in SPLITS:
        for part in sorted((dataset / split).glob("*.parquet")):
            ids.update(pq.read_table(part, columns=["id"]).column("id").to_pylist())
    return ids


def filter_truth(cands: pd.DataFrame, kept: set[str]) -> dict:
    """The CLIP filter against the truth: precision = correct share of kept, recall = kept share of correct."""
    k = cands["id"].isin(kept)
    correct = cands["both"]
    precision = round(float(correct[k].mean()), 4) if k.any() else 0.0
    return {"candidates": int(len(cands)), "kept": int(k.sum()),
            "correct_before_filter": round(float(correct.mean()), 4),
            "correct_after_filter": precision,
            "correct_among_dropped": round(float(correct[~k].mean()), 4) if (~k).any() else 0.0,
            "precision": precision,
            "recall": round(float(k[correct].mean()), 4) if correct.any() else 0.0}


def auc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """The chance that a correct candidate scores above a wrong one (ties count half): the Mann-Whitney
    statistic from average ranks. 0.5 = the score knows nothing of the label; None without both kinds."""
    labels = np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = pd.Series(np.asarray(scores, dtype=float)).rank().to_numpy()
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def metric_truth(table: pd.DataFrame, thresholds: dict[str, float], quantiles: list[float]) -> dict:
    """For each CLIP score (columns METRICS of `table`, with the verdict's both / success / preserved):
    its AUC for each verdict, and the filter's kept count, precision and recall of "both" when that
    score's threshold is set at each quantile of its values and the other scores keep theirs (top-k
    not applied). Candidates without scores (unreadable) count as dropped."""
    out = {}
    correct = table["both"].to_numpy(bool)
    present = [m for m in METRICS if m in table]   # a table without one score (older data) sweeps the others
    records = table[present].to_dict("records")
    for metric in present:
        name = metric.removeprefix("clip_")
        values = table[metric].to_numpy(dtype=float)
        scored = ~np.isnan(values)
        entry = {f"auc_{v}": (None if (a := auc(values[scored], table[v].to_numpy(bool)[scored])) is None else round(a, 4))
                 for v in ("both", "success", "preserved")}
        rest = {other: limit for other, limit in thresholds.items() if other != name}
        others = np.array([first_failure(r, rest) is None for r in records], dtype=bool)  # the filter's own rule
        sweep = []
        for q in quantiles:
            limit = float(np.quantile(values[scored], q)) if scored.any() else float("nan")
            keep = others & scored & (values >= limit)
            sweep.append({"quantile": q, "threshold": round(limit, 4), "kept": int(keep.sum()),
                          "precision": round(float(correct[keep].mean()), 4) if keep.any() else 0.0,
                          "recall": round(float(keep[correct].mean()), 4) if correct.any() else 0.0})
        entry["sweep"] = sweep
        out[name] = entry
    return out


def rule_sweep(table: pd.DataFrame, thresholds: dict[str, float], top_k: int,
               grid: dict[str, list[float | None]]) -> list[dict]:
    """The filter's rule (`select`: thresholds, then the top_k of each caption pair by sim_dir) with every
    combination of `grid`'s thresholds put in (None: that score unchecked), against the truth. Per rule:
    the kept caption pairs and candidates, the correct share of the kept, and by kind "share/count"."""
    import itertools

    records = table.to_dict("records")
    names = list(grid)
    out = []
    for values in itertools.product(*(grid[n] for n in names)):
        rule = {**thresholds}
        for name, value in zip(names, values):
            rule.pop(name, None)
            if value is not None:
                rule[name] = float(value)
        kept, _ = select(records, rule, top_k)
        frame = pd.DataFrame(kept, columns=table.columns)
        row = {**dict(zip(names, values)), "pairs": int(frame["pair_id"].nunique()), "kept": len(frame),
               "correct": round(float(frame["both"].mean()), 4) if len(frame) else None}
        for kind, group in frame.groupby("kind"):
            row[kind] = f"{group['both'].mean():.2f}/{len(group)}"
        out.append(row)
    return out


def clip_score_table(cfg: DictConfig) -> pd.DataFrame:
    """id and the four CLIP scores of every candidate, as the filter scored them (its cache)."""
    rows = [{"id": c.id, **{m: (c.scores or {}).get(m, np.nan) for m in METRICS}} for c in scored_candidates(cfg)]
    return pd.DataFrame(rows, columns=["id", *METRICS])


def run(cfg: DictConfig) -> dict:
    start = time.perf_counter()
    c = cfg.world.judge
    out = Path(cfg.paths.reports)
    # 1. instructions
    result = {"instructions": judge_instructions(Path(c.instructions))}
    # 2. synthesis: every candidate pair
    cands = judge_candidates(Path(c.candidates), bool(cfg.progress))
    by_kind = cands.groupby("kind")[["success", "preserved", "both"]].mean().round(4)
    bins = pd.cut(cands["p"], np.linspace(0, 1, int(c.p_bins) + 1))
    by_p = cands.groupby(bins, observed=True)["both"].agg(["mean", "count"])
    result["synthesis"] = {"candidates": int(len(cands)), "judged": round(float(cands.judged.mean()), 4),
                           "correct": round(float(cands.both.mean()), 4),
                           "by_kind": {k: r.to_dict() for k, r in by_kind.iterrows()},
                           "by_p": [{"p_low": float(i.left), "p_high": float(i.right), "correct": round(float(r["mean"]), 4),
                                     "candidates": int(r["count"])} for i, r in by_p.iterrows()]}
    # 3. filter
    kept = kept_ids(Path(c.dataset))
    result["filter"] = filter_truth(cands, kept)
    result["filter"]["raises_correct_share"] = (result["filter"]["correct_after_filter"]
                                                 > result["filter"]["correct_before_filter"])
    # 4. each CLIP score against the truth (the scores come from the filter's cache)
    table = cands.merge(clip_score_table(cfg), on="id", how="left")
    thresholds = thresholds_from_config(cfg.filter.thresholds)
    result["filter"]["by_score"] = metric_truth(table, thresholds, [float(q) for q in c.sweep_quantiles])
    # 5. the whole rule over a grid of thresholds
    grid = {name: list(values) for name, values in c.rules.items()}
    rules = rule_sweep(table, thresholds, int(cfg.filter.top_k), grid)
    result["filter"]["rules"] = rules
    atomic_write_text(out / "filter_rules.csv", pd.DataFrame(rules).to_csv(index=False))
    result["seconds"] = round(time.perf_counter() - start, 1)
    atomic_write_json(out / "world_judge.json", result)
    pictures(cands, kept, by_p, result["filter"]["by_score"], out)
    log.info("world-judge: instructions %.3f, synthesis %.3f, filter %.3f -> %.3f",
             result["instructions"]["valid_and_consistent"], result["synthesis"]["correct"],
             result["filter"]["correct_before_filter"], result["filter"]["correct_after_filter"])
    return result


def pictures(cands: pd.DataFrame, kept: set[str], by_p: pd.DataFrame, by_score: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right, third) = plt.subplots(1, 3, figsize=(15, 3.8))
    mids = [i.mid for i in by_p.index]
    left.plot(mids, by_p["mean"], "o-")
    left.set(xlabel="p (fraction of steps with shared self-attention)", ylabel="correct pairs (oracle)",
             title="Prompt-to-Prompt pairs vs p", ylim=(0, 1))
    k = cands["id"].isin(kept)
    kinds = sorted(cands.kind.unique())
    x = np.arange(len(kinds))
    for offset, (name, mask) in zip((-0.2, 0.2), (("kept by CLIP filter", k), ("dropped", ~k))):
        vals = [cands[mask & (cands.kind == kd)].both.mean() if (mask & (cands.kind == kd)).any() else 0 for kd in kinds]
        right.bar(x + offset, vals, width=0.4, label=name)
    right.set_xticks(x, kinds, rotation=30, fontsize=8)
    right.set(ylabel="correct pairs (oracle)", title="CLIP filter vs the truth", ylim=(0, 1))
    right.legend(fontsize=8)
    total = max(len(cands), 1)
    for name, entry in by_score.items():
        sweep = entry["sweep"]
        third.plot([r["kept"] / total for r in sweep], [r["precision"] for r in sweep], "o-",
                   label=f"{name} (AUC both {entry['auc_both']})")
    third.axhline(float(cands.both.mean()), color="gray", ls="--", lw=1, label="all candidates")
    third.set(xlabel="kept share of candidates (threshold at quantiles)", ylabel="correct among kept (oracle)",
              title="Raising one CLIP threshold", ylim=(0, None))
    third.legend(fontsize=7)
    for ax in (left, right, third):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, out / "world_synthesis.png")
