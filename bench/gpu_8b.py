"""The full-size ERNIE-Image DiT (8B, random init: no download) training a LoRA on one GPU.

Rank-16 LoRA on attn+mlp, 1024² (4096 image + 256 text tokens), batch 1. For each variant: s/it,
peak CUDA memory and MFU, counting the FLOPs the step actually does: the frozen base needs input
gradients only (one matmul per forward matmul, no weight gradients), attention's backward is two of
its forward, and checkpointing adds one more forward. Also prints the planner's figure beside each
measured peak.

    python bench/gpu_8b.py                       # on a GPU machine (the `device` tool)
    python bench/gpu_8b.py --layers 2 --scale 8  # a CPU smoke run: 2 blocks at 1/8 width, 256² tokens

Variants: bf16, bf16 + checkpointing, int8 base + checkpointing, float8 base + checkpointing,
bf16 + checkpointing + regional compile, bf16 + checkpointing with half the blocks swapped to CPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ernie_lora.config import TrainRunConfig  # noqa: E402
from ernie_lora.lora.adapters import add_lora, resolve_targets  # noqa: E402
from ernie_lora.models.block_swap import BlockSwap  # noqa: E402
from ernie_lora.models.family import FULL_TRANSFORMER_CONFIG  # noqa: E402
from ernie_lora.models.quantize import quantize_base  # noqa: E402
from ernie_lora.plan import Profiles, Settings, build_dit, estimate, narrowed, training_step  # noqa: E402

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "4090": 165.0}  # dense bf16


def step_flops(config: dict, image_tokens: int, text_tokens: int, rank: int, checkpointing: bool) -> float:
    h, f, layers = config["hidden_size"], config["ffn_hidden_size"], config["num_layers"]
    s = image_tokens + text_tokens
    lora = layers * rank * (4 * (h + h) + 2 * (h + f) + (f + h))
    fwd_linear = 2 * s * (layers * (4 * h * h + 3 * h * f) + lora)
    fwd_attn = layers * 4 * s * s * h
    # backward: input grads of every matmul (1x), LoRA weight grads (~1x of LoRA), attention 2x
    bwd = fwd_linear + 2 * s * lora + 2 * fwd_attn
    fwd = fwd_linear + fwd_attn
    return (2 if checkpointing else 1) * fwd + bwd


def run_variant(name: str, config: dict, device: torch.device, side: int, text_tokens: int, *, quantize: str,
                checkpointing: bool, compile_blocks: bool, steps: int, warmup: int, block_swap: int = 0) -> dict:
    torch.manual_seed(0)
    model = build_dit(config, torch.bfloat16, device=str(device))
    quantize_base(model, quantize)
    add_lora(model, 16, 16, resolve_targets(model, "attn_mlp"))
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    if checkpointing:
        model.enable_gradient_checkpointing()
    swap = BlockSwap(model, block_swap, device) if block_swap else None
    if compile_blocks:
        model.compile_repeated_blocks()
    model.train()
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        training_step(model, side, text_tokens, 1, autocast=True)
        if swap:
            swap.park_all()
        opt.step()
        opt.zero_grad(set_to_none=True)

    cuda = device.type == "cuda"
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    s_it = (time.perf_counter() - t0) / steps
    peak = torch.cuda.max_memory_allocated() if cuda else float("nan")
    return {"name": name, "s_it": s_it, "peak": peak, "quantize": quantize, "checkpointing": checkpointing,
            "flops": step_flops(config, side * side, text_tokens, 16, checkpointing)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=None, help="blocks (default: the model's 36)")
    ap.add_argument("--scale", type=int, default=1, help="divide hidden and FFN width by this (CPU smoke runs)")
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--only", default=None, help="comma-separated variant names")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak (default: by name)")
    args = ap.parse_args()
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # build_dit's dtype cast logs a note per model

    config = dict(FULL_TRANSFORMER_CONFIG)
    if args.layers:
        config["num_layers"] = args.layers
    if args.scale > 1:
        config, _ = narrowed(config, config["hidden_size"] // args.scale)
    side, text_tokens = args.resolution // 16, 256
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    gpu = torch.cuda.get_device_name() if cuda else "CPU (no GPU: memory and MFU not measured)"
    peak_tflops = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in gpu), None)
    params = sum(p.numel() for p in build_dit(config, torch.bfloat16, "meta").parameters())
    print(f"device: {gpu}; torch {torch.__version__}; DiT {params / 1e9:.2f}B params, {config['num_layers']} blocks, "
          f"{side * side} image + {text_tokens} text tokens, LoRA r16 attn+mlp, batch 1")

    variants = [
        ("bf16", "none", False, False, 0),
        ("bf16+ckpt", "none", True, False, 0),
        ("int8+ckpt", "int8", True, False, 0),
        ("float8+ckpt", "float8", True, False, 0),
        ("bf16+ckpt+compile", "none", True, True, 0),
        (f"bf16+ckpt+swap{config['num_layers'] // 2}", "none", True, False, config["num_layers"] // 2),
    ]
    if args.only:
        keep = set(args.only.split(","))
        variants = [v for v in variants if v[0] in keep]
    cfg = TrainRunConfig.model_validate({"model": {"dtype": "bf16"}, "train": {"mixed_precision": "bf16"},
                                         "data": {"resolution": args.resolution, "max_aspect_ratio": 1.0}})
    profiles = Profiles(cfg, config)
    print(f"{'variant':<20}{'s/it':>8}{'peak GiB':>10}{'planned GiB':>13}{'TFLOP/step':>12}{'MFU':>7}")
    for name, quantize, ckpt, comp, swapped in variants:
        try:
            r = run_variant(name, config, device, side, text_tokens, quantize=quantize, checkpointing=ckpt,
                            compile_blocks=comp, steps=args.steps, warmup=args.warmup, block_swap=swapped)
        except torch.OutOfMemoryError:
            print(f"{name:<20}{'OOM':>8}")
            torch.cuda.empty_cache()
            continue
        if cuda:
            torch.cuda.empty_cache()  # the variant's model is gone with run_variant's frame
        plan = estimate(cfg, Settings(quantize, ckpt, "adamw", 1, args.resolution, block_swap=swapped), profiles,
                        config, text_tokens, 16)
        planned = plan.total - dict(plan.rows)["CUDA context + allocator slack (assumed)"]
        mfu = r["flops"] / r["s_it"] / (peak_tflops * 1e12) if peak_tflops and cuda else float("nan")
        print(f"{name:<20}{r['s_it']:>8.3f}{r['peak'] / 2**30:>10.2f}{planned / 2**30:>13.2f}"
              f"{r['flops'] / 1e12:>12.1f}{mfu:>7.1%}")


if __name__ == "__main__":
    main()
