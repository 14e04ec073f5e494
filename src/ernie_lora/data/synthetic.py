"""The synthetic layout world: structured images with layout captions and ground-truth layout records.

Four genres from the seed documents, drawn at 64x64 (what the micro model and a 2-core CPU afford):

- ``poster``: a title band in the theme colour with the title in it: full-width at the top, middle or
  bottom, or full-height at the left or right (the side bands are held out of pretraining); optionally
  a dark subtitle bar;
- ``infographic``: a title band at the top and a grid of theme-coloured blocks (2 to 6 blocks);
- ``comic``: 1 to 4 panels with black borders, a theme-coloured figure in each panel, optionally a
  speech bubble in one panel;
- ``ui``: a white card with a theme-coloured header (the title), two to four grey text lines and a
  theme-coloured button at the bottom left, centre or right.

Every image is fully determined by its ``Layout`` record (plus a seed for small jitter); the caption is
rendered from the same record and parsed back, so scoring an image against its caption compares like
with like, and the element boxes the renderer draws (``element_boxes``) are the ones the scorer checks.

``HELD_OUT`` concepts never appear in what micro ERNIE was pretrained on: two colours, and the side
bands (a structure). ``split_of`` puts every caption in one split by its hash: ``pretrain`` (micro's
pretraining captions), ``train`` (what LoRAs, preference pairs and distillation train on: captions micro
never saw), ``validation`` (tuning) and ``test`` (reporting), so evaluation prompts are never training
prompts and micro has room to improve on the ones its recipes train on.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ..errors import UserError
from ..io import atomic_write_text, save_png

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
BANDS = ("top", "middle", "bottom", "left", "right")
GRIDS = ((1, 2), (2, 1), (2, 2), (1, 3), (3, 1), (2, 3), (3, 2))
TITLES = ("SALE", "OPEN", "NEWS", "JAZZ", "EXPO", "MENU", "TECH", "FOOD", "MAP", "PLAN", "DATA", "SHOP")
BUTTONS = ("left", "center", "right")
LINES = (2, 3, 4)
# Held out of the micro model's pretraining: a LoRA on them has something to learn (a colour, a structure).
HELD_OUT = {"colours": ("purple", "pink"), "bands": ("left", "right")}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
PANEL_ARRANGEMENTS = {1: ("single",), 2: ("side by side", "stacked"), 3: ("in a row", "stacked"), 4: ("in a 2x2 grid",)}
SPLITS = ("pretrain", "train", "validation", "test")


@dataclass
class Layout:
    """The ground truth of one image: what its caption says and what the scorer checks."""

    kind: str
    theme: str
    title: str = ""
    band: str = ""  # poster: top | middle | bottom | left | right
    subtitle: bool = False  # poster
    grid: tuple[int, int] = (0, 0)  # infographic: rows, columns
    panels: int = 0  # comic
    arrangement: str = ""  # comic: single | side by side | stacked | in a row | in a 2x2 grid
    bubble: int = 0  # comic: the panel (1-based) with a speech bubble, 0 for none
    lines: int = 0  # ui: grey text lines on the card
    button: str = ""  # ui: left | center | right, at the bottom of the card
    extras: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> Layout:
        data = dict(data)
        data["grid"] = tuple(data.get("grid", (0, 0)))
        return cls(**data)

    @property
    def structure(self) -> tuple:
        """Everything but colour and text: two layouts with equal structure differ only in those."""
        return (self.kind, self.band, self.subtitle, self.grid, self.panels, self.arrangement, self.bubble,
                self.lines, self.button)


# -- captions --------------------------------------------------------------------------------------


def caption(layout: Layout) -> str:
    """The layout language rendering of a record (the natural style)."""
    t = layout.theme
    if layout.kind == "poster":
        sub = ", a subtitle bar" if layout.subtitle else ""
        return f'a poster with title "{layout.title}", title band at the {layout.band}{sub}, {t} theme'
    if layout.kind == "infographic":
        rows, cols = layout.grid
        return (f'an infographic with {NUMBER_WORDS[rows * cols]} blocks in a {rows}x{cols} grid, '
                f'title "{layout.title}" at the top, {t} theme')
    if layout.kind == "comic":
        n = layout.panels
        panels = "a single panel" if n == 1 else f"{NUMBER_WORDS[n]} panels {layout.arrangement}"
        bubble = f", a speech bubble in panel {layout.bubble}" if layout.bubble else ""
        return f"a comic page with {panels}{bubble}, black borders, {t} theme"
    if layout.kind == "ui":
        return (f'a UI card with header "{layout.title}" at the top, {NUMBER_WORDS[layout.lines]} text lines, '
                f"a button at the bottom {layout.button}, {t} theme")
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
        band = re.search(r"title band at the (top|middle|bottom|left|right)", text)
        return Layout("poster", theme, word, band=band.group(1) if band else "", subtitle="a subtitle bar" in text)
    if text.startswith("an infographic"):
        grid = re.search(r"(\d)x(\d) grid", text)
        return Layout("infographic", theme, word, grid=(int(grid.group(1)), int(grid.group(2))) if grid else (0, 0))
    if text.startswith("a comic"):
        bubble = re.search(r"a speech bubble in panel (\d)", text)
        layout = Layout("comic", theme, bubble=int(bubble.group(1)) if bubble else 0)
        if "a single panel" in text:
            layout.panels, layout.arrangement = 1, "single"
        elif m := re.search(r"\b(two|three|four) panels (side by side|stacked|in a row|in a 2x2 grid)", text):
            layout.panels, layout.arrangement = _WORD_NUMBERS[m.group(1)], m.group(2)
        return layout
    if text.startswith("a ui card"):
        lines = re.search(r"\b(two|three|four) text lines", text)
        button = re.search(r"a button at the bottom (left|center|right)", text)
        return Layout("ui", theme, word, lines=_WORD_NUMBERS[lines.group(1)] if lines else 0,
                      button=button.group(1) if button else "")
    return None


def split_of(text: str) -> str:
    """The split a caption belongs to, by its hash: 40 % pretrain, 20 % each train, validation and test."""
    bucket = int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:8], 16) % 10
    return "test" if bucket < 2 else "validation" if bucket < 4 else "train" if bucket < 6 else "pretrain"


# -- sampling layouts ------------------------------------------------------------------------------


def pretraining_colours() -> tuple[str, ...]:
    return tuple(c for c in COLOURS if c not in HELD_OUT["colours"])


def seen_bands() -> tuple[str, ...]:
    return tuple(b for b in BANDS if b not in HELD_OUT["bands"])


def _random_layout(rng: random.Random, kind: str, palette: tuple[str, ...], bands: tuple[str, ...]) -> Layout:
    theme, title = rng.choice(palette), rng.choice(TITLES)
    if kind == "poster":
        return Layout(kind, theme, title, band=rng.choice(bands), subtitle=rng.random() < 0.5)
    if kind == "infographic":
        return Layout(kind, theme, title, grid=rng.choice(GRIDS))
    if kind == "comic":
        n = rng.randint(1, 4)
        bubble = rng.randint(1, n) if rng.random() < 0.6 else 0
        return Layout(kind, theme, panels=n, arrangement=rng.choice(PANEL_ARRANGEMENTS[n]), bubble=bubble)
    if kind == "ui":
        return Layout(kind, theme, title, lines=rng.choice(LINES), button=rng.choice(BUTTONS))
    raise ValueError(f"unknown kind {kind!r}; choose from {', '.join(KINDS)}")


def sample_layout(rng: random.Random, kind: str | None = None, colours: tuple[str, ...] | None = None,
                  split: str | tuple[str, ...] | None = None, bands: tuple[str, ...] | None = None) -> Layout:
    """A random layout; ``colours`` limits the themes (default: the pretraining colours), ``bands`` the
    poster bands (default: the seen ones), ``split`` the captions' split(s)."""
    palette, bands = colours or pretraining_colours(), bands or seen_bands()
    splits = (split,) if isinstance(split, str) else split
    for _ in range(1000):
        layout = _random_layout(rng, kind or rng.choice(KINDS), palette, bands)
        if splits is None or split_of(caption(layout)) in splits:
            return layout
    raise UserError(f"no {kind or 'layout'} caption of split {split} among 1000 draws")


