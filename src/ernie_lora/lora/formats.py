"""Every ERNIE-Image LoRA file layout, read into one form and written back out.

- diffusers (also SimpleTuner, OneTrainer): ``transformer.<module>.lora_A.weight`` / ``lora_B.weight``;
  alpha from ``lora_adapter_metadata`` in the header, else alpha = rank;
- comfy (ai-toolkit, ComfyUI): ``diffusion_model.<module>.lora_A.weight`` / ``lora_B.weight``; an
  optional ``<module>.alpha``, else alpha = rank;
- peft: ``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight``; alpha from an
  ``adapter_config.json`` beside the file, else alpha = rank;
- kohya (musubi-tuner): ``lora_unet_<module_with_underscores>.lora_down.weight`` / ``.lora_up.weight``
  with an optional ``.alpha`` tensor, else alpha = rank.

Module paths are ERNIE's (``layers.N.self_attention.to_q``, ``layers.N.mlp.gate_proj``,
``adaLN_modulation.1``, ``final_norm.linear``, ``final_linear``, ``text_proj``,
``time_embedding.linear_1`` ...). What a LoRA does is ``delta W = alpha / rank * up @ down`` per
module; conversions keep that product exactly (formats whose loaders assume alpha = rank get the
scale folded into ``up``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from .adapters import METADATA_PREFIX, read_lora

FORMATS = ("diffusers", "comfy", "peft", "kohya")
_PREFIXES = {"diffusers": "transformer.", "comfy": "diffusion_model.", "peft": "base_model.model."}
# kohya names: dots became underscores, so the ERNIE names are rebuilt from their known shapes
_KOHYA_FIXED = {
    "adaLN_modulation_1": "adaLN_modulation.1",
    "final_norm_linear": "final_norm.linear",
    "final_linear": "final_linear",
    "text_proj": "text_proj",
    "time_embedding_linear_1": "time_embedding.linear_1",
    "time_embedding_linear_2": "time_embedding.linear_2",
}
_KOHYA_LAYER = re.compile(r"^layers_(\d+)_(self_attention|mlp)_(to_q|to_k|to_v|to_out_0|gate_proj|up_proj|linear_fc2)$")


@dataclass
class LoraModule:
    down: torch.Tensor  # [rank, in]  (peft's lora_A)
    up: torch.Tensor  # [out, rank]  (peft's lora_B)
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        return self.scale * (self.up.double() @ self.down.double())


def kohya_name(module: str) -> str:
    return "lora_unet_" + module.replace(".", "_")


def module_from_kohya(name: str) -> str | None:
    body = name.removeprefix("lora_unet_")
    if body in _KOHYA_FIXED:
        return _KOHYA_FIXED[body]
    m = _KOHYA_LAYER.match(body)
    if m:
        return f"layers.{m.group(1)}.{m.group(2)}.{m.group(3).replace('to_out_0', 'to_out.0')}"
    return None


def detect_format(keys: list[str]) -> str:
    """The layout of a LoRA's keys; one line naming the problem when it is mixed or unknown."""
    kinds = set()
    for key in keys:
        if key.startswith("lora_unet_"):
            kinds.add("kohya")
        elif key.startswith("base_model.model."):
            kinds.add("peft")
        elif key.startswith("diffusion_model."):
            kinds.add("comfy")
        elif key.startswith("transformer."):
            kinds.add("diffusers")
        else:
            raise UserError(f"unknown LoRA key {key!r}: expected a transformer., diffusion_model., "
                            "base_model.model. or lora_unet_ prefix")
    if len(kinds) != 1:
        raise UserError(f"mixed LoRA formats in one file: {', '.join(sorted(kinds)) or 'no keys'}")
    return kinds.pop()


def _peft_alphas(metadata: dict[str, str], path: Path) -> tuple[float | None, dict[str, float]]:
    """(default alpha, per-module alpha pattern) from diffusers' header metadata or a PEFT adapter_config.json."""
    config = None
    if "lora_adapter_metadata" in metadata:
        raw = json.loads(metadata["lora_adapter_metadata"])
        config = {k.removeprefix("transformer."): v for k, v in raw.items()}
    elif (path.parent / "adapter_config.json").exists():
        config = json.loads((path.parent / "adapter_config.json").read_text())
    if not config:
        return None, {}
    return config.get("lora_alpha"), dict(config.get("alpha_pattern") or {})


