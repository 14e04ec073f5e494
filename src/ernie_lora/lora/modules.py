"""The in-memory form of every LoRA layout: what a file does to each module of the DiT.

- ``LoraModule``: ``delta W = alpha / rank * up @ down`` (a plain LoRA), optionally with DoRA's
  magnitude and a bias change;
- ``LohaModule`` (LyCORIS LoHa): ``delta W = alpha / rank * (w1a @ w1b) * (w2a @ w2b)``;
- ``LokrModule`` (LyCORIS LoKr): ``delta W = scale * kron(w1, w2)``;
- ``FullModule``: a full weight and/or bias change (ComfyUI's ``.diff`` / ``.diff_b``).

``apply`` changes a weight exactly as the loader the file was made for does (DoRA differs between
peft and ComfyUI); ``to_plain`` turns anything into a plain LoRA of a chosen rank by a truncated SVD and
says how much was lost. Everything is computed in float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..errors import UserError

EXACT_SVD_MAX_SIDE = 2048  # above this, a randomized SVD (torch.svd_lowrank) of the chosen rank


@dataclass
class Dora:
    """DoRA's learnt magnitude. peft (``lora_magnitude_vector``) normalises each output row and applies
    the strength to the LoRA inside the norm; ComfyUI and LyCORIS (``dora_scale``) normalise each input
    column ([1, in]; [out, 1] for LyCORIS' ``wd_on_out``) and blend the result with the base by strength."""

    magnitude: torch.Tensor  # 1-D: [out] for rows, [in] for columns
    axis: Literal["rows", "columns"]
    strength_inside: bool  # True: peft's rule; False: ComfyUI's

    def apply(self, weight: torch.Tensor, delta: torch.Tensor, strength: float) -> torch.Tensor:
        m = self.magnitude.double()
        changed = weight + (strength * delta if self.strength_inside else delta)
        if self.axis == "rows":
            result = changed * (m / changed.norm(dim=1))[:, None]
        else:
            result = changed * (m / changed.norm(dim=0))[None, :]
        return result if self.strength_inside else weight + strength * (result - weight)


@dataclass
class LoraModule:
    down: torch.Tensor  # [rank, in]  (peft's lora_A, kohya's lora_down)
    up: torch.Tensor  # [out, rank]  (peft's lora_B, kohya's lora_up)
    alpha: float
    conv: bool = False  # a 1x1 convolution's LoRA, held as the linear it equals
    dora: Dora | None = None
    bias: torch.Tensor | None = None  # the bias change at strength 1

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def shape(self) -> tuple[int, int]:
        return self.up.shape[0], self.down.shape[1]

    def delta(self) -> torch.Tensor:
        return self.scale * (self.up.double() @ self.down.double())

    def folded(self) -> LoraModule:
        """The same delta with the scale folded into up: alpha = rank, what every loader assumes."""
        return LoraModule(self.down, (self.up.double() * self.scale).to(self.up.dtype), float(self.rank), self.conv,
                          self.dora, self.bias)


@dataclass
class LohaModule:
    w1a: torch.Tensor  # [out, rank]
    w1b: torch.Tensor  # [rank, in]
    w2a: torch.Tensor
    w2b: torch.Tensor
    alpha: float
    conv: bool = False
    dora: Dora | None = None
    bias: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.w1b.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return self.w1a.shape[0], self.w1b.shape[1]

    def delta(self) -> torch.Tensor:
        d = lambda t: t.double()  # noqa: E731
        return self.alpha / self.rank * (d(self.w1a) @ d(self.w1b)) * (d(self.w2a) @ d(self.w2b))


@dataclass
class LokrModule:
    w1: torch.Tensor  # [a, c], composed from lokr_w1_a @ lokr_w1_b where the file factorised it
    w2: torch.Tensor  # [b, d]; delta W is [a*b, c*d]
    scale: float
    conv: bool = False
    dora: Dora | None = None
    bias: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.w1.shape[0] * self.w2.shape[0], self.w1.shape[1] * self.w2.shape[1]

    def delta(self) -> torch.Tensor:
        return self.scale * torch.kron(self.w1.double(), self.w2.double())


@dataclass
class FullModule:
    weight: torch.Tensor | None  # the weight change (any shape: a norm's vector, a linear's matrix)
    bias: torch.Tensor | None = None
    conv: bool = False
    dora: None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape) if self.weight is not None else ()

    def delta(self) -> torch.Tensor:
        if self.weight is None:
            raise ValueError("a bias-only change has no weight delta")
        return self.weight.double()


