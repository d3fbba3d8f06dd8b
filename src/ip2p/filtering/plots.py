"""reports/clip_scores.png: the CLIP score distributions, thresholds marked, kept fraction in the title."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Mapping

import numpy as np

from ip2p.io.atomic import atomic_write_bytes

PANELS = (("clip_sim_image", "sim_image", "image-image cos"), ("clip_sim_dir", "sim_dir", "directional cos"),
          ("clip_sim_0", "sim_0", "image 0 - input caption"), ("clip_sim_1", "sim_1", "image 1 - output caption"),
          ("clip_sim_rest", "sim_rest", "image-image cos apart from the caption direction"))


def plot_clip_scores(histograms: Mapping[str, np.ndarray], edges: np.ndarray, thresholds: Mapping[str, float],
                     kept: int, total: int, path: str | Path) -> Path:
    """Each metric's histogram (counts per bin between `edges`, on the cosine range [-1, 1]; missing
    values left out), a dashed line at each threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fraction = kept / total if total else 0.0
    fig, axes = plt.subplots(2, 3, figsize=(15, 7))
    axes.flat[-1].axis("off")
    for ax, (column, name, label) in zip(axes.flat, PANELS):
        counts = histograms.get(column)
        if counts is not None and counts.sum():
            ax.stairs(counts, edges, fill=True, color="tab:blue", alpha=0.8)
        else:
            ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes)
        if name in thresholds:
            ax.axvline(thresholds[name], color="tab:red", linestyle="--", label=f"threshold {thresholds[name]:g}")
            ax.legend(loc="upper left", fontsize=8)
        ax.set_title(f"{column} ({label})", fontsize=10)
        ax.set_xlim(-1.0, 1.0)
        ax.set_xlabel("cosine similarity")
        ax.set_ylabel("candidates")
    fig.suptitle(f"CLIP filter: kept {kept} of {total} candidates ({100 * fraction:.1f}%)")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return atomic_write_bytes(path, buffer.getvalue())
