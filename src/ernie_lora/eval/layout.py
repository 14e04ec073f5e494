"""Layout fidelity: how well an image follows a layout caption of the synthetic world, from 0 to 1.

The caption is parsed back into a ``Layout`` record (``data.synthetic.parse_caption``); the image is
reduced to 64x64 and every pixel is classified as one of the theme colours, dark ink, white or
neutral. Each genre has four checks, each scored 0-1, and the fidelity is their mean:

- poster: theme colour dominates; a theme band at the asked position; the band spans the width
  with the drawn height; the subtitle bar is there exactly when asked for;
- infographic: theme colour; a title band at the top; the asked number of blocks; their grid shape;
- comic: theme colour; the asked number of bordered panels; their arrangement; a theme figure in
  each panel;
- ui: theme colour; a header bar at the top; a button at the bottom; a white card on a grey ground.

Finding the band, the blocks or the header *in the theme colour* is part of each check: an image in
the wrong colour fails the layout too, as a designer would judge it.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..data.synthetic import BAND_HEIGHT, BAND_TOPS, COLOURS, SIZE, Layout, parse_caption

COLOUR_NAMES = list(COLOURS)
_PALETTE = np.array([COLOURS[c] for c in COLOUR_NAMES], dtype=np.float32)
MAX_COLOUR_DISTANCE = 90.0  # RGB distance within which a pixel counts as a theme colour


@dataclass
class LayoutScore:
    score: float
    checks: dict[str, float] = field(default_factory=dict)
    kind: str = ""


def classify_pixels(image: Image.Image) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(colour index per pixel or -1, dark-ink mask, white mask) of the image at 64x64."""
    rgb = np.asarray(image.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR), dtype=np.float32)
    chroma = rgb.max(axis=2) - rgb.min(axis=2)
    dist = np.linalg.norm(rgb[:, :, None, :] - _PALETTE[None, None], axis=3)
    nearest = dist.argmin(axis=2)
    coloured = (chroma > 60) & (dist.min(axis=2) < MAX_COLOUR_DISTANCE)
    labels = np.where(coloured, nearest, -1)
    luminance = rgb.mean(axis=2)
    dark = (luminance < 150) & (chroma < 60)  # generous: blurred 2px borders of generated comics stay ink
    white = (luminance > 225) & (chroma < 30)
    return labels, dark, white


def components(mask: np.ndarray, min_area: int = 1) -> list[np.ndarray]:
    """4-connected components of a boolean mask, as arrays of (y, x); small ones dropped."""
    seen = np.zeros_like(mask, dtype=bool)
    h, w = mask.shape
    found = []
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if seen[y0, x0]:
            continue
        queue, pixels = deque([(y0, x0)]), []
        seen[y0, x0] = True
        while queue:
            y, x = queue.popleft()
            pixels.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        if len(pixels) >= min_area:
            found.append(np.array(pixels))
    return found


def _ramp(value: float, full: float) -> float:
    return float(max(0.0, min(1.0, value / full)))


def _colour_check(labels: np.ndarray, theme: int) -> float:
    coloured = labels >= 0
    if coloured.sum() < 20:
        return 0.0
    return _ramp(float((labels == theme).sum() / coloured.sum()), 0.8)


def _coverage(mask: np.ndarray, y0: int, y1: int, x0: int, x1: int) -> float:
    return float(mask[y0:y1, x0:x1].mean())


def _score_poster(layout: Layout, labels, dark, white) -> dict[str, float]:
    theme = labels == COLOUR_NAMES.index(layout.theme)
    rows = theme.mean(axis=1)
    band_rows = np.nonzero(rows > 0.5)[0]
    checks = {"colour": _colour_check(labels, COLOUR_NAMES.index(layout.theme))}
    if len(band_rows) == 0:
        return checks | {"band position": 0.0, "band shape": 0.0, "subtitle": 0.0}
    top, bottom = BAND_TOPS[layout.band], BAND_TOPS[layout.band] + BAND_HEIGHT
    centre = (top + bottom - 1) / 2
    found_centre = float(band_rows.mean())
    checks["band position"] = float(np.clip(1 - (abs(found_centre - centre) - 4) / 10, 0, 1))
    height = len(band_rows)
    span = float(rows[band_rows].mean())
    checks["band shape"] = float(np.clip(1 - abs(height - BAND_HEIGHT) / 10, 0, 1)) * _ramp(span, 0.85)
    below = dark[band_rows.max() + 1 : band_rows.max() + 10, 8:56]
    if band_rows.max() + 10 > SIZE:  # a bottom band: the bar may sit on the last rows
        below = dark[SIZE - 8 :, 8:56]
    has_bar = below.size > 0 and (below.mean(axis=1) > 0.5).sum() >= 2
    checks["subtitle"] = 1.0 if has_bar == layout.subtitle else 0.0
    return checks


