"""The layout language as data: a schema for structured captions, three renderings, and a parser.

ERNIE-Image reads captions as a structural description: text in quotes, roles (title, subtitle,
label, ...), positions (a 9-cell grid or a panel index), size and weight hints, theme colours, the
panel count and the reading order. ``CaptionSchema`` holds that; ``render`` writes it in the three
styles of the ERNIE-Image SFT stage (natural, keyword, instruction); ``parse`` recovers what it can
from free text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

KINDS = ("poster", "infographic", "comic", "ui", "other")
ROLES = ("title", "subtitle", "heading", "label", "body", "button", "caption", "panel")
# shapes: what the layout analysis finds besides text (captions.analysis)
SHAPES = ("band", "bar", "block", "image", "bubble")
POSITIONS = ("top-left", "top", "top-right", "left", "center", "right", "bottom-left", "bottom", "bottom-right",
             "middle")  # "middle": a band across the middle
COLOUR_WORDS = ("red", "blue", "green", "yellow", "orange", "teal", "purple", "pink", "white", "light grey", "grey",
                "black", "brown", "navy", "gold", "beige", "cyan", "magenta", "violet", "cream")
STYLES = ("natural", "keyword", "instruction")
SIZES = ("small", "medium", "large")
WEIGHTS = ("regular", "bold")
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine"}
_KIND_NOUN = {"poster": "a poster", "infographic": "an infographic", "comic": "a comic page", "ui": "a UI screen",
              "other": "an image"}


@dataclass
class Element:
    role: str
    text: str | None = None
    position: str | None = None  # one of POSITIONS
    panel: int | None = None  # 1-based panel index, for comics
    size: str | None = None
    weight: str | None = None
    colour: str | None = None  # shapes: a name from COLOUR_WORDS
    count: int | None = None  # shapes: several alike (blocks of a grid)
    grid: tuple[int, int] | None = None  # shapes: (rows, columns) of those

    def __post_init__(self) -> None:
        for name, value, allowed in (("role", self.role, ROLES + SHAPES), ("position", self.position, POSITIONS),
                                     ("size", self.size, SIZES), ("weight", self.weight, WEIGHTS)):
            if value is not None and value not in allowed:
                raise ValueError(f"element {name} {value!r}: choose from {', '.join(allowed)}")


@dataclass
class CaptionSchema:
    kind: str = "other"
    elements: list[Element] = field(default_factory=list)
    theme: str | None = None
    colours: list[str] = field(default_factory=list)
    layout: str | None = None  # e.g. "centered", "grid", "two-column"
    panels: int | None = None
    reading_order: str | None = None  # e.g. "left to right", "top to bottom"
    background: str | None = None  # a name from COLOUR_WORDS
    subject: str | None = None  # what the picture shows, in free words (a captioning model's; not parsed back)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind {self.kind!r}: choose from {', '.join(KINDS)}")


def _where(element: Element) -> str:
    if element.panel is not None:
        return f" in panel {element.panel}"
    if element.position is None:
        return ""
    return " in the center" if element.position == "center" else f" at the {element.position}"


_SHAPE_NOUN = {"band": "band", "bar": "accent bar", "block": "block", "image": "image area", "bubble": "speech bubble"}


def _shape_phrase(element: Element) -> str:
    noun = _SHAPE_NOUN[element.role]
    colour = f"{element.colour} " if element.colour else ""
    if element.count and element.count > 1:
        grid = f" in a {element.grid[0]}x{element.grid[1]} grid" if element.grid else ""
        return f"{_count(element.count)} {colour}{noun}s{grid}{_where(element)}"
    return f"{'an' if (colour or noun)[0] in 'aeiou' else 'a'} {colour}{noun}{_where(element)}"


def _element_phrase(element: Element) -> str:
    if element.role in SHAPES:
        return _shape_phrase(element)
    hints = " ".join(h for h in (element.size, element.weight) if h)
    words = f"{hints} {element.role}" if hints else element.role
    text = f' "{element.text}"' if element.text is not None else ""
    return f"{words}{text}{_where(element)}"


def _count(n: int) -> str:
    return NUMBER_WORDS.get(n, str(n))


def render(schema: CaptionSchema, style: str = "natural") -> str:
    """The caption in one of ``STYLES``: the same content, worded as users write prompts."""
    if style not in STYLES:
        raise ValueError(f"caption style {style!r}: choose from {', '.join(STYLES)}")
    parts = [_element_phrase(e) for e in schema.elements]
    extras = []
    if schema.panels:
        extras.append(f"{_count(schema.panels)} panels" if schema.panels != 1 else "a single panel")
    if schema.reading_order:
        extras.append(f"read {schema.reading_order}")
    if schema.layout:
        extras.append(f"{schema.layout} layout")
    if schema.background:
        extras.append(f"{schema.background} background")
    if schema.colours:
        extras.append("colours " + " and ".join(schema.colours))
    if schema.theme:
        extras.append(f"{schema.theme} theme")
    noun = _KIND_NOUN[schema.kind]
    subject = [schema.subject] if schema.subject else []
    if style == "natural":
        body = ", ".join(parts + extras + [f"showing {s}" for s in subject])
        return f"{noun} with {body}" if parts else (f"{noun}, {body}" if body else noun)
    if style == "keyword":
        keyword_parts = [re.sub(r'^(\w+(?: \w+)*) "', lambda m: f'{m.group(1)}: "', p) for p in parts]
        return ", ".join([noun.split(" ", 1)[1]] + keyword_parts + extras + subject)
    verb = {"comic": "Draw", "ui": "Design", "other": "Create"}.get(schema.kind, "Design")
    sentences = [f"{verb} {noun}."]
    sentences += [f"Place {p}." if e.role in SHAPES else f"Place the {p}."
                  for p, e in zip(parts, schema.elements, strict=True)]
    if extras:
        sentences.append("Use " + ", ".join(extras) + ".")
    sentences += [f"Show {s}." for s in subject]
    return " ".join(sentences)


# -- parsing ---------------------------------------------------------------------------------------

_ROLE_ALIASES = {"header": "heading", "headline": "title", "tagline": "subtitle", "text": "body", "label": "label"}
_POSITION_RE = (r"(?:at|in|on)\s+the\s+(top[- ]left|top[- ]right|bottom[- ]left|bottom[- ]right|top|bottom|left|"
                r"right|center|centre|middle)")
_ELEMENT_RE = re.compile(
    r"(?:\b(small|medium|large)\s+)?(?:\b(bold|regular)\s+)?\b(title|subtitle|heading|header|headline|tagline|"
    r"label|body|button|caption|panel|text)\b(?:\s+text)?\s*:?\s*\"([^\"]*)\"(?:\s+" + _POSITION_RE + r")?"
    r"(?:\s+in\s+panel\s+(\d+))?",
    re.IGNORECASE,
)
_NUMBER_RE = r"(\d+|one|two|three|four|five|six|seven|eight|nine)"
_COLOUR = "(?P<colour>" + "|".join(sorted(COLOUR_WORDS, key=len, reverse=True)) + ")"
_AT = (r"(?:\s+(?:at|in|on|across)\s+the\s+(?P<position>top[- ]left|top[- ]right|bottom[- ]left|bottom[- ]right|top|"
       r"bottom|left|right|center|centre|middle))?")
_SHAPE_RES = (
    ("band", re.compile(rf"\b(?:{_COLOUR}\s+)?(?:title\s+)?band{_AT}", re.IGNORECASE)),
    ("bar", re.compile(rf"\b(?:{_COLOUR}\s+)?(?:accent\s+|subtitle\s+)?bar\b{_AT}", re.IGNORECASE)),
    ("block", re.compile(rf"\b(?P<count>\d+|one|two|three|four|five|six|seven|eight|nine|an?)\s+(?:{_COLOUR}\s+)?"
                         rf"blocks?(?:\s+in\s+a\s+(?P<rows>\d)x(?P<cols>\d)\s+grid)?{_AT}", re.IGNORECASE)),
    ("image", re.compile(rf"\bimage area{_AT}", re.IGNORECASE)),
    ("bubble", re.compile(r"\bspeech bubble(?:\s+in\s+panel\s+(?P<panel>\d+))?", re.IGNORECASE)),
)
_BACKGROUND_RE = re.compile(rf"\b{_COLOUR}\s+background\b", re.IGNORECASE)
_WORD_NUMBERS = {v: k for k, v in NUMBER_WORDS.items()}


def _number(word: str) -> int:
    return int(word) if word.isdigit() else _WORD_NUMBERS[word.lower()]


def _position(word: str | None) -> str | None:
    if not word:
        return None
    word = word.lower().replace(" ", "-")
    return {"centre": "center", "middle": "center"}.get(word, word)


def parse(text: str) -> CaptionSchema:
    """Recover what a free-text caption says about layout; anything unrecognised is left out."""
    lower = text.lower()
    kind = "other"
    for name, pattern in (("infographic", r"\binfographic"), ("comic", r"\b(comic|manga|storyboard)"),
                          ("ui", r"\b(ui|app screen|screen|interface|card|website|web page)\b"),
                          ("poster", r"\b(poster|flyer|banner|cover)\b")):
        if re.search(pattern, lower):
            kind = name
            break
    elements = []
    for m in _ELEMENT_RE.finditer(text):
        size, weight, role, quoted, position, panel = m.groups()
        role = _ROLE_ALIASES.get(role.lower(), role.lower())
        elements.append(Element(role=role, text=quoted, position=_position(position),
                                panel=int(panel) if panel else None, size=size and size.lower(),
                                weight=weight and weight.lower()))
    claimed = {m.group(4) for m in _ELEMENT_RE.finditer(text)}
    for quoted in re.findall(r'"([^"]*)"', text):  # quoted text with no role word: a label
        if quoted not in claimed:
            elements.append(Element(role="label", text=quoted))
    for role, pattern in _SHAPE_RES:
        for m in pattern.finditer(text):
            found = m.groupdict()
            count = found.get("count")
            count = None if count is None or count.lower() in ("a", "an") else _number(count)
            rows, cols = found.get("rows"), found.get("cols")
            elements.append(Element(role=role, colour=found.get("colour") and found["colour"].lower(),
                                    position=_position(found.get("position")), count=count,
                                    grid=(int(rows), int(cols)) if rows else None,
                                    panel=int(found["panel"]) if found.get("panel") else None))
    background = _BACKGROUND_RE.search(text)
    theme = re.search(r"\b((?:(?:dark|light|pale|deep|bright|pastel|neon|muted|warm|cool|navy)[- ])?[a-z]+) "
                      r"(?:theme|color scheme|colour scheme)\b", lower)
    panels = re.search(_NUMBER_RE + r"[- ]panels?\b", lower)
    single = re.search(r"\ba single panel\b", lower)
    order = re.search(r"\b(left to right|right to left|top to bottom|bottom to top)\b", lower)
    layout = re.search(r"\b(centered|centred|grid|two-column|three-column|asymmetric|symmetric)\s+layout\b", lower)
    return CaptionSchema(
        kind=kind,
        elements=elements,
        theme=theme.group(1) if theme else None,
        layout=layout.group(1).replace("centred", "centered") if layout else None,
        panels=1 if single else (_number(panels.group(1)) if panels else None),
        reading_order=order.group(1) if order else None,
        background=background.group("colour").lower() if background else None,
    )


_STOP = {"a", "an", "the", "with", "at", "in", "on", "and", "of", "is", "layout", "read", "place", "use", "design",
         "draw", "create", "text", "it", "below", "above", "page", "screen", "image", "colours", "colors"}


def content_words(text: str) -> set[str]:
    return {w for w in re.findall(r"[\w-]+", text.lower()) if w not in _STOP}


def _keyword_phrases(caption: str) -> str:
    """Comma-separated phrases without articles or the joining 'with': every content word kept."""
    text = caption.strip().rstrip(".")
    text = re.sub(r"^(an?|the)\s+", "", text, flags=re.IGNORECASE)
    text = re.sub(r"\s+with\s+", ", ", text, count=1)
    phrases = [re.sub(r"^(an?|the)\s+", "", p.strip(), flags=re.IGNORECASE) for p in text.split(",")]
    phrases = [re.sub(r"\b(at|in|on) the\b", r"\1", p) for p in phrases]
    return ", ".join(p for p in phrases if p)


def _instruction(caption: str) -> str:
    text = caption.strip().rstrip(".")
    verb = {"comic": "Draw", "other": "Create"}.get(parse(caption).kind, "Design")
    return f"{verb} {text[0].lower() + text[1:] if text else text}."


def restyle(caption: str, style: str) -> str:
    """``caption`` reworded in ``style`` with all of its content kept.

    When the parser captures the whole caption, the schema is rendered in that style; otherwise a
    phrase-level rewording (keyword: comma phrases without articles; instruction: an imperative
    sentence) keeps every content word, since training on a rewording that dropped part of the
    caption would teach the wrong thing.
    """
    if style not in STYLES:
        raise ValueError(f"caption style {style!r}: choose from {', '.join(STYLES)}")
    if style == "natural" or not caption.strip():
        return caption
    schema = parse(caption)
    # shapes parse with less than was said ("title band" -> a band): their phrases are reworded, not re-rendered
    if (schema.elements and not any(e.role in SHAPES for e in schema.elements)
            and content_words(caption) <= content_words(render(schema, "natural"))):
        return render(schema, style)
    return _keyword_phrases(caption) if style == "keyword" else _instruction(caption)
