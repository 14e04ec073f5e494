"""``caption lint``: what makes a caption weak training data for a layout model, per file.

Checks: non-UTF-8 files; trigger-word-only captions; no quoted text although the image has text
(OCR); no layout words; no hierarchy (role) words; more tokens than the text encoder reads
(counted with the model's own tokenizer; the pipeline truncates the rest away).

With ``--images`` each caption is also compared with what the image shows (OCR and
``captions.analysis``): text the image has that the caption does not quote or misspells, the background
or theme colour never named, a band never named, a wrong panel count, a title placed at the wrong edge.
"""

from __future__ import annotations

import difflib
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..data.dataset import CACHE_DIR_NAME, IMAGE_EXTS
from ..errors import UserError
from ..io import open_image
from .ocr import read_text

LAYOUT_WORDS = {
    "top", "bottom", "left", "right", "center", "centre", "centered", "centred", "middle", "grid", "column",
    "columns", "row", "rows", "panel", "panels", "above", "below", "under", "beside", "header", "footer",
    "corner", "side", "layout", "aligned", "top-left", "top-right", "bottom-left", "bottom-right", "stacked",
}
HIERARCHY_WORDS = {
    "title", "subtitle", "heading", "headline", "tagline", "label", "labels", "body", "caption", "button",
    "header", "logo", "slogan",
}
CHECKS = ("not UTF-8", "trigger word only", "no quoted text", "no layout words", "no hierarchy", "too many tokens")
IMAGE_CHECKS = ("text not quoted", "text misspelled", "colour not named", "band not named", "panel count wrong",
                "position wrong")


@dataclass
class LintFinding:
    path: Path
    check: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.path.name}: {self.check}" + (f" ({self.detail})" if self.detail else "")


def lint_caption(text: str, image_has_text: bool | None, max_tokens: int | None, count_tokens) -> list[tuple[str, str]]:
    """(check, detail) pairs for one caption."""
    found = []
    words = re.findall(r"[\w-]+", text.lower())
    quoted = re.findall(r'"[^"]+"|“[^”]+”|「[^」]+」', text)
    if len(words) <= 2 and not quoted:
        found.append(("trigger word only", f"{text.strip()!r}"))
    if image_has_text and not quoted:
        found.append(("no quoted text", "the image has text; quote it as it is written"))
    if not set(words) & LAYOUT_WORDS:
        found.append(("no layout words", "say where things are: top, centered, grid, left, ..."))
    if not set(words) & HIERARCHY_WORDS:
        found.append(("no hierarchy", "name the roles: title, subtitle, label, ..."))
    if max_tokens is not None:
        n = count_tokens(text)
        if n > max_tokens:
            found.append(("too many tokens", f"{n} > {max_tokens}; the text encoder truncates the rest"))
    return found


def _normal(text: str) -> str:
    return " ".join(text.lower().split())


def _opposite(said: str, seen: str) -> bool:
    """Two grid positions at opposite edges (top vs bottom, left vs right): not a near miss."""
    pairs = (("top", "bottom"), ("left", "right"))
    return any((a in said.split("-") and b in seen.split("-")) or (b in said.split("-") and a in seen.split("-"))
               for a, b in pairs)


