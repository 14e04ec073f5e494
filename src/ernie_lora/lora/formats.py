"""Every ERNIE-Image LoRA file layout read into one form, and written back out in ours.

Reading (``read_modules``) takes any row of ``layouts.LAYOUTS``: alpha comes from the module's
``.alpha`` tensor, else the header's ``lora_adapter_metadata`` (peft's ``alpha_pattern`` and
``use_rslora`` honoured), else ``adapter_config.json`` when the file is peft's own
``adapter_model.safetensors``, else alpha = rank (what every loader assumes).

Writing (``write_modules``) takes plain LoRAs only (``to_plain`` converts the rest) and always folds
``alpha / rank`` into ``up``: the file says alpha = rank wherever it says anything, so diffusers,
ComfyUI, peft and kohya-style loaders all apply exactly the same delta W at strength 1.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from ..io import atomic_write_text
from ..models.names import flat_module_name
from .files import read_lora, save_lora
from .header import resolve_lora_path
from .layouts import (
    OUR_FORMATS,
    Key,
    Loader,
    ModulePlan,
    alpha_config,
    alpha_value,
    group_roles,
    layout_name,
    loader_plan,
    module_plans,
    parse_keys,
    split_key,
)
from .modules import Dora, FullModule, LohaModule, LokrModule, LoraModule, Module, is_plain

FORMATS = OUR_FORMATS
_PREFIX = {"diffusers": "transformer.", "comfy": "diffusion_model.", "peft": "base_model.model."}


@dataclass
class LoraFile:
    modules: dict[str, Module]
    layout: str  # the LAYOUTS row it matched
    header: dict[str, str]
    alpha_source: str  # where its alphas came from
    tensors: dict[str, torch.Tensor]  # as stored (what a loader's rule reads)


def read_lora_file(path: str | Path) -> LoraFile:
    """Any supported LoRA file (or peft adapter folder) -> {ERNIE module path: module}."""
    path = resolve_lora_path(path)
    tensors, header = read_lora(path)
    parsed = parse_keys(list(tensors), path)
    config, source = alpha_config(parsed, header, path)
    modules = build_modules(tensors, parsed, config, path)
    for name, module in modules.items():
        for tensor in vars(module).values():
            if isinstance(tensor, torch.Tensor) and not bool(torch.isfinite(tensor).all()):
                raise UserError(f"LoRA {path}: module {name} holds NaN or infinite values")
    return LoraFile(modules, layout_name(parsed), header, source, tensors)


def build_modules(tensors: dict[str, torch.Tensor], parsed: dict[str, Key], config: dict | None,
                  path: Path) -> dict[str, Module]:
    """Build each module as ``layouts.module_plans`` decides from the shapes and ``.alpha`` values (alpha from
    its tensor, else ``config``, else rank)."""
    shapes = {key: tuple(t.shape) for key, t in tensors.items()}
    alphas = {key: alpha_value(key, tensors[key].reshape(-1).tolist(), path)
              for key, k in parsed.items() if k.role == "alpha"}
    plans = module_plans(parsed, shapes, alphas, config, path)
    return {name: _materialise(plans[name], {role: tensors[key] for role, key in keys.items()})
            for name, keys in group_roles(parsed, path).items()}


def _two_d(tensor: torch.Tensor) -> torch.Tensor:
    return tensor[:, :, 0, 0] if tensor.dim() == 4 else tensor  # a 1x1 conv's factor is the linear it equals


def _dora(plan: ModulePlan, roles: dict[str, torch.Tensor]) -> Dora | None:
    if plan.dora is None:
        return None
    values = roles["magnitude"] if "magnitude" in roles else roles["dora_scale"]
    return Dora(values.reshape(-1), plan.dora[0], strength_inside=plan.dora[1])


def _materialise(plan: ModulePlan, roles: dict[str, torch.Tensor]) -> Module:
    bias = roles.get("diff_b")
    if plan.kind == "LoRA":
        if "up_bias" in roles:  # peft's lora_bias runs through the scaling too
            extra = roles["up_bias"].double() * plan.scale
            bias = extra if bias is None else bias.double() + extra
        return LoraModule(_two_d(roles["down"]).float(), _two_d(roles["up"]).float(), plan.alpha, plan.conv,
                          _dora(plan, roles), bias)
    if plan.kind == "LoHa":
        parts = [roles[r].float() for r in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")]
        return LohaModule(*parts, plan.alpha, bias=bias, dora=_dora(plan, roles))
    if plan.kind == "LoKr":
        w1, w2 = (roles[stem] if stem in roles else roles[f"{stem}_a"].double() @ roles[f"{stem}_b"].double()
                  for stem in ("lokr_w1", "lokr_w2"))
        return LokrModule(w1.float(), w2.float(), plan.scale, bias=bias, dora=_dora(plan, roles))
    weight = roles.get("diff")
    return FullModule(None if weight is None else weight.float(), None if bias is None else bias.float(), plan.conv)


@dataclass
class LoaderView:
    """What one loader makes of a file: whether it loads it unchanged, and the modules it builds."""

    loader: str
    loads: bool
    note: str
    modules: dict[str, Module]
    dropped: list[str]


def loader_view(loader: Loader, tensors: dict[str, torch.Tensor], header: dict[str, str], path: Path
                ) -> LoaderView:
    """Run ``loader``'s documented rule (``layouts.loader_plan``) on a file and build what it reads."""
    plan = loader_plan(loader, {key: split_key(key) for key in tensors}, header, path)
    modules = build_modules({key: tensors[key] for key in plan.kept}, plan.kept, plan.config, path) if plan.loads \
        else {}
    return LoaderView(plan.loader, plan.loads, plan.note, modules, plan.dropped)


