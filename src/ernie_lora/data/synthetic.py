"""The synthetic layout world: structured images with layout captions and ground-truth layout records.

Four genres from the seed documents, drawn at 64x64 (what the micro model and a 2-core CPU afford):

- ``poster``: a full-width title band in the theme colour at the top, middle or bottom, the title
  in it, optionally a dark subtitle bar just below;
- ``infographic``: a title band at the top and a grid of theme-coloured blocks (2 to 6 blocks);
- ``comic``: 1 to 4 panels with black borders, a theme-coloured figure in each panel;
- ``ui``: a white card with a theme-coloured header bar at the top and a button at the bottom.

Every image is fully determined by its ``Layout`` record (plus a seed for small jitter), and the
caption is rendered from the same record, so scoring a generated image against its caption
(``eval.layout``) compares like with like. ``HELD_OUT`` concepts never appear in the data the micro
model was pretrained on: a LoRA has something new to learn.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ..errors import UserError
from ..io import atomic_write_text

SIZE = 64
KINDS = ("poster", "infographic", "comic", "ui")
# Theme colours as drawn. Saturated and far apart, so a colour is recognisable in a 64px image.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (210, 40, 40),
    "blue": (40, 80, 210),
    "green": (30, 160, 60),
    "yellow": (235, 200, 30),
    "orange": (240, 120, 20),
    "teal": (20, 160, 160),
    "purple": (140, 50, 190),
    "pink": (240, 100, 180),
}
POSITIONS = ("top", "middle", "bottom")
GRIDS = ((1, 2), (2, 1), (2, 2), (1, 3), (3, 1), (2, 3), (3, 2))
TITLES = ("SALE", "OPEN", "NEWS", "JAZZ", "EXPO", "MENU", "TECH", "FOOD", "MAP", "PLAN", "DATA", "SHOP")
# Held out of the micro model's pretraining: a LoRA on them has something to learn.
HELD_OUT = {"colours": ("purple", "pink")}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
PANEL_ARRANGEMENTS = {1: ("single",), 2: ("side by side", "stacked"), 3: ("in a row", "stacked"), 4: ("in a 2x2 grid",)}


@dataclass
class Layout:
    """The ground truth of one image: what its caption says and what the scorer checks."""

    kind: str
    theme: str
    title: str = ""
    band: str = ""  # poster: top | middle | bottom
    subtitle: bool = False  # poster
    grid: tuple[int, int] = (0, 0)  # infographic: rows, columns
    panels: int = 0  # comic
    arrangement: str = ""  # comic: single | side by side | stacked | in a row | in a 2x2 grid
    extras: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> Layout:
        data = dict(data)
        data["grid"] = tuple(data.get("grid", (0, 0)))
        return cls(**data)


# -- captions --------------------------------------------------------------------------------------


def caption(layout: Layout) -> str:
    """The layout language rendering of a record (the natural style)."""
    t = layout.theme
    if layout.kind == "poster":
        sub = ", subtitle below" if layout.subtitle else ""
        return f'a poster with title "{layout.title}", title band at the {layout.band}{sub}, centered layout, {t} theme'
    if layout.kind == "infographic":
        rows, cols = layout.grid
        return (f'an infographic with {NUMBER_WORDS[rows * cols]} blocks in a {rows}x{cols} grid, '
                f'title "{layout.title}" at the top, {t} theme')
    if layout.kind == "comic":
        n = layout.panels
        panels = "a single panel" if n == 1 else f"{NUMBER_WORDS[n]} panels {layout.arrangement}"
        return f"a comic page with {panels}, black borders, {t} theme"
    if layout.kind == "ui":
        return f'a UI card with header "{layout.title}" at the top, a button at the bottom, {t} theme'
    raise ValueError(f"unknown kind {layout.kind!r}")


_WORD_NUMBERS = {v: k for k, v in NUMBER_WORDS.items()}


def parse_caption(text: str) -> Layout | None:
    """What a caption of this language asks for; None when it is not one of ours."""
    text = text.strip().lower()
    colour = re.search(r"\b(" + "|".join(COLOURS) + r") theme\b", text)
    title = re.search(r'"([^"]*)"', text)
    theme = colour.group(1) if colour else ""
    word = title.group(1).upper() if title else ""
    if text.startswith("a poster"):
        band = re.search(r"title band at the (top|middle|bottom)", text)
        return Layout("poster", theme, word, band=band.group(1) if band else "", subtitle="subtitle below" in text)
    if text.startswith("an infographic"):
        grid = re.search(r"(\d)x(\d) grid", text)
        return Layout("infographic", theme, word, grid=(int(grid.group(1)), int(grid.group(2))) if grid else (0, 0))
    if text.startswith("a comic"):
        if "a single panel" in text:
            return Layout("comic", theme, panels=1, arrangement="single")
        m = re.search(r"\b(two|three|four) panels (side by side|stacked|in a row|in a 2x2 grid)", text)
        if not m:
            return Layout("comic", theme)
        return Layout("comic", theme, panels=_WORD_NUMBERS[m.group(1)], arrangement=m.group(2))
    if text.startswith("a ui card"):
        return Layout("ui", theme, word)
    return None


# -- sampling layouts ------------------------------------------------------------------------------


def sample_layout(rng: random.Random, kind: str | None = None, colours: tuple[str, ...] | None = None) -> Layout:
    """A random layout; ``colours`` limits the themes (default: the pretraining colours)."""
    kind = kind or rng.choice(KINDS)
    palette = colours or pretraining_colours()
    theme, title = rng.choice(palette), rng.choice(TITLES)
    if kind == "poster":
        return Layout(kind, theme, title, band=rng.choice(POSITIONS), subtitle=rng.random() < 0.5)
    if kind == "infographic":
        return Layout(kind, theme, title, grid=rng.choice(GRIDS))
    if kind == "comic":
        n = rng.randint(1, 4)
        return Layout(kind, theme, panels=n, arrangement=rng.choice(PANEL_ARRANGEMENTS[n]))
    if kind == "ui":
        return Layout(kind, theme, title)
    raise ValueError(f"unknown kind {kind!r}; choose from {', '.join(KINDS)}")


def pretraining_colours() -> tuple[str, ...]:
    return tuple(c for c in COLOURS if c not in HELD_OUT["colours"])


# -- drawing ---------------------------------------------------------------------------------------

BACKGROUND = (242, 238, 228)
INK = (30, 30, 34)


def _jitter(colour: tuple[int, int, int], rng: random.Random, amount: int = 12) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in colour)


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)  # Pillow's bundled font: the same on every machine


def _centered_text(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], text: str, size: int) -> None:
    font = _font(size)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x = (box[0] + box[2] - (right - left)) // 2 - left
    y = (box[1] + box[3] - (bottom - top)) // 2 - top
    draw.text((x, y), text, fill=(255, 255, 255), font=font)


BAND_HEIGHT = 16
BAND_TOPS = {"top": 4, "middle": 24, "bottom": 44}  # the subtitle bar (4px) sits 3px under the band


def render(layout: Layout, seed: int = 0, size: int = SIZE, rgb: tuple[int, int, int] | None = None) -> Image.Image:
    """Draw a layout at 64x64 (then resized to ``size``); ``seed`` only jitters shades slightly.

    ``rgb`` draws the theme in any colour instead of the named one (the VAE learns from those).
    """
    rng = random.Random(seed)
    image = Image.new("RGB", (SIZE, SIZE), _jitter(BACKGROUND, rng, 6))
    draw = ImageDraw.Draw(image)
    theme = _jitter(rgb or COLOURS[layout.theme], rng)
    if layout.kind == "poster":
        top = BAND_TOPS[layout.band]
        draw.rectangle((0, top, SIZE - 1, top + BAND_HEIGHT - 1), fill=theme)
        _centered_text(draw, (0, top, SIZE, top + BAND_HEIGHT), layout.title, 11)
        if layout.subtitle:
            y = top + BAND_HEIGHT + 3
            if y + 4 > SIZE:  # a bottom band has its subtitle bar just above the bottom edge
                y = SIZE - 4
            draw.rectangle((14, y, SIZE - 15, y + 3), fill=_jitter(INK, rng, 8))
    elif layout.kind == "infographic":
        draw.rectangle((0, 0, SIZE - 1, 13), fill=theme)
        _centered_text(draw, (0, 0, SIZE, 14), layout.title, 10)
        rows, cols = layout.grid
        x0, y0, x1, y1, gap = 4, 18, SIZE - 4, SIZE - 4, 4
        bw, bh = (x1 - x0 - gap * (cols - 1)) / cols, (y1 - y0 - gap * (rows - 1)) / rows
        for r in range(rows):
            for c in range(cols):
                bx, by = x0 + c * (bw + gap), y0 + r * (bh + gap)
                draw.rectangle((round(bx), round(by), round(bx + bw) - 1, round(by + bh) - 1), fill=theme)
                cx, cy = bx + bw / 2, by + bh / 2
                rad = max(2, min(bw, bh) / 5)
                draw.ellipse((cx - rad, cy - rad, cx + rad, cy + rad), fill=(255, 255, 255))
    elif layout.kind == "comic":
        draw.rectangle((0, 0, SIZE - 1, SIZE - 1), fill=(250, 250, 250))
        for (px0, py0, px1, py1) in panel_boxes(layout.panels, layout.arrangement):
            draw.rectangle((px0, py0, px1, py1), outline=INK, width=2, fill=(250, 250, 250))
            w, h = px1 - px0, py1 - py0
            # a figure: a coloured disc on a coloured ground line, somewhere in the panel
            cx = px0 + w * rng.uniform(0.35, 0.65)
            cy = py0 + h * rng.uniform(0.35, 0.55)
            rad = max(3, min(w, h) * 0.2)
            draw.ellipse((cx - rad, cy - rad, cx + rad, cy + rad), fill=theme)
            draw.rectangle((px0 + 3, py1 - max(3, h // 6), px1 - 3, py1 - 3), fill=theme)
    elif layout.kind == "ui":
        draw.rectangle((0, 0, SIZE - 1, SIZE - 1), fill=(200, 204, 210))
        draw.rounded_rectangle((8, 4, SIZE - 9, SIZE - 5), radius=4, fill=(255, 255, 255))
        draw.rectangle((8, 4, SIZE - 9, 17), fill=theme)
        _centered_text(draw, (8, 4, SIZE - 8, 18), layout.title, 10)
        for y in (24, 30, 36):
            draw.rectangle((14, y, SIZE - 15 - (y % 7), y + 2), fill=(170, 170, 175))
        draw.rounded_rectangle((20, 45, SIZE - 21, 54), radius=3, fill=theme)
    else:
        raise ValueError(f"unknown kind {layout.kind!r}")
    return image if size == SIZE else image.resize((size, size), Image.Resampling.LANCZOS)


def panel_boxes(panels: int, arrangement: str) -> list[tuple[int, int, int, int]]:
    """Panel rectangles (inclusive pixel boxes) of a comic page."""
    m, g = 3, 4  # margin and gutter
    full = SIZE - 1 - m
    if panels == 1:
        return [(m, m, full, full)]
    if panels == 4:
        mid = SIZE // 2
        return [(m, m, mid - g // 2, mid - g // 2), (mid + g // 2, m, full, mid - g // 2),
                (m, mid + g // 2, mid - g // 2, full), (mid + g // 2, mid + g // 2, full, full)]
    horizontal = arrangement in ("side by side", "in a row")
    span = (SIZE - 2 * m - g * (panels - 1)) / panels
    boxes = []
    for i in range(panels):
        a = round(m + i * (span + g))
        b = round(m + i * (span + g) + span) - 1
        boxes.append((a, m, b, full) if horizontal else (m, a, full, b))
    return boxes


# -- datasets --------------------------------------------------------------------------------------


def write_synthetic_dataset(
    folder: str | Path,
    count: int,
    kind: str | None = None,
    seed: int = 0,
    colours: tuple[str, ...] | None = None,
    size: int = SIZE,
    overwrite: bool = False,
) -> Path:
    """A ready training folder: PNG + same-stem .txt caption + metadata.jsonl with the layout records.

    Refuses to write into a folder that already holds images unless ``overwrite``.
    """
    folder = Path(folder)
    if folder.exists() and any(folder.glob("*.png")) and not overwrite:
        raise UserError(f"{folder}: already holds images; choose another --out or pass --overwrite")
    if kind is not None and kind not in KINDS:
        raise UserError(f"kind {kind!r}: choose from {', '.join(KINDS)} (or all)")
    if colours:
        unknown = [c for c in colours if c not in COLOURS]
        if unknown:
            raise UserError(f"colour {unknown[0]!r}: choose from {', '.join(COLOURS)}")
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        layout = sample_layout(rng, kind, colours)
        stem = f"{layout.kind}_{i:05d}"
        render(layout, seed=rng.randrange(1 << 30), size=size).save(folder / f"{stem}.png")
        text = caption(layout)
        (folder / f"{stem}.txt").write_text(text + "\n", encoding="utf-8")
        rows.append(json.dumps({"file_name": f"{stem}.png", "text": text, "layout": json.loads(layout.to_json())}))
    atomic_write_text(folder / "metadata.jsonl", "\n".join(rows) + "\n")
    return folder


def vocabulary() -> list[str]:
    """Every word the layout language of this world uses (held-out ones included)."""
    words: set[str] = set()
    rng = random.Random(0)
    for kind in KINDS:
        for _ in range(400):
            words.update(tokenize_words(caption(sample_layout(rng, kind, tuple(COLOURS)))))
    words.update(tokenize_words(" ".join(TITLES)))
    words.update(c.lower() for c in COLOURS)
    return sorted(words)


def tokenize_words(text: str) -> list[str]:
    """The word split the micro tokenizer uses: words, numbers like 2x2, quotes and commas."""
    return re.findall(r'[a-z0-9]+|"|,', text.lower())


# -- posters with real text (for OCR, auto-captions and the text-rendering score) -------------------

# Titles and subtitles for real-text posters, by script.
POSTER_TEXTS = {
    "latin": (("SUMMER SALE", "AI SUMMIT 2026", "JAZZ NIGHT", "OPEN HOUSE", "BOOK FAIR", "CITY MARATHON",
               "FRESH MARKET", "DESIGN WEEK", "NIGHT RUN", "COFFEE CLUB"),
              ("fifty percent off", "Beijing, May 2026", "live music every friday", "all welcome",
               "tickets at the door")),
    "cjk": (("夏季促销", "人工智能大会", "爵士之夜", "城市马拉松", "新鲜市场", "设计周", "读书节", "咖啡俱乐部"),
            ("全场五折", "欢迎光临", "免费入场", "每周五现场音乐")),
}
FONT_FILES = {
    "latin": "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf",
    "cjk": "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
}


def font_path(script: str = "latin") -> str | None:
    """A Debian font file for ``script`` (fonts-dejavu-core, fonts-wqy-zenhei), or None when missing."""
    path = FONT_FILES[script]
    return path if Path(path).exists() else None


def text_poster(title: str, subtitle: str | None = None, band: str = "top", theme: str = "blue", size: int = 512,
                script: str = "latin") -> Image.Image:
    """A poster at ``size`` px with a real-font title in a band and an optional smaller subtitle below it."""
    path = font_path(script)
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    band_h = size // 5
    # band centres in the top, middle and bottom thirds; the subtitle sits under the band
    top = {"top": size // 16, "middle": (size - band_h) // 2, "bottom": size - band_h - size // 8}[band]
    draw.rectangle((0, top, size - 1, top + band_h), fill=COLOURS[theme])

    def fit(text: str, height: int, width: int):
        px = height
        while px > 8:
            font = ImageFont.truetype(path, px) if path else ImageFont.load_default(size=px)
            left, t, right, bottom = draw.textbbox((0, 0), text, font=font)
            if right - left <= width:
                return font, (left, t, right, bottom)
            px -= 2
        return font, draw.textbbox((0, 0), text, font=font)

    font, (left, t, right, bottom) = fit(title, int(band_h * 0.6), int(size * 0.9))
    draw.text(((size - (right - left)) // 2 - left, top + (band_h - (bottom - t)) // 2 - t), title,
              fill=(255, 255, 255), font=font)
    if subtitle:
        font, (left, t, right, bottom) = fit(subtitle, int(band_h * 0.3), int(size * 0.8))
        y = top + band_h + size // 20
        draw.text(((size - (right - left)) // 2 - left, y - t), subtitle, fill=INK, font=font)
    return image
