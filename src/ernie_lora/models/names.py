"""ERNIE-Image's DiT module names and their kohya spelling: plain Python, so a command that only reads a
LoRA file's keys (``lora info``, ``lora verify``) never waits for torch. ``family.ErnieImageFamily``
exposes these; everything else about the model lives there.
"""

from __future__ import annotations

import re

BLOCK_LINEARS = ("self_attention.to_q", "self_attention.to_k", "self_attention.to_v", "self_attention.to_out.0",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.linear_fc2")
BLOCK_NORMS = ("adaLN_sa_ln", "adaLN_mlp_ln", "self_attention.norm_q", "self_attention.norm_k")
TOP_LINEARS = ("text_proj", "time_embedding.linear_1", "time_embedding.linear_2", "adaLN_modulation.1",
               "final_norm.linear", "final_linear")
TOP_CONVS = ("x_embedder.proj",)
# ERNIE-Image's pixels per token side (VAE x8, the pipeline's 2x2 patchify, patch 1): what a bucket's sides
# are multiples of when no model's configs are at hand (``family.pixel_multiple`` reads a model's own)
PIXELS_PER_TOKEN = 16


def _flat(name: str) -> str:
    return name.replace(".", "_")


_FLAT_TOP = {_flat(n): n for n in TOP_LINEARS + TOP_CONVS}
_FLAT_BLOCK = {_flat(n): n for n in BLOCK_LINEARS + BLOCK_NORMS}
_FLAT_LAYER = re.compile(r"^layers_(\d+)_(.+)$")


def flat_module_name(module: str) -> str:
    """kohya's spelling of a module path: dots become underscores (``layers_0_self_attention_to_q``)."""
    return _flat(module)


def module_from_flat(flat: str) -> str | None:
    """The module path a kohya-style name stands for; None when it names no ERNIE-Image module.

    Underscores are ambiguous (``to_out_0``, ``adaLN_sa_ln``), so names are matched against ERNIE's own
    module list rather than split."""
    if flat in _FLAT_TOP:
        return _FLAT_TOP[flat]
    m = _FLAT_LAYER.match(flat)
    if m and m.group(2) in _FLAT_BLOCK:
        return f"layers.{m.group(1)}.{_FLAT_BLOCK[m.group(2)]}"
    return None


def is_module_path(name: str) -> bool:
    """True for a dotted DiT module path (``layers.3.mlp.up_proj``, ``final_linear``)."""
    return module_from_flat(_flat(name)) == name
