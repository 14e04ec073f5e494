"""Dataset folders: images with same-stem ``.txt`` captions (kohya / ai-toolkit convention) and/or a
``metadata.jsonl`` with ``file_name`` and ``text`` (diffusers imagefolder convention).

``check_dataset`` reads every file once and reports every problem per file; training refuses a
dataset whose report has errors. What it learnt of each image that passed (size, mode, content hash) is
kept in ``.ernie_lora_cache/checked.json`` keyed by (path, byte size, mtime), so checking an unchanged
dataset again opens no image: at 100k images that is minutes of decoding saved on every run. That includes
each image's perceptual signature, so near duplicates (see ``duplicates.py``) are found without decoding.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..errors import UserError
from ..io import atomic_write_json, sha256_text
from .buckets import Bucket, bucket_and_upscale
from .duplicates import NEAR_DISTANCE, image_signature, near_duplicates

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
METADATA_FILE = "metadata.jsonl"
CACHE_DIR_NAME = ".ernie_lora_cache"
CHECKED_FILE = "checked.json"
CHECKED_VERSION = 2  # entries: [bytes, mtime_ns, width, height, mode, sha256, signature]
CHECKED_FIELDS = 7
UNUSUAL_MODES = {
    "CMYK": "CMYK, converted to RGB",
    "P": "palette, converted to RGB",
    "PA": "palette with alpha, composited on white",
    "RGBA": "alpha channel, composited on white",
    "LA": "grey with alpha, composited on white",
    "I;16": "16-bit, reduced to 8-bit",
    "I;16B": "16-bit, reduced to 8-bit",
    "I;16L": "16-bit, reduced to 8-bit",
    "I": "32-bit integer, reduced to 8-bit",
    "F": "floating point, reduced to 8-bit",
    "1": "1-bit, converted to RGB",
    "YCbCr": "YCbCr, converted to RGB",
}


@dataclass
class Finding:
    path: str
    level: str  # "error" stops training, "warning" does not
    message: str

    def __str__(self) -> str:
        return f"{self.level}: {self.path}: {self.message}"


@dataclass
class Item:
    image: Path
    caption: str
    width: int
    height: int
    sha256: str


@dataclass
class DatasetReport:
    root: Path
    items: list[Item] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    images_seen: int = 0

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "warning"]

    def raise_if_errors(self) -> None:
        if not self.items and not self.errors:
            raise UserError(f"dataset {self.root}: no images found (looked for {', '.join(sorted(IMAGE_EXTS))})")
        if self.errors:
            first = self.errors[0]
            raise UserError(
                f"dataset {self.root}: {len(self.errors)} problem(s) stop training; first: {first.path}: "
                f"{first.message} (run `ernie-lora dataset check {self.root}` for all)"
            )


def _rel(root: Path, path: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def read_metadata(root: Path) -> tuple[dict[str, str], list[Finding]]:
    """Captions from ``metadata.jsonl``: {relative file name: text}, plus per-line problems."""
    path = root / METADATA_FILE
    captions: dict[str, str] = {}
    findings: list[Finding] = []
    if not path.exists():
        return captions, findings
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        return captions, [Finding(METADATA_FILE, "error", f"not UTF-8 ({exc.reason} at byte {exc.start})")]
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{METADATA_FILE}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            findings.append(Finding(where, "error", f"invalid JSON ({exc.msg})"))
            continue
        if not isinstance(row, dict) or "file_name" not in row:
            findings.append(Finding(where, "error", "missing key 'file_name'"))
            continue
        if not isinstance(row["file_name"], str) or not row["file_name"].strip():
            findings.append(Finding(where, "error", f"'file_name' must be a file name, got "
                                    f"{type(row['file_name']).__name__}"))
            continue
        text = row.get("text", row.get("caption"))
        if text is None:
            findings.append(Finding(where, "error", "missing key 'text'"))
            continue
        if not isinstance(text, str):
            findings.append(Finding(where, "error", f"'text' must be a string, got {type(text).__name__}"))
            continue
        captions[str(Path(row["file_name"]))] = text
    return captions, findings


def _iter_files(root: Path) -> list[Path]:
    return sorted(
        p for p in root.rglob("*") if p.is_file() and CACHE_DIR_NAME not in p.parts and not p.name.startswith(".")
    )


def load_rgb(path: Path) -> Image.Image:
    """Open an image as 8-bit RGB: EXIF rotation applied, alpha composited on white, 16-bit reduced."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        im.load()
    return as_rgb(im)


