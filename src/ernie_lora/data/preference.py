"""Preference pairs for DPO: read them (ours or Pick-a-Pic's columns).

Our format is what ``ernie-lora rank scores`` writes, one JSON object per line::

    {"prompt": "...", "chosen": "a.png", "rejected": "b.png"}

Pick-a-Pic's columns are read too: ``caption``, ``jpg_0``, ``jpg_1``, ``label_0`` (1: the first is
preferred, 0: the second; 0.5, a tie, is skipped). Relative image paths are relative to the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..errors import UserError, short_repr
from ..io import read_text_file, sha256_file
from .buckets import Bucket
from .cache import CachedSample
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
    for lineno, line in enumerate(read_text_file(path).splitlines(), start=1):
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
            label = row["label_0"]
            if isinstance(label, bool) or label not in (0, 0.5, 1):
                raise UserError(f"{where}: label_0 must be 1 (jpg_0 preferred), 0 or 0.5 (a tie), got "
                                f"{short_repr(label)}")
            if label == 0.5:
                continue  # a tie says nothing to DPO
            prompt = row["caption"]
            chosen, rejected = (row["jpg_0"], row["jpg_1"]) if label == 1.0 else (row["jpg_1"], row["jpg_0"])
        else:
            raise UserError(f"{where}: needs prompt/chosen/rejected (or caption/jpg_0/jpg_1/label_0)")
        files = []
        for key, value in (("chosen", chosen), ("rejected", rejected)):
            if not isinstance(value, str) or not value.strip():
                raise UserError(f"{where}: {key} must be an image path, got {short_repr(value)}")
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
                im.load()  # a truncated file fails here, naming it, not later inside the cache
                width, height = im.size
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise UserError(f"{file}: not a readable image ({exc})") from None
        return Item(file, prompt, width, height, sha256_file(file))

    return [item(p.chosen, p.prompt) for p in pairs], [item(p.rejected, p.prompt) for p in pairs]


@dataclass
class PairSample:
    """A pair's two cached images (one bucket: DPO compares them under the same noise)."""

    chosen: CachedSample
    rejected: CachedSample

    @property
    def bucket(self) -> Bucket:  # what BucketBatches groups by
        return self.chosen.bucket


def pair_samples(path: Path, pairs: list[PreferencePair], cached: list[CachedSample]) -> list[PairSample]:
    """Cached samples of ``pair_items``' chosen then rejected images, zipped back into pairs."""
    samples = []
    for i, pair in enumerate(pairs):
        chosen, rejected = cached[i], cached[len(pairs) + i]
        if chosen.bucket != rejected.bucket:
            raise UserError(f"{path}: pair {i + 1} ({pair.chosen.name}, {pair.rejected.name}) falls in two "
                            "aspect buckets; DPO needs both images in one shape (crop or resize them alike)")
        samples.append(PairSample(chosen, rejected))
    return samples
