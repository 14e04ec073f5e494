"""Denoising time with LoRAs, as ratios to the base model, measured side by side (interleaved).

    OMP_NUM_THREADS=1 python bench/lora_inference.py [--images 12] [--steps 24] [--threads 1]

1. micro ERNIE at 64x64 through ``ErnieImagePipeline`` (24 steps, CFG: batch 2): the base; one rank-16
   LoRA fused for the call (``generate``'s default); the same unfused (``--no-fuse``: ``lora.live``,
   added inside each layer's GEMM); two stacked unfused; unfused without the contiguous attention input
   (the strided ``bmm`` path); and unfused through diffusers' ``load_lora_weights`` (peft's layers).
2. A 1024-wide ERNIE-architecture DiT (2 blocks, 8 heads, FFN 3072; the 8B's layers are 4096 wide), one
   forward at 32x32 latent tokens + 64 text tokens, batch 2, the same set-ups minus stacking.

The set-ups take turns run by run so machine noise hits them alike; the first round is not counted;
medians are printed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ernie_lora.generate import LoraSpec, load_loras  # noqa: E402
from ernie_lora.lora.adapters import add_lora, lora_state_dict, peft_config_metadata, resolve_targets  # noqa: E402
from ernie_lora.lora.files import save_lora  # noqa: E402
from ernie_lora.lora.formats import read_lora_file  # noqa: E402
from ernie_lora.lora.live import LiveLoras  # noqa: E402
from ernie_lora.lora.tools import fuse_into  # noqa: E402
from ernie_lora.models import ERNIE_IMAGE  # noqa: E402
from ernie_lora.plan import build_dit  # noqa: E402

WIDE = dict(hidden_size=1024, num_attention_heads=8, num_layers=2, ffn_hidden_size=3072, in_channels=128,
            out_channels=128, text_in_dim=256, rope_axes_dim=(16, 56, 56))


def random_lora(transformer, path: Path, seed: int) -> Path:
    """A rank-16 LoRA on attention and MLP with visible B factors, added to ``transformer`` and saved."""
    torch.manual_seed(seed)
    config = add_lora(transformer, 16, 16, resolve_targets(transformer, "attn_mlp"))
    for name, param in transformer.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.01)
    return save_lora(path, lora_state_dict(transformer), peft_config_metadata(config))


def timed_rounds(setups: dict, run, rounds: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in setups}
    for i in range(rounds + 1):
        for name, target in setups.items():
            start = time.perf_counter()
            run(target, i)
            if i:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def print_table(title: str, medians: dict[str, float], unit: str) -> None:
    print(title)
    base = medians["base"]
    for name, t in medians.items():
        print(f"  {name:30s} {t * 1000:8.1f} ms/{unit}  {t / base:5.3f}x base")


def micro(tmp: Path, images: int, steps: int) -> None:
    donor = ERNIE_IMAGE.load_pipeline("micro", dtype="fp32", components=("transformer",)).transformer
    a = random_lora(donor, tmp / "a.safetensors", 0)
    donor = ERNIE_IMAGE.load_pipeline("micro", dtype="fp32", components=("transformer",)).transformer
    b = random_lora(donor, tmp / "b.safetensors", 1)
    setups = {"base": ([], True, True), "one LoRA, fused": ([LoraSpec(a, 0.9)], True, True),
              "one LoRA, unfused": ([LoraSpec(a, 0.9)], False, True),
              "two LoRAs, unfused": ([LoraSpec(a, 0.6), LoraSpec(b, 0.6)], False, True),
              "one LoRA, unfused, strided": ([LoraSpec(a, 0.9)], False, False),
              "one LoRA, unfused, peft layers": ([], False, True)}
    pipes = {}
    for name, (loras, fuse, contiguous) in setups.items():
        pipe = ERNIE_IMAGE.load_pipeline("micro", dtype="fp32")
        pipe.set_progress_bar_config(disable=True)
        load_loras(pipe, loras, fuse=fuse)
        if name.endswith("peft layers"):  # what diffusers' own loader puts on the model
            pipe.load_lora_weights(str(a), adapter_name="a")
            pipe.set_adapters(["a"], [0.9])
        ERNIE_IMAGE.contiguous_attention_input(pipe.transformer, enable=contiguous)
        pipes[name] = pipe
    prompt = 'a poster with title "SALE", title band at the top, centered layout, blue theme'

    def run(pipe, i):
        pipe(prompt, height=64, width=64, num_inference_steps=steps, guidance_scale=3.0,
             generator=torch.Generator().manual_seed(i))

    with torch.no_grad():
        medians = timed_rounds(pipes, run, images)
    print_table(f"micro ERNIE (128 wide), 64x64, {steps} steps, CFG, {images} images each", medians, "image")


def wide(tmp: Path, rounds: int) -> None:
    torch.manual_seed(0)
    base = build_dit(WIDE, torch.float32)
    state = base.state_dict()

    def copy():
        model = build_dit(WIDE, torch.float32)
        model.load_state_dict(state)
        return model

    unfused, strided, fused, peft_layers = copy(), copy(), copy(), copy()
    path = random_lora(peft_layers, tmp / "wide.safetensors", 2)
    modules = read_lora_file(path).modules
    fuse_into(fused, modules, 1.0)
    LiveLoras(unfused, [(modules, 1.0)])
    LiveLoras(strided, [(modules, 1.0)])
    models = {"base": base, "one LoRA, fused": fused, "one LoRA, unfused": unfused,
              "one LoRA, unfused, strided": strided, "one LoRA, unfused, peft layers": peft_layers}
    for name, model in models.items():
        model.eval().requires_grad_(False)
        ERNIE_IMAGE.contiguous_attention_input(model, enable=not name.endswith("strided"))
    side = 32
    x = torch.randn(2, WIDE["in_channels"], side, side)
    texts = [torch.randn(64, WIDE["text_in_dim"])] * 2
    sigmas = torch.full((2,), 0.5)

    def run(model, i):
        ERNIE_IMAGE.predict_velocity(model, x, sigmas, texts)

    with torch.no_grad():
        medians = timed_rounds(models, run, rounds)
    print_table(f"1024-wide DiT, 2 blocks, {side * side}+64 tokens, batch 2, {rounds} forwards each", medians,
                "forward")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: as started)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    with tempfile.TemporaryDirectory() as tmp:
        micro(Path(tmp), args.images, args.steps)
        wide(Path(tmp), args.rounds)


if __name__ == "__main__":
    main()
