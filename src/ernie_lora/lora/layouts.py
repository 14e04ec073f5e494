"""Which keys each LoRA loader reads, and what scale it applies: the table every other module uses.

A LoRA changes a weight by ``alpha / rank * up @ down``. Files disagree on where ``alpha`` lives, and
loaders disagree on where they look for it. A file is only portable when every loader finds the same
scale, so every file ernie-lora writes folds ``alpha / rank`` into ``up`` and says alpha = rank
wherever it says anything: each loader below then applies exactly the trained delta at strength 1.

``LAYOUTS``: one row per key layout found in ERNIE-Image LoRA files (prefix, factor suffixes, where
alpha lives, who writes it). ``LOADERS``: each loader's documented behaviour, as a rule this module
can run on a file's keys (``loader_plan``), so ``lora info`` and the tests can say what each loader does.
``module_plan`` decides what each module is (kind, rank, alpha, DoRA, bias) from shapes and alpha alone.
Plain Python: ``lora info`` reads a file without torch; ``formats`` builds the tensors by these rules.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from ..models.names import is_module_path, module_from_flat
from .header import adapter_metadata


@dataclass(frozen=True)
class KeyLayout:
    name: str
    prefix: str  # before the module path
    flat: bool  # the module path spelt with underscores (kohya), not dots
    down: str  # suffix of the [rank, in] factor
    up: str  # suffix of the [out, rank] factor
    alpha: str  # where alpha lives in this layout
    writers: str


LAYOUTS = (
    KeyLayout("diffusers", "transformer.", False, ".lora_A.weight", ".lora_B.weight",
              "header lora_adapter_metadata (a peft LoraConfig), else alpha = rank",
              "ernie-lora, diffusers, SimpleTuner, OneTrainer (diffusers export)"),
    KeyLayout("comfy", "diffusion_model.", False, ".lora_A.weight", ".lora_B.weight",
              "optional <module>.alpha tensor, else alpha = rank", "ai-toolkit, ComfyUI"),
    KeyLayout("comfy-updown", "diffusion_model.", False, ".lora_down.weight", ".lora_up.weight",
              "optional <module>.alpha tensor, else alpha = rank",
              "ComfyUI LoraSave (also .diff, .diff_b), LyCORIS in ComfyUI naming"),
    KeyLayout("peft", "base_model.model.", False, ".lora_A.weight", ".lora_B.weight",
              "adapter_config.json beside adapter_model.safetensors (lora_alpha, alpha_pattern, rank_pattern, "
              "use_rslora)", "peft save_pretrained"),
    KeyLayout("kohya", "lora_unet_", True, ".lora_down.weight", ".lora_up.weight",
              "<name>.alpha tensor, else alpha = rank", "kohya sd-scripts, musubi-tuner"),
    KeyLayout("onetrainer-legacy", "lora_transformer_", True, ".lora_down.weight", ".lora_up.weight",
              "<name>.alpha tensor, else alpha = rank", "OneTrainer (legacy format)"),
    KeyLayout("lycoris", "lycoris_", True, ".lora_down.weight", ".lora_up.weight",
              "<name>.alpha tensor, else alpha = rank", "SimpleTuner (LyCORIS)"),
    KeyLayout("bare", "", False, ".lora_A.default.weight", ".lora_B.default.weight",
              "none: alpha = rank", "DiffSynth-Studio, OneTrainer (original format)"),
)
OUR_FORMATS = ("diffusers", "comfy", "peft", "kohya")  # the layouts ernie-lora writes

# Suffix -> what the tensor is. Factor suffixes first; the longest suffix that fits a key wins.
ROLES: dict[str, str] = {
    ".lora_A.weight": "down", ".lora_B.weight": "up",
    ".lora_A.default.weight": "down", ".lora_B.default.weight": "up",
    ".lora_down.weight": "down", ".lora_up.weight": "up",
    ".lora_B.bias": "up_bias", ".lora_B.default.bias": "up_bias",
    ".alpha": "alpha",
    ".dora_scale": "dora_scale",
    ".lora_magnitude_vector": "magnitude", ".lora_magnitude_vector.weight": "magnitude",
    ".lora_magnitude_vector.default.weight": "magnitude",
    ".hada_w1_a": "hada_w1_a", ".hada_w1_b": "hada_w1_b", ".hada_w2_a": "hada_w2_a", ".hada_w2_b": "hada_w2_b",
    ".hada_t1": "hada_t1", ".hada_t2": "hada_t2",
    ".lokr_w1": "lokr_w1", ".lokr_w1_a": "lokr_w1_a", ".lokr_w1_b": "lokr_w1_b",
    ".lokr_w2": "lokr_w2", ".lokr_w2_a": "lokr_w2_a", ".lokr_w2_b": "lokr_w2_b", ".lokr_t2": "lokr_t2",
    ".lora_mid.weight": "lora_mid",
    ".diff": "diff", ".diff_b": "diff_b",
}
_SUFFIXES = sorted(ROLES, key=len, reverse=True)
_PREFIXES = sorted({(layout.prefix, layout.flat) for layout in LAYOUTS}, key=lambda p: len(p[0]), reverse=True)
TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder", "text_encoders.", "te.", "te1.", "te2.")


@dataclass(frozen=True)
class Key:
    prefix: str
    module: str  # ERNIE module path, dotted
    suffix: str

    @property
    def role(self) -> str:
        return ROLES[self.suffix]


def split_key(key: str) -> Key | None:
    """(prefix, module path, suffix) of a LoRA key, or None when it fits no layout."""
    for prefix, flat in _PREFIXES:
        if not key.startswith(prefix):
            continue
        body = key[len(prefix):]
        for suffix in _SUFFIXES:
            if not body.endswith(suffix):
                continue
            name = body[: -len(suffix)]
            if flat:
                module = module_from_flat(name)
            else:
                module = name if is_module_path(name) else None
            if module is not None:
                return Key(prefix, module, suffix)
    return None


def parse_keys(keys: list[str], path: Path) -> dict[str, Key]:
    """Every key split; one line naming the first key that fits no layout, or a mix of layouts."""
    parsed = {}
    for key in keys:
        found = split_key(key)
        if found is None:
            if key.startswith(TEXT_ENCODER_PREFIXES):
                raise UserError(f"LoRA {path}: key {key!r} adapts the text encoder; ernie-lora applies LoRAs to "
                                "the DiT only")
            raise UserError(f"LoRA {path}: unknown LoRA key {key!r} (no ERNIE-Image module with a known prefix "
                            "and suffix; see `ernie-lora lora info --help` for the layouts read)")
        parsed[key] = found
    prefixes = {k.prefix for k in parsed.values()}
    if len(prefixes) > 1:
        shown = ", ".join(repr(p) if p else "(none)" for p in sorted(prefixes))
        raise UserError(f"LoRA {path}: mixed LoRA formats in one file: key prefixes {shown}")
    if not parsed:
        raise UserError(f"LoRA {path}: no tensors in the file")
    return parsed


def layout_name(parsed: dict[str, Key]) -> str:
    """The ``LAYOUTS`` row a file matches best (its prefix, then its factor suffixes)."""
    prefix = next(iter(parsed.values())).prefix
    suffixes = {k.suffix for k in parsed.values()}
    rows = [layout for layout in LAYOUTS if layout.prefix == prefix]
    for layout in rows:
        if layout.down in suffixes or layout.up in suffixes:
            return layout.name
    return rows[0].name


# -- alpha from a peft config (header or adapter_config.json) -------------------------------------------


def pattern_value(patterns: dict, module: str, default):
    """peft's rule: the first pattern ``p`` with ``re.match(rf"(.*\\.)?({p})$", module)`` gives the value."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def config_alpha(config: dict, module: str, rank: int, source: str) -> float:
    """The alpha that makes ``alpha / rank`` what peft applies for this module under ``config``."""
    try:
        alpha = float(pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", rank)))
    except (TypeError, ValueError):
        raise UserError(f"{source}: lora_alpha / alpha_pattern for {module} is not a number") from None
    if config.get("use_rslora"):
        return alpha * math.sqrt(rank)  # peft's rsLoRA scales by alpha / sqrt(rank)
    return alpha


def peft_folder_config(path: Path) -> dict | None:
    """adapter_config.json, read only in peft's own folder layout (beside adapter_model.safetensors)."""
    config_file = path.parent / "adapter_config.json"
    if path.name != "adapter_model.safetensors" or not config_file.is_file():
        return None
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{config_file}: not JSON ({exc})") from None
    if not isinstance(config, dict):
        raise UserError(f"{config_file}: not a JSON object")
    return config


# -- what each module is, from its keys' shapes and its alpha ---------------------------------------------


@dataclass(frozen=True)
class ModulePlan:
    """What a module of a file is, decided from shapes and alpha alone (the tensors are read only to apply
    it): every rule of reading lives here, so ``lora info`` (no torch) and the readers agree."""

    kind: str  # LoRA, LoHa, LoKr, full delta
    shape: tuple[int, ...]  # the weight change's shape ([out, in] for factors)
    rank: int | None = None
    alpha: float | None = None
    scale: float | None = None  # what the change is multiplied by (alpha / rank; LoKr's alpha / dim)
    conv: bool = False
    dora: tuple[str, bool] | None = None  # (axis, strength inside the norm): ("rows", True) is peft's rule
    bias: bool = False  # it changes the bias too

    @property
    def label(self) -> str:
        return self.kind + (" + DoRA" if self.dora else "") + (" + bias" if self.bias else "")


def alpha_config(parsed: dict[str, Key], header: dict[str, str], path: Path) -> tuple[dict | None, str]:
    """The peft config alphas come from when a module has no ``.alpha`` tensor, and a line saying where
    the file's alphas come from."""
    config, source = adapter_metadata(header, path), "header lora_adapter_metadata"
    if config is None:
        config, source = peft_folder_config(path), "adapter_config.json"
    if any(k.role == "alpha" for k in parsed.values()):
        source = ".alpha tensors" + (f" (else {source})" if config is not None else "")
    elif config is None:
        source = "none in the file: alpha = rank"
    return config, source


def group_roles(parsed: dict[str, Key], path: Path) -> dict[str, dict[str, str]]:
    """{module: {role: key}}; one line when a module has a role twice."""
    by_module: dict[str, dict[str, str]] = {}
    for key, k in parsed.items():
        roles = by_module.setdefault(k.module, {})
        if k.role in roles:
            raise UserError(f"LoRA {path}: module {k.module} has two {k.role} tensors")
        roles[k.role] = key
    return dict(sorted(by_module.items()))


def two_d_shape(shape: tuple[int, ...], where: str) -> tuple[tuple[int, int], bool]:
    """A factor's shape as 2-D; 1x1-conv factors ([r, in, 1, 1]) are the linear they equal."""
    if len(shape) == 4 and tuple(shape[2:]) == (1, 1):
        return (shape[0], shape[1]), True
    if len(shape) != 2:
        raise UserError(f"{where}: shape {list(shape)}: only linear and 1x1-conv LoRAs are supported")
    return (shape[0], shape[1]), False


def _dora_plan(shapes: dict[str, tuple[int, ...]], shape: tuple[int, int], where: str) -> tuple[str, bool] | None:
    if "magnitude" in shapes:
        count = math.prod(shapes["magnitude"])
        if count != shape[0]:
            raise UserError(f"{where}: lora_magnitude_vector has {count} values for {shape[0]} outputs")
        return "rows", True
    if "dora_scale" in shapes:
        scale = shapes["dora_scale"]
        flat = (scale[0], math.prod(scale[1:])) if len(scale) > 1 else (1, math.prod(scale))
        if flat == (1, shape[1]):
            return "columns", False
        if flat == (shape[0], 1):
            return "rows", False
        raise UserError(f"{where}: dora_scale shape {list(scale)} fits neither [1, {shape[1]}] nor "
                        f"[{shape[0]}, 1]")
    return None


def module_plan(name: str, shapes: dict[str, tuple[int, ...]], alpha_tensor: float | None, config: dict | None,
                source: str) -> ModulePlan:
    """Decide what a module is: alpha from its tensor, else ``config``, else rank; every shape checked."""
    where = f"{source}: {name}"
    for refused, why in (("hada_t1", "CP-decomposed LoHa (hada_t1) is for convolutions"),
                         ("lokr_t2", "CP-decomposed LoKr (lokr_t2) is for convolutions"),
                         ("lora_mid", "LoCon's lora_mid is for convolutions")):
        if refused in shapes:
            raise UserError(f"{where}: {why}; ERNIE-Image's adapted layers are linear")
    bias = "diff_b" in shapes
    factor_roles = {r for r in shapes if r in ("down", "up")}
    if factor_roles:
        if factor_roles != {"down", "up"}:
            raise UserError(f"LoRA {source.removeprefix('LoRA ')}: module {name!r} has only one of its two matrices")
        down, conv = two_d_shape(shapes["down"], where)
        up, _ = two_d_shape(shapes["up"], where)
        if up[1] != down[0]:
            raise UserError(f"{where}: shapes {list(up)} @ {list(down)} do not chain "
                            "(the ranks of up and down differ)")
        rank = down[0]
        if alpha_tensor is not None:
            alpha = alpha_tensor
        elif config is not None:
            alpha = config_alpha(config, name, rank, source)
        else:
            alpha = float(rank)
        shape = (up[0], down[1])
        return ModulePlan("LoRA", shape, rank, alpha, alpha / rank, conv, _dora_plan(shapes, shape, where),
                          bias or "up_bias" in shapes)
    if "hada_w1_a" in shapes:
        parts = [shapes.get(r) for r in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")]
        if any(p is None for p in parts) or any(len(p) != 2 for p in parts):
            raise UserError(f"{where}: LoHa needs 2-D hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b")
        rank = parts[1][0]
        alpha = alpha_tensor if alpha_tensor is not None else float(rank)
        shape = (parts[0][0], parts[1][1])
        return ModulePlan("LoHa", shape, rank, alpha, alpha / rank, False, _dora_plan(shapes, shape, where), bias)
    if any(r.startswith("lokr_") for r in shapes):
        w1, dim1 = _kron_shape(shapes, "lokr_w1", where)
        w2, dim2 = _kron_shape(shapes, "lokr_w2", where)
        dim = dim2 if dim2 is not None else dim1  # ComfyUI's rule: the factorised one's rank (w2 first)
        scale = alpha_tensor / dim if alpha_tensor is not None and dim is not None else 1.0
        shape = (w1[0] * w2[0], w1[1] * w2[1])
        return ModulePlan("LoKr", shape, None, alpha_tensor, scale, False, _dora_plan(shapes, shape, where), bias)
    if "diff" in shapes or "diff_b" in shapes:
        weight = shapes.get("diff")
        return ModulePlan("full delta", tuple(weight) if weight is not None else (), conv=weight is not None
                          and len(weight) == 4, bias=bias)
    raise UserError(f"{where}: only {', '.join(sorted(shapes))}; no LoRA factors")


def _kron_shape(shapes: dict[str, tuple[int, ...]], stem: str, where: str) -> tuple[tuple[int, int], int | None]:
    if stem in shapes:
        return tuple(shapes[stem]), None
    a, b = shapes.get(f"{stem}_a"), shapes.get(f"{stem}_b")
    if a is None or b is None:
        raise UserError(f"{where}: LoKr needs {stem} or both {stem}_a and {stem}_b")
    return (a[0], b[1]), b[0]


def alpha_value(key: str, values: list[float], path: Path) -> float:
    """An ``.alpha`` tensor's one number (its values flattened); one line when it holds more or none."""
    if len(values) != 1:
        raise UserError(f"LoRA {path}: {key} holds {len(values)} values; an alpha is one number")
    return float(values[0])


def module_plans(parsed: dict[str, Key], shapes: dict[str, tuple[int, ...]], alphas: dict[str, float],
                 config: dict | None, path: Path) -> dict[str, ModulePlan]:
    """Every module's plan: ``shapes`` and ``alphas`` (the ``.alpha`` tensors' values) by key."""
    source = f"LoRA {path}"
    plans = {}
    for name, roles in group_roles(parsed, path).items():
        alpha = alphas[roles["alpha"]] if "alpha" in roles else None
        plans[name] = module_plan(name, {role: shapes[key] for role, key in roles.items()}, alpha, config, source)
    return plans


def same_plan(a: ModulePlan, b: ModulePlan, rtol: float = 1e-5) -> bool:
    """Two readings of one module's keys change the weight alike (they read the same tensors, so kind,
    DoRA, bias and scale decide)."""
    if (a.kind, a.dora, a.bias) != (b.kind, b.dora, b.bias):
        return False
    return a.scale == b.scale or (a.scale is not None and b.scale is not None
                                  and math.isclose(a.scale, b.scale, rel_tol=rtol))


# -- the loaders -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Loader:
    """One loader's documented behaviour, as data ``loader_plan`` runs on a file."""

    name: str
    doc: str
    prefixes: tuple[str, ...]  # key prefixes it maps to ERNIE modules; other keys it does not load
    factors: tuple[str, ...]  # factor suffixes it reads
    alpha_tensor: bool  # reads <module>.alpha
    header: bool  # reads lora_adapter_metadata from the safetensors header
    peft_folder: bool  # reads adapter_config.json (and needs it)
    applies: tuple[str, ...]  # other roles it applies exactly
    drops: tuple[str, ...] = ()  # roles it skips (the file then loads, but not as meant)
    refuses: tuple[str, ...] = ()  # roles that make it refuse the whole file
    hint: str = ""  # how to get a file this loader reads


LOADERS = (
    Loader(
        "diffusers",
        "ErnieImagePipeline.load_lora_weights (diffusers >= 0.42, ErnieImageLoraLoaderMixin): maps "
        "diffusion_model. and base_model.model. keys to transformer.; reads rank, lora_alpha, alpha_pattern, "
        "rank_pattern and use_rslora from the header's lora_adapter_metadata, else alpha = rank; refuses a file "
        "with any key without 'lora' in it (.alpha, .diff, LoHa, LoKr); drops dora_scale with a warning; "
        "applies peft's lora_magnitude_vector (DoRA); fails on lora_down/lora_up names and silently loads "
        "nothing from lora_unet_ or bare keys (measured on the tiny pipeline).",
        prefixes=("transformer.", "diffusion_model.", "base_model.model."),
        factors=(".lora_A.weight", ".lora_B.weight"), alpha_tensor=False, header=True, peft_folder=False,
        applies=("magnitude", "up_bias"), drops=("dora_scale",),
        refuses=("alpha", "diff", "diff_b", "hada_w1_a", "lokr_w1", "lokr_w1_a", "lokr_w2", "lokr_w2_a"),
        hint="lora convert FILE OUT --format diffusers"),
    Loader(
        "ComfyUI",
        "ComfyUI's LoraLoader (comfy/lora.py, comfy/weight_adapter): maps diffusion_model.<module>, "
        "transformer.<module> (ERNIE-Image, since April 2026) and lora_unet_<module_with_underscores> keys; "
        "reads lora_A/lora_B, lora_down/lora_up and .lora_B.default factors, the <module>.alpha tensor and "
        "ignores the header: without an .alpha tensor the scale is 1.0. Applies dora_scale (its own DoRA rule), "
        "LoHa, LoKr, .diff and .diff_b; other keys are logged 'lora key not loaded'.",
        prefixes=("diffusion_model.", "transformer.", "lora_unet_"),
        factors=(".lora_A.weight", ".lora_B.weight", ".lora_down.weight", ".lora_up.weight",
                 ".lora_A.default.weight", ".lora_B.default.weight"),
        alpha_tensor=True, header=False, peft_folder=False,
        applies=("dora_scale", "diff", "diff_b", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "lokr_w1",
                 "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"),
        drops=("magnitude", "up_bias"), hint="lora convert FILE OUT --format comfy"),
    Loader(
        "peft",
        "PeftModel.from_pretrained(transformer, FOLDER): reads FOLDER/adapter_config.json (lora_alpha, "
        "alpha_pattern, rank_pattern, use_rslora) and FOLDER/adapter_model.safetensors with base_model.model. "
        "keys; ignores the header; a lone .safetensors file is not a peft adapter.",
        prefixes=("base_model.model.",), factors=(".lora_A.weight", ".lora_B.weight"),
        alpha_tensor=False, header=False, peft_folder=True, applies=("magnitude", "up_bias"),
        refuses=("alpha", "dora_scale", "diff", "diff_b", "hada_w1_a", "lokr_w1", "lokr_w1_a"),
        hint="lora convert FILE OUT_FOLDER --format peft"),
    Loader(
        "kohya",
        "kohya-style loaders (sd-scripts / musubi-tuner networks.lora, and the WebUIs built on them): "
        "lora_unet_<module_with_underscores>.lora_down/lora_up keys, the <name>.alpha tensor, else alpha = rank "
        "(scale 1.0); the header is ignored; DoRA, LoHa, LoKr and full deltas need LyCORIS instead.",
        prefixes=("lora_unet_",), factors=(".lora_down.weight", ".lora_up.weight"),
        alpha_tensor=True, header=False, peft_folder=False, applies=(),
        refuses=("dora_scale", "magnitude", "diff", "diff_b", "hada_w1_a", "lokr_w1", "lokr_w1_a"),
        hint="lora convert FILE OUT --format kohya"),
)
LOADER_NAMES = tuple(loader.name for loader in LOADERS)


@dataclass
class LoaderPlan:
    """What one loader makes of a file, from its keys and header: whether it loads it unchanged, which keys
    it reads and with which peft config."""

    loader: str
    loads: bool
    note: str
    kept: dict[str, Key] = field(default_factory=dict)  # the keys it reads
    config: dict | None = None
    dropped: list[str] = field(default_factory=list)  # modules or parts it skips


def loader_plan(loader: Loader, parsed: dict[str, Key | None], header: dict[str, str], path: Path) -> LoaderPlan:
    """Run ``loader``'s documented rule on a file's parsed keys (``split_key`` of each), header and path."""
    unknown = [key for key, k in parsed.items() if k is None]
    if unknown:
        return LoaderPlan(loader.name, False, f"unknown key {unknown[0]!r}")
    prefix = next(iter(parsed.values())).prefix
    if prefix not in loader.prefixes:
        shown = repr(prefix) if prefix else "bare module paths"
        return LoaderPlan(loader.name, False, f"does not map {shown} keys ({loader.hint})")
    config, alpha_from = None, "no alpha anywhere: alpha = rank"
    if loader.peft_folder:
        config = peft_folder_config(path)
        if config is None:
            return LoaderPlan(loader.name, False, f"needs adapter_config.json beside adapter_model.safetensors "
                                                  f"({loader.hint})")
        alpha_from = "adapter_config.json"
    elif loader.header:
        config = adapter_metadata(header, path)
        alpha_from = "header lora_adapter_metadata" if config is not None else "no header config: alpha = rank"
    roles = {k.role for k in parsed.values()}
    refused = sorted(roles & set(loader.refuses))
    if refused:
        return LoaderPlan(loader.name, False, f"refuses files with {', '.join(refused)} keys ({loader.hint})")
    unread = sorted({k.suffix for k in parsed.values() if ROLES[k.suffix] in ("down", "up")} - set(loader.factors))
    if unread:
        return LoaderPlan(loader.name, False, f"does not read {', '.join(unread)} factors ({loader.hint})")
    kept = {key: k for key, k in parsed.items()
            if k.role in ("down", "up") or k.role in loader.applies or (k.role == "alpha" and loader.alpha_tensor)}
    dropped = sorted({f"{k.module} ({k.role})" for key, k in parsed.items() if key not in kept})
    if loader.alpha_tensor and "alpha" in roles:
        alpha_from = ".alpha tensors"
    elif loader.alpha_tensor:
        alpha_from = "no .alpha tensor: scale 1.0"
    note = alpha_from + (f"; skips {len(dropped)} part(s): {dropped[0]}" if dropped else "")
    return LoaderPlan(loader.name, True, note, kept, config, dropped)