def read_modules(path: str | Path) -> tuple[dict[str, Module], str, dict[str, str]]:
    """(modules, layout name, header) of any supported LoRA file."""
    f = read_lora_file(path)
    return f.modules, f.layout, f.header


def adapter_config(modules: dict[str, LoraModule]) -> dict:
    """A peft LoraConfig (as a dict) for folded modules: alpha = rank everywhere, so the scale is 1.0."""
    ranks = [m.rank for m in modules.values()]
    r = max(set(ranks), key=ranks.count)
    odd = {n: m.rank for n, m in modules.items() if m.rank != r}
    return {"r": r, "lora_alpha": r, "target_modules": sorted(modules), "rank_pattern": odd, "alpha_pattern": odd,
            "lora_dropout": 0.0, "bias": "none", "use_dora": False, "use_rslora": False,
            "init_lora_weights": True, "peft_type": "LORA"}


def _factor(t: torch.Tensor, conv: bool) -> torch.Tensor:
    return t[:, :, None, None] if conv else t


def folded_state_dict(modules: dict[str, Module], fmt: str) -> dict[str, torch.Tensor]:
    """The tensors of ``fmt`` for plain LoRAs, the scale folded into up (alpha = rank)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        if not is_plain(module):
            raise UserError(f"module {name} is not a plain LoRA; convert it first (lora convert ... --rank R)")
        m = module.folded()
        down, up = _factor(m.down, m.conv).contiguous(), _factor(m.up, m.conv).contiguous()
        if fmt == "kohya":
            stem = "lora_unet_" + flat_module_name(name)
            tensors[f"{stem}.lora_down.weight"] = down
            tensors[f"{stem}.lora_up.weight"] = up
            tensors[f"{stem}.alpha"] = torch.tensor(float(m.rank))
        else:
            tensors[f"{_PREFIX[fmt]}{name}.lora_A.weight"] = down
            tensors[f"{_PREFIX[fmt]}{name}.lora_B.weight"] = up
    return tensors


def write_modules(path: str | Path, modules: dict[str, Module], fmt: str = "diffusers",
                  provenance: dict | None = None) -> Path:
    """Write plain LoRA modules in ``fmt`` with the scale folded in, ``provenance`` in the header (our
    ``ernie_lora.*`` fields); returns the LoRA file written.

    peft: ``path`` is a folder (``adapter_model.safetensors`` + ``adapter_config.json``, what
    ``PeftModel.from_pretrained`` loads); or a ``.safetensors`` path for the tensors alone."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: choose from {', '.join(FORMATS)}")
    path = Path(path)
    header = dict(provenance or {})
    tensors = folded_state_dict(modules, fmt)
    config = adapter_config(modules) if fmt != "kohya" else None
    if fmt == "peft" and path.suffix != ".safetensors":
        path.mkdir(parents=True, exist_ok=True)
        written = save_lora(path / "adapter_model.safetensors", tensors, None, header)
        atomic_write_text(path / "adapter_config.json", json.dumps({**config, "base_model_name_or_path":
                                                                     header.get("base_model", "")}, indent=2) + "\n")
        return written
    # diffusers' header key names the component: transformer.r, transformer.lora_alpha, ...
    header_config = {f"transformer.{k}": v for k, v in config.items()} if config else None
    return save_lora(path, tensors, header_config, header)


def to_diffusers_state_dict(modules: dict[str, Module]) -> dict[str, torch.Tensor]:
    """diffusers keys with the scale folded into up, for ``load_lora_weights`` from memory (alpha = rank)."""
    return folded_state_dict(modules, "diffusers")
