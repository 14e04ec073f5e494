"""A toy dataset of simple posters (a coloured title band on a plain background) with layout captions.

Enough for the spine's tests, benchmark and demo to train on real files; the synthetic layout world
with ground-truth layouts and held-out concepts is ``data.synthetic`` (issue "micro ERNIE").
"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (200, 40, 40), "blue": (40, 70, 200), "green": (40, 160, 70), "yellow": (230, 200, 40)}
POSITIONS = ("top", "middle", "bottom")
WORDS = ("SALE", "OPEN", "NEWS", "JAZZ", "EXPO", "MENU")


def toy_poster(colour: str, position: str, word: str, size: tuple[int, int] = (32, 32)) -> Image.Image:
    w, h = size
    image = Image.new("RGB", size, (245, 240, 230))
    draw = ImageDraw.Draw(image)
    band = max(4, h // 4)
    top = {"top": h // 16, "middle": (h - band) // 2, "bottom": h - band - h // 16}[position]
    draw.rectangle((0, top, w - 1, top + band - 1), fill=COLOURS[colour])
    draw.text((2, top), word, fill=(255, 255, 255))
    return image


def toy_caption(colour: str, position: str, word: str) -> str:
    return f'a poster with title "{word}", title band at the {position}, centered layout, {colour} theme'


def write_toy_dataset(folder: str | Path, count: int = 8, size: tuple[int, int] = (32, 32), seed: int = 0) -> Path:
    """Write ``count`` posters with same-stem .txt captions into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(count):
        colour, position, word = rng.choice(list(COLOURS)), rng.choice(POSITIONS), rng.choice(WORDS)
        toy_poster(colour, position, word, size).save(folder / f"poster_{i:03d}.png")
        (folder / f"poster_{i:03d}.txt").write_text(toy_caption(colour, position, word) + "\n", encoding="utf-8")
    return folder
