"""What a dataset holds before a run trains on it: sizes, aspect ratios and the bucket each image lands in
at the configured resolution (with a contact sheet of what each bucket's crop keeps), caption lengths in
the model's own tokens, words the tokenizer does not know, the most used words, and the languages of the
captions and of their quoted text.
"""

from __future__ import annotations

import re
import statistics
import unicodedata
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

from ..errors import UserError
from ..eval.text import quoted_text, without_quotes
from ..io import atomic_write
from .buckets import Bucket, nearest_bucket, resize_and_crop
from .dataset import Item, load_rgb

# Words too common to say anything about a dataset (English, plus the layout language's glue words).
STOPWORDS = frozenset("""a an the and or of in on at to for with by from is are be as it its this that these those
into over under above below while than then so if but not no one two three four five six some each every""".split())
# Function words that tell Latin-script languages apart (a caption is long enough for a few of them).
LATIN_MARKERS = {
    "en": {"the", "and", "with", "of", "at", "in", "on", "a", "an", "is", "for", "from"},
    "de": {"der", "die", "das", "und", "mit", "ein", "eine", "auf", "im", "ist", "oben", "unten"},
    "fr": {"le", "la", "les", "et", "avec", "un", "une", "des", "du", "en", "sur", "au"},
    "es": {"el", "la", "los", "las", "y", "con", "un", "una", "del", "en", "sobre", "arriba"},
    "it": {"il", "lo", "la", "gli", "e", "con", "un", "una", "del", "della", "sopra", "sotto"},
    "pt": {"o", "os", "as", "e", "com", "um", "uma", "do", "da", "em", "sobre", "acima"},
    "nl": {"de", "het", "en", "met", "een", "van", "op", "boven", "onder", "bij"},
}
_SCRIPTS = (("zh", re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")),
            ("ja", re.compile(r"[\u3040-\u30ff]")),
            ("ko", re.compile(r"[\uac00-\ud7af\u1100-\u11ff]")),
            ("cyrillic", re.compile(r"[\u0400-\u04ff]")),
            ("arabic", re.compile(r"[\u0600-\u06ff]")),
            ("latin", re.compile(r"[A-Za-z\u00c0-\u024f]")))
_WORD = re.compile(r"[^\W\d_]+", re.UNICODE)
SHEET_PER_BUCKET = 8  # thumbnails per bucket row of the contact sheet
SHEET_HEIGHT = 96  # pixels of each thumbnail's height


def language_of(text: str) -> str | None:
    """The language of a text by its script (Chinese, Japanese, Korean, Cyrillic, Arabic) and, for Latin
    script, by its function words (en, de, fr, es, it, pt, nl; "latin" when none decides); None for text
    without letters. Japanese wins over Chinese when kana appear (Japanese mixes kanji in)."""
    counts = {name: len(pattern.findall(text)) for name, pattern in _SCRIPTS}
    # a Chinese character is a word, a Latin word is about five letters: compare them a third apart
    if counts["ja"] and counts["ja"] + counts["zh"] >= counts["latin"] / 3:
        return "ja"
    if counts["zh"] and counts["zh"] >= counts["latin"] / 3:
        return "zh"
    script = max(("ko", "cyrillic", "arabic", "latin"), key=counts.get)
    if not counts[script]:
        return None
    if script != "latin":
        return script
    words = [w.lower() for w in _WORD.findall(text)]
    votes = {lang: sum(w in markers for w in words) for lang, markers in LATIN_MARKERS.items()}
    best = max(votes, key=votes.get)
    return best if votes[best] and list(votes.values()).count(votes[best]) == 1 else "latin"


def caption_words(caption: str) -> list[str]:
    """The caption's own words (its quoted text left out), lowercased."""
    return [w.lower() for w in _WORD.findall(without_quotes(unicodedata.normalize("NFKC", caption)))]


@dataclass
class TokenCounter:
    """Counts a caption's tokens as the pipeline does and names the words its tokenizer does not know."""
    model: str
    count: Callable[[str], int]
    limit: int | None  # tokens the text encoder reads; the rest is cut off
    unknown: Callable[[str], list[str]]


def token_counter(model: str, revision: str | None = None) -> TokenCounter:
    """The tokenizer of ``model`` (a local folder, a hub id in the cache, micro or tiny) as a counter."""
    from ..captions.lint import load_tokenizer
    from ..models import family_for  # deferred: torch and transformers load only when tokens are counted

    tokenizer = load_tokenizer(model)
    unk = tokenizer.unk_token_id

    def unknown(text: str) -> list[str]:
        if unk is None or not tokenizer.is_fast:
            return []  # byte-level tokenizers (Ministral-3's) know every string
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return [text[a:b] for token, (a, b) in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True)
                if token == unk]

    return TokenCounter(model, lambda text: len(tokenizer(text, add_special_tokens=True)["input_ids"]),
                        family_for(model).text_token_limit(tokenizer, model, revision), unknown)