def _score_infographic(layout: Layout, labels, dark, white) -> dict[str, float]:
    index = COLOUR_NAMES.index(layout.theme)
    theme = labels == index
    checks = {"colour": _colour_check(labels, index)}
    checks["title band"] = _ramp(_coverage(theme, 1, 13, 0, SIZE), 0.75)
    blocks = components(theme[17:, :], min_area=12)
    rows, cols = layout.grid
    checks["block count"] = 1.0 if len(blocks) == rows * cols else 0.0
    if blocks:
        ys = sorted(float(b[:, 0].mean()) for b in blocks)
        xs = sorted(float(b[:, 1].mean()) for b in blocks)
        found_rows = 1 + sum(1 for a, b in zip(ys, ys[1:], strict=False) if b - a > 6)
        found_cols = 1 + sum(1 for a, b in zip(xs, xs[1:], strict=False) if b - a > 6)
        checks["grid shape"] = 1.0 if (found_rows, found_cols) == (rows, cols) else 0.0
    else:
        checks["grid shape"] = 0.0
    return checks


def _panels(dark: np.ndarray) -> list[np.ndarray]:
    """Regions enclosed by dark borders: components of non-ink pixels that do not touch the edge."""
    regions = components(~dark, min_area=30)
    return [r for r in regions if r[:, 0].min() > 0 and r[:, 1].min() > 0 and r[:, 0].max() < SIZE - 1
            and r[:, 1].max() < SIZE - 1]


def _arrangement(panels: list[np.ndarray]) -> str:
    if len(panels) == 1:
        return "single"
    cy = [float(p[:, 0].mean()) for p in panels]
    cx = [float(p[:, 1].mean()) for p in panels]
    spread_y, spread_x = max(cy) - min(cy), max(cx) - min(cx)
    if len(panels) == 4 and spread_x > 15 and spread_y > 15:
        return "in a 2x2 grid"
    if spread_x > spread_y:
        return "side by side" if len(panels) == 2 else "in a row"
    return "stacked"


def _score_comic(layout: Layout, labels, dark, white) -> dict[str, float]:
    index = COLOUR_NAMES.index(layout.theme)
    theme = labels == index
    panels = _panels(dark)
    checks = {"colour": _colour_check(labels, index)}
    checks["panel count"] = 1.0 if len(panels) == layout.panels else 0.0
    checks["arrangement"] = 1.0 if panels and _arrangement(panels) == layout.arrangement else 0.0
    if panels:
        with_figure = sum(1 for p in panels if theme[p[:, 0], p[:, 1]].sum() >= 6)
        checks["figures"] = with_figure / max(len(panels), layout.panels)
    else:
        checks["figures"] = 0.0
    return checks


def _score_ui(layout: Layout, labels, dark, white) -> dict[str, float]:
    index = COLOUR_NAMES.index(layout.theme)
    theme = labels == index
    checks = {"colour": _colour_check(labels, index)}
    checks["header"] = _ramp(_coverage(theme, 5, 17, 10, 54), 0.7)
    checks["button"] = _ramp(_coverage(theme, 46, 54, 24, 40), 0.7)
    grey_ground = ~white[:, :6] & ~theme[:, :6] & ~dark[:, :6]
    checks["card"] = _ramp(_coverage(white, 20, 44, 12, 52), 0.5) * _ramp(float(grey_ground.mean()), 0.8)
    return checks


_SCORERS = {"poster": _score_poster, "infographic": _score_infographic, "comic": _score_comic, "ui": _score_ui}


def score_image(image: Image.Image, caption: str) -> LayoutScore | None:
    """Fidelity of ``image`` to ``caption``; None when the caption is not in the layout language."""
    layout = parse_caption(caption)
    if layout is None or layout.theme not in COLOURS:
        return None
    labels, dark, white = classify_pixels(image)
    checks = _SCORERS[layout.kind](layout, labels, dark, white)
    return LayoutScore(score=float(np.mean(list(checks.values()))), checks=checks, kind=layout.kind)


def prompt_for(path: Path, metadata: dict[str, str]) -> str | None:
    """An image's prompt: its PNG text (what ``generate`` writes), a same-stem .txt, or metadata.jsonl."""
    try:
        with Image.open(path) as im:
            text = getattr(im, "text", {}) or {}
        if text.get("prompt"):
            return text["prompt"]
    except OSError:
        return None
    txt = path.with_suffix(".txt")
    if txt.exists():
        return txt.read_text(encoding="utf-8").strip()
    return metadata.get(path.name)


def read_metadata_captions(folder: Path) -> dict[str, str]:
    """{file name: text} from a folder's metadata.jsonl (empty when there is none)."""
    metadata: dict[str, str] = {}
    meta_file = folder / "metadata.jsonl"
    if meta_file.exists():
        for line in meta_file.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                metadata[row["file_name"]] = row.get("text", "")
    return metadata


def score_folder(folder: str | Path) -> list[tuple[Path, str, LayoutScore | None]]:
    """Score every PNG in a folder against its prompt."""
    folder = Path(folder)
    metadata = read_metadata_captions(folder)
    results = []
    for path in sorted(folder.glob("*.png")):
        prompt = prompt_for(path, metadata)
        if prompt is None:
            results.append((path, "", None))
            continue
        with Image.open(path) as im:
            results.append((path, prompt, score_image(im, prompt)))
    return results
