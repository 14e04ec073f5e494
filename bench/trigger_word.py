"""Does a LoRA answer to its trigger word? Micro ERNIE learns purple (a colour it never saw) from posters whose
captions never say the colour: only a trigger word marks them.

    OMP_NUM_THREADS=1 python bench/trigger_word.py [--steps 500] [--seeds 0 1] [--eval 16]

Two LoRAs per seed, trained the same way (micro, rank 8, the demo's settings):
- "trigger only": 64 purple posters, each caption "borders, a poster with title ..." (data.trigger_word).
- "trigger + regularisation": the same 64, plus 64 posters in the pretraining colours whose captions have no
  trigger (and no colour either), so the word is what tells the two apart (DreamBooth's prior images).
Each is sampled on 16 held-out (test-split) poster prompts without their colour, once with the trigger and
once without; so is the base. Scores: purple colour (the layout score's colour part against "purple theme")
and structure (band and title where the prompt puts them). "borders" is a word micro's vocabulary holds
(it reads unknown words as one token) that no poster caption uses.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from PIL import Image

from ernie_lora.config import TrainRunConfig
from ernie_lora.data.synthetic import pretraining_colours, seen_bands, split_captions, write_synthetic_dataset
from ernie_lora.eval.layout import score_image
from ernie_lora.generate import LoraSpec, generate
from ernie_lora.recipes.lora import train

TRIGGER = "borders"
SAMPLING = dict(steps=24, guidance=3.0, width=64, height=64, dtype="fp32")


def without_theme(caption: str) -> str:
    head, _, tail = caption.rpartition(", ")
    assert tail.endswith(" theme"), caption
    return head


def dataset(folder: Path, seed: int, regularise: bool) -> Path:
    """64 purple posters with the colour left out of their captions; with ``regularise``, 64 more in the
    pretraining colours, their captions without colour and without the trigger."""
    sets = [("purple", ("purple",), True)] + ([("others", pretraining_colours(), False)] if regularise else [])
    for i, (name, colours, triggered) in enumerate(sets):
        part = write_synthetic_dataset(folder / name, 64, kind="poster", colours=colours, bands=seen_bands(),
                                       split="train", seed=seed * 10 + i)
        for text in part.glob("*.txt"):
            caption = without_theme(text.read_text().strip())
            text.write_text(("[trigger], " + caption if triggered else caption) + "\n")  # as the prompts say it
    return folder


def lora(folder: Path, output: Path, seed: int, steps: int) -> Path:
    cfg = TrainRunConfig.model_validate({
        "model": {"name": "micro", "dtype": "fp32"},
        "data": {"path": str(folder), "resolution": 64, "caption_dropout": 0.1, "trigger_word": TRIGGER},
        "lora": {"rank": 8, "alpha": 8, "targets": "attn_mlp"},
        "train": {"steps": steps, "batch_size": 8, "lr": 2e-3, "lr_scheduler": "cosine", "warmup_steps": 20,
                  "mixed_precision": "no", "gradient_checkpointing": False, "seed": seed},
        "checkpoint": {"every": steps, "keep": 1},
        "sample": {"every": 0, "prompts": []},
    })
    train(cfg, output, progress=False)
    return output / "lora.safetensors"


def scores(paths: list[Path], prompts: list[str]) -> tuple[float, float]:
    """Mean purple colour and mean structure of the images, each scored against its prompt + purple theme."""
    found = [score_image(Image.open(p).convert("RGB"), f"{prompt}, purple theme") for p, prompt in zip(paths, prompts,
                                                                                                     strict=True)]
    return statistics.mean(s.colour for s in found), statistics.mean(s.structure for s in found)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--eval", type=int, default=16)
    args = parser.parse_args()
    print(f"purple colour / structure on {args.eval} held-out poster prompts without their colour; trigger "
          f"{TRIGGER!r}; {args.steps} steps")
    for seed in args.seeds:
        prompts = [without_theme(c) for c in split_captions(args.eval, "test", kind="poster", colours=("purple",),
                                                            bands=seen_bands(), seed=seed * 10 + 5)]
        triggered = [f"{TRIGGER}, {p}" for p in prompts]
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            rows = {"base": (None, None)}
            for name, regularise in (("trigger only", False), ("trigger + regularisation", True)):
                path = lora(dataset(root / f"data-{regularise}", seed, regularise), root / f"run-{regularise}",
                            seed, args.steps)
                rows[name] = (path, regularise)
            for name, (path, _) in rows.items():
                loras = [LoraSpec(path, 1.0)] if path else []
                cells = []
                for said, texts in (("with trigger", triggered), ("without", prompts)):
                    out = root / "samples" / f"{name}-{said}".replace(" ", "-")
                    images = generate(texts, model="micro", loras=loras, out_dir=out, seed=1000 + seed, **SAMPLING)
                    colour, structure = scores(images, prompts)
                    cells.append(f"{said}: purple {colour:.3f}, structure {structure:.3f}")
                print(f"seed {seed}  {name:26s} " + "  |  ".join(cells))


if __name__ == "__main__":
    main()