@dataclass
class DatasetStats:
    items: list[Item]
    resolution: int
    buckets: dict[Bucket, list[Item]]
    upscaled: list[Item]  # smaller than their bucket: trained on an enlarged image
    lengths: list[int]  # per caption, in ``length_unit``
    length_unit: str  # "tokens (MODEL)" or "words"
    limit: int | None = None
    over_limit: list[tuple[Item, int]] = field(default_factory=list)
    unknown_words: Counter = field(default_factory=Counter)
    top_words: list[tuple[str, int]] = field(default_factory=list)
    languages: Counter = field(default_factory=Counter)
    quoted_languages: Counter = field(default_factory=Counter)
    quoting: int = 0  # captions that quote text


def dataset_stats(items: list[Item], resolution: int, choices: list[Bucket], tokens: TokenCounter | None = None,
                  top: int = 15) -> DatasetStats:
    """Statistics of the usable items of a checked dataset (see ``check_dataset``) at a training resolution
    and its buckets (``make_buckets``)."""
    if not items:
        raise UserError("no usable images (run `ernie-lora dataset check` for the problems)")
    buckets: dict[Bucket, list[Item]] = {}
    upscaled = []
    for item in items:
        bucket = nearest_bucket(item.width, item.height, choices)
        buckets.setdefault(bucket, []).append(item)
        if max(bucket.width / item.width, bucket.height / item.height) > 1.0:
            upscaled.append(item)
    stats = DatasetStats(items, resolution, dict(sorted(buckets.items(), key=lambda kv: kv[0].ratio)), upscaled,
                         [], f"tokens ({tokens.model})" if tokens else "words", tokens.limit if tokens else None)
    words: Counter = Counter()
    for item in items:
        own = caption_words(item.caption)
        words.update(w for w in own if w not in STOPWORDS and len(w) > 1)
        length = tokens.count(item.caption) if tokens else len(item.caption.split())
        stats.lengths.append(length)
        if stats.limit is not None and length > stats.limit:
            stats.over_limit.append((item, length))
        if tokens:
            stats.unknown_words.update(w.lower() for w in tokens.unknown(item.caption) if w.strip())
        stats.languages[language_of(without_quotes(item.caption)) or "none"] += 1
        quoted = " ".join(quoted_text(item.caption))
        if quoted:
            stats.quoting += 1
            stats.quoted_languages[language_of(quoted) or "none"] += 1
    stats.top_words = words.most_common(top)
    return stats


def _spread(values: list[float], fmt: str = "{:.0f}") -> str:
    return " / ".join(fmt.format(v) for v in (min(values), statistics.median(values), max(values)))


def _shares(counter: Counter, total: int) -> str:
    return ", ".join(f"{name} {count} ({count / total:.0%})" for name, count in counter.most_common())


