"""LoRA adapters (peft) and LoRA files."""

from .adapters import (
    TARGET_PRESETS,
    add_lora,
    add_lora_from_file,
    check_lora_fits,
    lora_state_dict,
    read_lora,
    read_lora_shapes,
    resolve_targets,
    save_lora,
    set_lora_state,
)

__all__ = [
    "TARGET_PRESETS",
    "add_lora",
    "add_lora_from_file",
    "check_lora_fits",
    "lora_state_dict",
    "read_lora",
    "read_lora_shapes",
    "resolve_targets",
    "save_lora",
    "set_lora_state",
]
