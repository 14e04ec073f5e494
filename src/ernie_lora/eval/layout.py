"""Layout fidelity: how well an image follows a layout caption of the synthetic world, as separate scores.

The caption is parsed back into a ``Layout`` record (``data.synthetic.parse_caption``); the image is
reduced to 64x64 and median-filtered (noise), and its pixels are classed without regard to hue:
saturated (any colour), ink (dark grey), white, light grey.

- **structure** (0-1, colour-blind): the genre's main element where the record puts it (poster: the
  title band's rows or columns; infographic: the block grid; comic: the panels enclosed by ink; UI: the
  button), times 0.5 + 0.5 x the mean of the secondary checks (subtitle bar; title band; figures and
  the speech bubble; header, text lines and card). A wrong main element scores 0 whatever else is right.
- **colour** (0-1): the share of the saturated pixels that are the theme colour.
- **text** (0-1, optional): OCR recall of the caption's quoted text (``eval.text``); slow, and micro
  ERNIE cannot draw legible letters at 64 px, so the proofs leave it out.
- **score**, the headline: structure x colour (x text when scored): no one of them alone passes.

The element boxes come from ``data.synthetic`` (the renderer draws the same ones). The sanity table
in ``tests/test_layout_score.py`` and ``bench/layout_sanity.py`` pins what the scores mean.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from ..data.synthetic import (
    CARD,
    COLOURS,
    SIDE_BAND_LEFT,
    SIZE,
    UI_HEADER,
    Layout,
    band_box,
    block_boxes,
    bubble_box,
    panel_boxes,
    parse_caption,
    subtitle_box,
    ui_button_box,
    ui_line_boxes,
)
from ..io import open_image
from .prompts import prompt_for, read_metadata_captions
from .text import score_image_text

COLOUR_NAMES = list(COLOURS)
SATURATED_CHROMA = 70  # max - min of RGB above this: a coloured pixel


def hue_degrees(rgb: np.ndarray) -> np.ndarray:
    """HSV hue in degrees; mixing a colour with white, grey or black (blur, noise, anti-aliasing) keeps it."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    top, low = rgb.max(axis=-1), rgb.min(axis=-1)
    span = np.maximum(top - low, 1e-6)
    hue = np.where(top == r, (g - b) / span % 6, np.where(top == g, (b - r) / span + 2, (r - g) / span + 4))
    return hue * 60.0


_THEME_HUES = hue_degrees(np.array([COLOURS[c] for c in COLOUR_NAMES], dtype=np.float32))
MIN_COLOURED = 20  # fewer coloured pixels than this: no colour to judge


@dataclass
class LayoutScore:
    score: float  # the headline: structure x colour (x text when scored)
    structure: float
    colour: float
    text: float | None = None
    checks: dict[str, float] = field(default_factory=dict)
    kind: str = ""


@dataclass
class Classes:
    """Per-pixel classes of a 64x64 image."""

    rgb: np.ndarray
    chroma: np.ndarray
    saturated: np.ndarray
    hue: np.ndarray  # the named colour of nearest hue, per pixel (meaningful where saturated)
    luminance: np.ndarray
    grey: np.ndarray  # low chroma


def classify(image: Image.Image) -> Classes:
    small = image.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR).filter(ImageFilter.MedianFilter(3))
    rgb = np.asarray(small, dtype=np.float32)
    chroma = rgb.max(axis=2) - rgb.min(axis=2)
    distance = np.abs(hue_degrees(rgb)[:, :, None] - _THEME_HUES[None, None])
    hue = np.minimum(distance, 360 - distance).argmin(axis=2)
    # coloured: chromatic and bright (a dark pixel with noise is chromatic, and still ink)
    saturated = (chroma > SATURATED_CHROMA) & (rgb.max(axis=2) > 110)
    return Classes(rgb, chroma, saturated, hue, rgb.mean(axis=2), chroma < 45)


def _ramp(value: float, zero: float, full: float) -> float:
    """0 at or below ``zero``, 1 at or above ``full``, linear between."""
    return float(np.clip((value - zero) / (full - zero), 0.0, 1.0))


def _box_mask(box, shape=(SIZE, SIZE)) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    x0, y0, x1, y1 = box
    mask[max(0, y0):y1 + 1, max(0, x0):x1 + 1] = True
    return mask


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 0.0


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


def _bbox(pixels: np.ndarray) -> tuple[int, int, int, int]:
    return int(pixels[:, 1].min()), int(pixels[:, 0].min()), int(pixels[:, 1].max()), int(pixels[:, 0].max())


def _bbox_mask(pixels: np.ndarray) -> np.ndarray:
    return _box_mask(_bbox(pixels))


