"""The paper's trade-off plot and a picture grid of one input across the guidance scales."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from ip2p.io.atomic import atomic_write_bytes  # noqa: E402
from ip2p.io.figures import save_figure  # noqa: E402


def tradeoff_plot(grid: pd.DataFrame, path: str | Path, title: str = "") -> Path:
    """x: CLIP directional similarity, y: CLIP image similarity; one curve per text guidance,
    points labelled by image guidance (as the paper's Figure on the guidance trade-off)."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for text_guidance, rows in grid.groupby("text_guidance", sort=True):
        rows = rows.sort_values("image_guidance")
        ax.plot(rows["clip_sim_dir"], rows["clip_sim_image"], marker="o", label=f"text {text_guidance:g}")
        for _, r in rows.iterrows():
            ax.annotate(f"{r['image_guidance']:g}", (r["clip_sim_dir"], r["clip_sim_image"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("CLIP text-image direction similarity")
    ax.set_ylabel("CLIP image similarity")
    ax.set_title(title or "Guidance trade-off (labels: image guidance scale)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path, dpi=120, tight=True)


def picture_grid(input_image: Image.Image, edits: dict[tuple[float, float], Image.Image], text_guidances: list[float],
                 image_guidances: list[float], path: str | Path, caption: str = "") -> Path:
    """Rows: text guidances; columns: the input, then each image guidance."""
    w, h = input_image.size
    label_h = 14
    canvas = Image.new("RGB", ((len(image_guidances) + 1) * w, label_h + len(text_guidances) * (h + label_h) + label_h), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((2, 1), caption[:160], fill="black")
    for row, t in enumerate(text_guidances):
        y = label_h + row * (h + label_h)
        draw.text((2, y + 1), f"input / text {t:g}", fill="black")
        canvas.paste(input_image, (0, y + label_h))
        for col, i in enumerate(image_guidances, start=1):
            draw.text((col * w + 2, y + 1), f"img {i:g}", fill="black")
            canvas.paste(edits[(t, i)], (col * w, y + label_h))
    import io

    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return atomic_write_bytes(Path(path), buffer.getvalue())
