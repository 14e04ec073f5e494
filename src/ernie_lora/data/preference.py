"""Preference pairs for DPO: read them (ours or Pick-a-Pic's columns), or make them in the synthetic world.

Our format is what ``ernie-lora rank scores`` writes, one JSON object per line::

    {"prompt": "...", "chosen": "a.png", "rejected": "b.png"}

Pick-a-Pic's columns are read too: ``caption``, ``jpg_0``, ``jpg_1``, ``label_0`` (1: the first is
preferred, 0: the second; 0.5, a tie, is skipped). Relative image paths are relative to the file.

``write_synthetic_pairs`` samples a model several times per prompt of the synthetic world and pairs
the best sample by layout fidelity (``eval.layout``) with each clearly worse one.
"""

from __future__ import annotations

import json
import random
import statistics
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..errors import UserError
from ..io import atomic_write_text, sha256_file
from .dataset import Item


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: Path
    rejected: Path


def read_pairs(path: str | Path) -> list[PreferencePair]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such preference file (JSONL of prompt, chosen, rejected)")
    pairs = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{where}: invalid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise UserError(f"{where}: expected an object")
        if {"prompt", "chosen", "rejected"} <= row.keys():
            prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
        elif {"caption", "jpg_0", "jpg_1", "label_0"} <= row.keys():
            label = float(row["label_0"])
            if label == 0.5:
                continue  # a tie says nothing to DPO
            prompt = row["caption"]
            chosen, rejected = (row["jpg_0"], row["jpg_1"]) if label == 1.0 else (row["jpg_1"], row["jpg_0"])
        else:
            raise UserError(f"{where}: needs prompt/chosen/rejected (or caption/jpg_0/jpg_1/label_0)")
        files = []
        for key, value in (("chosen", chosen), ("rejected", rejected)):
            file = Path(value) if Path(value).is_absolute() else path.parent / value
            if not file.is_file():
                raise UserError(f"{where}: {key} image {file} does not exist")
            files.append(file)
        if not isinstance(prompt, str) or not prompt.strip():
            raise UserError(f"{where}: empty prompt")
        pairs.append(PreferencePair(prompt, files[0], files[1]))
    if not pairs:
        raise UserError(f"{path}: no preference pairs")
    return pairs


def pair_items(pairs: list[PreferencePair]) -> tuple[list[Item], list[Item]]:
    """Chosen and rejected images as dataset items (size read, content hashed: the cache keys)."""
    def item(file: Path, prompt: str) -> Item:
        try:
            with Image.open(file) as im:
                width, height = im.size
        except OSError as exc:
            raise UserError(f"{file}: not a readable image ({exc})") from None
        return Item(file, prompt, width, height, sha256_file(file))

    return [item(p.chosen, p.prompt) for p in pairs], [item(p.rejected, p.prompt) for p in pairs]


@dataclass
class SyntheticPairsReport:
    pairs: int
    prompts: int
    chosen_mean: float
    rejected_mean: float


def write_synthetic_pairs(folder: str | Path, *, model: str, kind: str, prompts: int, candidates: int,
                          min_margin: float, seed: int, sampling: dict) -> SyntheticPairsReport:
    """Sample ``candidates`` images per prompt; pair the best (by layout fidelity) with every sample at
    least ``min_margin`` worse. Writes the images and ``pairs.jsonl`` into ``folder``."""
    from ..data.synthetic import caption, pretraining_colours, sample_layout
    from ..eval.layout import score_image
    from ..generate import generate
    from ..models.loading import load_pipeline

    folder = Path(folder)
    if (folder / "pairs.jsonl").exists():
        raise UserError(f"{folder}: already holds pairs.jsonl; choose another folder")
    rng = random.Random(seed)
    texts = [caption(sample_layout(rng, kind, pretraining_colours())) for _ in range(prompts)]
    pipe = load_pipeline(model, dtype=sampling.get("dtype", "fp32"), device="cpu")
    pipe.set_progress_bar_config(disable=True)
    rows, chosen_scores, rejected_scores = [], [], []
    for i, text in enumerate(texts):
        paths = generate([text] * candidates, model=model, pipe=pipe, out_dir=folder / f"{i:04d}",
                         seed=seed * 100_000 + i * candidates, **sampling)
        scored = []
        for path in paths:
            with Image.open(path) as im:
                result = score_image(im.convert("RGB"), text)
            scored.append((result.score if result else 0.0, path))
        scored.sort(key=lambda s: s[0])
        high, best = scored[-1]
        for low, worse in scored[:-1]:  # the best against every sample clearly worse than it
            if high - low >= min_margin:
                rows.append({"prompt": text, "chosen": str(best.relative_to(folder)),
                             "rejected": str(worse.relative_to(folder)), "chosen_score": round(high, 4),
                             "rejected_score": round(low, 4)})
                chosen_scores.append(high)
                rejected_scores.append(low)
    if not rows:
        raise UserError(f"no prompt gave samples {min_margin} apart in layout fidelity; lower min_margin")
    atomic_write_text(folder / "pairs.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    return SyntheticPairsReport(len(rows), prompts, statistics.mean(chosen_scores), statistics.mean(rejected_scores))
