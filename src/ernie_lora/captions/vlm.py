"""An optional captioning model: a small vision-language model through transformers, merged with what the OCR
and the layout analysis found.

``caption auto --model NAME`` loads NAME (a hub id or a local folder) with ``AutoProcessor`` and
``AutoModelForImageTextToText``, asks it to describe the design in the layout language's terms, parses its
free text with ``schema.parse`` and merges that into the schema the OCR and the analysis built:

- quoted text comes from the OCR, which reads every letter; the model's quoted text is used only for an
  image where the OCR read nothing (stylised lettering), never to replace or add to what OCR read;
- shapes the analysis did not find (of a role and colour not yet named) are added; the kind, theme,
  background, panel count and reading order fill what the analysis left open;
- the model's first sentence, quotes removed, becomes the caption's *subject* ("showing a saxophone
  player under a spotlight"): what the picture shows, which no layout analysis can say.

Models that work (the processor must have a chat template, or be Florence-2's with its task token):
``HuggingFaceTB/SmolVLM-256M-Instruct`` (CPU-friendly, 256M), ``Qwen/Qwen2.5-VL-3B-Instruct`` (best at
layouts and text; a GPU; its processor needs ``pip install torchvision``), ``florence-community/Florence-2-base``
(a detailed paragraph; no layout terms).
"""

from __future__ import annotations

import re
from dataclasses import replace

from PIL import Image

from .. import hub
from ..errors import UserError
from .schema import SHAPES, CaptionSchema, parse

LAYOUT_PROMPT = (
    "Describe this design in one short paragraph. First say in one sentence what the picture shows. Then say "
    "whether it is a poster, an infographic, a comic page or a UI screen; quote every piece of text exactly in "
    "double quotes with its role (title, subtitle, label, button) and position (top, bottom, left, right, center); "
    "name each coloured band, bar or block with its colour and position; give the number of panels, the "
    "background colour and the main theme colour."
)
FLORENCE_TASK = "<MORE_DETAILED_CAPTION>"  # Florence-2 takes a task token, not a chat prompt
MAX_SHAPES = 8
MAX_SUBJECT_WORDS = 24
_OPENING = re.compile(r"^(?:the|this)\s+(?:image|picture|design|poster|graphic)\s+(?:shows|depicts|is|features|"
                      r"contains|displays)\s+", re.IGNORECASE)


class CaptionModel:
    """A loaded vision-language model that describes one image at a time (greedy, so reruns agree)."""

    def __init__(self, name: str, max_new_tokens: int = 192) -> None:
        try:  # deferred: torch and transformers load only when --model asks for a captioning model
            import torch
            from huggingface_hub.utils import logging as hub_logging
            from transformers import AutoModelForImageTextToText, AutoProcessor
            from transformers import logging as transformers_logging

            transformers_logging.set_verbosity_error()
            hub_logging.set_verbosity_error()  # its retry warnings would bury the one line that says what failed

            self.device = "cuda" if torch.cuda.is_available() else "cpu"
            dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
            source = hub.local_source(name)
            self.processor = AutoProcessor.from_pretrained(source)
            self.model = AutoModelForImageTextToText.from_pretrained(source, dtype=dtype).to(self.device).eval()
        except Exception as exc:  # a missing download, an unknown architecture: the user's setup, in one line
            why = str(exc) if isinstance(exc, hub.NotCached) else (
                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            raise UserError(f"--model {name}: cannot load it as an image-text-to-text model ({why})") from None
        self.name = name
        self.max_new_tokens = max_new_tokens
        self.florence = getattr(self.model.config, "model_type", "") == "florence2"
        if not self.florence and not getattr(self.processor, "chat_template", None):
            raise UserError(f"--model {name}: its processor has no chat template (use an instruction-tuned model, "
                            "e.g. HuggingFaceTB/SmolVLM-256M-Instruct)")

    def describe(self, image: Image.Image) -> str:
        import torch

        if self.florence:
            prompt = FLORENCE_TASK
        else:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": LAYOUT_PROMPT}]}]
            prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = self.processor(images=[image.convert("RGB")], text=[prompt], return_tensors="pt").to(self.device)
        if self.device == "cuda":
            inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs.items()}
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1]:]
        return self.processor.batch_decode(new, skip_special_tokens=True)[0].strip()


def subject_of(text: str) -> str | None:
    """What the picture shows, from the model's first sentence (quotes and the "The image shows" opening
    removed, at most 24 words); None when it is not plain words (a broken or untrained model's output)."""
    text = re.sub(r'"[^"]*"|“[^”]*”', " ", text)
    sentence = re.split(r"(?<=[.!?])\s|\n", text.strip(), maxsplit=1)[0].strip().rstrip(".!?")
    sentence = _OPENING.sub("", " ".join(sentence.split()))
    words = sentence.split()
    letters = sum(ch.isalpha() or ch.isspace() or ch in ",'-" for ch in sentence)
    if len(words) < 2 or letters < 0.9 * len(sentence) or any(not ch.isprintable() for ch in sentence):
        return None
    sentence = " ".join(words[:MAX_SUBJECT_WORDS])
    return sentence[0].lower() + sentence[1:]


def merge_description(schema: CaptionSchema, text: str, kind_given: bool = False) -> CaptionSchema:
    """``schema`` (from the OCR and the layout analysis) with what a model's free ``text`` adds; see the
    module's rules. ``kind_given``: the user chose the kind, so the model's guess does not replace it."""
    theirs = parse(text)
    merged = replace(schema, elements=list(schema.elements), colours=list(schema.colours))
    if merged.kind == "other" and not kind_given:
        merged.kind = theirs.kind
    read_by_ocr = any(e.text is not None for e in schema.elements)
    for element in theirs.elements:
        if element.text is not None:
            if not read_by_ocr:
                merged.elements.append(element)
            continue
        if element.role in SHAPES and sum(e.role in SHAPES for e in merged.elements) < MAX_SHAPES and not any(
                e.role == element.role and (e.colour == element.colour or None in (e.colour, element.colour))
                for e in merged.elements):
            merged.elements.append(element)
    for name in ("theme", "background", "panels", "reading_order", "layout"):
        if getattr(merged, name) is None:
            setattr(merged, name, getattr(theirs, name))
    merged.subject = merged.subject or subject_of(text)
    return merged