def split_captions(count: int, split: str, kind: str | None = None, colours: tuple[str, ...] | None = None,
                   bands: tuple[str, ...] | None = None, seed: int = 0) -> list[str]:
    """Up to ``count`` distinct captions of one split (fewer when the space holds fewer), in draw order."""
    rng = random.Random(seed)
    found: dict[str, None] = {}
    for _ in range(200 * count):
        found[caption(sample_layout(rng, kind, colours, split, bands))] = None
        if len(found) == count:
            break
    return list(found)


def all_layouts(kind: str, colours: tuple[str, ...], bands: tuple[str, ...] = BANDS) -> list[Layout]:
    """Every layout of a kind in these colours (one title: titles vary text, not structure)."""
    if kind == "poster":
        return [Layout(kind, c, "SALE", band=b, subtitle=s) for c in colours for b in bands for s in (False, True)]
    if kind == "infographic":
        return [Layout(kind, c, "DATA", grid=g) for c in colours for g in GRIDS]
    if kind == "comic":
        return [Layout(kind, c, panels=n, arrangement=a, bubble=k) for c in colours for n, options in
                PANEL_ARRANGEMENTS.items() for a in options for k in range(n + 1)]
    return [Layout(kind, c, "MENU", lines=n, button=b) for c in colours for n in LINES for b in BUTTONS]