def boxes_match(found: list[tuple[int, int, int, int]], expected: list[tuple[int, int, int, int]]) -> float:
    """How well found boxes sit where expected ones are: per expected box, its nearest found box's largest
    edge offset, 1 within 3 px falling to 0 at 8 px; the mean over expected boxes (0 when counts differ)."""
    if len(found) != len(expected) or not expected:
        return 0.0
    scores = []
    for box in expected:
        offset = min(max(abs(a - b) for a, b in zip(box, f, strict=True)) for f in found)
        scores.append(1 - _ramp(offset, 3, 8))
    return float(np.mean(scores))


# -- structure, genre by genre: (main element, {secondary check: value}) --------------------------------


def _poster(layout: Layout, c: Classes) -> tuple[float, dict[str, float]]:
    box = _box_mask(band_box(layout.band))
    side = layout.band in SIDE_BAND_LEFT
    profile = c.saturated.mean(axis=0 if side else 1)  # per column for a side band, per row otherwise
    found = profile > 0.5
    expected = box.any(axis=0 if side else 1)
    outside = float((c.saturated & ~box).sum() / max(1, c.saturated.sum()))
    main = _ramp(_iou(found, expected), 0.5, 0.85) * (1 - _ramp(outside, 0.1, 0.3))
    bar = _box_mask(subtitle_box(layout.band))
    has_bar = c.luminance[bar].mean() < 160 and c.grey[bar].mean() > 0.5
    near = np.zeros_like(bar)  # the bar and the blur around it
    x0, y0, x1, y1 = subtitle_box(layout.band)
    near[max(0, y0 - 3):y1 + 4, max(0, x0 - 3):x1 + 4] = True
    stray_ink = (_dark(c, 110) & ~box & ~near).sum() > 8
    return main, {"subtitle": float(has_bar == layout.subtitle and not stray_ink)}


def _runs(on: np.ndarray, offset: int, bridge: int = 2) -> list[tuple[int, int]]:
    """(first, last) index + offset of each run of True; runs ``bridge`` or fewer apart are one (the blocks'
    gaps are 4 px, a white dot or noise makes shorter dips)."""
    runs: list[list[int]] = []
    for i in np.nonzero(on)[0]:
        if runs and i - runs[-1][1] <= bridge + 1:
            runs[-1][1] = int(i)
        else:
            runs.append([int(i), int(i)])
    return [(a + offset, b + offset) for a, b in runs]


def runs_match(found: list[tuple[int, int]], expected: list[tuple[int, int]]) -> float:
    """1 when the same number of runs start and end within 2 px of where expected, falling to 0 at 6 px."""
    if len(found) != len(expected):
        return 0.0
    return float(np.mean([1 - _ramp(max(abs(a - c), abs(b - d)), 2, 6)
                          for (a, b), (c, d) in zip(found, expected, strict=True)]))


def _infographic(layout: Layout, c: Classes) -> tuple[float, dict[str, float]]:
    # the grid by projections: the rows and the columns of blocks are runs of coloured rows and columns
    # (each averaged over a whole grid line, so a block's white dot, blur and noise do not split it)
    boxes = block_boxes(layout.grid)
    strong = c.saturated.copy()  # blur bleeds colour into the 4-px gaps: a block is what is well inside its colour
    if strong.any():
        strong &= c.chroma > 0.6 * np.percentile(c.chroma[c.saturated], 95)
    area = strong[18:60, 4:60]
    rows = runs_match(_runs(area.mean(axis=1) > 0.2, 18), sorted({(b[1], b[3]) for b in boxes}))
    cols = runs_match(_runs(area.mean(axis=0) > 0.2, 4), sorted({(b[0], b[2]) for b in boxes}))
    filled = float(np.mean([c.saturated[_box_mask(b)].mean() > 0.5 for b in boxes]))
    return rows * cols * filled, {"title band": _ramp(float(c.saturated[1:13].mean()), 0.5, 0.75)}


def _dark(c: Classes, below: float = 190) -> np.ndarray:
    """Dark and uncoloured: grey, or black that noise made a little chromatic (a dark colour mixed with black by
    blur is more chromatic than that, and not ink)."""
    return (c.luminance < below) & (c.grey | ((c.rgb.max(axis=2) < 110) & (c.chroma < 60)))


def run_centres(positions: list[float] | np.ndarray, gap: float = 5) -> list[float]:
    """Centres of runs of positions no more than ``gap`` apart (a gutter's two borders are one line; block or
    panel centres in one row are one row)."""
    groups: list[list[float]] = []
    for p in sorted(positions):
        if groups and p - groups[-1][-1] <= gap:
            groups[-1].append(p)
        else:
            groups.append([p])
    return [sum(g) / len(g) for g in groups]


