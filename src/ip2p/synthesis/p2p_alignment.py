"""Token alignment for Prompt-to-Prompt "refine": which token of the input caption each token of the
edited caption takes its cross-attention map from.

Global (Needleman-Wunsch) alignment of the two token-id sequences, BOS and EOS included. With the
configured scores (synthesis.attention.google.align) two gaps beat a mismatch, so a swapped word
becomes a deletion plus an insertion: the new word keeps its own attention, every kept word borrows
the map of its partner in the input caption.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

# Traceback moves, in the order ties are broken: a (mis)match step first, then a gap in the output
# caption (an input token with no partner), then a gap in the input caption (a new output token).
DIAGONAL, UP, LEFT = 0, 1, 2


@dataclass(frozen=True)
class AlignScores:
    """Needleman-Wunsch step scores. No defaults of its own: synthesis.attention.google.align in
    conf/synthesis/default.yaml is their one home (ip2p.synthesis.run.settings_from_config)."""

    match: float
    mismatch: float
    gap: float


def needleman_wunsch(x: Sequence[int], y: Sequence[int], scores: AlignScores) -> list[tuple[int, int]]:
    """Global alignment of x (input tokens) and y (output tokens).

    Returns, for every position j of y in order, the pair (j, i): i is the position in x aligned to
    y[j] by a match or mismatch step, or -1 when y[j] is an insertion.
    """
    n, m = len(x), len(y)
    # score[i][j]: best score aligning x[:i] with y[:j]
    score = [[0.0] * (m + 1) for _ in range(n + 1)]
    move = [[DIAGONAL] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        score[i][0] = i * scores.gap
        move[i][0] = UP
    for j in range(1, m + 1):
        score[0][j] = j * scores.gap
        move[0][j] = LEFT
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            pair = scores.match if x[i - 1] == y[j - 1] else scores.mismatch
            options = (score[i - 1][j - 1] + pair, score[i - 1][j] + scores.gap, score[i][j - 1] + scores.gap)
            best = max(options)
            score[i][j] = best
            move[i][j] = options.index(best)  # first best in (DIAGONAL, UP, LEFT) order
    mapping: list[tuple[int, int]] = []
    i, j = n, m
    while i > 0 or j > 0:
        step = move[i][j]
        if step == DIAGONAL:
            i, j = i - 1, j - 1
            mapping.append((j, i))
        elif step == UP:
            i -= 1
        else:
            j -= 1
            mapping.append((j, -1))
    mapping.reverse()
    return mapping


@dataclass
class TokenMap:
    """How the output caption's cross-attention is built from the input caption's.

    mapper[j]: position in the input caption whose map output position j receives;
    alphas[j]: 1 where that map is used, 0 where the output token keeps its own map (an insertion);
    changed_input / changed_output: positions of words that differ (used to place a LocalBlend mask).
    """

    mapper: torch.Tensor  # [max_len] int64
    alphas: torch.Tensor  # [max_len] float
    changed_input: list[int]
    changed_output: list[int]


def refine_map(x: Sequence[int], y: Sequence[int], max_len: int, scores: AlignScores) -> TokenMap:
    """Token map for captions of any lengths (x, y: token ids with BOS/EOS, at most max_len each).

    Padding positions of the output (after its EOS) map to the input's padding positions in order,
    so padding attends like padding (clipped to the last position)."""
    mapping = needleman_wunsch(x, y, scores)
    mapper = torch.zeros(max_len, dtype=torch.int64)
    alphas = torch.ones(max_len)
    for j, i in mapping:
        mapper[j] = max(i, 0)
        alphas[j] = 0.0 if i < 0 else 1.0
    for j in range(len(y), max_len):
        mapper[j] = min(len(x) + (j - len(y)), max_len - 1)
    matched_input = {i for _, i in mapping if i >= 0}
    changed_input = [i for i in range(len(x)) if i not in matched_input or _partner_differs(i, mapping, x, y)]
    changed_output = [j for j, i in mapping if i < 0 or x[i] != y[j]]
    return TokenMap(mapper, alphas, changed_input, changed_output)


def _partner_differs(i: int, mapping: list[tuple[int, int]], x: Sequence[int], y: Sequence[int]) -> bool:
    return any(xi == i and x[i] != y[j] for j, xi in mapping)


def replace_map(x: Sequence[int], y: Sequence[int], max_len: int) -> TokenMap:
    """Word swap with equal token counts: position j takes the input's map at position j."""
    if len(x) != len(y):
        raise ValueError(f"replace needs captions of equal token count (got {len(x)} and {len(y)})")
    changed = [j for j in range(len(x)) if x[j] != y[j]]
    return TokenMap(torch.arange(max_len), torch.ones(max_len), changed, list(changed))
