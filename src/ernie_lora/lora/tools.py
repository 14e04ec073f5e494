"""What users do with LoRA files besides training them: inspect, verify, merge, fuse."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import UserError
from .adapters import METADATA_PREFIX, check_lora_fits
from .formats import LoraModule, read_modules, to_diffusers_state_dict


def tensor_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """A hash of every tensor's name, dtype, shape and bytes, in key order (stored at save, checked by verify)."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # reshape: 0-d alpha tensors too
    return h.hexdigest()


@dataclass
class LoraInfo:
    path: Path
    format: str
    modules: int
    ranks: dict[int, int]  # rank -> number of modules
    alphas: dict[float, int]
    size_bytes: int
    provenance: dict[str, str] = field(default_factory=dict)
    fits: str | None = None  # None: not checked; "yes" or the first mismatch


def lora_info(path: str | Path, model: str | None = None) -> LoraInfo:
    path = Path(path)
    modules, fmt, metadata = read_modules(path)
    ranks: dict[int, int] = {}
    alphas: dict[float, int] = {}
    for m in modules.values():
        ranks[m.rank] = ranks.get(m.rank, 0) + 1
        alphas[m.alpha] = alphas.get(m.alpha, 0) + 1
    provenance = {k.removeprefix(METADATA_PREFIX): v for k, v in metadata.items() if k.startswith(METADATA_PREFIX)}
    info = LoraInfo(path, fmt, len(modules), ranks, alphas, path.stat().st_size, provenance)
    if model is not None:
        from accelerate import init_empty_weights
        from diffusers import ErnieImageTransformer2DModel

        from ..models.loading import load_component_config

        with init_empty_weights():  # shapes only: an 8B model is checked without loading 15 GB
            transformer = ErnieImageTransformer2DModel.from_config(load_component_config(model, "transformer"))
        shapes = {k: tuple(v.shape) for k, v in to_diffusers_state_dict(modules).items()}
        try:
            check_lora_fits(path, shapes, transformer)
            info.fits = "yes"
        except UserError as exc:
            info.fits = str(exc)
    return info


def verify_lora(path: str | Path) -> tuple[bool, str]:
    """(ok, what was checked): the header parses, the keys are one known format, the tensor hash matches."""
    from .adapters import read_lora

    tensors, metadata = read_lora(path)  # header integrity: a truncated or corrupt file fails here
    for key, value in metadata.items():
        if key == "lora_adapter_metadata":
            try:
                json.loads(value)
            except json.JSONDecodeError:
                return False, f"header field {key} is not valid JSON"
    read_modules(path)
    stored = metadata.get(METADATA_PREFIX + "tensor_sha256")
    if stored is None:
        return False, "no stored tensor hash (not written by ernie-lora, or written before provenance existed)"
    actual = tensor_sha256(tensors)
    if actual != stored:
        return False, f"tensor hash mismatch: stored {stored[:16]}..., computed {actual[:16]}..."
    return True, f"header, format and tensor hash ({stored[:16]}...) all check out"


def merge_modules(loras: list[dict[str, LoraModule]], weights: list[float], rank: int
                  ) -> tuple[dict[str, LoraModule], float]:
    """One LoRA from several: per module, the truncated SVD of sum_i w_i * delta W_i.

    Computed without forming delta W: the stacked factors have rank K = sum of ranks, so
    delta W = (Q_up R_up)(R_down^T Q_down^T) and only a K x K matrix is decomposed.
    Returns the modules and the energy kept, sum of kept sigma^2 over all sigma^2, across modules.
    """
    if len(loras) != len(weights):
        raise UserError(f"--weights: {len(weights)} weights for {len(loras)} LoRAs")
    if rank <= 0:
        raise UserError(f"--rank: {rank} must be > 0")
    names = sorted(set().union(*loras))
    merged, kept, total = {}, 0.0, 0.0
    for name in names:
        ups, downs = [], []
        for lora, w in zip(loras, weights, strict=True):
            if name in lora:
                m = lora[name]
                ups.append(m.up.double() * (w * m.scale))
                downs.append(m.down.double())
        shapes = {(u.shape[0], d.shape[1]) for u, d in zip(ups, downs, strict=True)}
        if len(shapes) != 1:
            raise UserError(f"module {name}: the LoRAs disagree on its shape ({sorted(shapes)})")
        q_up, r_up = torch.linalg.qr(torch.cat(ups, dim=1))
        q_down, r_down = torch.linalg.qr(torch.cat(downs, dim=0).T)
        u, s, vh = torch.linalg.svd(r_up @ r_down.T)
        r = min(rank, s.numel())
        kept += float((s[:r] ** 2).sum())
        total += float((s**2).sum())
        up = (q_up @ u[:, :r]) * s[:r]
        down = vh[:r] @ q_down.T
        merged[name] = LoraModule(down.float().contiguous(), up.float().contiguous(), float(r))
    return merged, (kept / total if total else 1.0)


@torch.no_grad()
def fuse_into(transformer, modules: dict[str, LoraModule], strength: float = 1.0) -> None:
    """W <- W + strength * delta W for every module, in place."""
    named = dict(transformer.named_modules())
    for name, m in modules.items():
        layer = named.get(name)
        if not isinstance(layer, torch.nn.Linear):
            raise UserError(f"module {name!r}: no such linear layer in the model")
        if layer.weight.shape != (m.up.shape[0], m.down.shape[1]):
            raise UserError(f"module {name}: LoRA delta {list(m.up.shape[:1]) + list(m.down.shape[1:])} != "
                            f"weight {list(layer.weight.shape)}")
        layer.weight += (strength * m.delta()).to(layer.weight.dtype)
