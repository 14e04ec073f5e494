"""The run folder: never overwrite a run by accident, resume only with the config it was made with,
record which ernie-lora made it, write checkpoint folders atomically."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from .. import __version__
from ..config import dump_config
from ..errors import UserError
from ..io import atomic_write_json, atomic_write_text, fsync_path, fsync_tree, sha256_file

RUN_FILES = ("config.yaml", "run.json", "lora.safetensors", "loss.csv", "loss.png", "metrics.csv", "metrics.png",
             "report.md", "report.png", "comparison.png", "validation.csv")
RUN_DIRS = ("checkpoints", "samples", "pairs", "sft", "eval", "validation", "best", "logs", "report")
CHECKPOINT_RE = re.compile(r"^step-(\d+)$")
# What may differ when resuming: where and how often to save and sample, and how long to train.
RESUMABLE_CHANGES = {"checkpoint", "sample", "provenance", "train.steps", "train.device", "logging"}


# Every output folder we write (a run, a proof, the demo) holds this marker: what wrote it and the names it may
# write. --overwrite removes those names only, and only from a folder that holds the marker and nothing else.
MARKER = ".ernie-lora-output.json"
TEMP_RE = re.compile(r"^\..+\.tmp$|^\.tmp-")  # io.atomic_write's temp files, save_checkpoint's temp folders


def _owned_names(output: Path) -> tuple[str, list[str]] | None:
    """(kind, names) from the marker; a run made before markers is recognised by its run.json; else None."""
    try:
        record = json.loads((output / MARKER).read_text(encoding="utf-8"))
        names = [str(n) for n in record["names"]]
        return str(record["kind"]), [n for n in names if "/" not in n and n not in ("", ".", "..")]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        if "recipe" in json.loads((output / "run.json").read_text(encoding="utf-8")):
            return "run", list(RUN_FILES + RUN_DIRS)
    except (OSError, ValueError, TypeError):
        pass
    return None


def remove_stale_temps(folder: Path) -> list[str]:
    """Temp files and folders a killed process of ours left behind in ``folder`` (and its checkpoints/)."""
    removed = []
    for parent in (folder, folder / "checkpoints"):
        if not parent.is_dir():
            continue
        for child in parent.iterdir():
            if TEMP_RE.match(child.name):
                shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
                removed.append(str(child))
    return removed


RUN_HINT = "pass --resume to continue it or --overwrite to replace it"


def prepare_output(output: Path, kind: str, names: tuple[str, ...], *, resume: bool, overwrite: bool,
                   what: str = "a run", hint: str = RUN_HINT) -> None:
    """Make ``output`` ready for a ``kind`` that writes ``names``: refuse a folder holding earlier outputs unless
    resuming or overwriting; ``--overwrite`` removes only what an ernie-lora output recorded in its marker wrote,
    and refuses a folder that also holds anything else. Temp files a killed run left are removed."""
    if resume and overwrite:
        raise UserError("--resume and --overwrite exclude each other")
    if output.exists() and not output.is_dir():
        raise UserError(f"output {output}: exists and is not a folder")
    owned = _owned_names(output) if output.is_dir() else None
    held = [name for name in names if (output / name).exists()]
    if not resume and (held or owned):
        if not overwrite:
            raise UserError(f"output {output}: already holds {what} ({', '.join(held[:6]) or MARKER}); {hint}")
        if owned is None:
            raise UserError(f"output {output}: holds {', '.join(held[:6])} but no {MARKER}, so ernie-lora did not "
                            "write it; --overwrite removes only ernie-lora's outputs: move these or choose another "
                            "--output")
        others = sorted(child.name for child in output.iterdir()
                        if child.name not in owned[1] and child.name != MARKER and not TEMP_RE.match(child.name))
        if others:
            raise UserError(f"output {output}: also holds {', '.join(others[:6])}{' ...' if len(others) > 6 else ''}, "
                            f"which the {owned[0]} there did not write; --overwrite replaces only a folder of "
                            "ernie-lora's outputs: move them or choose another --output")
        for name in owned[1]:
            path = output / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
    output.mkdir(parents=True, exist_ok=True)
    for path in remove_stale_temps(output):
        print(f"removed {path}: a temp file of an interrupted run", file=sys.stderr)
    if not (output / MARKER).exists() or not resume:
        atomic_write_json(output / MARKER, {"kind": kind, "names": sorted(names)})


def prepare_run_dir(output: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to write over an existing run unless told to resume it or replace it."""
    if resume and not overwrite:
        if latest_checkpoint(output) is None:
            raise UserError(f"output {output}: no checkpoint to resume from (looked in {output / 'checkpoints'})")
    prepare_output(output, "run", RUN_FILES + RUN_DIRS, resume=resume, overwrite=overwrite)


