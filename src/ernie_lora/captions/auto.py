"""Auto-captions: OCR text boxes -> a structured caption in the layout language.

Roles come from size and position: the tallest line is the title; a clearly smaller line right
under it is the subtitle; long lines are body text, the rest labels. Positions are the cell of the
3x3 grid that holds each box's centre; elements follow the reading order (top to bottom, then left
to right). Existing captions are never replaced unless asked to; ``--dry-run`` shows a diff.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..data.dataset import CACHE_DIR_NAME, IMAGE_EXTS
from ..errors import UserError
from ..io import atomic_write_text, open_image
from .ocr import TextBox, read_text
from .schema import CaptionSchema, Element, render

_ROWS = ("top", "", "bottom")
_COLS = ("left", "", "right")


def grid_position(x: float, y: float, width: int, height: int) -> str:
    """The 9-cell grid position of a point: top-left ... center ... bottom-right."""
    row = _ROWS[min(2, int(3 * y / height))]
    col = _COLS[min(2, int(3 * x / width))]
    if row and col:
        return f"{row}-{col}"
    return row or col or "center"


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


def vlm_description(image: Image.Image, model_id: str) -> str:
    """A free-text description from a transformers image-to-text model the user has the weights of."""
    try:
        from transformers import pipeline  # optional: only --vlm runs a captioning model

        captioner = pipeline("image-to-text", model=model_id)
        return str(captioner(image)[0]["generated_text"]).strip()
    except Exception as exc:  # any loading or model error is the user's setup, reported in one line
        raise UserError(f"--vlm {model_id}: cannot run it ({type(exc).__name__}: {exc})") from None


def auto_caption_image(image: Image.Image, kind: str = "other") -> tuple[str, bool]:
    """(the caption of one image from its OCR text, whether any text was found)."""
    image = image.convert("RGB")
    schema = boxes_to_schema(read_text(image), image.width, image.height, kind)
    return render(schema, "natural"), bool(schema.elements)


def auto_caption_folder(folder: str | Path, kind: str = "other", overwrite: bool = False, dry_run: bool = False,
                        vlm: str | None = None) -> list[AutoCaption]:
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder")
    results = []
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS and CACHE_DIR_NAME not in p.parts)
    for path in images:
        image = open_image(path).convert("RGB")
        caption, found_text = auto_caption_image(image, kind)
        if vlm:
            caption = f"{caption}; {vlm_description(image, vlm)}"
        found_text = found_text or bool(vlm)  # a bare "a poster" is no caption worth writing
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
