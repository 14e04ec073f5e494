"""peft LoRA adapters on the ERNIE-Image DiT: inject, read and set their weights, export them.

Checkpoints hold the adapter's raw weights with its peft config (what an exact resume needs);
the LoRA file a run hands out is exported with ``export_adapter``, which folds alpha / rank into
``lora_B`` (see ``layouts``) so every loader applies the trained delta.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from ..errors import UserError
from ..models import ERNIE_IMAGE
from .formats import adapter_config, read_lora_file, to_diffusers_state_dict, write_modules
from .layouts import config_alpha
from .modules import LoraModule, is_plain, kind

ADAPTER_NAME = "default"


def resolve_targets(transformer: torch.nn.Module, targets: str | list[str]) -> list[str]:
    """A preset name or an explicit list -> module-name suffixes; every one must match a Linear layer."""
    if isinstance(targets, str):
        if targets not in ERNIE_IMAGE.target_presets:
            raise UserError(f"lora.targets: unknown preset {targets!r}; use attn, attn_mlp or a list of modules")
        return list(ERNIE_IMAGE.target_presets[targets])
    linear_names = [n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    for target in targets:
        if not any(n == target or n.endswith("." + target) for n in linear_names):
            examples = ", ".join(sorted({n.split(".")[-1] for n in linear_names})[:12])
            raise UserError(f"lora.targets: {target!r} matches no linear layer of the transformer (e.g. {examples})")
    return list(targets)


def add_lora(transformer, rank: int, alpha: float, targets: list[str], dropout: float = 0.0,
             adapter_name: str = ADAPTER_NAME) -> PeftLoraConfig:
    """Inject a peft LoRA adapter; every base weight stays frozen. Returns the peft config."""
    if rank <= 0:
        raise UserError(f"lora.rank: {rank} must be > 0")
    config = PeftLoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, init_lora_weights=True
    )
    transformer.requires_grad_(False)
    with warnings.catch_warnings():
        # over a torchao-quantised base peft warns that merge() is unavailable: we never merge into it
        warnings.filterwarnings("ignore", message="TorchaoLoraLinear was instantiated")
        transformer.add_adapter(config, adapter_name=adapter_name)
    return config


def lora_state_dict(transformer, adapter_name: str = ADAPTER_NAME) -> dict[str, torch.Tensor]:
    """The adapter's raw weights in diffusers keys (``transformer.`` prefix, no adapter name)."""
    sd = get_peft_model_state_dict(transformer, adapter_name=adapter_name)
    return {f"transformer.{k}": v.detach().clone().contiguous() for k, v in sd.items()}


def peft_config_metadata(config: PeftLoraConfig) -> dict:
    """The peft config as diffusers stores it in ``lora_adapter_metadata`` (``transformer.`` keys)."""
    return {f"transformer.{k}": sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}


def adapter_modules(transformer, config: PeftLoraConfig, adapter_name: str = ADAPTER_NAME
                    ) -> dict[str, LoraModule]:
    """The adapter as modules with their trained alpha (alpha_pattern and rsLoRA as peft applies them)."""
    sd = get_peft_model_state_dict(transformer, adapter_name=adapter_name)
    config_dict = {"lora_alpha": config.lora_alpha, "alpha_pattern": dict(config.alpha_pattern or {}),
                   "use_rslora": config.use_rslora}
    modules = {}
    for key, down in sd.items():
        if not key.endswith(".lora_A.weight"):
            continue
        name = key.removesuffix(".lora_A.weight")
        up = sd[f"{name}.lora_B.weight"]
        conv = down.dim() == 4
        d, u = (down[:, :, 0, 0], up[:, :, 0, 0]) if conv else (down, up)
        alpha = config_alpha(config_dict, name, d.shape[0], "adapter")
        modules[name] = LoraModule(d.detach().float().cpu(), u.detach().float().cpu(), alpha, conv)
    return modules


