"""The report every run ends with: ``RUN/report.md`` and ``RUN/report.png``.

report.png: the training curves, the validation curves (when the run validated) and the before/after grid
on the validation (or sample) prompts. report.md: what ran, how long, peak memory, the last metrics, the
validation table, the scores before and after, the files the run wrote and the config.
"""

from __future__ import annotations

import contextlib
import resource
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from pydantic import BaseModel

from ..config import dump_config
from ..io import atomic_write, atomic_write_text
from ..plots import image_grid, panels_image, save_image_grid
from .engine import Sampler, trigger_word


@dataclass
class BeforeAfter:
    """Grids of the same prompts and seeds before training and after (files: a resumed run has them too)."""

    prompts: int
    before: Path
    after: Path
    scores: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)  # name: (before, after)


def score_samples(images: Sequence[Image.Image], captions: Sequence[str], kinds: Sequence[str]) -> dict[str, float]:
    """Mean scores of samples against their captions: ``layout`` (the layout score, over the captions in the
    layout language) and ``text`` (OCR recall of quoted text, over the captions that quote some)."""
    found: dict[str, float] = {}
    if "layout" in kinds:
        from ..eval.layout import score_image  # deferred: numpy / scipy image code only when scoring

        layout = [s.score for s in (score_image(im, c) for im, c in zip(images, captions, strict=True)) if s]
        if layout:
            found["layout"] = statistics.mean(layout)
    if "text" in kinds:
        from ..eval.text import score_image_text  # deferred: OCR loads only for text scores

        text = [t for t in (score_image_text(im, c) for im, c in zip(images, captions, strict=True)) if t is not None]
        if text:
            found["text"] = statistics.mean(text)
    return found


def sample_before_after(folder: Path, sampler: Sampler, before: contextlib.AbstractContextManager,
                        captions: list[str], kinds: Sequence[str] = ("layout",)) -> BeforeAfter:
    """The same prompts and seeds sampled inside ``before`` (the starting weights) and as trained now: two grids
    in ``folder`` and their scores (for runs without a validation set: DPO, distillation)."""
    with before:
        first = sampler.images()
    last = sampler.images()
    paths = [save_image_grid(images, folder / f"{name}.png", labels=sampler.labels, columns=min(4, len(images)))
             for name, images in (("before", first), ("after", last))]
    scored = score_samples(first, captions, kinds), score_samples(last, captions, kinds)
    return BeforeAfter(len(captions), *paths, {k: (scored[0].get(k), scored[1].get(k)) for k in scored[1]})


def peak_memory() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB on the GPU (torch's peak allocation)"
    # Linux reports ru_maxrss in KiB
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB of process memory (peak RSS)"


def _curves(history: list[dict], plotted: tuple[str, ...], validation: list[dict]) -> Image.Image:
    panels = [(name, [r["step"] for r in history], [r[name] for r in history], False) for name in plotted
              if history and name in history[0]]
    for name in ("val_loss", "layout", "text"):
        rows = [r for r in validation if name in r]
        if rows:
            panels.append((f"validation {name}", [r["step"] for r in rows], [r[name] for r in rows], True))
    return panels_image(panels)


def write_run_report(output: Path, cfg: BaseModel, *, title: str, started: float, steps: int,
                     history: list[dict], plotted: tuple[str, ...], validation: list[dict] | None = None,
                     best: dict | None = None, before_after: BeforeAfter | None = None,
                     files: dict[str, Path | None] | None = None, notes: list[str] | None = None) -> Path:
    """Write ``report.md`` and ``report.png`` into the run folder; returns the markdown's path."""
    validation = validation or []
    parts = [_curves(history, plotted, validation)]
    if before_after and before_after.before.exists() and before_after.after.exists():
        with Image.open(before_after.before) as before, Image.open(before_after.after) as after:
            parts.append(image_grid([before.convert("RGB"), after.convert("RGB")], ["before", f"after {steps} steps"],
                                    columns=2))
    width = max(p.width for p in parts)
    sheet = Image.new("RGB", (width, sum(p.height for p in parts)), "white")
    top = 0
    for part in parts:
        sheet.paste(part, (0, top))
        top += part.height
    atomic_write(output / "report.png", lambda tmp: sheet.save(tmp, format="PNG"))

    minutes = (time.perf_counter() - started) / 60
    lines = [f"# {title}", "", f"{steps} steps in {minutes:.1f} min; peak memory {peak_memory()}.", "",
             "![curves, validation and before/after](report.png)", ""]
    lines += notes or []
    trigger = trigger_word(cfg)
    if trigger:
        lines += [f"Trigger word: `{trigger}`. Write it in prompts, or `[trigger]`, which `generate` fills.", ""]
    if history:
        tail = history[-max(1, len(history) // 10):]
        lines += ["Last 10 % of steps, means:", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {statistics.mean(r[k] for r in tail):.5g} |" for k in plotted if k in tail[0]]
        lines.append("")
    if validation:
        names = [n for n in ("val_loss", "layout", "text") if any(n in r for r in validation)]
        lines += ["Validation:", "", "| step | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        lines += [f"| {r['step']} | " + " | ".join(f"{r[n]:.4f}" if n in r else "-" for n in names) + " |"
                  for r in validation]
        lines.append("")
    if best and best.get("step") is not None:
        lines += [f"Best checkpoint by {best['metric']}: step {best['step']} ({best['value']:.4f}), "
                  f"`{best['path']}`.", ""]
    if before_after and before_after.scores:
        lines += [f"Scores of the {before_after.prompts} samples before and after:", "",
                  "| score | before | after |", "|---|---|---|"]
        lines += [f"| {k} | {_fmt(b)} | {_fmt(a)} |" for k, (b, a) in before_after.scores.items()]
        lines.append("")
    if files:
        lines += ["Files:", ""] + [f"- {k}: `{v}`" for k, v in files.items() if v] + [""]
    lines += ["Config:", "", "```yaml", dump_config(cfg).rstrip(), "```", ""]
    return atomic_write_text(output / "report.md", "\n".join(lines))


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