def as_rgb(im: Image.Image) -> Image.Image:
    """``load_rgb``'s conversion of an opened image."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        peak = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        im = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode in ("P", "PA"):
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA"):
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im.convert("RGBA"))
    return im.convert("RGB")


def check_dataset(root: str | Path, min_side: int = 256, near: int | None = NEAR_DISTANCE,
                  count_tokens: Callable[[str], int] | None = None, max_tokens: int | None = None,
                  buckets: list[Bucket] | None = None) -> DatasetReport:
    """Read every file of a dataset folder and report every problem.

    ``min_side``: images whose shorter side is below it are flagged (they will be upscaled to fill
    the smallest bucket); with ``buckets`` (a training resolution's), each image is compared with the
    bucket it lands in instead, so a 200x200 image is flagged at 256 even though the smallest side of any
    bucket is 181. ``near``: the largest perceptual-hash distance (bits of 256) of two images
    flagged as near duplicates; None: exact duplicates only. ``count_tokens`` and ``max_tokens``: captions
    over the text encoder's limit are flagged (the encoder reads only the first ``max_tokens``).
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserError(f"dataset {root}: not a folder")
    report = DatasetReport(root=root)
    meta_captions, meta_findings = read_metadata(root)
    report.findings.extend(meta_findings)
    files = _iter_files(root)
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTS]
    image_stems = {p.with_suffix("") for p in images}
    report.images_seen = len(images)

    for txt in (p for p in files if p.suffix.lower() == ".txt"):
        if txt.with_suffix("") not in image_stems:
            report.findings.append(Finding(_rel(root, txt), "warning", "caption without an image"))
    image_names = {_rel(root, p) for p in images}
    for name in meta_captions:
        if name not in image_names:
            report.findings.append(Finding(METADATA_FILE, "warning", f"caption for {name!r}: no such image"))

    by_hash: dict[str, list[str]] = defaultdict(list)
    known, checked = _read_checked(root), {}
    for path in images:
        rel = _rel(root, path)
        stat = path.stat()
        entry = known.get(rel)
        if entry is None or entry[:2] != [stat.st_size, stat.st_mtime_ns]:
            entry = _check_image(path, rel, report)
            entry = None if entry is None else [stat.st_size, stat.st_mtime_ns, *entry]
        if entry is not None:
            checked[rel] = entry
            _image_findings(rel, *entry[2:5], min_side, buckets, report)
        caption = _caption_for(path, rel, meta_captions, report)
        if entry is None or caption is None:
            continue
        width, height, digest = entry[2], entry[3], entry[5]
        by_hash[digest].append(rel)
        report.items.append(Item(image=path, caption=caption, width=width, height=height, sha256=digest))
        if count_tokens is not None and max_tokens is not None and (length := count_tokens(caption)) > max_tokens:
            report.findings.append(Finding(rel, "warning", f"caption is {length} tokens; the text encoder reads "
                                           f"the first {max_tokens}, the rest is cut off"))
    for names in by_hash.values():
        for dup in names[1:]:
            report.findings.append(Finding(dup, "warning", f"duplicate image (same content as {names[0]})"))
    if near is not None:
        firsts = {names[0] for names in by_hash.values()}  # exact copies are reported above, once
        for first, second, distance in near_duplicates({rel: checked[rel][6] for rel in firsts}, near):
            report.findings.append(Finding(second, "warning", f"near duplicate of {first} (perceptual hash "
                                           f"{distance} of 256 bits apart, same colours)"))
    if checked != known:
        _write_checked(root, checked)
    return report


