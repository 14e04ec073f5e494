"""Weight-only quantisation of the frozen DiT (torchao), so the 8B base fits a 24 GB GPU under a LoRA.

int8 stores each weight in one byte with a scale per output row; float8 (e4m3) likewise, and is the
better choice on GPUs with float8 units (Ada, Hopper and later). Both dequantise inside the matmul:
activations and the LoRA stay in bf16/fp32, and peft wraps the quantised linear layers with its
torchao LoRA layer, so gradients reach the LoRA exactly as over a bf16 base.
"""

from __future__ import annotations

import torch

from ..errors import UserError
from .family import ERNIE_IMAGE

QUANTIZE_CHOICES = ("none", "int8", "float8")
quantizable = ERNIE_IMAGE.quantizable  # torchao's filter (module, name): the family's linears, not its ends


def quantize_base(transformer: torch.nn.Module, kind: str) -> None:
    """Quantise the frozen linear layers in place (before the LoRA is added)."""
    if kind == "none":
        return
    if kind not in QUANTIZE_CHOICES:
        raise UserError(f"model.quantize: {kind!r} is not one of {', '.join(QUANTIZE_CHOICES)}")
    try:
        from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_  # extra [quant]
    except ImportError:
        raise UserError(f"model.quantize: {kind} needs torchao (pip install 'ernie-lora[quant]')") from None
    config = Int8WeightOnlyConfig() if kind == "int8" else Float8WeightOnlyConfig()
    quantize_(transformer, config, filter_fn=quantizable)


def quantized_weight_bytes(out_features: int, in_features: int, kind: str) -> int:
    """Bytes torchao keeps for one weight-only quantised matrix: a byte per weight, an fp32 scale per row
    (and an int8 zero point per row for int8)."""
    per_row = 4 + (1 if kind == "int8" else 0)
    return out_features * in_features + out_features * per_row