def format_dataset_stats(stats: DatasetStats) -> str:
    n = len(stats.items)
    ratios = [i.width / i.height for i in stats.items]
    shapes = Counter("portrait" if r < 0.9 else "landscape" if r > 1.1 else "square" for r in ratios)
    sizes = Counter(f"{i.width}x{i.height}" for i in stats.items).most_common(3)
    lines = [
        f"images          {n}",
        f"width           {_spread([i.width for i in stats.items])} (min / median / max)",
        f"height          {_spread([i.height for i in stats.items])}",
        f"aspect (w/h)    {_spread(ratios, '{:.2f}')}; {_shares(shapes, n)}",
        f"common sizes    {', '.join(f'{size} ({count})' for size, count in sizes)}",
        f"{f'buckets at {stats.resolution}':16s}" + ", ".join(f"{b} {len(v)}" for b, v in stats.buckets.items()),
        f"upscaled        {len(stats.upscaled)} image(s) smaller than their bucket"
        + (f" (e.g. {stats.upscaled[0].image.name} {stats.upscaled[0].width}x{stats.upscaled[0].height})"
           if stats.upscaled else ""),
        f"caption length  {_spread(stats.lengths)} {stats.length_unit}"
        + (f"; limit {stats.limit}, {len(stats.over_limit)} over it" if stats.limit is not None else ""),
    ]
    if stats.unknown_words:
        lines.append(f"unknown words   {sum(stats.unknown_words.values())} in captions, not in the tokenizer: "
                     + ", ".join(f"{w} ({c})" for w, c in stats.unknown_words.most_common(8)))
    lines += [
        f"top words       {', '.join(f'{w} {c}' for w, c in stats.top_words)}",
        f"languages       {_shares(stats.languages, n)} (caption words outside quotes)",
        f"quoted text     {stats.quoting} of {n} captions"
        + (f"; {_shares(stats.quoted_languages, stats.quoting)}" if stats.quoting else ""),
    ]
    return "\n".join(lines) + "\n"


def contact_sheet(stats: DatasetStats, per_bucket: int = SHEET_PER_BUCKET, height: int = SHEET_HEIGHT) -> Image.Image:
    """One row per bucket: its size and image count, then up to ``per_bucket`` of its images (spread over
    the bucket's file order) as training crops them, each named under it."""
    label_w, gap, name_h = 150, 4, 14
    widths = {b: max(1, round(height * b.ratio)) for b in stats.buckets}
    sheet_w = label_w + max(min(len(v), per_bucket) * (widths[b] + gap) for b, v in stats.buckets.items()) + gap
    row_h = height + name_h + gap
    sheet = Image.new("RGB", (sheet_w, len(stats.buckets) * row_h + gap), "white")
    draw = ImageDraw.Draw(sheet)
    for row, (bucket, items) in enumerate(stats.buckets.items()):
        y = gap + row * row_h
        draw.text((6, y + 4), f"{bucket}", fill="black")
        draw.text((6, y + 20), f"{len(items)} image{'s' * (len(items) != 1)}", fill="#555")
        shown = items
        if len(items) > per_bucket:
            shown = [items[round(i * (len(items) - 1) / (per_bucket - 1))] for i in range(per_bucket)]
            draw.text((6, y + 36), f"({per_bucket} shown)", fill="#888")
        for col, item in enumerate(shown):
            x, w = label_w + col * (widths[bucket] + gap), widths[bucket]
            crop = resize_and_crop(load_rgb(item.image), bucket)  # what training sees of it
            sheet.paste(crop.resize((w, height), Image.Resampling.LANCZOS), (x, y))
            name = item.image.stem
            room = max(3, w // 6)
            draw.text((x, y + height + 1), name if len(name) <= room else name[:room - 1] + "…", fill="#333")
    return sheet


def save_contact_sheet(stats: DatasetStats, path: Path) -> Path:
    sheet = contact_sheet(stats)
    atomic_write(path, lambda tmp: sheet.save(tmp, format="PNG"))
    return path
