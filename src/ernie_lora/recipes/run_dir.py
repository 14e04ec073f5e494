"""The run folder: refusing to overwrite a run by accident, atomic checkpoints, exact resume state."""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from ..errors import UserError

RUN_FILES = ("config.yaml", "lora.safetensors", "loss.csv", "loss.png", "metrics.csv", "metrics.png", "report.md",
             "comparison.png")
RUN_DIRS = ("checkpoints", "samples", "pairs", "sft", "eval")
CHECKPOINT_RE = re.compile(r"^step-(\d+)$")
# Sections that may differ when resuming: where and how often to save and sample, and how long to train.
RESUMABLE_CHANGES = {"checkpoint", "sample", "provenance", "train.steps", "train.device"}


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


def first_config_difference(old: dict, new: dict, prefix: str = "") -> str | None:
    """The first key (dotted) whose value differs, skipping the ones a resume may change."""
    for key in sorted(set(old) | set(new)):
        path = f"{prefix}{key}"
        if path in RESUMABLE_CHANGES:
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found = first_config_difference(a, b, path + ".")
            if found:
                return found
        elif a != b:
            return f"{path} ({a!r} -> {b!r})"
    return None


def check_resume_config(output: Path, new_config: dict, config_model: type | None = None) -> None:
    saved = output / "config.yaml"
    if not saved.exists():
        return
    old = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
    try:  # keys added to the config since the run began take their defaults on both sides
        from ..config import TrainRunConfig

        old = (config_model or TrainRunConfig).model_validate(old).model_dump(mode="json")
    except ValueError:
        pass  # a key since removed or renamed: the plain comparison below names it
    diff = first_config_difference(old, new_config)
    if diff:
        raise UserError(f"--resume: config differs from the run in {output} at {diff}; resume with the same config")


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


def rng_state(generator: torch.Generator) -> dict:
    state = {"generator": generator.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict, generator: torch.Generator) -> None:
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_training_state(folder: Path) -> dict:
    # our own file; weights_only keeps torch.load from unpickling arbitrary objects all the same
    return torch.load(folder / "training_state.pt", map_location="cpu", weights_only=True)


def write_metrics(output: Path, history: list[dict], fields: tuple[str, ...], plotted: tuple[str, ...],
                  title: str) -> None:
    """``metrics.csv`` (every field per step, atomically) and ``metrics.png`` (one panel per plotted field)."""
    from ..io import atomic_write_text
    from ..plots import save_metric_plots

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["step", *fields], lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: (f"{v:.8g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(output / "metrics.csv", buf.getvalue())
    save_metric_plots([r["step"] for r in history], {k: [r[k] for r in history] for k in plotted},
                      output / "metrics.png", title)


def read_metrics(path: Path, fields: tuple[str, ...]) -> list[dict]:
    if not path.exists():
        return []
    return [{"step": int(r["step"]), **{k: float(r[k]) for k in fields}}
            for r in csv.DictReader(io.StringIO(path.read_text(encoding="utf-8")))]


def save_lora_checkpoint(output: Path, step: int, keep: int, transformer, peft_config, optimizer, lr_scheduler,
                         batches, generator: torch.Generator) -> Path:
    """A single-LoRA recipe's checkpoint: the LoRA, and everything an exact resume needs."""
    from ..lora.adapters import lora_state_dict, peft_config_metadata
    from ..lora.files import save_lora

    def write(folder: Path) -> None:
        save_lora(folder / "lora.safetensors", lora_state_dict(transformer), peft_config_metadata(peft_config))
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
                    "data": batches.state_dict(), "rng": rng_state(generator)}, folder / "training_state.pt")
    return save_checkpoint(output, step, write, keep)


def load_lora_checkpoint(output: Path, transformer, optimizer, lr_scheduler, batches,
                         generator: torch.Generator) -> int:
    """Restore what ``save_lora_checkpoint`` wrote last into the live objects; returns its step."""
    from ..lora.adapters import set_lora_state
    from ..lora.files import read_lora

    ckpt = latest_checkpoint(output)
    lora_sd, _ = read_lora(ckpt / "lora.safetensors")
    set_lora_state(transformer, lora_sd, str(ckpt / "lora.safetensors"))
    state = load_training_state(ckpt)
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    batches.load_state_dict(state["data"])
    restore_rng_state(state["rng"], generator)
    return int(state["step"])


@dataclass
class RunResult:
    """What a DPO or distillation run returns: its folder, steps done, metrics per step, proof table."""

    output: Path
    steps_done: int
    history: list[dict]
    report: dict | None = None
