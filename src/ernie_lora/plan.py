"""GPU memory planner: the peak memory of a LoRA training config, before it runs.

Weights, LoRA parameters, gradients and optimizer state are counted exactly from the DiT's config
(the model is built on the meta device: no weights, no download). Activations are *measured*, not
guessed: a slice of the real model (one and two blocks at full width, the configured LoRA, dtype and
precision) runs a training step on this machine's CPU for a few hundred tokens while torch's profiler
records every allocation; the peaks of the one- and two-block slices give the memory per token of
the part outside the blocks and of each block, with and without gradient checkpointing. Both are
linear in tokens x batch and in the number of blocks, which is how they are scaled to the config.
What the CPU cannot show is added as stated assumptions: the CUDA context and allocator slack.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from diffusers import ErnieImageTransformer2DModel
from torch.profiler import ProfilerActivity, profile

from .config import TrainRunConfig
from .data.buckets import make_buckets
from .flow import noisy_latents, velocity_target
from .lora.adapters import add_lora, resolve_targets
from .models import ERNIE_IMAGE, family_for, parse_dtype
from .models.block_swap import BlockSwap
from .models.quantize import quantizable, quantize_base, quantized_weight_bytes

GiB = 1024**3
CUDA_OVERHEAD_BYTES = int(1.0 * GiB)  # CUDA context (~0.5 GiB) + caching-allocator slack; not measurable on a CPU
SLICE_MAX_WIDTH = 512  # wider models are measured narrowed to this hidden size (see measure_activations)
SLICE_IMAGE_SIDE = 24  # the measured slices: 576 and 1089 image tokens ...
SLICE_TEXT_TOKENS = 32  # ... plus 32 text tokens (one stream: a text token costs what an image token does)


@contextlib.contextmanager
def _stderr_silenced():
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def peak_allocated_bytes(fn) -> int:
    """Peak of (allocated - freed) CPU bytes while ``fn`` runs, from torch's profiler allocation events."""
    # kineto prints a line to stderr at each start and stop, and a warning for blocks freed that were
    # allocated before it started; Python exceptions still surface once stderr is back
    with _stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []

    def walk(node) -> None:
        if node.tag.name == "Allocation":
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        for child in node.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    current = peak = 0
    for _, size in sorted(events):
        current += size
        peak = max(peak, current)
    return peak


def build_dit(config: dict, dtype: torch.dtype, device: str = "cpu"):
    """The DiT with uninitialised weights (allocation only; meta when nothing is to be run)."""
    with torch.device("meta"):
        model = ErnieImageTransformer2DModel(**config)
    if device != "meta":
        model = model.to_empty(device=device)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.02)  # finite values: uninitialised memory can hold NaNs
    return model.to(dtype)


def training_step(model, image_side: int, text_tokens: int, batch: int, autocast: bool) -> None:
    """One flow-matching forward and backward as the LoRA recipe runs it, on the model's device (inputs
    are made inside, so a memory measurement counts them)."""
    cfg = model.config
    dtype, device = model.dtype, model.device
    x0 = torch.randn(batch, cfg.in_channels, image_side, image_side, device=device)
    noise = torch.randn_like(x0)
    sigma = torch.rand(batch, device=device)
    texts = list(torch.randn(batch, text_tokens, cfg.text_in_dim, dtype=dtype, device=device))
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        pred = ERNIE_IMAGE.predict_velocity(model, noisy_latents(x0, noise, sigma), sigma, texts)
    F.mse_loss(pred.float(), velocity_target(x0, noise).float()).backward()


@dataclass
class ActivationProfile:
    """Activation memory = constant + blocks x block_constant + tokens x batch x (outer + blocks x block).

    ``outer`` covers the embeddings, adaLN modulation, final layer, loss and the backward's transient
    buffers; ``block`` what each block keeps for backward (under checkpointing: its input). The
    constants do not grow with tokens: e.g. with an int8/float8 base and no checkpointing, every block
    keeps its weights dequantised for the backward (measured, torchao 0.18), one block's worth when
    checkpointed.
    """

    constant: float
    block_constant: float
    outer: float
    block: float

    def bytes(self, tokens: int, batch: int, layers: int) -> int:
        return int(self.constant + layers * self.block_constant + tokens * batch * (self.outer + layers * self.block))


def _lora_grad_bytes(model) -> int:
    return sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)


