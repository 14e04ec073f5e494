"""What a dataset's captions hold: lengths in the model's own tokens (and the text encoder's limit), words
the tokenizer does not know, the most used words outside quotes, and the languages of the captions and of
their quoted text. ``dataset stats`` prints these beside the images' figures (``data.stats``).
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from ..data.stats import shares, spread
from ..eval.text import quoted_text, without_quotes

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
    from ..models import family_for  # deferred: torch and transformers load only when tokens are counted

    family = family_for(model)
    tokenizer = family.load_tokenizer(model, revision)
    unk = tokenizer.unk_token_id

    def unknown(text: str) -> list[str]:
        if unk is None or not tokenizer.is_fast:
            return []  # byte-level tokenizers (Ministral-3's) know every string
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return [text[a:b] for token, (a, b) in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True)
                if token == unk]

    return TokenCounter(model, lambda text: len(tokenizer(text, add_special_tokens=True)["input_ids"]),
                        family.text_token_limit(tokenizer, model, revision), unknown)


@dataclass
class CaptionStats:
    lengths: list[int]  # per caption, in ``unit``
    unit: str  # "tokens (MODEL)" or "words"
    limit: int | None = None
    over_limit: int = 0
    unknown_words: Counter = field(default_factory=Counter)
    top_words: list[tuple[str, int]] = field(default_factory=list)
    languages: Counter = field(default_factory=Counter)
    quoted_languages: Counter = field(default_factory=Counter)
    quoting: int = 0  # captions that quote text


def caption_stats(captions: list[str], tokens: TokenCounter | None = None, top: int = 15) -> CaptionStats:
    """Statistics of a dataset's captions; lengths in ``tokens``' tokens, in words without it."""
    stats = CaptionStats([], f"tokens ({tokens.model})" if tokens else "words", tokens.limit if tokens else None)
    words: Counter = Counter()
    for caption in captions:
        words.update(w for w in caption_words(caption) if w not in STOPWORDS and len(w) > 1)
        length = tokens.count(caption) if tokens else len(caption.split())
        stats.lengths.append(length)
        stats.over_limit += stats.limit is not None and length > stats.limit
        if tokens:
            stats.unknown_words.update(w.lower() for w in tokens.unknown(caption) if w.strip())
        stats.languages[language_of(without_quotes(caption)) or "none"] += 1
        quoted = " ".join(quoted_text(caption))
        if quoted:
            stats.quoting += 1
            stats.quoted_languages[language_of(quoted) or "none"] += 1
    stats.top_words = words.most_common(top)
    return stats


def format_caption_stats(stats: CaptionStats) -> str:
    n = len(stats.lengths)
    lines = [f"caption length  {spread(stats.lengths)} {stats.unit}"
             + (f"; limit {stats.limit}, {stats.over_limit} over it" if stats.limit is not None else "")]
    if stats.unknown_words:
        lines.append(f"unknown words   {sum(stats.unknown_words.values())} in captions, not in the tokenizer: "
                     + ", ".join(f"{w} ({c})" for w, c in stats.unknown_words.most_common(8)))
    lines += [
        f"top words       {', '.join(f'{w} {c}' for w, c in stats.top_words)}",
        f"languages       {shares(stats.languages, n)} (caption words outside quotes)",
        f"quoted text     {stats.quoting} of {n} captions"
        + (f"; {shares(stats.quoted_languages, stats.quoting)}" if stats.quoting else ""),
    ]
    return "\n".join(lines) + "\n"