def _line_positions(dark: np.ndarray, axis: int, skip: list[float]) -> list[float]:
    keep = np.ones(SIZE, dtype=bool)
    keep[:6] = keep[SIZE - 6:] = False
    for line in skip:  # the other direction's bands: blurred gutters would fill every profile
        keep[max(0, round(line) - 4):round(line) + 5] = False
    profile = dark[keep, :].mean(axis=0) if axis == 0 else dark[:, keep].mean(axis=1)
    return run_centres(np.nonzero(profile > 0.6)[0])


def border_lines(dark: np.ndarray) -> tuple[list[float], list[float]]:
    """Where ink lines cross the page: (vertical lines by column, horizontal lines by row), each a column or
    row dark over 60 % of the page's inside, the other direction's lines left out. Averaging ~50 pixels per
    line is what makes it robust to blur and noise; a speech bubble's arc is too short to count."""
    vertical, horizontal = _line_positions(dark, 0, []), _line_positions(dark, 1, [])
    return _line_positions(dark, 0, horizontal), _line_positions(dark, 1, vertical)


def _expected_lines(boxes: list, axis: int) -> list[float]:
    lo, hi = (0, 2) if axis == 0 else (1, 3)  # a border is 2 px: both of its pixels, on both sides of a box
    return run_centres([v for box in boxes for v in (box[lo], box[lo] + 1, box[hi] - 1, box[hi])])


def lines_match(found: list[float], expected: list[float]) -> float:
    """1 when the same number of lines sit within 2 px of where expected, falling to 0 at 6 px."""
    if len(found) != len(expected):
        return 0.0
    return float(np.mean([1 - _ramp(abs(f - e), 2, 6) for f, e in zip(found, expected, strict=True)]))


def _comic(layout: Layout, c: Classes) -> tuple[float, dict[str, float]]:
    boxes = panel_boxes(layout.panels, layout.arrangement) if layout.panels else []
    if not boxes:
        return 0.0, {"figures": 0.0, "bubble": 0.0}
    dark = _dark(c)
    found = border_lines(dark)
    main = min(lines_match(found[axis], _expected_lines(boxes, axis)) for axis in (0, 1))
    figures, bubbles = [], []
    for i, (x0, y0, x1, y1) in enumerate(boxes, start=1):
        inner = _box_mask((x0 + 3, y0 + 3, x1 - 3, y1 - 3))
        figures.append(float(c.saturated[inner].sum() >= 6))
        # a bubble by the mean darkness where one goes (its ring), which blur and noise leave as it is
        bx0, by0, bx1, by1 = bubble_box((x0, y0, x1, y1))
        where = _box_mask((max(x0 + 3, bx0), max(y0 + 3, by0), min(x1 - 3, bx1), min(y1 - 3, by1)))
        found = float((255 - c.luminance[where]).mean()) > 30 if where.any() else False
        bubbles.append(float(found == (layout.bubble == i)))
    return main, {"figures": float(np.mean(figures)), "bubble": float(np.mean(bubbles))}


def _ui(layout: Layout, c: Classes) -> tuple[float, dict[str, float]]:
    lower = c.saturated.copy()
    lower[:40] = False
    blobs = components(lower, min_area=10)
    main = boxes_match([_bbox(max(blobs, key=len))] if blobs else [], [ui_button_box(layout.button)])
    header = _ramp(float(c.saturated[_box_mask(UI_HEADER)].mean()), 0.5, 0.8)
    # the text lines by the height of their grey block (blur merges lines 5 px apart; the block's half-height
    # edges stay put): n lines span 5n - 3 rows
    # the text lines by where their grey block ends (blur merges lines 5 px apart, but the block's edge at
    # half its height stays put): n lines end 5n - 3 rows below the first line's top
    x0, first, x1, _ = ui_line_boxes(1)[0]
    grey_dark = np.where(c.grey, 255 - c.luminance, 0.0)  # the coloured header and button are not lines
    darkness = grey_dark[first:43, x0:x1 + 1].mean(axis=1)
    rows = np.nonzero(darkness > 0.5 * darkness.max())[0] if darkness.max() > 20 else np.array([-99])
    lines = round((rows[-1] + 1 + 3) / 5)
    white = c.grey & (c.luminance > 225)
    ground = c.grey & (c.luminance > 180) & (c.luminance < 225)
    card = _ramp(float(white[_box_mask(CARD)].mean()), 0.35, 0.5) * _ramp(float(ground[:, :6].mean()), 0.5, 0.8)
    return main, {"header": header, "text lines": float(lines == layout.lines), "card": card}


