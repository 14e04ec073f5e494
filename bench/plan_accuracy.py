"""The memory planner's activation figures against torch's measured peaks of whole training steps (CPU).

For each precision / quantisation / checkpointing setting the planner measures its slices (2-3 blocks,
608-1121 tokens, narrowed to --slice-width when the model is wider), then a whole step of the model
(--layers blocks at the listed token counts) is measured; printed: planned / measured.

    python bench/plan_accuracy.py                          # 256 wide, 4 blocks, not narrowed
    python bench/plan_accuracy.py --hidden 1024 --layers 3 --slice-width 256 --sides 64
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ernie_lora.config import TrainRunConfig  # noqa: E402
from ernie_lora.plan import (  # noqa: E402
    Profiles,
    Settings,
    _lora_param_count,
    build_dit,
    estimate,
    measure_activations,
    measure_step,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--slice-width", type=int, default=512)
    ap.add_argument("--sides", default="40,56", help="latent sides of the measured steps (tokens = side² + 64)")
    args = ap.parse_args()
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    torch.set_num_threads(2)
    head_dim = 64
    dit = dict(hidden_size=args.hidden, num_attention_heads=args.hidden // head_dim, num_layers=args.layers,
               ffn_hidden_size=3 * args.hidden, in_channels=128, out_channels=128, text_in_dim=256,
               rope_axes_dim=(16, 24, 24))
    print(f"DiT {args.hidden} wide, {args.layers} blocks; slices at width {min(args.hidden, args.slice_width)}")
    print(f"{'setting':<28}{'tokens':>7}{'batch':>6}{'measured MiB':>14}{'planned MiB':>13}{'ratio':>7}")
    for precision, dtype, quantize in (("no", "fp32", "none"), ("bf16", "bf16", "none"), ("bf16", "bf16", "int8"),
                                       ("bf16", "bf16", "float8")):
        cfg = TrainRunConfig.model_validate({"model": {"dtype": dtype, "quantize": quantize},
                                             "train": {"mixed_precision": precision}, "lora": {"rank": 16}})
        lora_grads = _lora_param_count(build_dit(dit, torch.float32, "meta"), cfg) * 4
        for checkpointing in (False, True):
            t0 = time.perf_counter()
            profile = measure_activations(cfg, dit, checkpointing, max_width=args.slice_width)
            took = time.perf_counter() - t0
            for side in (int(s) for s in args.sides.split(",")):
                for batch in (1, 2) if side == int(args.sides.split(",")[0]) else (1,):
                    measured = measure_step(cfg, dit, side, 64, batch=batch, checkpointing=checkpointing)
                    planned = profile.bytes(side * side + 64, batch, args.layers) + lora_grads
                    name = f"{dtype}/{quantize}/{'ckpt' if checkpointing else 'kept'} ({took:.1f}s)"
                    print(f"{name:<28}{side * side + 64:>7}{batch:>6}{measured / 2**20:>14.1f}"
                          f"{planned / 2**20:>13.1f}{planned / measured:>7.3f}")
            if quantize == "none" and dtype == "bf16" and checkpointing:
                # block swap: the swapped blocks' copies made during the step count on top
                side = int(args.sides.split(",")[-1])
                profiles = Profiles(cfg, dit)
                profiles._cache[True, "none"] = profile  # the one just measured (at --slice-width)
                for swapped in (1, args.layers):
                    measured = measure_step(cfg, dit, side, 64, checkpointing=True, block_swap=swapped)
                    rows = dict(estimate(cfg, Settings("none", True, "adamw", 1, side * 16, block_swap=swapped),
                                         profiles, dit, 64, 16).rows)
                    planned = lora_grads + sum(b for k, b in rows.items()
                                               if k.startswith(("activations", "block swap")))
                    name = f"bf16/swap {swapped}/ckpt"
                    print(f"{name:<28}{side * side + 64:>7}{1:>6}{measured / 2**20:>14.1f}"
                          f"{planned / 2**20:>13.1f}{planned / measured:>7.3f}")


if __name__ == "__main__":
    main()
