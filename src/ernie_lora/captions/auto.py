"""Auto-captions: an image -> a structured caption in the layout language, from its text and its layout.

Text (offline OCR, words spaced by their geometry): roles come from size and position: the tallest
line is the title; a clearly smaller line right under it is the subtitle; long lines are body text,
the rest labels. Positions are the cell of the 3x3 grid that holds each box's centre; elements follow
the reading order (top to bottom, then left to right).

Layout (``captions.analysis``): bands, accent bars, blocks and block grids with their colours, image
areas, panels and speech bubbles, the background and the theme (the colour of the largest coloured
region). The kind (poster, infographic, comic, UI) is guessed from those unless given.

A captioning model (``captions.vlm``, ``caption auto --model``) adds what the picture shows and fills what
the analysis left open; quoted text stays the OCR's.

Existing captions are never replaced unless asked to; ``--dry-run`` shows a diff.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..data.dataset import CACHE_DIR_NAME, IMAGE_EXTS
from ..errors import UserError
from ..eval.layout import run_centres
from ..io import atomic_write_text, open_image
from .analysis import HUE_NAMES, Analysis, Region, analyse, grid_position
from .ocr import TextBox, read_text
from .schema import CaptionSchema, Element, render
from .vlm import CaptionModel, merge_description

OCR_MIN_SIDE = 256  # smaller images are enlarged for OCR (a 64 px poster's letters are 8 px tall)
MAX_SHAPES = 6  # the largest shapes named in a caption; more make it long, not better


def _same_line(a: TextBox, b: TextBox) -> bool:
    """Neighbouring words of one line: similar height, centres level, a gap under two letter heights."""
    similar = min(a.height, b.height) >= 0.7 * max(a.height, b.height)
    level = abs(a.centre[1] - b.centre[1]) < 0.3 * max(a.height, b.height)
    return similar and level and b.box[0] - a.box[2] < 2.0 * max(a.height, b.height)


def _lines(boxes: list[TextBox]) -> list[TextBox]:
    """Reading order (rows top to bottom, then left to right), with the word boxes of a line merged:
    OCR often returns "SUMMER" and "SALE" of one title as two boxes."""
    ordered = sorted(boxes, key=lambda b: b.centre[1])
    rows: list[list[TextBox]] = []
    for box in ordered:
        if rows and abs(rows[-1][0].centre[1] - box.centre[1]) < 0.5 * max(rows[-1][0].height, box.height):
            rows[-1].append(box)
        else:
            rows.append([box])
    lines = []
    for row in rows:
        row.sort(key=lambda b: b.centre[0])
        current = row[0]
        for box in row[1:]:
            if _same_line(current, box):
                left, top, right, bottom = current.box
                current = TextBox(f"{current.text} {box.text}", min(current.confidence, box.confidence),
                                  (left, min(top, box.box[1]), box.box[2], max(bottom, box.box[3])))
            else:
                lines.append(current)
                current = box
        lines.append(current)
    return lines


def boxes_to_schema(boxes: list[TextBox], width: int, height: int, kind: str = "other") -> CaptionSchema:
    """The text elements of a caption from OCR boxes: roles by size and position, in reading order."""
    lines = _lines(boxes)
    if not lines:
        return CaptionSchema(kind=kind)
    tallest = max(b.height for b in lines)
    title = next(b for b in lines if b.height == tallest)
    elements = []
    subtitle_taken = False
    for box in lines:
        if box is title:
            role = "title"
        elif (not subtitle_taken and box.centre[1] > title.centre[1] and box.height < 0.8 * tallest
              and box.box[1] - title.box[3] < 2.5 * title.height):
            role, subtitle_taken = "subtitle", True
        elif len(box.text.split()) >= 6:
            role = "body"
        else:
            role = "label"
        size = "large" if box.height >= 0.8 * tallest else ("medium" if box.height >= 0.45 * tallest else "small")
        elements.append(Element(role=role, text=box.text, position=grid_position(*box.centre, width, height),
                                size=size if role not in ("title",) else None))
    return CaptionSchema(kind=kind, elements=elements, reading_order="top to bottom" if len(elements) > 2 else None)


@dataclass
class AutoCaption:
    image: Path
    caption: str
    previous: str | None
    written: bool
    found_text: bool = True


def read_lines(image: Image.Image, read: list[TextBox] | None = None) -> list[TextBox]:
    """The OCR lines of an image (small images enlarged first), boxes in the image's own pixels; ``read``:
    ``read_text`` of the image as it is, when the caller has it already. A doubtful reading (under 0.85) of
    a box over a quarter of the image, or of one or two characters, is a pattern taken for glyphs (a grid
    of blocks read as "品"), not text."""
    factor = max(1.0, OCR_MIN_SIDE / min(image.size))
    if factor == 1:
        boxes = read_text(image) if read is None else read
    else:
        big = image.resize((round(image.width * factor), round(image.height * factor)), Image.Resampling.LANCZOS)
        boxes = [TextBox(b.text, b.confidence, tuple(v / factor for v in b.box)) for b in read_text(big)]
    area = image.width * image.height
    return [b for b in boxes if b.confidence >= 0.85 or (
        (b.box[2] - b.box[0]) * b.height < 0.25 * area and len(b.text.strip()) > 2)]


def block_grids(analysis: Analysis, regions: list[Region] | None = None
                ) -> list[tuple[list[Region], tuple[int, int] | None]]:
    """Blocks of one colour and about one size (within 2x), two or more: (the blocks, their rows x columns
    when they fill a grid)."""
    groups: dict[str, list[Region]] = {}
    for region in analysis.regions if regions is None else regions:
        if region.kind == "block":
            groups.setdefault(region.colour, []).append(region)
    found = []
    for blocks in groups.values():
        biggest = max(b.share for b in blocks)
        alike = [b for b in blocks if b.share >= 0.5 * biggest]
        if len(alike) < 2:
            continue
        rows = len(run_centres([(b.box[1] + b.box[3]) / 2 for b in alike], analysis.height * 0.08))
        cols = len(run_centres([(b.box[0] + b.box[2]) / 2 for b in alike], analysis.width * 0.08))
        found.append((alike, (rows, cols) if rows * cols == len(alike) else None))
    return found


def guess_kind(analysis: Analysis) -> str:
    """poster, infographic, comic or ui from the shapes; ``other`` when nothing says which."""
    panel_area = sum((p.box[2] - p.box[0]) * (p.box[3] - p.box[1]) for p in analysis.panels)
    if analysis.panels and panel_area >= 0.4 * analysis.width * analysis.height:
        return "comic"
    if analysis.background in ("light grey", "grey") and any(
            r.kind == "block" and r.colour == "white" and r.share >= 0.25 for r in analysis.regions):
        return "ui"  # a white card on a grey ground
    if any(grid and colour in HUE_NAMES for (blocks, grid) in block_grids(analysis)
           for colour in {blocks[0].colour}):
        return "infographic"
    if any(r.kind in ("band", "bar") for r in analysis.regions):
        return "poster"
    return "other"


def describe(analysis: Analysis, lines: list[TextBox], kind: str = "auto") -> CaptionSchema:
    """The full caption schema: text elements from the OCR lines, shapes, panels and colours from the analysis."""
    kind = guess_kind(analysis) if kind == "auto" else kind
    schema = boxes_to_schema(lines, analysis.width, analysis.height, kind)
    shapes: list[Element] = []

    def in_panel(region: Region) -> bool:  # a panel's content (figures, ground) is drawing, not layout
        cx, cy = (region.box[0] + region.box[2]) / 2, (region.box[1] + region.box[3]) / 2
        return any(p.box[0] <= cx <= p.box[2] and p.box[1] <= cy <= p.box[3] for p in analysis.panels)

    regions = [r for r in analysis.regions if not in_panel(r)]
    grouped = set()
    for blocks, grid in block_grids(analysis, regions):
        shapes.append(Element("block", colour=blocks[0].colour, count=len(blocks), grid=grid))
        grouped.update(id(b) for b in blocks)
    for region in regions:
        if id(region) in grouped:
            continue
        shapes.append(Element(region.kind, colour=region.colour, position=region.position))
    for number, panel in enumerate(analysis.panels, start=1):
        if panel.bubble:
            shapes.append(Element("bubble", panel=number))
    merged: dict[tuple, Element] = {}  # alike shapes in one place: one phrase with a count
    for shape in shapes:
        key = (shape.role, shape.colour, shape.position, shape.panel, shape.grid)
        if key in merged and shape.count is None:
            merged[key].count = (merged[key].count or 1) + 1
        else:
            merged[key] = shape
    schema.elements += list(merged.values())[:MAX_SHAPES]
    coloured = [r for r in regions if r.colour in HUE_NAMES]
    theme = max(coloured, key=lambda r: r.share).colour if coloured else next(
        (name for name, _ in analysis.palette if name in HUE_NAMES), None)
    schema.theme = theme
    schema.background = analysis.background
    if analysis.panels:
        schema.panels = len(analysis.panels)
        rows, cols = analysis.panel_grid
        if len(analysis.panels) > 1:
            schema.layout = "side by side" if rows == 1 else "stacked" if cols == 1 else f"{rows}x{cols} grid"
    return schema


def auto_caption_image(image: Image.Image, kind: str = "auto", model: CaptionModel | None = None
                       ) -> tuple[str, bool]:
    """(the caption of one image from its text and layout, and a captioning model's description when
    ``model`` is given; whether it found anything to say)."""
    image = image.convert("RGB")
    lines = read_lines(image)
    schema = describe(analyse(image, lines), lines, kind)
    if model is not None:
        schema = merge_description(schema, model.describe(image), kind_given=kind != "auto")
    # a colour alone is no caption worth writing
    return render(schema, "natural"), bool(schema.elements or schema.subject)


def auto_caption_folder(folder: str | Path, kind: str = "auto", overwrite: bool = False, dry_run: bool = False,
                        model: str | None = None) -> list[AutoCaption]:
    """Caption every image of ``folder`` (``model``: a captioning model's hub id or folder, loaded once)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder")
    results = []
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS and CACHE_DIR_NAME not in p.parts)
    captioner = CaptionModel(model) if model and images else None
    for path in images:
        image = open_image(path).convert("RGB")
        caption, found_text = auto_caption_image(image, kind, captioner)
        txt = path.with_suffix(".txt")
        previous = txt.read_text(encoding="utf-8", errors="replace").strip() if txt.exists() else None
        write = found_text and not dry_run and (previous is None or overwrite)
        if write:
            atomic_write_text(txt, caption + "\n")
        results.append(AutoCaption(path, caption, previous, write, found_text))
    return results


def caption_diff(result: AutoCaption) -> str:
    old = [] if result.previous is None else [result.previous]
    return "\n".join(difflib.unified_diff(old, [result.caption], f"{result.image.stem}.txt (now)",
                                          f"{result.image.stem}.txt (auto)", lineterm=""))
