"""peft LoRA adapters on the ERNIE-Image DiT, and the diffusers-format LoRA file.

The file we write is what ``ErnieImagePipeline.load_lora_weights`` loads unchanged: keys
``transformer.<module>.lora_A.weight`` / ``lora_B.weight`` and, in the safetensors header,
``lora_adapter_metadata`` holding the peft LoraConfig (so diffusers rebuilds the same rank, alpha and
targets; without it, diffusers would assume alpha = rank). Our own provenance fields sit beside it
under ``ernie_lora.*`` keys.
"""

from __future__ import annotations

import json
import struct
import warnings
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import UserError
from ..io import atomic_write

TARGET_PRESETS: dict[str, list[str]] = {
    "attn": ["to_q", "to_k", "to_v", "to_out.0"],
    "attn_mlp": ["to_q", "to_k", "to_v", "to_out.0", "gate_proj", "up_proj", "linear_fc2"],
}
ADAPTER_NAME = "default"
METADATA_PREFIX = "ernie_lora."


def resolve_targets(transformer: torch.nn.Module, targets: str | list[str]) -> list[str]:
    """A preset name or an explicit list -> module-name suffixes; every one must match a Linear layer."""
    if isinstance(targets, str):
        if targets not in TARGET_PRESETS:
            raise UserError(f"lora.targets: unknown preset {targets!r}; use attn, attn_mlp or a list of modules")
        return list(TARGET_PRESETS[targets])
    linear_names = [n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    for target in targets:
        if not any(n == target or n.endswith("." + target) for n in linear_names):
            examples = ", ".join(sorted({n.split(".")[-1] for n in linear_names})[:12])
            raise UserError(f"lora.targets: {target!r} matches no linear layer of the transformer (e.g. {examples})")
    return list(targets)


def add_lora(transformer, rank: int, alpha: float, targets: list[str], dropout: float = 0.0) -> PeftLoraConfig:
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
        transformer.add_adapter(config, adapter_name=ADAPTER_NAME)
    return config


def lora_state_dict(transformer) -> dict[str, torch.Tensor]:
    """The adapter's weights in diffusers format (``transformer.`` prefix, no adapter name)."""
    sd = get_peft_model_state_dict(transformer, adapter_name=ADAPTER_NAME)
    return {f"transformer.{k}": v.detach().clone().contiguous() for k, v in sd.items()}


def set_lora_state(transformer, state_dict: dict[str, torch.Tensor], source: str = "LoRA",
                   adapter_name: str = ADAPTER_NAME) -> None:
    """Load diffusers-format LoRA weights into the already-injected adapter (resume, init_from).

    The file must have exactly the adapter's modules and shapes (rank and targets as configured).
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


def add_lora_from_file(transformer, path: str | Path, adapter_name: str) -> None:
    """A second (third...) adapter with a LoRA file's own rank, alpha and targets (a frozen teacher)."""
    state_dict, metadata = read_lora(path)
    if "lora_adapter_metadata" not in metadata:
        raise UserError(f"{path}: no lora_adapter_metadata in its header (convert it with `ernie-lora lora convert`)")
    fields = {k.removeprefix("transformer."): v for k, v in json.loads(metadata["lora_adapter_metadata"]).items()}
    config = PeftLoraConfig(r=int(fields["r"]), lora_alpha=float(fields["lora_alpha"]),
                            target_modules=fields["target_modules"], lora_dropout=0.0,
                            rank_pattern=fields.get("rank_pattern") or {},
                            alpha_pattern=fields.get("alpha_pattern") or {})
    transformer.add_adapter(config, adapter_name=adapter_name)
    set_lora_state(transformer, state_dict, str(path), adapter_name=adapter_name)


def _jsonable(value):
    if isinstance(value, set):
        return sorted(value)
    return value


def peft_config_metadata(config: PeftLoraConfig) -> dict:
    return {f"transformer.{k}": _jsonable(v) for k, v in config.to_dict().items()}


def save_lora(
    path: str | Path,
    state_dict: dict[str, torch.Tensor],
    peft_config: PeftLoraConfig | None = None,
    metadata: dict[str, object] | None = None,
) -> Path:
    """Write a diffusers-format LoRA file atomically, with peft config and provenance in its header."""
    from .tools import tensor_sha256

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    header: dict[str, str] = {"format": "pt", METADATA_PREFIX + "tensor_sha256": tensor_sha256(tensors)}
    if peft_config is not None:
        header["lora_adapter_metadata"] = json.dumps(peft_config_metadata(peft_config), sort_keys=True, default=str)
    for key, value in (metadata or {}).items():
        if key != "tensor_sha256":  # always the hash of these tensors, never a copied one
            header[METADATA_PREFIX + key] = value if isinstance(value, str) else json.dumps(value, default=str)
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))


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
    path = Path(path)
    _check_safetensors(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as exc:
        raise UserError(f"LoRA {path}: cannot read ({exc})") from None


def read_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a LoRA safetensors file (never unpickles anything): tensors and header metadata."""
    path = Path(path)
    _check_safetensors(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise UserError(f"LoRA {path}: cannot read ({exc})") from None
    return tensors, metadata


def check_lora_fits(path: str | Path, shapes: dict[str, tuple[int, ...]], transformer: torch.nn.Module) -> None:
    """Raise one line listing the first keys or shapes (``read_lora_shapes``) that do not match the transformer."""
    modules = dict(transformer.named_modules())
    problems: list[str] = []
    for key, shape in shapes.items():
        name = key.removeprefix("transformer.").removeprefix("diffusion_model.").removeprefix("base_model.model.")
        if ".lora_A." in name:
            module_name, which = name.split(".lora_A.")[0], "A"
        elif ".lora_B." in name:
            module_name, which = name.split(".lora_B.")[0], "B"
        else:
            problems.append(f"{key} (not a lora_A/lora_B key)")
            continue
        module = modules.get(module_name)
        base = getattr(module, "base_layer", module)
        if not isinstance(base, torch.nn.Linear):
            problems.append(f"{key} (no linear layer {module_name!r} in the model)")
            continue
        expected_in = base.in_features if which == "A" else None
        expected_out = base.out_features if which == "B" else None
        if len(shape) != 2 or (expected_in and shape[1] != expected_in) or (expected_out and shape[0] != expected_out):
            want = f"[r, {base.in_features}]" if which == "A" else f"[{base.out_features}, r]"
            problems.append(f"{key} shape {list(shape)} != {want}")
    if problems:
        shown = "; ".join(problems[:3])
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise UserError(f"LoRA {path} does not match the model: {shown}{more}")
