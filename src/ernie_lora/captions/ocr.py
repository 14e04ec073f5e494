"""Offline OCR: rapidocr-onnxruntime, whose Chinese + English models ship inside its wheel.

Install with ``pip install 'ernie-lora[ocr]'`` (``make setup`` does). Tesseract would need Debian
packages and language data on every machine; rapidocr needs nothing outside PyPI, so it is the
one backend.
"""

from __future__ import annotations

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


def read_text(image: Image.Image, min_confidence: float = 0.5) -> list[TextBox]:
    """Text boxes found in an image, most confident reading of each line."""
    result, _ = _engine()(np.asarray(image.convert("RGB"))[:, :, ::-1])  # rapidocr takes BGR arrays
    boxes = []
    for points, text, confidence in result or []:
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        if float(confidence) >= min_confidence and text.strip():
            boxes.append(TextBox(text.strip(), float(confidence), (min(xs), min(ys), max(xs), max(ys))))
    return boxes