Module = LoraModule | LohaModule | LokrModule | FullModule


def is_plain(module: Module) -> bool:
    """A plain LoRA: low-rank factors and nothing else (what every loader reads)."""
    return isinstance(module, LoraModule) and module.dora is None and module.bias is None


def kind(module: Module) -> str:
    name = {LoraModule: "LoRA", LohaModule: "LoHa", LokrModule: "LoKr", FullModule: "full delta"}[type(module)]
    return name + (" + DoRA" if module.dora is not None else "") + (" + bias" if module.bias is not None else "")


@torch.no_grad()
def apply(module: Module, weight: torch.Tensor, bias: torch.Tensor | None, strength: float
          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The module's weight and bias after the change at ``strength``, as its loader computes them (float64)."""
    w = weight.double()
    flat = w.reshape(w.shape[0], -1) if w.dim() > 1 else w
    if isinstance(module, FullModule) and module.weight is None:
        new = flat
    elif module.dora is not None:
        new = module.dora.apply(flat, module.delta(), strength)
    else:
        new = flat + strength * module.delta().reshape(flat.shape)
    new_bias = None if bias is None else bias.double()
    if module.bias is not None:
        if bias is None:
            raise UserError("the LoRA changes a bias the model's layer does not have")
        new_bias = new_bias + strength * module.bias.double()
    return new.reshape(weight.shape), new_bias


def _truncated_svd(dense: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rank = min(rank, *dense.shape)
    if min(dense.shape) <= EXACT_SVD_MAX_SIDE:
        u, s, vh = torch.linalg.svd(dense, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank]
    generator_state = torch.random.get_rng_state()  # svd_lowrank draws a random test matrix
    torch.manual_seed(0)
    try:
        u, s, v = torch.svd_lowrank(dense, q=min(rank + 10, *dense.shape), niter=6)
    finally:
        torch.random.set_rng_state(generator_state)
    return u[:, :rank], s[:rank], v[:, :rank].T


def dense_delta(module: Module, base: torch.Tensor | None = None) -> torch.Tensor:
    """The 2-D weight change at strength 1; DoRA needs the base weight to compute it."""
    if module.dora is not None:
        if base is None:
            raise UserError("DoRA changes depend on the base weights: pass --model")
        w = base.double().reshape(base.shape[0], -1)
        return apply(module, w, None, 1.0)[0] - w
    delta = module.delta()
    return delta.reshape(delta.shape[0], -1)


def to_plain(module: Module, rank: int, base: torch.Tensor | None = None) -> tuple[LoraModule, float]:
    """A plain LoRA of at most ``rank`` closest to the module's weight change (truncated SVD), and the
    relative Frobenius error of that approximation (0 for a plain LoRA, returned as it is)."""
    if is_plain(module):
        return module, 0.0
    if module.bias is not None:
        raise UserError("it changes a bias, which a plain LoRA cannot (pass --drop-bias to leave it out)")
    if isinstance(module, FullModule) and (module.weight is None or module.weight.dim() < 2):
        raise UserError("it changes a vector (a norm's weight), which a plain LoRA cannot (--drop-bias leaves "
                        "these out too)")
    dense = dense_delta(module, base)
    u, s, vh = _truncated_svd(dense, rank)
    up, down = u * s, vh
    total = float(dense.norm())
    error = float((dense - up @ down).norm()) / total if total else 0.0
    return LoraModule(down.float().contiguous(), up.float().contiguous(), float(down.shape[0]), module.conv), error


def without_bias(module: Module) -> Module | None:
    """The module without its bias change (``--drop-bias``); None when nothing else is left."""
    if isinstance(module, FullModule):
        if module.weight is None or module.weight.dim() < 2:
            return None
        return FullModule(module.weight, None, module.conv)
    copy = type(module)(**{**module.__dict__, "bias": None})
    return copy


def factors(module: Module, base: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) in float64 with the scale folded in, whose product is exactly the weight change.

    Plain LoRAs give their own factors; anything else is decomposed by a full SVD, keeping every
    singular value above numerical noise."""
    if is_plain(module):
        return module.up.double() * module.scale, module.down.double()
    dense = dense_delta(module, base)
    u, s, vh = torch.linalg.svd(dense, full_matrices=False)
    keep = max(1, int((s > s[0] * 1e-12).sum())) if s.numel() and s[0] > 0 else 1
    return u[:, :keep] * s[:keep], vh[:keep]