def measure_step(cfg: TrainRunConfig, dit_config: dict, image_side: int, text_tokens: int, batch: int = 1,
                 checkpointing: bool | None = None, block_swap: int = 0) -> int:
    """Peak bytes of one training step beyond the weights (activations, transients, LoRA gradients), measured.
    With ``block_swap`` the swapped blocks' copies made during the step are counted too."""
    dtype = parse_dtype(cfg.model.dtype)
    checkpointing = cfg.train.gradient_checkpointing if checkpointing is None else checkpointing
    torch.manual_seed(0)
    model = build_dit(dit_config, dtype)
    quantize_base(model, cfg.model.quantize)
    add_lora(model, cfg.lora.rank, cfg.lora.alpha, resolve_targets(model, cfg.lora.targets))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # as the recipe trains them
    if checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    if block_swap:
        BlockSwap(model, block_swap, "cpu")
    autocast = cfg.train.mixed_precision == "bf16"
    return peak_allocated_bytes(lambda: training_step(model, image_side, text_tokens, batch, autocast))


def narrowed(dit_config: dict, width: int) -> tuple[dict, float]:
    """The DiT at ``width`` hidden size (FFN, heads and text width scaled alike, head size kept), and the factor."""
    hidden = dit_config["hidden_size"]
    if hidden <= width:
        return dict(dit_config), 1.0
    factor = hidden / width
    config = dict(dit_config, hidden_size=width, ffn_hidden_size=round(dit_config["ffn_hidden_size"] / factor),
                  num_attention_heads=max(1, round(dit_config["num_attention_heads"] / factor)),
                  text_in_dim=max(1, round(dit_config["text_in_dim"] / factor)))
    return config, factor


def measure_activations(cfg: TrainRunConfig, dit_config: dict, checkpointing: bool,
                        max_width: int = SLICE_MAX_WIDTH) -> ActivationProfile:
    """Four slices, (2 or 3 blocks) x (n or ~2n tokens), solved for the profile's four terms.

    Two blocks, not one, as the base: the backward's peak can hold buffers of two neighbouring blocks
    (a block's backward beside the next one's recompute), so the third block shows the true marginal cost.
    A model wider than ``max_width`` is measured narrowed to it (head size kept) and scaled back: what
    grows with tokens is linear in the width, what does not (dequantised weights) is quadratic. Narrow
    slices can afford enough tokens that the per-token terms are not lost under the constant ones.
    """
    config, factor = narrowed(dit_config, max_width)
    sides = (SLICE_IMAGE_SIDE, int(SLICE_IMAGE_SIDE * math.sqrt(2)))
    s1, s2 = (side * side + SLICE_TEXT_TOKENS for side in sides)
    peaks = {}
    for layers in (2, 3):
        sliced = {**config, "num_layers": layers}
        lora_grads = _lora_param_count(build_dit(sliced, torch.float32, "meta"), cfg) * 4  # counted exactly
        for side in sides:
            peaks[layers, side] = measure_step(cfg, sliced, side, SLICE_TEXT_TOKENS, checkpointing=checkpointing)
            peaks[layers, side] -= lora_grads
    two_small, two_large = peaks[2, sides[0]], peaks[2, sides[1]]
    diff_small, diff_large = peaks[3, sides[0]] - two_small, peaks[3, sides[1]] - two_large
    block = (diff_large - diff_small) / (s2 - s1)
    block_constant = diff_small - s1 * block
    outer = (two_large - two_small) / (s2 - s1) - 2 * block
    constant = two_small - s1 * (outer + 2 * block) - 2 * block_constant
    if checkpointing:
        # a checkpointed block must keep its input (tokens x hidden): should the peak fall where the step's
        # transients hide it, that is the floor of the marginal cost
        width = 2 if cfg.train.mixed_precision == "bf16" or cfg.model.dtype != "fp32" else 4
        floor = config["hidden_size"] * width
        if block < floor:
            outer -= floor - block  # the slices' totals stay as measured
            block = floor
    return ActivationProfile(constant * factor**2, block_constant * factor**2, outer * factor, block * factor)


class Profiles:
    """Activation profiles measured on demand, per (checkpointing, quantisation)."""

    def __init__(self, cfg: TrainRunConfig, dit_config: dict):
        self.cfg, self.dit_config, self._cache = cfg, dit_config, {}

    def __getitem__(self, key: tuple[bool, str]) -> ActivationProfile:
        if key not in self._cache:
            checkpointing, quantize = key
            cfg = self.cfg.model_copy(deep=True)
            cfg.model.quantize = quantize
            self._cache[key] = measure_activations(cfg, self.dit_config, checkpointing)
        return self._cache[key]