# -- geometry: what the renderer draws where, and what the scorer checks ---------------------------

BACKGROUND = (242, 238, 228)
INK = (30, 30, 34)
UI_GROUND = (200, 204, 210)
BAND_WIDTH = 16
BAND_TOPS = {"top": 4, "middle": 24, "bottom": 44}
SIDE_BAND_LEFT = {"left": 4, "right": 44}
CARD = (8, 4, SIZE - 9, SIZE - 5)
UI_HEADER = (8, 4, SIZE - 9, 17)
UI_LINE_TOPS = (22, 27, 32, 37)
UI_BUTTON_LEFTS = {"left": 11, "center": 25, "right": 39}
Box = tuple[int, int, int, int]  # inclusive pixel box: left, top, right, bottom


def band_box(band: str) -> Box:
    if band in SIDE_BAND_LEFT:
        left = SIDE_BAND_LEFT[band]
        return (left, 0, left + BAND_WIDTH - 1, SIZE - 1)
    top = BAND_TOPS[band]
    return (0, top, SIZE - 1, top + BAND_WIDTH - 1)


def subtitle_box(band: str) -> Box:
    """The dark subtitle bar: 3px under a horizontal band (just above the bottom edge for a bottom band),
    or across the free side of a side band."""
    if band in SIDE_BAND_LEFT:
        x0 = 26 if band == "left" else 6
        return (x0, 44, x0 + 31, 47)
    y = BAND_TOPS[band] + BAND_WIDTH + 3
    if y + 4 > SIZE:
        y = SIZE - 4
    return (14, y, SIZE - 15, y + 3)


def block_boxes(grid: tuple[int, int]) -> list[Box]:
    rows, cols = grid
    x0, y0, x1, y1, gap = 4, 18, SIZE - 4, SIZE - 4, 4
    bw, bh = (x1 - x0 - gap * (cols - 1)) / cols, (y1 - y0 - gap * (rows - 1)) / rows
    return [(round(x0 + c * (bw + gap)), round(y0 + r * (bh + gap)), round(x0 + c * (bw + gap) + bw) - 1,
             round(y0 + r * (bh + gap) + bh) - 1) for r in range(rows) for c in range(cols)]


