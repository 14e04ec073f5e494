"""Where an image's prompt is found: its PNG text, a same-stem .txt, or the folder's metadata.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError
from ..io import open_image, read_text_file


def prompt_for(path: Path, metadata: dict[str, str]) -> str | None:
    """An image's prompt: its PNG text (what ``generate`` writes), a same-stem .txt, or metadata.jsonl."""
    text = open_image(path).info  # a PNG's text chunks (our generate writes the prompt there)
    if text.get("prompt"):
        return text["prompt"]
    txt = path.with_suffix(".txt")
    if txt.exists():
        return read_text_file(txt).strip()
    return metadata.get(path.name)


def read_metadata_captions(folder: Path) -> dict[str, str]:
    """{file name: text} from a folder's metadata.jsonl (empty when there is none)."""
    metadata: dict[str, str] = {}
    meta_file = folder / "metadata.jsonl"
    if meta_file.exists():
        for lineno, line in enumerate(read_text_file(meta_file).splitlines(), start=1):
            if line.strip():
                try:
                    row = json.loads(line)
                    metadata[str(row["file_name"])] = str(row.get("text", ""))
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise UserError(f"{meta_file}:{lineno}: expected a JSON object with file_name") from None
    return metadata


def require_held_out(evaluated: list[str], seen: list[str] | set[str], what: str) -> int:
    """The number of evaluation prompts that were also training (or pair-generation) prompts, which must
    be 0: a score on seen prompts measures memory, not generalisation."""
    overlap = set(evaluated) & set(seen)
    if overlap:
        raise UserError(f"{what}: {len(overlap)} evaluation prompts were also training prompts, e.g. "
                        f"{sorted(overlap)[0]!r}; evaluate on another split")
    return 0
