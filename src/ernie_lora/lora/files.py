"""LoRA files on disk: safetensors only (nothing is ever unpickled), written atomically, with a header.

The header holds ``lora_adapter_metadata`` (the peft LoraConfig diffusers rebuilds the adapter from)
and our provenance fields under ``ernie_lora.*`` keys, among them a hash of every tensor that
``lora verify`` checks.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import UserError
from ..io import atomic_write
from .header import (
    ADAPTER_METADATA_KEY,
    METADATA_PREFIX,
    MODELSPEC_TRIGGER,
    check_safetensors,
    resolve_lora_path,
    tensor_digest,
)


def tensor_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """A hash of every tensor's name, dtype, shape and bytes, in key order (stored at save, checked by verify)."""
    def entry(key: str) -> tuple[str, str, list[int], bytes]:
        t = tensors[key].detach().cpu().contiguous()
        return key, str(t.dtype), list(t.shape), t.reshape(-1).view(torch.uint8).numpy().tobytes()  # 0-d too

    return tensor_digest(entry(key) for key in tensors)


def save_lora(path: str | Path, state_dict: dict[str, torch.Tensor], adapter_metadata: dict | None = None,
              metadata: dict[str, object] | None = None) -> Path:
    """Write tensors atomically with ``adapter_metadata`` (diffusers' ``lora_adapter_metadata``, keys as
    written) and ``metadata`` (our provenance, stored under ``ernie_lora.``) in the header."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    header: dict[str, str] = {"format": "pt", METADATA_PREFIX + "tensor_sha256": tensor_sha256(tensors)}
    if adapter_metadata is not None:
        header[ADAPTER_METADATA_KEY] = json.dumps(adapter_metadata, sort_keys=True, default=str)
    for key, value in (metadata or {}).items():
        key = key.removeprefix(METADATA_PREFIX)
        if key != "tensor_sha256":  # always the hash of these tensors, never a copied one
            header[METADATA_PREFIX + key] = value if isinstance(value, str) else json.dumps(value, default=str)
    if header.get(METADATA_PREFIX + "trigger_word"):  # also where other tools look (SAI ModelSpec)
        header[MODELSPEC_TRIGGER] = header[METADATA_PREFIX + "trigger_word"]
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))


def read_lora_shapes(path: str | Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Keys, shapes and header metadata of a LoRA file, without reading its tensors."""
    path = resolve_lora_path(path)
    check_safetensors(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as exc:
        raise UserError(f"LoRA {path}: cannot read ({exc})") from None


def read_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a LoRA safetensors file (never unpickles anything): tensors and header metadata."""
    path = resolve_lora_path(path)
    check_safetensors(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise UserError(f"LoRA {path}: cannot read ({exc})") from None
    return tensors, metadata