def read_modules(path: str | Path) -> tuple[dict[str, LoraModule], str, dict[str, str]]:
    """Any supported LoRA file -> {ERNIE module path: LoraModule}, its format, its header metadata."""
    path = Path(path)
    tensors, metadata = read_lora(path)
    fmt = detect_format(list(tensors))
    downs, ups, alphas = {}, {}, {}
    for key, tensor in tensors.items():
        if fmt == "kohya":
            stem, _, kind = key.partition(".")
            module = module_from_kohya(stem)
            if module is None:
                raise UserError(f"LoRA {path}: unknown kohya module {stem!r}")
            if kind == "lora_down.weight":
                downs[module] = tensor
            elif kind == "lora_up.weight":
                ups[module] = tensor
            elif kind == "alpha":
                alphas[module] = float(tensor)
            else:
                raise UserError(f"LoRA {path}: unknown key {key!r}")
            continue
        body = key.removeprefix(_PREFIXES[fmt])
        if body.endswith(".lora_A.weight"):
            downs[body.removesuffix(".lora_A.weight")] = tensor
        elif body.endswith(".lora_B.weight"):
            ups[body.removesuffix(".lora_B.weight")] = tensor
        elif body.endswith(".alpha"):
            alphas[body.removesuffix(".alpha")] = float(tensor)
        else:
            raise UserError(f"LoRA {path}: unknown key {key!r} (expected lora_A/lora_B weights)")
    if set(downs) != set(ups):
        odd = sorted(set(downs) ^ set(ups))[0]
        raise UserError(f"LoRA {path}: module {odd!r} has only one of its two matrices")
    default_alpha, pattern = _peft_alphas(metadata, path) if fmt in ("diffusers", "peft") else (None, {})
    modules = {}
    for name in sorted(downs):
        down, up = downs[name], ups[name]
        if down.dim() != 2 or up.dim() != 2 or up.shape[1] != down.shape[0]:
            raise UserError(f"LoRA {path}: {name}: shapes {list(up.shape)} @ {list(down.shape)} do not chain")
        alpha = alphas.get(name, pattern.get(name, default_alpha))
        modules[name] = LoraModule(down.float(), up.float(), float(down.shape[0] if alpha is None else alpha))
    return modules, fmt, metadata


def _own_metadata(metadata: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in metadata.items() if k.startswith(METADATA_PREFIX)}


def write_modules(path: str | Path, modules: dict[str, LoraModule], fmt: str = "diffusers",
                  metadata: dict[str, str] | None = None) -> Path:
    """Write modules in ``fmt``; delta W of every module is what it was."""
    from .adapters import save_lora

    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: choose from {', '.join(FORMATS)}")
    header = {k.removeprefix(METADATA_PREFIX): v for k, v in _own_metadata(metadata or {}).items()}
    tensors: dict[str, torch.Tensor] = {}
    for name, m in modules.items():
        if fmt == "kohya":
            tensors[f"{kohya_name(name)}.lora_down.weight"] = m.down
            tensors[f"{kohya_name(name)}.lora_up.weight"] = m.up
            tensors[f"{kohya_name(name)}.alpha"] = torch.tensor(float(m.alpha))
        elif fmt == "diffusers":
            tensors[f"transformer.{name}.lora_A.weight"] = m.down
            tensors[f"transformer.{name}.lora_B.weight"] = m.up
        else:  # comfy and peft loaders assume alpha = rank: fold the scale into up
            prefix = _PREFIXES[fmt]
            tensors[f"{prefix}{name}.lora_A.weight"] = m.down
            tensors[f"{prefix}{name}.lora_B.weight"] = m.up * m.scale
    peft_config = _peft_config(modules) if fmt == "diffusers" else None
    return save_lora(path, tensors, peft_config, header)


def _peft_config(modules: dict[str, LoraModule]):
    """A peft LoraConfig describing the modules (per-module rank and alpha patterns where they differ)."""
    from peft import LoraConfig

    ranks = [m.rank for m in modules.values()]
    r = max(set(ranks), key=ranks.count)
    alphas = [m.alpha for m in modules.values()]
    alpha = max(set(alphas), key=alphas.count)
    return LoraConfig(
        r=r, lora_alpha=alpha, target_modules=sorted(modules),
        rank_pattern={n: m.rank for n, m in modules.items() if m.rank != r},
        alpha_pattern={n: m.alpha for n, m in modules.items() if m.alpha != alpha},
    )


def to_diffusers_state_dict(modules: dict[str, LoraModule]) -> dict[str, torch.Tensor]:
    """diffusers keys with the scale folded into up, for ``load_lora_weights`` from memory (alpha = rank)."""
    out = {}
    for name, m in modules.items():
        out[f"transformer.{name}.lora_A.weight"] = m.down
        out[f"transformer.{name}.lora_B.weight"] = m.up * m.scale
    return out
