"""Designed posters: PIL-drawn posters as a designer makes them, with their truth, for judging auto-captions.

Each has a background (white, light grey or black), a colour band along one edge (a side band is the case
users reported), a thin accent bar of another colour, and two text lines in a real font: a title of one
to three words and a smaller subtitle of two to four (word spaces are what OCR tends to drop). The
``DesignedPoster`` record is what a full caption must say.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

from .synthetic import COLOURS, font_path

BACKGROUNDS = {"white": (246, 244, 238), "light grey": (204, 206, 210), "black": (24, 24, 28)}
BAND_SIDES = ("left", "right", "top", "bottom")
TITLE_WORDS = ("Jazz", "Night", "Summer", "Market", "Open", "Studio", "Design", "Week", "Film", "Club", "Garden",
               "Party", "Books", "Coffee", "Art", "Fair", "Live", "Music", "Spring", "Sale")
SUBTITLE_WORDS = ("every", "Friday", "Tuesday", "from", "nine", "at", "the", "old", "harbour", "free", "entry",
                  "classics", "tickets", "online", "all", "day", "long", "new", "season", "city", "hall")


@dataclass
class DesignedPoster:
    background: str
    band: str  # the edge: left | right | top | bottom
    band_colour: str
    accent_colour: str
    title: str
    subtitle: str
    size: int = 512


def random_poster(rng: random.Random, size: int = 512) -> DesignedPoster:
    band_colour, accent_colour = rng.sample(list(COLOURS), 2)
    title = " ".join(rng.sample(TITLE_WORDS, rng.randint(1, 3)))
    subtitle = " ".join(rng.sample(SUBTITLE_WORDS, rng.randint(2, 4)))
    return DesignedPoster(rng.choice(list(BACKGROUNDS)), rng.choice(BAND_SIDES), band_colour, accent_colour,
                          title, subtitle, size)


def draw_poster(poster: DesignedPoster) -> Image.Image:
    """The poster: band on its edge, text and accent bar in the free area (text never on the band)."""
    size = poster.size
    image = Image.new("RGB", (size, size), BACKGROUNDS[poster.background])
    draw = ImageDraw.Draw(image)
    band = round(0.22 * size)
    free = {"left": (band, 0, size, size), "right": (0, 0, size - band, size), "top": (0, band, size, size),
            "bottom": (0, 0, size, size - band)}[poster.band]
    box = {"left": (0, 0, band - 1, size - 1), "right": (size - band, 0, size - 1, size - 1),
           "top": (0, 0, size - 1, band - 1), "bottom": (0, size - band, size - 1, size - 1)}[poster.band]
    draw.rectangle(box, fill=COLOURS[poster.band_colour])
    ink = (250, 250, 250) if poster.background == "black" else (20, 20, 24)
    x0, y0, x1, y1 = free
    margin = round(0.06 * size)
    width = x1 - x0 - 2 * margin

    def fitted(text: str, px: int) -> ImageFont.ImageFont:
        while px > 10:
            font = ImageFont.truetype(font_path(), px) if font_path() else ImageFont.load_default(size=px)
            if draw.textlength(text, font=font) <= width:
                return font
            px -= 2
        return font

    title_font = fitted(poster.title, round(0.1 * size))
    subtitle_font = fitted(poster.subtitle, round(0.045 * size))
    top = y0 + round(0.28 * (y1 - y0))
    draw.text((x0 + margin, top), poster.title, fill=ink, font=title_font)
    title_bottom = draw.textbbox((x0 + margin, top), poster.title, font=title_font)[3]
    draw.text((x0 + margin, title_bottom + round(0.04 * size)), poster.subtitle, fill=ink, font=subtitle_font)
    bar_top = y1 - margin - round(0.03 * size)
    draw.rectangle((x0 + margin, bar_top, x0 + margin + round(0.3 * size), bar_top + round(0.025 * size)),
                   fill=COLOURS[poster.accent_colour])
    return image
