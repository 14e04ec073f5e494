"""Offline OCR: rapidocr-onnxruntime, whose Chinese + English models ship inside its wheel.

Install with ``pip install 'ernie-lora[ocr]'`` (``make setup`` does). Tesseract would need Debian
packages and language data on every machine; rapidocr needs nothing outside PyPI, so it is the
one backend.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from ..errors import UserError


@dataclass
class TextBox:
    text: str
    confidence: float
    box: tuple[float, float, float, float]  # left, top, right, bottom in pixels

    @property
    def height(self) -> float:
        return self.box[3] - self.box[1]

    @property
    def centre(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2


@lru_cache(maxsize=1)
def _engine():
    try:
        from rapidocr_onnxruntime import RapidOCR  # optional extra [ocr]: loaded on first use
    except ImportError:
        raise UserError("OCR needs rapidocr-onnxruntime: pip install 'ernie-lora[ocr]' (make setup installs it)"
                        ) from None
    return RapidOCR()


@dataclass(frozen=True)
class SpaceRule:
    """How wide a run of ink-free columns in a text line must be to count as a space: wider than
    ``line_share`` of the line's height and than ``letter_factor`` times the line's usual gap between
    letters (bold capitals stand apart). Tuned on designed posters at 256 and 512 px (bench/ocr_rates.py):
    an 11 px subtitle's spaces are 4 px, its gaps between letters 1-2 px."""

    line_share: float = 0.2
    letter_factor: float = 2.0


def read_text(image: Image.Image, min_confidence: float = 0.5, spaces: SpaceRule = SpaceRule()) -> list[TextBox]:
    """Text boxes found in an image, most confident reading of each line, words spaced by their geometry.

    The recogniser often drops the space between two words ("everyTuesday"); where the ink of the line
    has a gap as wide as a space (``spaces``) at the boundary between two letters, a space is put back.
    """
    rgb = np.asarray(image.convert("RGB"))
    result, _ = _engine()(rgb[:, :, ::-1], return_word_box=True)  # rapidocr takes BGR arrays
    boxes = []
    for points, text, confidence, *letters in result or []:
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        if float(confidence) >= min_confidence and text.strip():
            box = (min(xs), min(ys), max(xs), max(ys))
            if letters and len(letters[0]) == len(text):
                text = space_words(text, [_x_span(q) for q in letters[0]], _ink_gaps(rgb, box, spaces))
            boxes.append(TextBox(text.strip(), float(confidence), box))
    return boxes


_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef]")


def _x_span(quad) -> tuple[float, float]:
    xs = [p[0] for p in quad]
    return min(xs), max(xs)


def _ink_gaps(rgb: np.ndarray, box: tuple[float, float, float, float], spaces: SpaceRule) -> list[tuple[float, float]]:
    """Runs of ink-free columns inside a text line wide enough to be a space (``spaces``), as (left, right) in
    image pixels. The line's background is its commonest colour, ink what differs from it."""
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    crop = rgb[max(0, y0):y1 + 1, max(0, x0):x1 + 1].astype(np.int16)
    if crop.size == 0:
        return []
    flat = crop.reshape(-1, 3)
    colours, counts = np.unique(flat // 16, axis=0, return_counts=True)
    ground = colours[counts.argmax()] * 16 + 8
    ink = (np.abs(crop - ground).max(axis=2) > 60).any(axis=0)
    if not ink.any():
        return []
    first, last = int(np.argmax(ink)), len(ink) - 1 - int(np.argmax(ink[::-1]))
    runs, start = [], None
    for x in range(first, last + 1):
        if not ink[x] and start is None:
            start = x
        elif ink[x] and start is not None:
            runs.append((start, x - 1))
            start = None
    widths = sorted(b - a + 1 for a, b in runs)
    usual = widths[len(widths) // 2] if len(widths) >= 3 else 0
    wide = max(spaces.line_share * (y1 - y0), spaces.letter_factor * usual)
    return [(x0 + a, x0 + b) for a, b in runs if b - a + 1 >= wide]


def space_words(text: str, letters: list[tuple[float, float]], gaps: list[tuple[float, float]]) -> str:
    """``text`` with a space put back at each ``gap`` (ink-free columns) that falls between two letters
    (their x spans, one per character) with no space between them; Chinese and Japanese are left as is."""
    out = list(text)
    inserts = []
    for left, right in gaps:
        centre = (left + right) / 2
        best, distance = None, None
        for i in range(len(text) - 1):
            a, b = text[i], text[i + 1]
            if a.isspace() or b.isspace() or _CJK.match(a) or _CJK.match(b):
                continue
            boundary = (letters[i][1] + letters[i + 1][0]) / 2
            d = abs(boundary - centre)
            if distance is None or d < distance:
                best, distance = i, d
        if best is not None and distance <= max(right - left, 1) and not any(
                text[j].isspace() for j in (best, best + 1)):
            inserts.append(best + 1)
    for index in sorted(set(inserts), reverse=True):
        out.insert(index, " ")
    return "".join(out)
