"""Per-image generation time with LoRAs, as ratios to the base model, measured side by side.

    python bench/lora_inference.py [--images 12] [--steps 24]

On micro ERNIE at 64x64 (CPU): base; base + one LoRA fused into the weights; base + one unfused
LoRA (peft layers active); base + two stacked unfused LoRAs. Rank-16 LoRAs on attention and MLP.
The four set-ups take turns image by image so machine noise hits them alike.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from ernie_lora.generate import LoraSpec, load_loras
from ernie_lora.lora.adapters import add_lora, lora_state_dict, peft_config_metadata, resolve_targets
from ernie_lora.lora.files import save_lora
from ernie_lora.models import ERNIE_IMAGE


def random_lora(path: Path, seed: int) -> Path:
    transformer = ERNIE_IMAGE.load_pipeline("micro", dtype="fp32", components=("transformer",)).transformer
    torch.manual_seed(seed)
    config = add_lora(transformer, 16, 16, resolve_targets(transformer, "attn_mlp"))
    for name, param in transformer.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.01)
    return save_lora(path, lora_state_dict(transformer), peft_config_metadata(config))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--steps", type=int, default=24)
    args = parser.parse_args()
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        a, b = random_lora(Path(tmp) / "a.safetensors", 0), random_lora(Path(tmp) / "b.safetensors", 1)
        setups = {"base": [], "fused": [LoraSpec(a, 0.9)], "unfused": [LoraSpec(a, 0.9)],
                  "two stacked": [LoraSpec(a, 0.6), LoraSpec(b, 0.6)]}
        pipes = {}
        for name, loras in setups.items():
            pipe = ERNIE_IMAGE.load_pipeline("micro", dtype="fp32")
            pipe.set_progress_bar_config(disable=True)
            load_loras(pipe, loras, fuse=name == "fused")
            pipes[name] = pipe
        times = {name: 0.0 for name in setups}
        prompt = 'a poster with title "SALE", title band at the top, centered layout, blue theme'
        for i in range(args.images + 1):  # the first round warms up and is not counted
            for name, pipe in pipes.items():
                start = time.perf_counter()
                pipe(prompt, height=64, width=64, num_inference_steps=args.steps, guidance_scale=3.0,
                     generator=torch.Generator().manual_seed(i))
                if i:
                    times[name] += time.perf_counter() - start
    base = times["base"] / args.images
    print(f"micro ERNIE, 64x64, {args.steps} steps, CFG, {args.images} images each, {torch.get_num_threads()} threads")
    for name, total in times.items():
        per = total / args.images
        print(f"{name:12s} {per * 1000:7.1f} ms/image  {per / base:5.2f}x base")


if __name__ == "__main__":
    main()
