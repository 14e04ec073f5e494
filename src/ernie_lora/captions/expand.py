"""A deterministic prompt expander: a short request -> a full layout caption, without any model.

ERNIE-Image's Prompt Enhancer is a 3B LLM; this is the rule-based stand-in for machines without
its weights. Quoted strings become, in order, the title (large, bold, at the top unless a position
word says otherwise), the subtitle (below it) and labels (at the bottom); a kind word (poster,
infographic, comic, ui) and a colour word are kept; a layout is added. A prompt that already names
roles is returned unchanged: it is a layout caption already.
"""

from __future__ import annotations

import re

from .schema import CaptionSchema, Element, parse, render

COLOUR_WORDS = ("red", "orange", "yellow", "green", "teal", "cyan", "blue", "navy", "purple", "pink", "magenta",
                "brown", "black", "white", "grey", "gray", "gold", "silver", "beige")
_TITLE_POSITION = {"top": "top", "middle": "center", "center": "center", "centre": "center", "bottom": "bottom"}


def expand_prompt(prompt: str) -> str:
    parsed = parse(prompt)
    if any(e.role != "label" for e in parsed.elements):
        return prompt
    lower = prompt.lower()
    quoted = [e.text for e in parsed.elements]
    kind = parsed.kind if parsed.kind != "other" else ("poster" if quoted else "other")
    position = next((_TITLE_POSITION[w] for w in re.findall(r"[a-z]+", lower) if w in _TITLE_POSITION), "top")
    elements = []
    if quoted:
        elements.append(Element("title", quoted[0], position, size="large", weight="bold"))
    if len(quoted) > 1:
        elements.append(Element("subtitle", quoted[1], "bottom" if position == "bottom" else "center"))
    elements += [Element("label", text, "bottom") for text in quoted[2:]]
    theme = parsed.theme or next((w for w in re.findall(r"[a-z]+", lower) if w in COLOUR_WORDS), None)
    comic = kind == "comic"
    schema = CaptionSchema(kind=kind, elements=elements, theme=theme,
                           layout=parsed.layout or (None if comic else "centered"), panels=parsed.panels,
                           reading_order=parsed.reading_order or ("left to right" if comic else None))
    expanded = render(schema, "natural")
    # words of the request the schema has no place for are kept at the end, not dropped
    rest = re.sub(r'"[^"]*"', " ", prompt)
    known = set(re.findall(r"[\w-]+", expanded.lower())) | {"and", "with", "a", "an", "the", "for"}
    known |= {str(parsed.panels)} if parsed.panels else set()
    extra = [w for w in re.findall(r"[\w-]+", rest) if w.lower() not in known and w.lower() not in _TITLE_POSITION]
    return expanded + (", " + " ".join(extra) if extra else "")
