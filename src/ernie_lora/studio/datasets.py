"""Datasets as the studio keeps them: ``ROOT/datasets/<name>/`` with images and same-stem ``.txt``
captions, the layout every ``ernie-lora`` command reads, so a dataset made here trains from the CLI
and a folder made by hand shows up here.

Every name that reaches the disk is sanitised and checked to stay inside its folder; an upload is
kept only when it decodes as an image within the size and pixel limits, and never replaces a file
unless asked to.
"""

from __future__ import annotations

import io
import re
from collections import Counter
from pathlib import Path

from PIL import Image

from ..captions.lint import lint_caption
from ..captions.schema import STYLES, restyle
from ..data.buckets import make_buckets, nearest_bucket
from ..data.dataset import CACHE_DIR_NAME, IMAGE_EXTS, check_dataset, read_metadata
from ..errors import UserError
from ..io import atomic_write, atomic_write_text, read_text_file

MAX_UPLOAD_BYTES = 32 * 1024 * 1024
MAX_PIXELS = 50_000_000  # 7071 x 7071
FORMATS = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp"}
_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(name: str, what: str = "name") -> str:
    """A file or folder name reduced to letters, digits, '.', '_' and '-' (no path, no leading dot)."""
    cleaned = _NAME.sub("-", Path(str(name)).name).strip(".-_")[:80]
    if not cleaned:
        raise UserError(f"{what} {name!r}: use letters, digits, '.', '_' or '-'")
    return cleaned


class Datasets:
    def __init__(self, root: Path):
        self.root = root / "datasets"
        self.root.mkdir(parents=True, exist_ok=True)

    def folder(self, name: str, must_exist: bool = True) -> Path:
        if name != safe_name(name, "dataset"):
            raise UserError(f"dataset {name!r}: use letters, digits, '.', '_' or '-'")
        folder = self.root / name
        if must_exist and not folder.is_dir():
            raise UserError(f"dataset {name!r}: no such dataset")
        return folder

    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def create(self, name: str) -> str:
        name = safe_name(name, "dataset")
        folder = self.folder(name, must_exist=False)
        if folder.exists():
            raise UserError(f"dataset {name!r} exists already")
        folder.mkdir()
        return name

    def image_path(self, dataset: str, image: str) -> Path:
        folder = self.folder(dataset)
        if image != Path(image).name or image.startswith(".") or Path(image).suffix.lower() not in IMAGE_EXTS:
            raise UserError(f"image {image!r}: no such image in {dataset}")
        return folder / image

    def images(self, dataset: str) -> list[Path]:
        folder = self.folder(dataset)
        return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS and p.is_file()
                      and not p.is_symlink() and not p.name.startswith("."))

    def upload(self, dataset: str, filename: str, data: bytes, replace: bool = False) -> str:
        """Keep an uploaded file as ``<name>.<its real format>``; returns the name it was stored under."""
        folder = self.folder(dataset)
        if len(data) > MAX_UPLOAD_BYTES:
            raise UserError(f"{filename}: {len(data)} bytes, over the {MAX_UPLOAD_BYTES} byte limit")
        try:
            with Image.open(io.BytesIO(data)) as probe:
                fmt, (width, height) = probe.format, probe.size
                if width * height > MAX_PIXELS:
                    raise UserError(f"{filename}: {width}x{height} is over {MAX_PIXELS} pixels")
                probe.load()  # the whole file decodes, not just its header
        except UserError:
            raise
        except Exception as exc:  # PIL raises many kinds for a file that is not an image
            raise UserError(f"{filename}: not an image ({type(exc).__name__})") from None
        if fmt not in FORMATS:
            raise UserError(f"{filename}: {fmt} images are not accepted; use PNG, JPEG or WebP")
        name = safe_name(Path(filename).stem, "file name") + FORMATS[fmt]
        target = folder / name
        if not replace and any(p.exists() for p in (target, *(target.with_suffix(e) for e in IMAGE_EXTS))):
            raise UserError(f"{name}: exists in {dataset} already (replace it explicitly)")
        atomic_write(target, lambda tmp: Path(tmp).write_bytes(data))
        return name

    def delete(self, dataset: str, image: str) -> None:
        path = self.image_path(dataset, image)
        if not path.is_file():
            raise UserError(f"image {image!r}: no such image in {dataset}")
        path.unlink()
        caption = path.with_suffix(".txt")
        if caption.is_file():
            caption.unlink()

    def caption(self, path: Path, metadata: dict[str, str]) -> str:
        txt = path.with_suffix(".txt")
        if txt.is_file():
            return read_text_file(txt).strip()
        return metadata.get(path.name, "")

    def save_caption(self, dataset: str, image: str, text: str) -> None:
        path = self.image_path(dataset, image)
        if not path.is_file():
            raise UserError(f"image {image!r}: no such image in {dataset}")
        atomic_write_text(path.with_suffix(".txt"), text.strip() + "\n")

    def listing(self, dataset: str, resolution: int = 1024, multiple: int = 16) -> dict:
        """Every image with its caption, lint findings, size and bucket, and the dataset's statistics."""
        metadata, _ = read_metadata(self.folder(dataset))
        buckets = make_buckets(resolution, multiple)
        rows, bucket_counts, small = [], Counter(), 0
        for path in self.images(dataset):
            try:
                with Image.open(path) as im:
                    width, height = im.size
            except Exception:  # shown as unreadable; dataset check says why
                width = height = 0
            caption = self.caption(path, metadata)
            bucket = str(nearest_bucket(width, height, buckets)) if width and height else None
            bucket_counts[bucket or "unreadable"] += 1
            small += bool(width and min(width, height) < resolution)
            rows.append({"name": path.name, "width": width, "height": height, "bucket": bucket, "caption": caption,
                         "lint": lint(caption)["findings"]})
        return {"name": dataset, "images": rows, "resolution": resolution,
                "stats": {"images": len(rows), "captioned": sum(bool(r["caption"]) for r in rows),
                          "flagged": sum(bool(r["lint"]) for r in rows), "buckets": dict(bucket_counts),
                          "below_resolution": small}}

    def check(self, dataset: str, resolution: int) -> dict:
        report = check_dataset(self.folder(dataset), min_side=resolution)
        return {"images": report.images_seen, "usable": len(report.items),
                "findings": [{"path": f.path, "level": f.level, "message": f.message} for f in report.findings]}

    def thumbnail(self, dataset: str, image: str, side: int = 256) -> bytes:
        """A PNG at most ``side`` pixels on its long side, kept in the dataset's cache folder."""
        path = self.image_path(dataset, image)
        stat = path.stat()
        cache = path.parent / CACHE_DIR_NAME / "thumbs" / f"{path.name}.{stat.st_size}.{stat.st_mtime_ns}.{side}.png"
        if cache.is_file():
            return cache.read_bytes()
        with Image.open(path) as im:
            im.thumbnail((side, side))
            buf = io.BytesIO()
            im.convert("RGB").save(buf, format="PNG")
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cache, lambda tmp: Path(tmp).write_bytes(buf.getvalue()))
        return buf.getvalue()


def lint(text: str) -> dict:
    """``caption lint``'s rules on one caption (the image is not read) and its three rewrites."""
    findings = [{"check": check, "detail": detail} for check, detail in lint_caption(text, None, None, None)]
    return {"findings": findings, "rewrites": {style: restyle(text, style) for style in STYLES} if text.strip() else {}}