def lint_against_image(text: str, image, read: list | None = None) -> list[tuple[str, str]]:
    """(check, detail) pairs where a caption omits or contradicts what its image shows; ``read``: the
    image's ``read_text`` boxes when the caller has them (OCR runs once per image)."""
    from .analysis import HUE_NAMES, analyse, grid_position
    from .auto import read_lines
    from .schema import parse

    lines = [b for b in read_lines(image, read) if b.confidence > 0.8 and len(b.text.strip()) >= 2]
    analysis = analyse(image, lines)
    said = parse(text)
    quoted = [_normal(next(g for g in groups if g)) for groups in re.findall(r'"([^"]+)"|“([^”]+)”|「([^」]+)」', text)]
    found = []
    for line in lines:
        seen = _normal(line.text)
        if any(seen == q or seen in q for q in quoted):
            continue
        close = max(quoted, key=lambda q: difflib.SequenceMatcher(None, q, seen).ratio(), default=None)
        if close is not None and difflib.SequenceMatcher(None, close, seen).ratio() >= 0.75:
            found.append(("text misspelled", f'caption "{close}", image "{line.text}"'))
        else:
            found.append(("text not quoted", f'the image reads "{line.text}"'))
    words = " ".join(re.findall(r"[\w-]+", text.lower()))
    coloured = [r for r in analysis.regions if r.colour in HUE_NAMES]
    main = max(coloured, key=lambda r: r.share) if coloured else None
    for colour, what in ((analysis.background, "background"), (main.colour if main else None, "largest colour")):
        if colour and not re.search(rf"\b{colour}\b", words):
            found.append(("colour not named", f"the {what} is {colour}"))
    bands = [r for r in analysis.regions if r.kind == "band"]
    if bands and "band" not in words.split():
        found.append(("band not named", f"a {bands[0].colour} band at the {bands[0].position}"))
    panels = len(analysis.panels)
    if (said.panels or 0) != panels and (panels >= 2 or said.panels):
        found.append(("panel count wrong", f"caption {said.panels or 0}, image {panels}"))
    titles = [e for e in said.elements if e.role == "title" and e.text and e.position]
    if titles and lines:
        for line in lines:
            if _normal(line.text) == _normal(titles[0].text):
                seen = grid_position(*line.centre, analysis.width, analysis.height)
                if _opposite(titles[0].position, seen):
                    found.append(("position wrong", f'title "{line.text}": caption {titles[0].position}, '
                                                    f"image {seen}"))
    return found


def lint_folder(folder: str | Path, model: str | None = None, ocr: bool = True,
                max_tokens: int | None = None, images: bool = False) -> tuple[list[LintFinding], int]:
    """Findings for every caption of a dataset folder, and how many captions were read."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder")
    count_tokens = None
    if model is not None:
        from .stats import token_counter  # deferred: torch and diffusers load only when --model counts tokens

        tokens = token_counter(model)
        if max_tokens is None and tokens.limit is None:
            raise UserError(f"--model {model}: neither its tokenizer nor its text encoder declares a length limit; "
                            "pass --max-tokens N")
        max_tokens = max_tokens or tokens.limit
        count_tokens = tokens.count
    elif max_tokens is not None:
        raise UserError("--max-tokens needs --model (tokens are counted with the model's tokenizer)")
    reader = read_text if ocr else None
    findings: list[LintFinding] = []
    captions = sorted(p for p in folder.rglob("*.txt") if CACHE_DIR_NAME not in p.parts)
    for txt in captions:
        try:
            text = txt.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            findings.append(LintFinding(txt, "not UTF-8", f"{exc.reason} at byte {exc.start}"))
            continue
        image = next((txt.with_suffix(ext) for ext in IMAGE_EXTS if txt.with_suffix(ext).exists()), None)
        has_text, read = None, None
        if reader is not None and image is not None:
            read = reader(open_image(image))
            has_text = any(box.confidence > 0.8 and len(box.text) >= 2 for box in read)
        for check, detail in lint_caption(text, has_text, max_tokens if count_tokens else None, count_tokens):
            findings.append(LintFinding(txt, check, detail))
        if images and image is not None:
            findings += [LintFinding(txt, check, detail)
                         for check, detail in lint_against_image(text, open_image(image).convert("RGB"), read)]
    return findings, len(captions)


def summary_table(findings: list[LintFinding], total: int, images: bool = False) -> str:
    counts = Counter(f.check for f in findings)
    files = {check: len({f.path for f in findings if f.check == check}) for check in counts}
    rows = [f"{'check':20s} {'files':>6s}"] + [f"{check:20s} {files.get(check, 0):6d}"
                                               for check in CHECKS + (IMAGE_CHECKS if images else ())]
    flagged = len({f.path for f in findings})
    rows.append(f"{flagged} of {total} captions flagged")
    return "\n".join(rows)
