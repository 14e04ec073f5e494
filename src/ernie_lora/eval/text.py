"""Text-rendering score, LongText-Bench's rule: multiset recall of the prompt's quoted text in the OCR.

Text is NFKC-normalised; English counts lowercase words, Chinese counts characters. The score is
sum over tokens of min(count in prompt, count in OCR) / number of prompt tokens.

One adaptation: rapidocr often drops the space between words on one line ("SUMMERSALE"); an OCR
word that is exactly a concatenation of prompt words counts as those words.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from pathlib import Path

from PIL import Image

from ..captions.ocr import read_text
from ..io import open_image
from .prompts import prompt_for, read_metadata_captions

_QUOTES = re.compile(r'"([^"]+)"|“([^”]+)”|「([^」]+)」|『([^』]+)』')
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


def quoted_text(prompt: str) -> list[str]:
    return [next(g for g in m.groups() if g) for m in _QUOTES.finditer(prompt)]


def without_quotes(prompt: str) -> str:
    """The prompt's own words: every quoted span replaced by a space."""
    return _QUOTES.sub(" ", prompt)


def tokens(text: str) -> list[str]:
    """Lowercase words for English (letters and digits), single characters for Chinese."""
    text = unicodedata.normalize("NFKC", text).lower()
    return re.findall(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]|[a-z0-9]+", text)


def _split_merged(word: str, vocabulary: set[str]) -> list[str] | None:
    """``word`` as a concatenation of vocabulary words (longest first), or None."""
    if word in vocabulary:
        return [word]
    for end in range(len(word) - 1, 0, -1):
        head = word[:end]
        if head in vocabulary:
            rest = _split_merged(word[end:], vocabulary)
            if rest is not None:
                return [head, *rest]
    return None


def text_recall(expected: list[str], ocr_text: str) -> float | None:
    """Multiset recall of the expected texts' tokens in the OCR text; None when nothing is expected."""
    want = Counter(t for text in expected for t in tokens(text))
    if not want:
        return None
    vocabulary = set(want)
    found: Counter[str] = Counter()
    for token in tokens(ocr_text):
        merged = None if _CJK.match(token) else _split_merged(token, vocabulary)
        found.update(merged or [token])
    hit = sum(min(count, found[token]) for token, count in want.items())
    return hit / sum(want.values())


def score_image_text(image: Image.Image, prompt: str) -> float | None:
    """Text score of an image for its prompt's quoted text (None when the prompt quotes nothing)."""
    expected = quoted_text(prompt)
    if not expected:
        return None
    return text_recall(expected, " ".join(box.text for box in read_text(image)))


def score_folder_text(folder: str | Path) -> list[tuple[Path, str, float | None]]:
    folder = Path(folder)
    metadata = read_metadata_captions(folder)
    results = []
    for path in sorted(folder.glob("*.png")):
        prompt = prompt_for(path, metadata) or ""
        results.append((path, prompt, score_image_text(open_image(path), prompt) if prompt else None))
    return results
