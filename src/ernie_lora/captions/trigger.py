"""Trigger words: a rare word or phrase a LoRA learns to answer to.

Training (``data.trigger_word``): ``[trigger]`` in a caption or sample prompt is replaced by it. When no caption
says ``[trigger]``, every text that names the word nowhere gets it put first ("ohwx, a poster ..."), as
ai-toolkit and the hosted trainers do; when some do, the placeholders alone say where it goes, so that
images without it (regularisation, DreamBooth's prior images) teach what the word is not. The
LoRA file records it (``ernie_lora.trigger_word`` and ModelSpec's ``modelspec.trigger_phrase``);
``generate`` fills ``[trigger]`` in prompts from the LoRAs given and says when a prompt leaves one out.
"""

from __future__ import annotations

import re

PLACEHOLDER = re.compile(r"\[trigger\]", re.IGNORECASE)


def has_placeholder(text: str) -> bool:
    return bool(PLACEHOLDER.search(text))


def names_trigger(text: str, trigger: str) -> bool:
    """Whether ``text`` says ``trigger`` as a word or phrase of its own (case aside). Only Latin letters and
    digits bound a word: Chinese runs on without spaces, so 水墨 is said in 一幅水墨画."""
    return re.search(rf"(?<![A-Za-z0-9_]){re.escape(trigger)}(?![A-Za-z0-9_])", text, re.IGNORECASE) is not None


def fill_placeholder(text: str, trigger: str) -> str:
    return PLACEHOLDER.sub(lambda _: trigger, text)


def with_trigger(text: str, trigger: str | None, put_first: bool = True) -> str:
    """``text`` as trained with ``trigger``: the placeholder filled, or (``put_first``) the trigger put first when
    the text does not name it. No trigger, or an empty text (caption dropout's), leaves it as it is."""
    if not trigger or not text.strip():
        return text
    text = fill_placeholder(text, trigger)
    return text if not put_first or names_trigger(text, trigger) else f"{trigger}, {text}"
