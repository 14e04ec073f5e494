"""What a dataset's images hold before a run trains on them: sizes, aspect ratios and the bucket each image
lands in at the configured resolution, with a contact sheet of what each bucket's crop keeps. The captions'
figures are ``captions.stats``; ``dataset stats`` prints both.
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from ..errors import UserError
from ..io import atomic_write
from .buckets import Bucket, bucket_and_upscale, resize_and_crop
from .dataset import Item, load_rgb

SHEET_PER_BUCKET = 8  # thumbnails per bucket row of the contact sheet
SHEET_HEIGHT = 96  # pixels of each thumbnail's height


@dataclass
class ImageStats:
    items: list[Item]
    resolution: int
    buckets: dict[Bucket, list[Item]]  # in aspect-ratio order
    upscaled: list[Item]  # smaller than their bucket: trained on an enlarged image


def image_stats(items: list[Item], resolution: int, choices: list[Bucket]) -> ImageStats:
    """The usable items of a checked dataset (see ``check_dataset``) at a training resolution and its buckets
    (``make_buckets``)."""
    if not items:
        raise UserError("no usable images (run `ernie-lora dataset check` for the problems)")
    buckets: dict[Bucket, list[Item]] = {}
    upscaled = []
    for item in items:
        bucket, scale = bucket_and_upscale(item.width, item.height, choices)
        buckets.setdefault(bucket, []).append(item)
        if scale > 1.0:
            upscaled.append(item)
    return ImageStats(items, resolution, dict(sorted(buckets.items(), key=lambda kv: kv[0].ratio)), upscaled)


def spread(values: list[float], fmt: str = "{:.0f}") -> str:
    """min / median / max."""
    return " / ".join(fmt.format(v) for v in (min(values), statistics.median(values), max(values)))


def shares(counter: Counter, total: int) -> str:
    """``name count (share)`` for each entry, most common first."""
    return ", ".join(f"{name} {count} ({count / total:.0%})" for name, count in counter.most_common())


def format_image_stats(stats: ImageStats) -> str:
    n = len(stats.items)
    ratios = [i.width / i.height for i in stats.items]
    shapes = Counter("portrait" if r < 0.9 else "landscape" if r > 1.1 else "square" for r in ratios)
    sizes = Counter(f"{i.width}x{i.height}" for i in stats.items).most_common(3)
    lines = [
        f"images          {n}",
        f"width           {spread([i.width for i in stats.items])} (min / median / max)",
        f"height          {spread([i.height for i in stats.items])}",
        f"aspect (w/h)    {spread(ratios, '{:.2f}')}; {shares(shapes, n)}",
        f"common sizes    {', '.join(f'{size} ({count})' for size, count in sizes)}",
        f"{f'buckets at {stats.resolution}':16s}" + ", ".join(f"{b} {len(v)}" for b, v in stats.buckets.items()),
        f"upscaled        {len(stats.upscaled)} image(s) smaller than their bucket"
        + (f" (e.g. {stats.upscaled[0].image.name} {stats.upscaled[0].width}x{stats.upscaled[0].height})"
           if stats.upscaled else ""),
    ]
    return "\n".join(lines) + "\n"


def contact_sheet(stats: ImageStats, per_bucket: int = SHEET_PER_BUCKET, height: int = SHEET_HEIGHT) -> Image.Image:
    """One row per bucket: its size and image count, then up to ``per_bucket`` of its images (spread over
    the bucket's file order) as training crops them, each named under it."""
    label_w, gap, name_h = 150, 4, 14
    widths = {b: max(1, round(height * b.ratio)) for b in stats.buckets}
    sheet_w = label_w + max(min(len(v), per_bucket) * (widths[b] + gap) for b, v in stats.buckets.items()) + gap
    row_h = height + name_h + gap
    sheet = Image.new("RGB", (sheet_w, len(stats.buckets) * row_h + gap), "white")
    draw = ImageDraw.Draw(sheet)
    for row, (bucket, items) in enumerate(stats.buckets.items()):
        y = gap + row * row_h
        draw.text((6, y + 4), f"{bucket}", fill="black")
        draw.text((6, y + 20), f"{len(items)} image{'s' * (len(items) != 1)}", fill="#555")
        shown = items
        if len(items) > per_bucket:
            shown = [items[round(i * (len(items) - 1) / (per_bucket - 1))] for i in range(per_bucket)]
            draw.text((6, y + 36), f"({per_bucket} shown)", fill="#888")
        for col, item in enumerate(shown):
            x, w = label_w + col * (widths[bucket] + gap), widths[bucket]
            crop = resize_and_crop(load_rgb(item.image), bucket)  # what training sees of it
            sheet.paste(crop.resize((w, height), Image.Resampling.LANCZOS), (x, y))
            name = item.image.stem
            room = max(3, w // 6)
            draw.text((x, y + height + 1), name if len(name) <= room else name[:room - 1] + "…", fill="#333")
    return sheet


def save_contact_sheet(stats: ImageStats, path: Path) -> Path:
    sheet = contact_sheet(stats)
    atomic_write(path, lambda tmp: sheet.save(tmp, format="PNG"))
    return path
