"""LoRA files on disk: safetensors only (nothing is ever unpickled), written atomically, with a header.

The header holds ``lora_adapter_metadata`` (the peft LoraConfig diffusers rebuilds the adapter from)
and our provenance fields under ``ernie_lora.*`` keys, among them a hash of every tensor that
``lora verify`` checks.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import UserError
from ..io import atomic_write

METADATA_PREFIX = "ernie_lora."
ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers' header key for the peft config


def tensor_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """A hash of every tensor's name, dtype, shape and bytes, in key order (stored at save, checked by verify)."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # reshape: 0-d alpha tensors too
    return h.hexdigest()


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
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))


def resolve_lora_path(path: str | Path) -> Path:
    """A LoRA file's path; a peft adapter folder stands for the adapter_model.safetensors inside it."""
    path = Path(path)
    if path.is_dir() and (path / "adapter_model.safetensors").is_file():
        return path / "adapter_model.safetensors"
    return path


def _check_safetensors(path: Path) -> None:
    if not path.is_file():
        raise UserError(f"LoRA {path}: no such file")
    if path.suffix != ".safetensors":
        raise UserError(f"LoRA {path}: only .safetensors files are loaded (pickled .pt/.ckpt/.bin are refused)")
    with open(path, "rb") as f:
        head = f.read(9)
    size = path.stat().st_size
    if len(head) < 9 or struct.unpack("<Q", head[:8])[0] > size - 8 or head[8:9] != b"{":
        raise UserError(f"LoRA {path}: not a valid safetensors file (bad header)")


def read_lora_shapes(path: str | Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Keys, shapes and header metadata of a LoRA file, without reading its tensors."""
    path = resolve_lora_path(path)
    _check_safetensors(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as exc:
        raise UserError(f"LoRA {path}: cannot read ({exc})") from None


def read_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a LoRA safetensors file (never unpickles anything): tensors and header metadata."""
    path = resolve_lora_path(path)
    _check_safetensors(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise UserError(f"LoRA {path}: cannot read ({exc})") from None
    return tensors, metadata


def adapter_metadata(header: dict[str, str], path: Path) -> dict | None:
    """The peft config in a header's ``lora_adapter_metadata`` (diffusers' ``transformer.`` prefix removed)."""
    raw = header.get(ADAPTER_METADATA_KEY)
    if raw is None:
        return None
    try:
        parsed = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise UserError(f"LoRA {path}: header field {ADAPTER_METADATA_KEY} is not JSON ({exc.msg})") from None
    if not isinstance(parsed, dict):
        raise UserError(f"LoRA {path}: header field {ADAPTER_METADATA_KEY} is not a JSON object")
    return {k.removeprefix("transformer."): v for k, v in parsed.items()}


def provenance(header: dict[str, str]) -> dict[str, str]:
    return {k.removeprefix(METADATA_PREFIX): v for k, v in header.items() if k.startswith(METADATA_PREFIX)}
