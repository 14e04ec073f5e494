"""PNG outputs people look at: the loss curve and image grids."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from .io import atomic_write  # noqa: E402


def save_loss_plot(steps: list[int], losses: list[float], path: str | Path, title: str = "training loss") -> Path:
    """Raw loss and an exponential moving average, as a PNG."""
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, losses, color="#9ab", linewidth=0.8, label="loss")
    if losses:
        ema, smoothed = losses[0], []
        for value in losses:
            ema = 0.9 * ema + 0.1 * value
            smoothed.append(ema)
        ax.plot(steps, smoothed, color="#c33", linewidth=1.6, label="EMA 0.9")
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching loss (MSE on velocity)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return Path(path)


def image_grid(images: list[Image.Image], labels: list[str] | None = None, columns: int | None = None,
               label_height: int = 14, min_side: int = 160) -> Image.Image:
    """Tile images (same size) in a grid with a short label under each; small images are enlarged
    (nearest neighbour) so that a 32px sample and its label stay readable."""
    if not images:
        raise ValueError("no images to tile")
    columns = columns or min(len(images), 4)
    rows = (len(images) + columns - 1) // columns
    w, h = images[0].size
    zoom = max(1, -(-min_side // min(w, h)))
    w, h = w * zoom, h * zoom
    cell_h = h + (label_height if labels else 0)
    grid = Image.new("RGB", (columns * w, rows * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    for i, image in enumerate(images):
        x, y = (i % columns) * w, (i // columns) * cell_h
        grid.paste(image.convert("RGB").resize((w, h), Image.Resampling.NEAREST), (x, y))
        if labels:
            text = labels[i]
            max_chars = max(4, w // 6)
            draw.text((x + 2, y + h + 1), text if len(text) <= max_chars else text[: max_chars - 1] + "…",
                      fill="black")
    return grid


def save_image_grid(images: list[Image.Image], path: str | Path, labels: list[str] | None = None,
                    columns: int | None = None) -> Path:
    grid = image_grid(images, labels, columns)
    atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))
    return Path(path)


def save_metric_plots(steps: list[int], series: dict[str, list[float]], path: str | Path, title: str,
                      columns: int = 3) -> Path:
    """One small panel per metric (raw and EMA 0.9), as a PNG: for recipes that log more than a loss."""
    rows = -(-len(series) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3 * rows), dpi=100, squeeze=False)
    for ax, (name, values) in zip(axes.flat, series.items(), strict=False):
        ax.plot(steps, values, color="#9ab", linewidth=0.8)
        if values:
            ema, smoothed = values[0], []
            for value in values:
                ema = 0.9 * ema + 0.1 * value
                smoothed.append(ema)
            ax.plot(steps, smoothed, color="#c33", linewidth=1.4)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(series):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return Path(path)


def save_stats_chart(stats: list, path: Path) -> Path:
    """Hierarchical sampling per category (``data.sampling.CategoryStats``): share of images vs of draws."""
    total = sum(s.images for s in stats)
    names = [s.name for s in stats]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(stats) + 2), 4.5), dpi=100)
    xs = range(len(stats))
    ax.bar([x - 0.2 for x in xs], [s.images / total for s in stats], width=0.4, color="#9ab", label="share of images")
    ax.bar([x + 0.2 for x in xs], [s.weight for s in stats], width=0.4, color="#c33", label="share of draws")
    for x, s in zip(xs, stats, strict=True):
        ax.annotate(f"aes {s.mean_aesthetic:.1f}", (x, max(s.weight, s.images / total)), ha="center",
                    va="bottom", fontsize=8)
    ax.set_xticks(list(xs), names, rotation=30, ha="right")
    ax.set_ylabel("share")
    ax.set_title("hierarchical sampling: weight = images x mean aesthetic")
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path


def panels_image(panels: list[tuple[str, list[int], list[float], bool]]) -> Image.Image:
    """Small line plots, three to a row, as an image: (title, steps, values, marked) per panel; marked
    panels (validations, a few points) get dots."""
    import math

    columns = min(3, max(1, len(panels)))
    rows = max(1, math.ceil(len(panels) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 2.8 * rows), dpi=100, squeeze=False)
    for ax, (name, steps, values, marked) in zip(axes.flat, panels, strict=False):
        finite = [(s, v) for s, v in zip(steps, values, strict=True) if math.isfinite(v)]
        if finite:
            ax.plot(*zip(*finite, strict=True), color="#3a6ea5" if marked else "#9ab", marker="o" if marked else None,
                    markersize=3, linewidth=1)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.canvas.draw()
    image = Image.frombuffer("RGBA", fig.canvas.get_width_height(), fig.canvas.buffer_rgba()).convert("RGB")
    plt.close(fig)
    return image
