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
from ..io import atomic_write_json, atomic_write_text

RUN_FILES = ("config.yaml", "run.json", "lora.safetensors", "loss.csv", "loss.png", "metrics.csv", "metrics.png",
             "report.md", "report.png", "comparison.png", "validation.csv")
RUN_DIRS = ("checkpoints", "samples", "pairs", "sft", "eval", "validation", "best", "logs", "report")
CHECKPOINT_RE = re.compile(r"^step-(\d+)$")
# What may differ when resuming: where and how often to save and sample, and how long to train.
RESUMABLE_CHANGES = {"checkpoint", "sample", "provenance", "train.steps", "train.device", "logging"}


def holds_run(output: Path) -> bool:
    return any((output / name).exists() for name in RUN_FILES + RUN_DIRS)


def prepare_run_dir(output: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to write over an existing run unless told to resume it or replace it."""
    if resume and overwrite:
        raise UserError("--resume and --overwrite exclude each other")
    if output.exists() and not output.is_dir():
        raise UserError(f"output {output}: exists and is not a folder")
    if resume:
        if latest_checkpoint(output) is None:
            raise UserError(f"output {output}: no checkpoint to resume from (looked in {output / 'checkpoints'})")
        return
    if holds_run(output):
        if not overwrite:
            raise UserError(
                f"output {output}: already holds a run; pass --resume to continue it or --overwrite to replace it"
            )
        for name in RUN_FILES:
            (output / name).unlink(missing_ok=True)
        for name in RUN_DIRS:
            shutil.rmtree(output / name, ignore_errors=True)
    output.mkdir(parents=True, exist_ok=True)


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


def save_checkpoint(output: Path, step: int, write, keep: int) -> Path:
    """``write(folder)`` fills a temp folder that is then renamed into place; keeps the last ``keep``."""
    root = output / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for _, old in checkpoint_dirs(output)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final
