"""Images of a folder with their prompt and category, for annotation, statistics and weighted sampling.

A category comes from ``metadata.jsonl`` (``"category": "Graphic Design/Poster"``) or, failing that,
from the image's folder inside the dataset (``Graphic Design/Poster/001.png``); images at the top level
are ``uncategorized``. Categories are hierarchical: ``Graphic Design`` holds ``Graphic Design/Poster``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..io import read_text_file
from .dataset import CACHE_DIR_NAME, IMAGE_EXTS, METADATA_FILE

UNCATEGORIZED = "uncategorized"


@dataclass(frozen=True)
class ImageEntry:
    path: str  # relative to the dataset root, with "/" separators
    prompt: str
    category: str


def inside(root: Path, path: Path) -> bool:
    """True when ``path``, symlinks resolved, is inside ``root`` (resolved)."""
    return path.resolve().is_relative_to(root.resolve())


def list_images(root: str | Path, outside_links: bool = False) -> list[ImageEntry]:
    """Every image under ``root`` (sorted), with its prompt (.txt beside it or metadata ``text``) and
    category. Symlinks that lead outside the root are left out unless ``outside_links`` (training may
    follow them; the annotation server never does)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: not a folder")
    meta = metadata_rows(root)
    entries = []
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() not in IMAGE_EXTS or CACHE_DIR_NAME in path.parts or path.name.startswith("."):
            continue
        if not path.is_file() or not (outside_links or inside(root, path)):
            continue
        rel = path.relative_to(root).as_posix()
        row = meta.get(rel, {})
        prompt = row.get("text", row.get("caption"))
        sidecar = path.with_suffix(".txt")
        if prompt is None and sidecar.is_file() and (outside_links or inside(root, sidecar)):
            prompt = read_text_file(sidecar).strip()
        category = row.get("category") or (Path(rel).parent.as_posix() if "/" in rel else UNCATEGORIZED)
        entries.append(ImageEntry(rel, str(prompt or ""), str(category).strip("/") or UNCATEGORIZED))
    return entries


def metadata_rows(root: Path) -> dict[str, dict]:
    """``metadata.jsonl`` as {file_name: row} (empty without the file); a bad line names file:line."""
    path = root / METADATA_FILE
    rows: dict[str, dict] = {}
    if not path.exists():
        return rows
    for lineno, line in enumerate(read_text_file(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
        if not isinstance(row, dict) or "file_name" not in row:
            raise UserError(f"{path}:{lineno}: missing key 'file_name'")
        if not isinstance(row["file_name"], str) or not row["file_name"].strip():
            raise UserError(f"{path}:{lineno}: 'file_name' must be a file name, got {type(row['file_name']).__name__}")
        rows[Path(row["file_name"]).as_posix()] = row
    return rows
