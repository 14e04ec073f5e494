"""Layout analysis of an image, on the CPU and without a model: what a caption should say besides the text.

The image is reduced to at most ``WORK_SIDE`` pixels a side and every pixel named: one of the theme hues
of the layout language (``COLOURS``: red ... pink) when it is clearly coloured, else white, light grey,
grey or black by brightness. From those names:

- **background**: the commonest name on the image's border;
- **palette**: the names with their pixel shares (at least ``MIN_SHARE``), largest first;
- **regions**: solid areas of one colour (connected, filling most of their box), not text: a *band*
  spans (nearly) the whole width or height; a thin one that does not is an accent *bar*; others are
  *blocks* (several of one colour on a grid: a block grid). Solid areas under OCR text boxes are letters,
  not regions;
- **panels**: areas enclosed by dark lines (comic panels, framed boxes), with their grid (rows x
  columns); an enclosed area inside a panel is a speech bubble;
- **image areas**: busy regions (many colour edges, no text): a photo or an illustration.

``describe`` turns an analysis and the OCR lines into a ``CaptionSchema`` (``captions.auto``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageFilter

from ..data.synthetic import COLOURS
from ..eval.layout import hue_degrees, run_centres
from .ocr import TextBox

WORK_SIDE = 256  # every image is analysed at this size (longest side)
MIN_SHARE = 0.03  # a palette colour covers at least this share of the image
MIN_REGION = 0.004  # a region covers at least this share of the image
HUE_NAMES = list(COLOURS)
NEUTRALS = ("white", "light grey", "grey", "black")
NAMES = (*HUE_NAMES, *NEUTRALS)


_HUES = hue_degrees(np.array([COLOURS[c] for c in HUE_NAMES], dtype=np.float32))


def name_pixels(rgb: np.ndarray) -> np.ndarray:
    """Per pixel, the index into ``NAMES`` of its colour name."""
    rgb = rgb.astype(np.float32)
    top, chroma = rgb.max(axis=-1), rgb.max(axis=-1) - rgb.min(axis=-1)
    distance = np.abs(hue_degrees(rgb)[..., None] - _HUES)
    hue = np.minimum(distance, 360 - distance).argmin(axis=-1)
    luminance = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    neutral = np.select([luminance > 215, luminance > 165, luminance > 85], [0, 1, 2], 3) + len(HUE_NAMES)
    coloured = (chroma > 60) & (top > 100)
    return np.where(coloured, hue, neutral)


@dataclass
class Region:
    kind: str  # band | bar | block | image
    colour: str | None  # a name from NAMES (None for an image area)
    box: tuple[int, int, int, int]  # left, top, right, bottom in the image's pixels
    share: float  # of the image's area
    position: str  # band: top | middle | bottom | left | right; others: a 9-cell grid position


@dataclass
class Panel:
    box: tuple[int, int, int, int]
    bubble: bool = False


@dataclass
class Analysis:
    width: int
    height: int
    background: str
    palette: list[tuple[str, float]]
    regions: list[Region] = field(default_factory=list)
    panels: list[Panel] = field(default_factory=list)

    @property
    def panel_grid(self) -> tuple[int, int] | None:
        if not self.panels:
            return None
        return (len(run_centres([(p.box[1] + p.box[3]) / 2 for p in self.panels], self.height * 0.1)),
                len(run_centres([(p.box[0] + p.box[2]) / 2 for p in self.panels], self.width * 0.1)))

    def largest(self, count: int = 2) -> list[str]:
        """The colours of the ``count`` largest areas: the background, then regions by size."""
        names = [self.background]
        for region in sorted(self.regions, key=lambda r: -r.share):
            if region.colour and region.colour not in names:
                names.append(region.colour)
        for name, _ in self.palette:
            if name not in names:
                names.append(name)
        return names[:count]


def grid_position(x: float, y: float, width: int, height: int) -> str:
    """The 9-cell grid position of a point: top-left ... center ... bottom-right."""
    row = ("top", "", "bottom")[min(2, int(3 * y / height))]
    col = ("left", "", "right")[min(2, int(3 * x / width))]
    if row and col:
        return f"{row}-{col}"
    return row or col or "center"


def analyse(image: Image.Image, text: list[TextBox] | None = None) -> Analysis:
    """The layout of ``image``; ``text`` (OCR boxes in the image's pixels) marks what is lettering."""
    from scipy import ndimage  # deferred: image analysis only

    image = image.convert("RGB")
    width, height = image.size
    # one working scale for every image: gaps and thin strokes are then the same number of pixels
    scale = WORK_SIDE / max(width, height)
    small = image.resize((max(8, round(width * scale)), max(8, round(height * scale))),
                         Image.Resampling.BOX if scale < 1 else Image.Resampling.NEAREST)
    rgb = np.asarray(small.filter(ImageFilter.MedianFilter(3)), dtype=np.float32)
    h, w = rgb.shape[:2]
    names = name_pixels(rgb)
    sx, sy = width / w, height / h

    frame = max(1, round(0.02 * min(h, w)))
    border = np.concatenate([names[:frame].ravel(), names[-frame:].ravel(), names[:, :frame].ravel(),
                             names[:, -frame:].ravel()])
    background = NAMES[int(np.bincount(border, minlength=len(NAMES)).argmax())]
    counts = np.bincount(names.ravel(), minlength=len(NAMES)) / names.size
    palette = [(NAMES[i], round(float(counts[i]), 3)) for i in np.argsort(-counts) if counts[i] >= MIN_SHARE]

    lettering = np.zeros((h, w), dtype=bool)
    for box in text or []:
        x0, y0, x1, y1 = box.box
        lettering[max(0, int(y0 / sy) - 1):int(y1 / sy) + 2, max(0, int(x0 / sx) - 1):int(x1 / sx) + 2] = True

    def to_image(box: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
        return round(box[0] * sx), round(box[1] * sy), round((box[2] + 1) * sx) - 1, round((box[3] + 1) * sy) - 1

    regions: list[Region] = []
    background_index = NAMES.index(background)
    for index in range(len(NAMES)):
        if index == background_index:
            continue
        mask = names == index
        if mask.sum() < MIN_REGION * h * w:
            continue
        # letters inside a band are holes in it; closing fills them so the band stays one region
        labels, count = ndimage.label(ndimage.binary_closing(mask, np.ones((3, 3)), iterations=2) & ~(
            lettering & ~mask))
        for number, found in enumerate(ndimage.find_objects(labels), start=1):
            if found is None:
                continue
            ys, xs = found
            part = labels[found] == number
            area = int(part.sum())
            bw, bh = xs.stop - xs.start, ys.stop - ys.start
            if area < MIN_REGION * h * w or area < 0.7 * bw * bh:
                continue  # small, or not solid (outlines, figures, letters)
            if lettering[found][part].mean() > 0.5:
                continue  # mostly under text: lettering, not a shape
            box = (xs.start, ys.start, xs.stop - 1, ys.stop - 1)
            regions.append(_region(NAMES[index], box, to_image(box), area / (h * w), w, h, width, height))

    dark = names == NAMES.index("black")
    panels = _panels(dark)
    regions += _image_areas(rgb, names, lettering, panels, w, h, to_image, width, height)
    return Analysis(width, height, background, palette, sorted(regions, key=lambda r: -r.share),
                    [Panel(to_image(p.box), p.bubble) for p in panels])


def _region(colour: str, box, image_box, share: float, w: int, h: int, width: int, height: int) -> Region:
    x0, y0, x1, y1 = box
    bw, bh = x1 - x0 + 1, y1 - y0 + 1
    cx, cy = (image_box[0] + image_box[2]) / 2, (image_box[1] + image_box[3]) / 2
    if bw >= 0.85 * w and bh <= 0.45 * h:
        third = ("top", "middle", "bottom")[min(2, int(3 * cy / height))]
        return Region("band", colour, image_box, share, third)
    if bh >= 0.85 * h and bw <= 0.45 * w:
        side = "left" if cx < width / 2 else "right"
        return Region("band", colour, image_box, share, side if abs(cx - width / 2) > 0.1 * width else "middle")
    thin = min(bw, bh) <= 0.08 * min(w, h) and max(bw, bh) >= 4 * min(bw, bh)
    return Region("bar" if thin else "block", colour, image_box, share, grid_position(cx, cy, width, height))


def _panels(dark: np.ndarray) -> list[Panel]:
    """Areas enclosed by dark lines, not touching the image's edge, filling their box; nested ones are
    speech bubbles (reported on their panel)."""
    from scipy import ndimage

    h, w = dark.shape
    lines = dark  # not minus lettering: an OCR misreading over a panel must not open its border
    if not 0.01 * h * w <= lines.sum() <= 0.35 * h * w:
        return []  # no lines, or a dark page (its light shapes are not panels)
    labels, _ = ndimage.label(~ndimage.binary_dilation(lines))
    holes = []
    for number, found in enumerate(ndimage.find_objects(labels), start=1):
        if found is None:
            continue
        ys, xs = found
        if ys.start == 0 or xs.start == 0 or ys.stop == h or xs.stop == w:
            continue  # open to the edge: the page around the panels
        area = int((labels[found] == number).sum())
        bw, bh = xs.stop - xs.start, ys.stop - ys.start
        if area >= 0.01 * h * w:
            holes.append(((xs.start, ys.start, xs.stop - 1, ys.stop - 1), area / (bw * bh)))
    panels = []
    for box, fill in holes:
        inside = [b for b, _ in holes if b != box and b[0] >= box[0] and b[1] >= box[1] and b[2] <= box[2]
                  and b[3] <= box[3]]
        outside = any(b != box and b[0] <= box[0] and b[1] <= box[1] and b[2] >= box[2] and b[3] >= box[3]
                      for b, _ in holes)
        if not outside and fill >= 0.6 and (box[2] - box[0]) * (box[3] - box[1]) >= 0.04 * h * w:
            panels.append(Panel(box, bubble=bool(inside)))
    return sorted(panels, key=lambda p: (round(p.box[1] / (0.1 * h)), p.box[0]))


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """The share of box ``a`` that box ``b`` covers."""
    w = min(a[2], b[2]) - max(a[0], b[0]) + 1
    h = min(a[3], b[3]) - max(a[1], b[1]) + 1
    return max(0, w) * max(0, h) / ((a[2] - a[0] + 1) * (a[3] - a[1] + 1))


def _image_areas(rgb: np.ndarray, names: np.ndarray, lettering: np.ndarray, panels: list[Panel], w: int, h: int,
                 to_image, width: int, height: int) -> list[Region]:
    """Busy areas: cells of 1/16 of the side where colour names change often, away from text."""
    from scipy import ndimage

    edges = (names[1:, :-1] != names[:-1, :-1]) | (names[:-1, 1:] != names[:-1, :-1])
    edges &= ~lettering[:-1, :-1]
    cell = max(4, min(h, w) // 16)
    rows, cols = (h - 1) // cell, (w - 1) // cell
    if rows < 2 or cols < 2:
        return []
    density = edges[:rows * cell, :cols * cell].reshape(rows, cell, cols, cell).mean(axis=(1, 3))
    distinct = np.array([[len(np.unique(names[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell]))
                          for c in range(cols)] for r in range(rows)])
    busy = (density > 0.12) & (distinct >= 3)
    labels, _ = ndimage.label(busy)
    areas = []
    for number, found in enumerate(ndimage.find_objects(labels), start=1):
        if found is None or (labels[found] == number).sum() < 0.06 * rows * cols:
            continue
        ys, xs = found
        box = (xs.start * cell, ys.start * cell, xs.stop * cell - 1, ys.stop * cell - 1)
        if sum(_overlap(box, panel.box) for panel in panels) > 0.3:  # panels do not overlap each other
            continue  # panels' drawings: the panels say them
        image_box = to_image(box)
        cx, cy = (image_box[0] + image_box[2]) / 2, (image_box[1] + image_box[3]) / 2
        share = (labels[found] == number).sum() / (rows * cols)
        areas.append(Region("image", None, image_box, round(float(share), 3), grid_position(cx, cy, width, height)))
    return areas
