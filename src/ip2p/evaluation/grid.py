"""Editing many (input, guidance cell) combinations in batches, with paired noise.

Every edit of input i uses noise from a generator seeded by (seed, input id): whatever cell or batch
it lands in, input i sees the same noise, so differences between cells come from guidance alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from tqdm.auto import tqdm

from ip2p.io.stage import stable_seed
from ip2p.models.instruct_pix2pix import InstructPix2Pix


@dataclass(frozen=True)
class Cell:
    text_guidance: float
    image_guidance: float


def guidance_cells(text_guidances: Iterable[float], image_guidances: Iterable[float], extra: Cell | None = None) -> list[Cell]:
    """The grid in row-major order (text guidance, then image guidance), plus `extra` if it is not on it."""
    cells = [Cell(float(t), float(i)) for t in text_guidances for i in image_guidances]
    if extra is not None and extra not in cells:
        cells.append(extra)
    return cells


@torch.no_grad()
def edit_grid(
    editor: InstructPix2Pix,
    images: torch.Tensor,
    instructions: list[str],
    input_ids: list[str],
    cells: list[Cell],
    steps: int,
    scheduler: str,
    seed: int,
    batch_size: int,
    progress: bool = True,
) -> torch.Tensor:
    """images [N, 3, H, W] in [-1, 1] -> edits [N, C, 3, H, W] in [-1, 1] (C = len(cells))."""
    conditions = editor.encode_condition(images)           # [N, 4, h, w]
    texts = editor.encode_text(instructions)               # [N, L, D]
    empty = editor.encode_text([""])                       # [1, L, D]
    jobs = [(n, c) for n in range(len(input_ids)) for c in range(len(cells))]
    out = torch.empty((len(input_ids), len(cells), *images.shape[1:]), dtype=torch.float32)
    bar = tqdm(total=len(jobs), desc="guidance grid", unit="edit", disable=not progress)
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start:start + batch_size]
        idx = torch.tensor([n for n, _ in batch])
        text_guidance = torch.tensor([cells[c].text_guidance for _, c in batch])
        image_guidance = torch.tensor([cells[c].image_guidance for _, c in batch])
        generators = [torch.Generator("cpu").manual_seed(stable_seed(seed, input_ids[n])) for n, _ in batch]
        latents = editor.sample(conditions[idx], texts[idx], empty, text_guidance, image_guidance, steps, scheduler,
                                generators, progress=False)
        decoded = editor.decode(latents).float().cpu()
        for k, (n, c) in enumerate(batch):
            out[n, c] = decoded[k]
        bar.update(len(batch))
    bar.close()
    return out
