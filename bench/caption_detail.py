"""Does a caption that names the layout teach a LoRA to follow it? Full auto-captions against text-only ones.

    OMP_NUM_THREADS=1 python bench/caption_detail.py [--posters 64] [--steps 500] [--prompts 24] [--seed 0]

1. Posters of the synthetic world (64 px, micro ERNIE's own domain) in the two colours micro was pretrained
   without, purple and pink, with the title band at any edge or across the middle (``data.synthetic``).
2. Each captioned twice from one run of ``caption auto``'s pipeline (OCR + layout analysis): the **full**
   caption (`a poster with title "SHOP" at the left, a purple band at the left, white background, purple
   theme`) and the **text-only** one (its text elements alone: `a poster with title "SHOP" at the left`,
   what ``caption auto`` wrote before the layout analysis).
3. One micro LoRA per caption set: same images, config and seed.
4. Prompts: the full auto-captions of test-split posters (layouts no training image had), sampled with the
   base model, the text-only LoRA and the full LoRA (same noise per prompt).
5. Scored by ``eval.layout`` against each prompt's true layout: *colour* (is the theme the named purple or
   pink: "a purple band" vs "a pink band"), *structure* (the band at the named edge) and their product.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from PIL import Image

from ernie_lora.captions.analysis import analyse
from ernie_lora.captions.auto import describe, read_lines
from ernie_lora.captions.schema import render as render_caption
from ernie_lora.config import TrainRunConfig
from ernie_lora.data.synthetic import BANDS, HELD_OUT, caption, render, sample_layout
from ernie_lora.eval.layout import score_image
from ernie_lora.generate import LoraSpec, generate
from ernie_lora.recipes.lora import train

WORLD = dict(kind="poster", colours=HELD_OUT["colours"], bands=BANDS)
SAMPLING = dict(steps=24, guidance=3.0, width=64, height=64, dtype="fp32")


def caption_both(image: Image.Image) -> tuple[str, str]:
    """(full caption, text-only caption) of one image from one OCR and layout analysis."""
    lines = read_lines(image)
    schema = describe(analyse(image, lines), lines, "poster")
    text_only = dataclasses.replace(schema, elements=[e for e in schema.elements if e.text is not None],
                                    theme=None, background=None, colours=[], panels=None)
    return render_caption(schema, "natural"), render_caption(text_only, "natural")


def train_lora(dataset: Path, run: Path, steps: int, seed: int) -> Path:
    cfg = TrainRunConfig.model_validate({
        "model": {"name": "micro", "dtype": "fp32"},
        "data": {"path": str(dataset), "resolution": 64, "caption_dropout": 0.1},
        "lora": {"rank": 8, "alpha": 8, "targets": "attn_mlp"},
        "train": {"steps": steps, "batch_size": 8, "lr": 2e-3, "lr_scheduler": "cosine", "warmup_steps": 20,
                  "mixed_precision": "no", "gradient_checkpointing": False, "seed": seed},
        "checkpoint": {"every": steps, "keep": 1},
    })
    train(cfg, run, progress=False)
    return run / "lora.safetensors"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--posters", type=int, default=64)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--prompts", type=int, default=24, help="test-split posters to prompt with")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, default=None, help="keep the datasets, runs and samples here")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="caption-detail-")) if args.keep is None else args.keep
    started = time.perf_counter()

    t = time.perf_counter()
    rng = random.Random(args.seed)
    for name in ("full", "text-only"):
        (work / name).mkdir(parents=True, exist_ok=True)
    for i in range(args.posters):
        image = render(sample_layout(rng, split="train", **WORLD), seed=args.seed * 1000 + i)
        full, text_only = caption_both(image)
        for name, text in (("full", full), ("text-only", text_only)):
            image.save(work / name / f"{i:04d}.png")
            (work / name / f"{i:04d}.txt").write_text(text + "\n", encoding="utf-8")
        if i < 2:
            print(f"  full:      {full}\n  text-only: {text_only}")
    print(f"{args.posters} posters captioned twice in {time.perf_counter() - t:.0f} s")

    loras = {}
    for name in ("text-only", "full"):
        t = time.perf_counter()
        loras[name] = train_lora(work / name, work / f"run-{name}", args.steps, args.seed)
        print(f"LoRA on {name} captions: {args.steps} steps in {time.perf_counter() - t:.0f} s")

    test_rng = random.Random(args.seed + 100)
    truths = [sample_layout(test_rng, split="test", **WORLD) for _ in range(args.prompts)]
    prompts = [caption_both(render(layout, seed=10_000 + i))[0] for i, layout in enumerate(truths)]
    print(f"e.g. prompt: {prompts[0]}")
    scores: dict[str, dict[str, list[float]]] = {}
    for name, lora in (("base", None), ("text-only", loras["text-only"]), ("full", loras["full"])):
        paths = generate(prompts, model="micro", loras=[LoraSpec(lora, 1.0)] if lora else [],
                         out_dir=work / "samples" / name, seed=1000 + args.seed, **SAMPLING)
        found = [score_image(Image.open(p), caption(layout)) for p, layout in zip(paths, truths, strict=True)]
        scores[name] = {key: [getattr(s, key) for s in found] for key in ("colour", "structure", "score")}

    print(f"\n{args.prompts} test prompts, {args.posters} training posters, {args.steps} steps, purple and pink "
          "(colours micro never saw)")
    print(f"{'model':12s} {'colour':>8s} {'structure':>10s} {'score':>8s}   (means, 0-1)")
    for name, s in scores.items():
        print(f"{name:12s} {statistics.mean(s['colour']):8.3f} {statistics.mean(s['structure']):10.3f} "
              f"{statistics.mean(s['score']):8.3f}")
    full, text = scores["full"], scores["text-only"]
    wins = sum(f > t_ for f, t_ in zip(full["colour"], text["colour"], strict=True))
    print(f"full vs text-only: colour {statistics.mean(full['colour']):.3f} vs {statistics.mean(text['colour']):.3f} "
          f"(full higher on {wins} of {args.prompts} prompts); score {statistics.mean(full['score']):.3f} vs "
          f"{statistics.mean(text['score']):.3f}")
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.keep is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