def panel_boxes(panels: int, arrangement: str) -> list[Box]:
    """Panel rectangles of a comic page, in reading order."""
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


def wide(panel: Box) -> bool:
    return panel[2] - panel[0] > 1.5 * (panel[3] - panel[1])


def bubble_box(panel: Box) -> Box:
    """A speech bubble clear of the borders: in the right part of a wide panel, the upper part of others."""
    px0, py0, px1, py1 = panel
    w, h = px1 - px0, py1 - py0
    if wide(panel):
        return (round(px0 + 0.62 * w), py0 + 5, px1 - 5, py0 + 5 + max(6, round(0.45 * h)))
    inset = max(5, round(0.18 * w))
    return (px0 + inset, py0 + 5, px1 - inset, py0 + 5 + max(6, round(0.28 * h)))


def ui_line_boxes(lines: int) -> list[Box]:
    return [(14, y, SIZE - 16, y + 2) for y in UI_LINE_TOPS[:lines]]


def ui_button_box(button: str) -> Box:
    left = UI_BUTTON_LEFTS[button]
    return (left, 45, left + 13, 53)


# -- drawing ---------------------------------------------------------------------------------------


def _jitter(colour: tuple[int, int, int], rng: random.Random, amount: int = 12) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in colour)


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)  # Pillow's bundled font: the same on every machine


def _centered_text(image: Image.Image, box: Box, text: str, size: int, vertical: bool = False) -> None:
    """White text centred in ``box``; ``vertical`` reads bottom to top (a side band's title)."""
    font = _font(size)
    probe = ImageDraw.Draw(image)
    left, top, right, bottom = probe.textbbox((0, 0), text, font=font)
    w, h = right - left, bottom - top
    patch = Image.new("L", (w + 2, h + 2), 0)
    ImageDraw.Draw(patch).text((1 - left, 1 - top), text, fill=255, font=font)
    if vertical:
        patch = patch.rotate(90, expand=True)
    x = (box[0] + box[2] + 1 - patch.width) // 2
    y = (box[1] + box[3] + 1 - patch.height) // 2
    image.paste((255, 255, 255), (x, y), patch)


