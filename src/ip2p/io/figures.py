"""Saving a matplotlib figure as a PNG without ever leaving half a file (temp file, then rename)."""

from __future__ import annotations

from pathlib import Path

from ip2p.io.atomic import atomic_file


def save_figure(fig, path: str | Path, dpi: int = 100, tight: bool = False) -> Path:
    """Write `fig` to `path` (folders made as needed) and close it. `tight` crops to the drawn area.
    No software tag in the PNG, so the same figure gives the same bytes under any matplotlib."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight" if tight else None, metadata={"Software": None})
    plt.close(fig)
    return path


def finish_figure(fig, path: str | Path, title: str, axes=(), legend_fontsize: float | None = None) -> Path:
    """The last strokes of a judge's figure: a light grid on `axes` (and a legend on each when
    `legend_fontsize` is given), the figure's title, a tight layout; then saved as `save_figure` does."""
    for ax in axes:
        ax.grid(alpha=0.3)
        if legend_fontsize is not None:
            ax.legend(fontsize=legend_fontsize)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)
