"""``ernie-lora demo``: the spine end to end on the CPU with no download.

Until the micro ERNIE model lands (issue 3) this runs on the random tiny model: it shows the
machinery (dataset check, caches, training, checkpoints, samples, a LoRA that diffusers loads,
generation with it), not image quality.
"""

from __future__ import annotations

from pathlib import Path

from .config import TrainRunConfig
from .data.dataset import check_dataset
from .data.toy import toy_caption, write_toy_dataset
from .generate import LoraSpec, generate
from .plots import save_image_grid
from .recipes.lora import train


def run_demo(output: Path) -> Path:
    output = Path(output)
    dataset = output / "dataset"
    if not dataset.exists():
        write_toy_dataset(dataset, count=16, size=(32, 32), seed=0)
    report = check_dataset(dataset, min_side=32)
    print(f"dataset: {len(report.items)} images in {dataset}")
    prompts = [toy_caption("red", "top", "SALE"), toy_caption("blue", "bottom", "JAZZ")]
    cfg = TrainRunConfig.model_validate({
        "model": {"name": "tiny", "dtype": "fp32"},
        "data": {"path": str(dataset), "resolution": 32},
        "lora": {"rank": 4, "alpha": 8},
        "train": {"steps": 40, "batch_size": 4, "lr": 1e-3, "mixed_precision": "no",
                  "gradient_checkpointing": False, "seed": 0},
        "checkpoint": {"every": 20, "keep": 2},
        "sample": {"every": 20, "prompts": prompts, "steps": 8, "guidance": 2.0},
    })
    run = output / "run"
    result = train(cfg, run, overwrite=True)
    print(f"trained {result.steps_done} steps, final loss {result.final_loss:.4f}; LoRA at {run / 'lora.safetensors'}")
    images = output / "images"
    base = generate(prompts, model="tiny", steps=8, guidance=2.0, width=32, height=32, out_dir=images / "base",
                    dtype="fp32")
    tuned = generate(prompts, model="tiny", loras=[LoraSpec(run / "lora.safetensors", 1.0)], steps=8,
                     guidance=2.0, width=32, height=32, out_dir=images / "lora", dtype="fp32")
    from PIL import Image

    grid = save_image_grid([Image.open(p) for p in base + tuned], output / "base_vs_lora.png",
                           labels=["base"] * len(base) + ["lora"] * len(tuned), columns=len(prompts))
    print(f"comparison grid: {grid}")
    print(f"loss plot: {run / 'loss.png'}; samples: {run / 'samples'}")
    return output
