"""Saving a matplotlib figure as a PNG without ever leaving half a file (temp file, then rename)."""

from __future__ import annotations

from pathlib import Path

from ip2p.io.atomic import atomic_file


def save_figure(fig, path: str | Path, dpi: int = 100) -> Path:
    """Write `fig` to `path` (folders made as needed) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)
    return path