def render(layout: Layout, seed: int = 0, size: int = SIZE, rgb: tuple[int, int, int] | None = None) -> Image.Image:
    """Draw a layout at 64x64 (then resized to ``size``); ``seed`` only jitters shades and figures.

    ``rgb`` draws the theme in any colour instead of the named one (the VAE learns from those).
    """
    rng = random.Random(seed)
    image = Image.new("RGB", (SIZE, SIZE), _jitter(BACKGROUND, rng, 6))
    draw = ImageDraw.Draw(image)
    theme = _jitter(rgb or COLOURS[layout.theme], rng)
    if layout.kind == "poster":
        box = band_box(layout.band)
        draw.rectangle(box, fill=theme)
        _centered_text(image, box, layout.title, 11, vertical=layout.band in SIDE_BAND_LEFT)
        if layout.subtitle:
            draw.rectangle(subtitle_box(layout.band), fill=_jitter(INK, rng, 8))
    elif layout.kind == "infographic":
        draw.rectangle((0, 0, SIZE - 1, 13), fill=theme)
        _centered_text(image, (0, 0, SIZE - 1, 13), layout.title, 10)
        for bx0, by0, bx1, by1 in block_boxes(layout.grid):
            draw.rectangle((bx0, by0, bx1, by1), fill=theme)
            cx, cy, rad = (bx0 + bx1) / 2, (by0 + by1) / 2, max(2, min(bx1 - bx0, by1 - by0) / 5)
            draw.ellipse((cx - rad, cy - rad, cx + rad, cy + rad), fill=(255, 255, 255))
    elif layout.kind == "comic":
        draw.rectangle((0, 0, SIZE - 1, SIZE - 1), fill=(250, 250, 250))
        for i, (px0, py0, px1, py1) in enumerate(panel_boxes(layout.panels, layout.arrangement), start=1):
            draw.rectangle((px0, py0, px1, py1), outline=INK, width=2, fill=(250, 250, 250))
            w, h = px1 - px0, py1 - py0
            # a figure: a coloured disc on a coloured ground line, clear of where a bubble goes
            if wide((px0, py0, px1, py1)):
                cx, cy = px0 + w * rng.uniform(0.22, 0.42), py0 + h * rng.uniform(0.45, 0.55)
            else:
                cx, cy = px0 + w * rng.uniform(0.35, 0.65), py0 + h * rng.uniform(0.58, 0.66)
            rad = max(3, min(w, h) * 0.15)
            draw.ellipse((cx - rad, cy - rad, cx + rad, cy + rad), fill=theme)
            draw.rectangle((px0 + 3, py1 - max(3, h // 7), px1 - 3, py1 - 3), fill=theme)
            if layout.bubble == i:
                draw.ellipse(bubble_box((px0, py0, px1, py1)), outline=INK, width=2, fill=(255, 255, 255))
    elif layout.kind == "ui":
        draw.rectangle((0, 0, SIZE - 1, SIZE - 1), fill=UI_GROUND)
        draw.rounded_rectangle(CARD, radius=4, fill=(255, 255, 255))
        draw.rectangle(UI_HEADER, fill=theme)
        _centered_text(image, UI_HEADER, layout.title, 10)
        for bx0, by0, bx1, by1 in ui_line_boxes(layout.lines):
            draw.rectangle((bx0, by0, bx1 - rng.randint(0, 6), by1), fill=(150, 150, 156))
        draw.rounded_rectangle(ui_button_box(layout.button), radius=3, fill=theme)
    else:
        raise ValueError(f"unknown kind {layout.kind!r}")
    return image if size == SIZE else image.resize((size, size), Image.Resampling.LANCZOS)


# -- datasets --------------------------------------------------------------------------------------


def write_synthetic_dataset(
    folder: str | Path,
    count: int,
    kind: str | None = None,
    seed: int = 0,
    colours: tuple[str, ...] | None = None,
    size: int = SIZE,
    overwrite: bool = False,
    split: str | tuple[str, ...] | None = None,
    bands: tuple[str, ...] | None = None,
) -> Path:
    """A ready training folder: PNG + same-stem .txt caption + metadata.jsonl with the layout records.

    Refuses to write into a folder that already holds images unless ``overwrite``.
    """
    folder = Path(folder)
    if folder.exists() and any(folder.glob("*.png")) and not overwrite:
        raise UserError(f"{folder}: already holds images; choose another --out or pass --overwrite")
    if kind is not None and kind not in KINDS:
        raise UserError(f"kind {kind!r}: choose from {', '.join(KINDS)} (or all)")
    for values, known, what in ((colours, COLOURS, "colour"), (bands, BANDS, "band")):
        unknown = [v for v in values or () if v not in known]
        if unknown:
            raise UserError(f"{what} {unknown[0]!r}: choose from {', '.join(known)}")
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        layout = sample_layout(rng, kind, colours, split, bands)
        stem = f"{layout.kind}_{i:05d}"
        save_png(render(layout, seed=rng.randrange(1 << 30), size=size), folder / f"{stem}.png")
        text = caption(layout)
        atomic_write_text(folder / f"{stem}.txt", text + "\n")
        rows.append(json.dumps({"file_name": f"{stem}.png", "text": text, "layout": json.loads(layout.to_json())}))
    atomic_write_text(folder / "metadata.jsonl", "\n".join(rows) + "\n")
    return folder


def vocabulary() -> list[str]:
    """Every word the layout language of this world uses (held-out concepts included)."""
    words: set[str] = set()
    for kind in KINDS:
        for layout in all_layouts(kind, tuple(COLOURS)):
            words.update(tokenize_words(caption(layout)))
    words.update(tokenize_words(" ".join(TITLES)))
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