_STRUCTURE = {"poster": _poster, "infographic": _infographic, "comic": _comic, "ui": _ui}


def colour_score(layout: Layout, c: Classes) -> float:
    """The share of coloured pixels that are the theme colour (0 without enough coloured pixels). Only
    pixels with three coloured neighbours of four count: specks of noise have no colour to judge."""
    s = c.saturated
    neighbours = np.zeros(s.shape, dtype=int)
    neighbours[1:] += s[:-1]
    neighbours[:-1] += s[1:]
    neighbours[:, 1:] += s[:, :-1]
    neighbours[:, :-1] += s[:, 1:]
    core = s & (neighbours >= 3)
    coloured = core.sum()
    if coloured < MIN_COLOURED:
        return 0.0
    share = float((core & (c.hue == COLOUR_NAMES.index(layout.theme))).sum() / coloured)
    return _ramp(share, 0.5, 0.85)


def score_image(image: Image.Image, caption: str, text: bool = False) -> LayoutScore | None:
    """The scores of ``image`` for ``caption``; None when the caption is not in the layout language.
    ``text`` also reads the image's text (OCR) and includes it in the headline."""
    layout = parse_caption(caption)
    if layout is None or layout.theme not in COLOURS:
        return None
    c = classify(image)
    main, secondary = _STRUCTURE[layout.kind](layout, c)
    structure = main * (0.5 + 0.5 * float(np.mean(list(secondary.values()))))
    colour = colour_score(layout, c)
    headline = structure * colour
    text_score = None
    if text:
        text_score = score_image_text(image, caption)
        if text_score is not None:
            headline *= text_score
    checks = {"main": main, **secondary}
    return LayoutScore(headline, structure, colour, text_score, checks, layout.kind)


def score_folder(folder: str | Path, text: bool = False) -> list[tuple[Path, str, LayoutScore | None]]:
    """Score every PNG in a folder against its prompt."""
    folder = Path(folder)
    metadata = read_metadata_captions(folder)
    results = []
    for path in sorted(folder.glob("*.png")):
        prompt = prompt_for(path, metadata)
        if prompt is None:
            results.append((path, "", None))
            continue
        results.append((path, prompt, score_image(open_image(path), prompt, text)))
    return results


# -- what the scores mean: the sanity table ------------------------------------------------------------

SANITY_CASES = ("truth", "blur 2", "noise 40", "blank", "white", "noise", "solid colour",
                "right colour, wrong layout", "right layout, wrong colour")


def sanity_images(layout: Layout, seed: int) -> dict[str, Image.Image]:
    """One image per ``SANITY_CASES`` entry for ``layout``: the truth, damaged truths and impostors."""
    from ..data.synthetic import BACKGROUND, BANDS, all_layouts, pretraining_colours, render

    rng = np.random.default_rng(seed)
    truth = render(layout, seed=seed)
    noisy = np.asarray(truth, dtype=np.float32) + rng.normal(0, 40, (SIZE, SIZE, 3))
    others = [o for o in all_layouts(layout.kind, (layout.theme,), BANDS) if o.structure != layout.structure]
    other = others[int(rng.integers(len(others)))]
    other.title = layout.title
    wrong = Layout(**{**layout.__dict__, "theme": next(c for c in pretraining_colours() if c != layout.theme)})
    return {
        "truth": truth,
        "blur 2": truth.filter(ImageFilter.GaussianBlur(2)),
        "noise 40": Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)),
        "blank": Image.new("RGB", (SIZE, SIZE), BACKGROUND),
        "white": Image.new("RGB", (SIZE, SIZE), (255, 255, 255)),
        "noise": Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)),
        "solid colour": Image.new("RGB", (SIZE, SIZE), COLOURS[layout.theme]),
        "right colour, wrong layout": render(other, seed=seed),
        "right layout, wrong colour": render(wrong, seed=seed),
    }


def sanity_table(per_kind: int = 40, seed: int = 0) -> dict[str, dict[str, list[LayoutScore]]]:
    """{kind: {case: scores}} over ``per_kind`` random layouts of each genre (side bands included)."""
    import random

    from ..data.synthetic import BANDS, KINDS, caption, pretraining_colours, sample_layout

    rng = random.Random(seed)
    table: dict[str, dict[str, list[LayoutScore]]] = {}
    for kind in KINDS:
        rows: dict[str, list[LayoutScore]] = {case: [] for case in SANITY_CASES}
        for i in range(per_kind):
            layout = sample_layout(rng, kind, pretraining_colours(), bands=BANDS)
            for case, image in sanity_images(layout, seed * 1000 + i).items():
                rows[case].append(score_image(image, caption(layout)))
        table[kind] = rows
    return table
