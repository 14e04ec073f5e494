"""A LoRA file as its header and raw bytes, without torch: what ``lora info`` and ``lora verify`` need.

safetensors is 8 bytes of header length, a JSON header (every tensor's dtype, shape and byte range, plus
string metadata) and the tensors' bytes, little-endian. Reading that directly lets a command answer in
a fraction of a second, where importing torch alone takes 1.5 s on a small machine. The tensor hash and
the finiteness check here are the ones the torch side uses (``files.tensor_sha256`` goes through
``tensor_digest``).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError

METADATA_PREFIX = "ernie_lora."
ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers' header key for the peft config
MODELSPEC_TRIGGER = "modelspec.trigger_phrase"  # SAI ModelSpec's key, read by other tools and sites

# safetensors dtype -> (torch's name for it, as hashed; numpy dtype, None where numpy has none; bytes each)
DTYPES = {
    "F64": ("torch.float64", "<f8", 8), "F32": ("torch.float32", "<f4", 4), "F16": ("torch.float16", "<f2", 2),
    "BF16": ("torch.bfloat16", None, 2), "F8_E4M3": ("torch.float8_e4m3fn", None, 1),
    "F8_E5M2": ("torch.float8_e5m2", None, 1), "I64": ("torch.int64", "<i8", 8), "I32": ("torch.int32", "<i4", 4),
    "I16": ("torch.int16", "<i2", 2), "I8": ("torch.int8", "i1", 1), "U8": ("torch.uint8", "u1", 1),
    "BOOL": ("torch.bool", "?", 1),
}


@dataclass
class RawTensor:
    dtype: str  # safetensors' code: F32, BF16, ...
    shape: tuple[int, ...]
    data: memoryview

    def as_float64(self) -> np.ndarray:
        """The values as float64 (bf16 widened bit for bit; float8 is not read here)."""
        if self.dtype == "BF16":
            bits = np.frombuffer(self.data, dtype="<u2").astype(np.uint32) << 16
            return bits.view(np.float32).astype(np.float64).reshape(self.shape)
        numpy_dtype = DTYPES[self.dtype][1]
        if numpy_dtype is None:
            raise UserError(f"{self.dtype} tensors are not read without torch")
        return np.frombuffer(self.data, dtype=numpy_dtype).astype(np.float64).reshape(self.shape)

    def finite(self) -> bool:
        """No NaN or infinity (integers always are); checked on the exponent bits, no copy of the data."""
        if self.dtype in ("BF16", "F16"):
            exponent = 0x7F80 if self.dtype == "BF16" else 0x7C00
            return not bool(np.any((np.frombuffer(self.data, dtype="<u2") & exponent) == exponent))
        if self.dtype in ("F32", "F64"):
            return bool(np.isfinite(np.frombuffer(self.data, dtype=DTYPES[self.dtype][1])).all())
        return True  # integers; float8 (e4m3fn has no infinity; its NaN is left to the torch side)


def resolve_lora_path(path: str | Path) -> Path:
    """A LoRA file's path; a peft adapter folder stands for the adapter_model.safetensors inside it."""
    path = Path(path)
    if path.is_dir() and (path / "adapter_model.safetensors").is_file():
        return path / "adapter_model.safetensors"
    return path


def check_safetensors(path: Path) -> None:
    """One line for a missing file, a pickled checkpoint or a header that cannot be a safetensors one."""
    if not path.is_file():
        raise UserError(f"LoRA {path}: no such file")
    if path.suffix != ".safetensors":
        raise UserError(f"LoRA {path}: only .safetensors files are loaded (pickled .pt/.ckpt/.bin are refused)")
    with open(path, "rb") as f:
        head = f.read(9)
    size = path.stat().st_size
    if len(head) < 9 or struct.unpack("<Q", head[:8])[0] > size - 8 or head[8:9] != b"{":
        raise UserError(f"LoRA {path}: not a valid safetensors file (bad header)")


def read_raw(path: str | Path) -> tuple[dict[str, RawTensor], dict[str, str]]:
    """Every tensor's dtype, shape and bytes (memory-mapped) and the header metadata; one line on damage."""
    path = resolve_lora_path(path)
    check_safetensors(path)
    with open(path, "rb") as f:
        if path.stat().st_size == 0:
            raise UserError(f"LoRA {path}: not a valid safetensors file (bad header)")
        data = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
    (length,) = struct.unpack("<Q", data[:8])
    try:
        header = json.loads(bytes(data[8 : 8 + length]))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"LoRA {path}: cannot read (the header is not JSON)") from None
    if not isinstance(header, dict):
        raise UserError(f"LoRA {path}: cannot read (the header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    body = data[8 + length :]
    tensors = {}
    for key, entry in header.items():
        try:
            dtype, shape, (start, end) = entry["dtype"], tuple(int(n) for n in entry["shape"]), entry["data_offsets"]
            count = int(np.prod(shape, dtype=np.int64)) if shape else 1
            valid = dtype in DTYPES and 0 <= start <= end <= len(body) and end - start == count * DTYPES[dtype][2]
        except (KeyError, TypeError, ValueError):
            valid = False
        if not valid:
            raise UserError(f"LoRA {path}: cannot read (tensor {key!r}: its header entry does not fit the file)")
        tensors[key] = RawTensor(dtype, shape, body[start:end])
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise UserError(f"LoRA {path}: cannot read (header metadata must map strings to strings)")
    return dict(sorted(tensors.items())), metadata


def tensor_digest(entries: Iterable[tuple[str, str, list[int], bytes | memoryview]]) -> str:
    """The provenance hash: every (key, torch dtype name, shape, bytes) in key order."""
    h = hashlib.sha256()
    for key, dtype, shape, data in sorted(entries, key=lambda e: e[0]):
        h.update(f"{key}|{dtype}|{list(shape)}|".encode())
        h.update(data)
    return h.hexdigest()


def raw_digest(tensors: dict[str, RawTensor]) -> str:
    return tensor_digest((k, DTYPES[t.dtype][0], list(t.shape), t.data) for k, t in tensors.items())


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
    """Our ``ernie_lora.*`` fields, and the trigger word of a file another tool wrote (ModelSpec's), so that
    a converted file keeps it."""
    found = {k.removeprefix(METADATA_PREFIX): v for k, v in header.items() if k.startswith(METADATA_PREFIX)}
    if not found.get("trigger_word", "").strip() and header.get(MODELSPEC_TRIGGER, "").strip():
        found["trigger_word"] = header[MODELSPEC_TRIGGER].strip()
    return found


def trigger_of(header: dict[str, str]) -> str | None:
    """The trigger word a LoRA file's header records, ours or ModelSpec's; None when it records none."""
    return provenance(header).get("trigger_word", "").strip() or None