def config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Every dotted key whose value differs (``key (old -> new)``), except those a resume may change."""
    found = []
    for key in sorted(set(old) | set(new)):
        path = f"{prefix}{key}"
        if path in RESUMABLE_CHANGES:
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found += config_differences(a, b, path + ".")
        elif a != b:
            found.append(f"{path} ({a!r} -> {b!r})")
    return found


def check_resume_config(output: Path, cfg: BaseModel, force: bool = False) -> None:
    """A resumed run trains with the config it began with: refuse any training-relevant change (and a run
    whose config.yaml is gone) unless ``force``, listing every differing key in one line."""
    saved = output / "config.yaml"
    if not saved.exists():
        if force:
            return
        raise UserError(f"--resume: {saved} is missing, so nothing says how the run was trained; pass --force to "
                        "resume it with this config anyway")
    try:
        old = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserError(f"--resume: {saved} is not readable YAML ({exc})") from None
    try:  # keys added to the config since the run began take their defaults on both sides
        old = type(cfg).model_validate(old).model_dump(mode="json")
    except ValidationError:
        pass  # a key since removed or renamed: the plain comparison below names it
    differences = config_differences(old, cfg.model_dump(mode="json"))
    if differences and not force:
        raise UserError(f"--resume: the config differs from the run in {output} at {', '.join(differences)}; resume "
                        "with the run's config, or pass --force to continue with the new one")


def git_commit() -> str:
    """The commit of the ernie-lora source tree this runs from, when it is a git checkout ('unknown' else)."""
    source = Path(__file__).resolve().parents[3]
    if not (source / ".git").exists():
        return "unknown"
    try:
        out = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out + ("+local changes" if dirty else "")


def record_run(output: Path, cfg: BaseModel, recipe: str, resumed: bool) -> None:
    """``config.yaml`` and ``run.json`` (recipe, ernie-lora version, git commit, command, each start)."""
    atomic_write_text(output / "config.yaml", dump_config(cfg))
    record_file = output / "run.json"
    record = {"recipe": recipe, "starts": []}
    if resumed and record_file.exists():
        try:
            record = json.loads(record_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass  # rewritten below
    record["starts"] = list(record.get("starts", [])) + [{
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "ernie_lora": __version__,
        "git_commit": git_commit(), "command": sys.argv, "resumed": resumed}]
    record["ernie_lora"], record["git_commit"] = __version__, record["starts"][-1]["git_commit"]
    atomic_write_json(record_file, record)


def checkpoint_dirs(output: Path) -> list[tuple[int, Path]]:
    root = output / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = CHECKPOINT_RE.match(child.name)
        if match and (child / "training_state.pt").exists():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(output: Path) -> Path | None:
    dirs = checkpoint_dirs(output)
    return dirs[-1][1] if dirs else None


CHECKSUMS = "checksums.json"


def checkpoint_problem(folder: Path) -> str | None:
    """Why a checkpoint folder cannot be trusted (a file missing, truncated or changed since it was written:
    its sha256 differs from ``checksums.json``), or None. Folders from before checksums are trusted."""
    try:
        sums = json.loads((folder / CHECKSUMS).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        return f"{CHECKSUMS} unreadable ({type(exc).__name__})"
    for name, digest in sorted(sums.items()):
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if sha256_file(path) != digest:
            return f"{name} does not match its checksum (truncated or changed)"
    return None


def save_checkpoint(output: Path, step: int, write, keep: int) -> Path:
    """``write(folder)`` fills a temp folder that is then renamed into place; keeps the last ``keep``."""
    root = output / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write(tmp)
    atomic_write_json(tmp / CHECKSUMS, {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()})
    fsync_tree(tmp)  # every file on disk before the folder takes its final name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_path(root)
    for _, old in checkpoint_dirs(output)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final
