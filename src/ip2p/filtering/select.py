"""Which candidates become training pairs, and which split each input caption (or caption pair) goes to.

Thresholds are keyed by the config's names (sim_0, sim_1, sim_dir, sim_image); scores by the dataset
columns (clip_sim_0, ...). A score of None means "not measurable" (e.g. an imported dataset without
captions has no text scores): its threshold is not applied. NaN is never kept.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from typing import Any, Iterable, Mapping, Sequence

from ip2p.errors import Ip2pError
from ip2p.io.stage import stable_seed
from ip2p.scoring.thresholds import first_failure

def _sort_key(row: Mapping[str, Any]) -> tuple:
    value = row.get("clip_sim_dir")
    best_first = -value if value is not None and not math.isnan(value) else math.inf
    return best_first, int(row["seed"])  # ties: lower seed first, so the choice is deterministic


def select(rows: Iterable[Mapping[str, Any]], thresholds: Mapping[str, float], top_k: int) -> tuple[list, Counter]:
    """Keep rows passing every threshold; per caption pair ("pair_id") the top_k by clip_sim_dir.

    Returns (kept rows, in pair order then rank; rejections by reason)."""
    rejected: Counter = Counter()
    survivors: dict[str, list] = defaultdict(list)
    for row in rows:
        reason = first_failure(row, thresholds)
        if reason is None:
            survivors[row["pair_id"]].append(row)
        else:
            rejected[reason] += 1
    kept = []
    for pair_id in sorted(survivors):
        ranked = sorted(survivors[pair_id], key=_sort_key)
        kept.extend(ranked[:top_k])
        if len(ranked) > top_k:
            rejected["over_top_k"] += len(ranked) - top_k
    return kept, rejected


def split_counts(num_pairs: int, fractions: Mapping[str, float]) -> dict[str, int]:
    """Pairs per split: largest remainders of fraction x num_pairs; every split with a positive fraction
    gets at least one pair when there are enough pairs (so a tiny run still has val and test pairs)."""
    names = list(fractions)
    values = [float(fractions[n]) for n in names]
    if any(v < 0 for v in values) or not math.isclose(sum(values), 1.0, abs_tol=1e-6):
        raise Ip2pError(f"filter.splits fractions must be >= 0 and sum to 1 (got {dict(fractions)})")
    exact = [v * num_pairs for v in values]
    counts = [math.floor(e) for e in exact]
    by_remainder = sorted(range(len(names)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: num_pairs - sum(counts)]:
        counts[i] += 1
    positive = [i for i, v in enumerate(values) if v > 0]
    if num_pairs >= len(positive):
        for i in positive:
            if counts[i] == 0:
                donor = max(range(len(names)), key=lambda j: (counts[j], -j))
                counts[donor] -= 1
                counts[i] += 1
    return dict(zip(names, counts))


SPLIT_UNITS = ("input_caption", "pair")


def split_group(unit: str, pair_id: str, input_caption: str) -> str:
    """What must not straddle two splits. input_caption (the default): every edit of one input caption
    lands in one split, so a test image's caption never appeared in training (with several edits per
    caption, a split by pair leaks it); compared lower-cased, whitespace collapsed, trailing ".!?"
    dropped. pair: the caption pair."""
    if unit == "pair":
        return "pair:" + pair_id
    return "caption:" + " ".join(input_caption.lower().split()).rstrip(".!?")


def assign_splits(pair_ids: Sequence[str], fractions: Mapping[str, float], seed: int) -> dict[str, str]:
    """Group (a caption pair or an input caption: split_group) -> split. Groups are ordered by a seeded
    hash of their key (a seeded shuffle that does not depend on the other groups) and cut into
    consecutive runs of split_counts' sizes, in the order the splits are listed. All candidates of a
    group land in the same split."""
    unique = sorted(set(pair_ids))
    order = sorted(unique, key=lambda pid: (stable_seed(seed, "split", pid), pid))
    assignment: dict[str, str] = {}
    start = 0
    for name, count in split_counts(len(order), fractions).items():
        for pid in order[start:start + count]:
            assignment[pid] = name
        start += count
    return assignment
