"""Unfused LoRAs for inference: each plain LoRA added to its layer's output inside one GEMM.

Why not peft's layers: at inference peft computes ``base(x) + lora_B(lora_A(x)) * scaling``, which
allocates and passes over two output-sized tensors per layer; on a CPU that costs 1.28x a 1024x3072
layer against 1.03x for ``out.addmm_(x @ A.T, (s * B).T)`` (bench/lora_inference.py). Strengths stay
free to change between calls (``set_strengths``: only the small ``(s * B).T`` is recomputed), and
``remove`` leaves the model exactly as it came (nothing is written into a weight).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .modules import LoraModule
from .tools import find_layer


@dataclass
class _Term:
    down_t: torch.Tensor  # [in, rank], the layer's dtype and device
    up: torch.Tensor  # [out, rank] float64 at strength 1 (alpha / rank folded in)
    strength: float
    up_t: torch.Tensor | None = None  # [rank, out] = (strength * up).T in the layer's dtype


class LiveLoras:
    """Plain LoRA modules applied at each forward of their layers, at strengths that can change."""

    def __init__(self, transformer: torch.nn.Module, loras: list[tuple[dict[str, LoraModule], float]]):
        self._terms: dict[str, list[_Term]] = {}
        self._handles = []
        self._order: list[list[_Term]] = []  # per LoRA, its terms (for set_strengths)
        for modules, strength in loras:
            terms = []
            for name, module in modules.items():
                layer = find_layer(transformer, name)
                weight = layer.weight
                term = _Term(module.down.to(weight.device, weight.dtype).t().contiguous(),
                             module.up.double() * module.scale, strength)
                self._terms.setdefault(name, []).append(term)
                terms.append(term)
            self._order.append(terms)
        self.set_strengths([strength for _, strength in loras])
        modules = dict(transformer.named_modules())
        for name, terms in self._terms.items():
            # hook the module at the path (peft's wrapper when a caller's adapter is on it): its output
            # is what the rest of the model sees
            self._handles.append(modules[name].register_forward_hook(_adder(terms)))

    def set_strengths(self, strengths: list[float]) -> None:
        """One strength per LoRA, in the order given; applies from the next forward."""
        if len(strengths) != len(self._order):
            raise ValueError(f"{len(strengths)} strengths for {len(self._order)} LoRAs")
        for terms, strength in zip(self._order, strengths, strict=True):
            for term in terms:
                dtype, device = term.down_t.dtype, term.down_t.device
                term.strength = strength
                term.up_t = (term.up * strength).t().to(device, dtype).contiguous()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _adder(terms: list[_Term]):
    def hook(module, args, output):
        x = args[0]
        flat_in = x.reshape(-1, x.shape[-1])
        if output.is_contiguous():  # the usual case: accumulate into the GEMM's output, no new tensor
            flat_out = output.view(-1, output.shape[-1])
            for term in terms:
                flat_out.addmm_(flat_in @ term.down_t, term.up_t)
            return output
        for term in terms:
            output = output + (flat_in @ term.down_t @ term.up_t).view(output.shape)
        return output

    return hook
