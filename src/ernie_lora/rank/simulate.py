"""Simulated annotation: images of a hidden quality, and annotators who judge them with noise.

``write_quality_dataset`` renders synthetic layouts (``data.synthetic``) several times per prompt and
degrades each copy by a hidden quality q in [0, 1]: blur, noise, washed-out contrast and a shifted
layout grow as q falls. q is kept in ``metadata.jsonl`` (key ``quality``) so scores, levels and the
aesthetic scorer can be checked against the truth. ``simulate_annotators`` votes through the same
store the web app uses, as several annotators taking turns.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter
from tqdm.auto import tqdm

from ..data.categories import metadata_rows
from ..data.dataset import METADATA_FILE
from ..data.synthetic import caption, render, sample_layout
from ..errors import UserError
from ..io import atomic_write_text, save_png
from .store import AnnotationStore

CATEGORY = {"poster": "Graphic Design/Poster", "infographic": "Graphic Design/Infographic",
            "comic": "Illustration/Comic", "ui": "UI/Card"}


def judge(qa: float, qb: float, noise: float, tie: float, rng: random.Random) -> float:
    """A noisy annotator's outcome for a against b: 1 win, 0.5 tie, 0 loss (Bradley-Terry with noise)."""
    if rng.random() < tie * math.exp(-abs(qa - qb)):
        return 0.5
    return 1.0 if rng.random() < 1 / (1 + math.exp(-(qa - qb) / noise)) else 0.0


def degrade(image: Image.Image, quality: float, rng: random.Random) -> Image.Image:
    """Worse as ``quality`` falls from 1 to 0: layout shifted, contrast lost, blurred, noisy."""
    bad = 1.0 - quality
    w, h = image.size
    shift = int(round(bad * 0.15 * w * rng.choice((-1, 1))))
    shifted = Image.new("RGB", image.size, image.getpixel((0, 0)))
    shifted.paste(image, (shift, int(round(bad * 0.1 * h))))
    image = ImageEnhance.Contrast(shifted).enhance(1.0 - 0.6 * bad)
    image = image.filter(ImageFilter.GaussianBlur(radius=2.0 * bad * w / 64))
    pixels = np.asarray(image, dtype=np.float32)
    noise = np.random.default_rng(rng.randrange(1 << 30)).normal(0, 40 * bad, pixels.shape)
    return Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8))


def write_quality_dataset(folder: str | Path, prompts: int, per_prompt: int = 4, seed: int = 0,
                          size: int = 64) -> Path:
    """``prompts`` x ``per_prompt`` images (same caption, different quality) with categories by genre."""
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise UserError(f"{folder}: not empty; choose a new folder")
    rng = random.Random(seed)
    rows = []
    for i in range(prompts):
        layout = sample_layout(rng)
        text = caption(layout)
        sub = folder / CATEGORY[layout.kind]
        sub.mkdir(parents=True, exist_ok=True)
        clean = render(layout, seed=rng.randrange(1 << 30), size=size)
        for j in range(per_prompt):
            quality = rng.random()
            rel = f"{CATEGORY[layout.kind]}/{layout.kind}_{i:04d}_{j}.png"
            save_png(degrade(clean, quality, rng), folder / rel)
            rows.append(json.dumps({"file_name": rel, "text": text, "quality": round(quality, 6)}))
    atomic_write_text(folder / "metadata.jsonl", "\n".join(rows) + "\n")
    return folder


def hidden_quality(folder: str | Path) -> dict[str, float]:
    rows = metadata_rows(Path(folder))
    quality = {name: float(r["quality"]) for name, r in rows.items() if "quality" in r}
    if not quality:
        raise UserError(f"{Path(folder) / METADATA_FILE}: no 'quality' keys (make a simulated dataset with "
                        "`ernie-lora rank synth`)")
    return quality


def simulate_annotators(store: AnnotationStore, quality: dict[str, float], votes: int, annotators: int = 3,
                        noise: float = 0.1, tie: float = 0.1, seed: int = 0, progress: bool = True) -> int:
    """Annotators take turns asking for a pair and voting (a skip now and then) until ``votes`` are in
    or every image has met every other. Returns the votes cast. Quality differences are on [0, 1], so
    ``noise`` 0.1 means a 0.1 gap in quality is called right 73 % of the time."""
    rng = random.Random(seed)
    names = [f"sim-{k}" for k in range(annotators)]
    cast = 0
    with tqdm(total=votes, desc="simulated votes", disable=not progress) as bar:
        while cast < votes:
            pair = store.next_pair(names[cast % annotators])
            if pair.get("done"):
                break
            if rng.random() < 0.02:
                outcome = "skip"
            else:
                o = judge(quality[pair["left"]["path"]], quality[pair["right"]["path"]], noise, tie, rng)
                outcome = {1.0: "left", 0.0: "right", 0.5: "tie"}[o]
            store.vote(pair["pair_id"], outcome, names[cast % annotators])
            cast += 1
            bar.update()
    return cast
