"""Small file helpers: atomic writes (never a partial file where a complete one stood) and hashing."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import UserError


def _default_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _default_file_mode()


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's or a folder's contents to disk (a folder: the names in it, so a rename survives a power
    cut). Filesystems that cannot sync a folder are ignored."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: str | os.PathLike) -> None:
    """fsync every file under ``folder`` and every folder in it, the deepest first."""
    for root, _, files in os.walk(folder, topdown=False):
        for name in files:
            fsync_path(os.path.join(root, name))
        fsync_path(root)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)``, fsync it, rename the temp file over ``path`` (same folder, so the rename is
    atomic) and fsync the folder: after a crash or power cut ``path`` is the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _FILE_MODE)  # mkstemp makes 0600 files; outputs get the usual permissions
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_path(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, data: object) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return sha256_bytes(text.encode("utf-8"))


def read_text_file(path: str | os.PathLike) -> str:
    """A user's text file (caption, JSONL, prompt list) as str; not UTF-8 or unreadable is one UserError
    naming the file."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror or exc})") from None


def open_image(path: str | os.PathLike):
    """A user's image file, decoded (``PIL.Image.Image``); a missing, truncated, corrupt or decompression-bomb
    file is one UserError naming it."""
    import struct
    import zlib

    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            return im.copy() if im.mode != "P" else im.convert("RGBA")
    except Image.DecompressionBombError as exc:
        raise UserError(f"{path}: refused, too many pixels to decode safely ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error) as exc:
        raise UserError(f"{path}: not a readable image ({type(exc).__name__}: {str(exc)[:160]})") from None


def write_folder_atomically(target: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` fills a temp folder beside ``target`` (``.tmp-NAME-PID``; one a killed process left is
    removed first), every file is fsync'ed, then it takes ``target``'s name: an existing ``target`` is swapped
    out and removed only after the new folder stands. A crash leaves the old folder or the new, never half."""
    import shutil

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".tmp-{target.name}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}"
    tmp.mkdir()
    try:
        write(tmp)
        fsync_tree(tmp)
        old = target.parent / f".tmp-{target.name}-old-{os.getpid()}"
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        fsync_path(target.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def write_entries_atomically(folder: str | os.PathLike, write: Callable[[Path], None], last: str | None = None) -> None:
    """``write(tmp)`` fills a temp folder inside ``folder``; every file is fsync'ed, then each entry it made
    replaces its namesake in ``folder`` by a rename (``last`` moved last: the file that says the folder is
    complete). Entries of ``folder`` that ``write`` did not make are left alone; none is ever half-written."""
    import shutil

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".tmp-entries-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = folder / f".tmp-entries-{os.getpid()}"
    tmp.mkdir()
    try:
        write(tmp)
        fsync_tree(tmp)
        names = sorted(p.name for p in tmp.iterdir())
        if last in names:
            names.remove(last)
            names.append(last)
        for name in names:
            old = folder / f".tmp-entries-old-{os.getpid()}-{name}"
            if (folder / name).is_dir() and not (folder / name).is_symlink():
                os.replace(folder / name, old)
            os.replace(tmp / name, folder / name)
            shutil.rmtree(old, ignore_errors=True)
        fsync_path(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_png(image, path: str | os.PathLike) -> Path:
    """A PIL image written as PNG atomically (never a half-written PNG where one stood)."""
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
