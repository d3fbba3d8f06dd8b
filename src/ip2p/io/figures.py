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
