"""Hierarchical sampling (the ERNIE-Image report): each category is drawn with weight = image count x
mean aesthetic score, then an image uniformly within it, so a large but mediocre category does not
crowd out a small excellent one.

- The aesthetic score of an image is its level (1-10) from ``aesthetic.jsonl`` (``rank scores``);
  images without a label count at the labelled images' mean (all 1 when there is no file).
- ``depth`` cuts category paths to their first levels (``Graphic Design/Poster`` -> ``Graphic Design``
  at depth 1): weights at the level of the hierarchy the user cares about.
- ``temperature`` T: weights become weight^(1/T): T > 1 flattens towards uniform over categories,
  T < 1 sharpens towards the best; T = 1 is the report's rule.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..io import read_text_file
from .categories import ImageEntry, list_images


@dataclass
class CategoryStats:
    name: str
    images: int
    mean_aesthetic: float
    weight: float  # share of draws, sums to 1 over categories

    @property
    def per_image(self) -> float:
        return self.weight / self.images


def category_of(entry: ImageEntry, depth: int | None) -> str:
    parts = entry.category.split("/")
    return "/".join(parts[:depth]) if depth else entry.category


def category_stats(entries: list[ImageEntry], aesthetic: dict[str, float] | None = None,
                   temperature: float = 1.0, depth: int | None = None) -> list[CategoryStats]:
    if temperature <= 0:
        raise UserError(f"temperature {temperature}: must be > 0")
    if not entries:
        raise UserError("no images to sample from")
    aesthetic = aesthetic or {}
    known = [aesthetic[e.path] for e in entries if e.path in aesthetic]
    fallback = sum(known) / len(known) if known else 1.0
    groups: dict[str, list[float]] = {}
    for e in entries:
        groups.setdefault(category_of(e, depth), []).append(aesthetic.get(e.path, fallback))
    raw = {}
    for name, scores in groups.items():
        mean = sum(scores) / len(scores)
        if mean <= 0:
            raise UserError(f"category {name}: mean aesthetic {mean:g}; use levels (1-10), not log-strengths")
        raw[name] = (len(scores) * mean) ** (1.0 / temperature)
    total = sum(raw.values())
    stats = [CategoryStats(n, len(groups[n]), sum(groups[n]) / len(groups[n]), raw[n] / total) for n in raw]
    return sorted(stats, key=lambda s: -s.weight)


def sample_weights(entries: list[ImageEntry], aesthetic: dict[str, float] | None = None,
                   temperature: float = 1.0, depth: int | None = None) -> list[float]:
    """Per-image draw probability (sums to 1), in the order of ``entries``."""
    by_name = {s.name: s for s in category_stats(entries, aesthetic, temperature, depth)}
    return [by_name[category_of(e, depth)].per_image for e in entries]


def sampling_weights(by: str, root: Path, images: list[Path], aesthetic: str | None, temperature: float,
                     depth: int | None) -> list[float] | None:
    """Per-image draw probabilities for a dataset's images (None: uniform), as ``data.sampling`` asks."""
    if by == "uniform":
        return None
    entries = {e.path: e for e in list_images(root, outside_links=True)}
    ordered = [entries[image.relative_to(root).as_posix()] for image in images]
    return sample_weights(ordered, aesthetic_levels(aesthetic) if aesthetic else None, temperature, depth)


def aesthetic_levels(path: str | Path) -> dict[str, float]:
    return {name: float(row.get("level", row["score"])) for name, row in read_aesthetic_labels(path).items()}


def read_aesthetic_labels(path: str | Path) -> dict[str, dict]:
    """``aesthetic.jsonl`` as {file_name: row}; a bad line is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such aesthetic label file (write one with `ernie-lora rank scores DB`)")
    rows = {}
    for lineno, line in enumerate(read_text_file(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            rows[str(row["file_name"])] = row
            float(row["score"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{path}:{lineno}: expected {{\"file_name\", \"score\", ...}} ({exc})") from None
    return rows


def format_stats(stats: list[CategoryStats]) -> str:
    total = sum(s.images for s in stats)
    width = max(12, *(len(s.name) for s in stats)) + 2
    lines = [f"{'category':<{width}}{'images':>8}{'share':>8}{'mean aes':>10}{'draws':>8}{'x uniform':>11}"]
    for s in stats:
        lines.append(f"{s.name:<{width}}{s.images:>8}{s.images / total:>8.1%}{s.mean_aesthetic:>10.2f}"
                     f"{s.weight:>8.1%}{s.per_image * total:>11.2f}")
    return "\n".join(lines) + "\n"