def _read_checked(root: Path) -> dict[str, list]:
    """What an earlier check learnt of each image: {path: [bytes, mtime_ns, width, height, mode, sha256,
    signature]}."""
    try:
        data = json.loads((root / CACHE_DIR_NAME / CHECKED_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # none yet, or unreadable: check everything again
    if not isinstance(data, dict) or data.get("version") != CHECKED_VERSION or not isinstance(data.get("images"), dict):
        return {}
    return {rel: entry for rel, entry in data["images"].items()
            if isinstance(entry, list) and len(entry) == CHECKED_FIELDS}


def _write_checked(root: Path, checked: dict[str, list]) -> None:
    try:
        atomic_write_json(root / CACHE_DIR_NAME / CHECKED_FILE, {"version": CHECKED_VERSION, "images": checked})
    except OSError:
        pass  # a read-only dataset is checked in full every time, nothing worse


def _image_findings(rel: str, width: int, height: int, mode: str, min_side: int, buckets: list[Bucket] | None,
                    report: DatasetReport) -> None:
    if mode in UNUSUAL_MODES:
        report.findings.append(Finding(rel, "warning", f"mode {mode}: {UNUSUAL_MODES[mode]}"))
    if buckets is not None:
        bucket, scale = bucket_and_upscale(width, height, buckets)
        if scale > 1.0:
            report.findings.append(Finding(rel, "warning", f"{width}x{height} is smaller than its bucket {bucket}; "
                                           f"it will be upscaled {scale:.2f}x"))
    elif min(width, height) < min_side:
        report.findings.append(
            Finding(rel, "warning", f"{width}x{height} is smaller than the smallest bucket ({min_side}px side); "
                    "it will be upscaled")
        )


def _check_image(path: Path, rel: str, report: DatasetReport) -> list | None:
    """[width, height, mode, sha256, signature] of a readable image (decoded in full); None and an error
    otherwise."""
    data = path.read_bytes()
    if not data:
        report.findings.append(Finding(rel, "error", "zero-byte file"))
        return None
    try:
        with Image.open(path) as im:
            mode = im.mode
            im.load()  # decodes everything: catches truncated files that Image.open alone accepts
            im = ImageOps.exif_transpose(im)
            width, height = im.size
            signature = image_signature(as_rgb(im))
    except Exception as exc:  # PIL raises many types for corrupt data
        msg = str(exc) or type(exc).__name__
        kind = "truncated image" if "truncated" in msg.lower() else "unreadable image"
        report.findings.append(Finding(rel, "error", f"{kind} ({msg})"))
        return None
    return [width, height, mode, hashlib.sha256(data).hexdigest(), signature]


def _caption_for(path: Path, rel: str, meta_captions: dict[str, str], report: DatasetReport) -> str | None:
    txt = path.with_suffix(".txt")
    caption: str | None = None
    if txt.exists():
        try:
            caption = txt.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError as exc:
            report.findings.append(Finding(_rel(report.root, txt), "error", f"caption is not UTF-8 ({exc.reason})"))
            return None
        if rel in meta_captions and meta_captions[rel].strip() != caption:
            report.findings.append(Finding(rel, "warning", f"caption in {txt.name} differs from {METADATA_FILE}; "
                                           f"using {txt.name}"))
    elif rel in meta_captions:
        caption = meta_captions[rel].strip()
    if caption is None:
        report.findings.append(Finding(rel, "error", f"missing caption (no {txt.name}, no {METADATA_FILE} entry)"))
        return None
    if not caption:
        report.findings.append(Finding(rel, "warning", "empty caption (trains unconditionally)"))
    return caption


def dataset_provenance(items: list[Item]) -> dict:
    """What a LoRA file records of its dataset: a hash of the image bytes and captions (independent of the
    model, bucket and cache), a hash of the captions alone, and the image count."""
    return {"dataset_hash": sha256_text("|".join(sorted(f"{i.sha256}:{sha256_text(i.caption)}" for i in items))),
            "captions_hash": sha256_text("\n".join(sorted(i.caption for i in items))),
            "image_count": len(items)}