@dataclass
class Settings:
    """The knobs the planner turns."""

    quantize: str
    gradient_checkpointing: bool
    optimizer: str
    batch_size: int
    resolution: int
    block_swap: int = 0
    fsdp_shards: int = 1  # processes the frozen base is sharded over (train.fsdp)

    def describe(self, base: Settings) -> list[str]:
        keys = {"quantize": "model.quantize", "gradient_checkpointing": "train.gradient_checkpointing",
                "optimizer": "train.optimizer", "batch_size": "train.batch_size", "resolution": "data.resolution",
                "block_swap": "model.block_swap"}
        changes = []
        for attr, key in keys.items():
            if getattr(self, attr) != getattr(base, attr):
                value = getattr(self, attr)
                changes.append(f"{key}={str(value).lower() if isinstance(value, bool) else value}")
        return changes


@dataclass
class Plan:
    settings: Settings
    rows: list[tuple[str, int]]  # (component, bytes)
    tokens: int
    text_tokens: int
    params: int
    lora_params: int
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(b for _, b in self.rows)


def _weight_bytes(meta_model, dtype: torch.dtype, quantize: str) -> tuple[int, int]:
    """(bytes of the frozen base, parameter count) with the quantised layers counted as torchao stores them."""
    quantized_names = set()
    total = 0
    if quantize != "none":
        for name, module in meta_model.named_modules():
            if quantizable(module, name):
                quantized_names.add(name + ".weight")
                total += quantized_weight_bytes(*module.weight.shape, quantize)
    count = 0
    for name, p in meta_model.named_parameters():
        count += p.numel()
        if name not in quantized_names:
            total += p.numel() * (torch.finfo(dtype).bits // 8)
    return total, count


def _lora_param_count(meta_model, cfg: TrainRunConfig) -> int:
    targets = resolve_targets(meta_model, cfg.lora.targets)
    count = 0
    for name, module in meta_model.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            count += cfg.lora.rank * (module.in_features + module.out_features)
    return count


def max_image_tokens(resolution: int, multiple: int, max_ratio: float) -> int:
    """Image tokens of the largest bucket (one token per ``multiple``² pixels)."""
    return max((b.width // multiple) * (b.height // multiple) for b in make_buckets(resolution, multiple, max_ratio))


def estimate(cfg: TrainRunConfig, settings: Settings, profiles: Profiles, dit_config: dict,
             text_tokens: int, multiple: int) -> Plan:
    dtype = parse_dtype(cfg.model.dtype)
    meta = build_dit(dit_config, dtype, device="meta")
    weights, params = _weight_bytes(meta, dtype, settings.quantize)
    block_weights = sum(p.numel() for p in ERNIE_IMAGE.blocks(meta)[0].parameters()) * (torch.finfo(dtype).bits // 8)
    swapped, shards = settings.block_swap, settings.fsdp_shards
    in_flight = min(2, swapped)  # a block's copy lives through its forward and its backward; two overlap
    blocks = dit_config["num_layers"]
    lora = _lora_param_count(meta, cfg)
    image_tokens = max_image_tokens(settings.resolution, multiple, cfg.data.max_aspect_ratio)
    tokens = image_tokens + text_tokens
    state_bytes = 2 if settings.optimizer == "adamw8bit" else 8  # AdamW: two fp32 moments; 8-bit: two bytes
    act = profiles[settings.gradient_checkpointing, settings.quantize].bytes(
        tokens, settings.batch_size, dit_config["num_layers"])
    label = _weight_label(cfg.model.dtype, settings.quantize)
    rows = [(f"frozen DiT weights ({label})", weights)]
    if swapped:
        rows = [(f"frozen DiT weights ({label}), {blocks - swapped} blocks resident",
                 weights - swapped * block_weights),
                (f"block swap: {in_flight} of {swapped} swapped blocks in flight", in_flight * block_weights)]
    elif shards > 1:  # FSDP2: block shards; the root unit (embeddings, final layer) stays gathered
        rows = [(f"frozen DiT weights ({label}), blocks sharded 1/{shards}",
                 weights - blocks * block_weights + math.ceil(blocks * block_weights / shards)),
                ("fsdp: 2 blocks gathered at once (prefetch)", 2 * block_weights)]
    rows += [
        ("LoRA weights (fp32)", lora * 4),
        ("LoRA gradients (fp32)", lora * 4),
        (f"optimizer state ({settings.optimizer})", lora * state_bytes),
        (f"activations ({'checkpointed' if settings.gradient_checkpointing else 'all kept'}, "
         f"batch {settings.batch_size} x {tokens} tokens)", act),
        ("CUDA context + allocator slack (assumed)", CUDA_OVERHEAD_BYTES),
    ]
    notes = ["text encoder and VAE: off the GPU while training (latents and embeddings are cached first)",
             "not planned: samples during training (the VAE decodes on the GPU), other processes on the GPU"]
    if swapped:
        notes.append(f"block swap keeps {swapped * block_weights / GiB:.2f} GiB in pinned CPU memory and copies "
                     f"{2 * swapped * block_weights / GiB:.2f} GiB to the GPU per step (forward and backward)")
    return Plan(settings, rows, tokens, text_tokens, params, lora, notes)


def _weight_label(dtype: str, quantize: str) -> str:
    return {"none": dtype, "int8": "int8 weight-only", "float8": "float8 weight-only"}[quantize]


def _cascade(base: Settings, multiple: int, layers: int):
    """Settings to try, in order of what they cost in quality or speed: checkpointing (speed only), int8
    base (float8 is as small and better on Ada/Hopper), 8-bit AdamW, the unquantised base with the
    fewest blocks swapped to CPU, smaller batch, lower resolution."""
    s = replace(base, gradient_checkpointing=True)
    yield s
    plain_only = s.block_swap or s.fsdp_shards > 1  # block swap and FSDP need the unquantised base
    if s.quantize == "none" and not plain_only:
        s = replace(s, quantize="int8")
        yield s
    if s.optimizer != "adamw8bit":
        s = replace(s, optimizer="adamw8bit")
        yield s
    if base.quantize == "none" and base.fsdp_shards == 1:
        for count in range(max(1, base.block_swap + 1), layers + 1):
            yield replace(s, quantize="none", block_swap=count)
        s = replace(s, quantize="none", block_swap=layers)
    while s.batch_size > 1:
        s = replace(s, batch_size=s.batch_size // 2)
        yield s
    for res in (768, 512, 256):
        res = max(multiple, res // multiple * multiple)
        if res < s.resolution:
            s = replace(s, resolution=res)
            yield s


def plan_config(cfg: TrainRunConfig, vram_gib: float | None, text_tokens: int = 256,
                gpus: int = 1) -> tuple[Plan, Plan | None]:
    """The config's plan per GPU, and (when a budget is given) the first settings in the cascade that fit it."""
    family = family_for(cfg.model.name)
    dit_config = family.transformer_config(cfg.model.name, cfg.model.revision)
    multiple = family.pixel_multiple(cfg.model.name, cfg.model.revision)
    profiles = Profiles(cfg, dit_config)
    base = Settings(cfg.model.quantize, cfg.train.gradient_checkpointing, cfg.train.optimizer,
                    cfg.train.batch_size, cfg.data.resolution, cfg.model.block_swap,
                    gpus if cfg.train.fsdp else 1)
    plan = estimate(cfg, base, profiles, dit_config, text_tokens, multiple)
    if vram_gib is None or plan.total <= vram_gib * GiB:
        return plan, None
    candidate = plan
    for settings in _cascade(base, multiple, dit_config["num_layers"]):
        candidate = estimate(cfg, settings, profiles, dit_config, text_tokens, multiple)
        if candidate.total <= vram_gib * GiB:
            break
    return plan, candidate


def format_plan(plan: Plan, vram_gib: float | None, fit: Plan | None = None) -> str:
    def gib(b: int) -> str:
        return f"{b / GiB:.2f}"

    width = max(len(name) for name, _ in plan.rows) + 2
    lines = [f"DiT {plan.params / 1e9:.3f}B parameters, LoRA {plan.lora_params / 1e6:.2f}M; "
             f"largest bucket {plan.tokens - plan.text_tokens} image + {plan.text_tokens} text tokens",
             f"{'component':<{width}}{'GiB':>8}{'MiB':>11}"]
    lines += [f"{name:<{width}}{gib(b):>8}{b / 2**20:>11.1f}" for name, b in plan.rows]
    lines.append(f"{'peak':<{width}}{gib(plan.total):>8}{plan.total / 2**20:>11.1f}")
    lines += [f"note: {n}" for n in plan.notes]
    if vram_gib is not None:
        if fit is None:
            lines.append(f"fits {vram_gib:g} GiB as configured ({gib(plan.total)} GiB)")
        elif fit.total <= vram_gib * GiB:
            changes = " ".join(f"--set {c}" for c in fit.settings.describe(plan.settings))
            lines.append(f"does not fit {vram_gib:g} GiB; fits at {gib(fit.total)} GiB with: {changes}")
        else:
            lines.append(f"does not fit {vram_gib:g} GiB even with every setting turned down "
                         f"({gib(fit.total)} GiB); use a larger GPU")
    return "\n".join(lines) + "\n"