def export_adapter(path: str | Path, transformer, config: PeftLoraConfig, metadata: dict,
                   adapter_name: str = ADAPTER_NAME) -> Path:
    """The LoRA file a run hands out: diffusers keys, alpha / rank folded into lora_B (see ``layouts``)."""
    modules = adapter_modules(transformer, config, adapter_name)
    scales = sorted({m.scale for m in modules.values()})
    metadata = {**metadata, "scale_folded": scales[0] if len(scales) == 1 else scales}
    return write_modules(path, modules, "diffusers", metadata)


def set_lora_state(transformer, state_dict: dict[str, torch.Tensor], source: str = "LoRA",
                   adapter_name: str = ADAPTER_NAME) -> None:
    """Load raw adapter weights (diffusers keys) into the already-injected adapter (resume).

    The weights must have exactly the adapter's modules and shapes (rank and targets as configured).
    """
    stripped = {k.removeprefix("transformer."): v for k, v in state_dict.items()}
    current = get_peft_model_state_dict(transformer, adapter_name=adapter_name)
    problems = [
        f"{k} shape {list(v.shape)} != {list(current[k].shape)}"
        for k, v in stripped.items() if k in current and v.shape != current[k].shape
    ]
    problems += [f"{k} not in the adapter" for k in stripped if k not in current]
    problems += [f"{k} missing" for k in current if k not in stripped]
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise UserError(f"{source} does not match the configured adapter (lora.rank, lora.targets): "
                        f"{'; '.join(problems[:3])}{more}")
    set_peft_model_state_dict(transformer, stripped, adapter_name=adapter_name)


def load_lora_into_adapter(transformer, path: str | Path, config: PeftLoraConfig, source: str,
                           adapter_name: str = ADAPTER_NAME) -> None:
    """Start the adapter from a LoRA file of any layout: the file's delta W, whatever its own alpha,
    becomes the adapter's (up rescaled to the adapter's alpha / rank)."""
    modules = read_lora_file(path).modules
    odd = [f"{n} ({kind(m)})" for n, m in modules.items() if not is_plain(m)]
    if odd:
        raise UserError(f"{source}: {odd[0]} is not a plain LoRA; convert it first (lora convert --rank R)")
    current = adapter_modules(transformer, config, adapter_name)
    state = {}
    for name, module in modules.items():
        target = current.get(name)
        if target is None or target.rank != module.rank or target.shape != module.shape:
            want = f"rank {target.rank}" if target else "no such module in the adapter"
            raise UserError(f"{source} does not match the configured adapter (lora.rank, lora.targets): {name} "
                            f"has rank {module.rank} ({want})")
        up = module.up.double() * (module.scale / target.scale)
        down, up = (module.down, up.float()) if not module.conv else (module.down[:, :, None, None],
                                                                      up.float()[:, :, None, None])
        state[f"transformer.{name}.lora_A.weight"] = down
        state[f"transformer.{name}.lora_B.weight"] = up
    set_lora_state(transformer, state, source, adapter_name)


def add_lora_from_file(transformer, path: str | Path, adapter_name: str) -> None:
    """A second (third...) adapter holding a LoRA file of any layout, frozen (a teacher): its own ranks
    and targets, the scale folded in (alpha = rank)."""
    modules = read_lora_file(path).modules
    odd = [f"{n} ({kind(m)})" for n, m in modules.items() if not is_plain(m)]
    if odd:
        raise UserError(f"{path}: {odd[0]} is not a plain LoRA; convert it first (lora convert --rank R)")
    settings = adapter_config(modules)
    config = PeftLoraConfig(r=settings["r"], lora_alpha=settings["lora_alpha"], target_modules=sorted(modules),
                            lora_dropout=0.0, rank_pattern=settings["rank_pattern"],
                            alpha_pattern=settings["alpha_pattern"])
    transformer.add_adapter(config, adapter_name=adapter_name)
    set_lora_state(transformer, to_diffusers_state_dict(modules), str(path), adapter_name=adapter_name)
