"""What users do with LoRA files besides training them: inspect, verify, convert, merge, fuse."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import ErnieImageTransformer2DModel

from ..errors import UserError
from ..models import family_for
from .modules import LoraModule, Module, apply, factors, is_plain, kind, to_plain, without_bias


def find_layer(transformer: torch.nn.Module, name: str) -> torch.nn.Module | None:
    """The layer a module path names (peft's base layer when an adapter wraps it)."""
    layer = dict(transformer.named_modules()).get(name)
    return getattr(layer, "base_layer", layer)


def fit_problems(modules: dict[str, Module], transformer: torch.nn.Module) -> list[str]:
    """Modules whose layer the model lacks, or whose shape differs from it."""
    problems = []
    for name, module in modules.items():
        layer = find_layer(transformer, name)
        weight = getattr(layer, "weight", None)
        if weight is None:
            problems.append(f"{name} (no such layer in the model)")
            continue
        if isinstance(layer, torch.nn.Conv2d) and tuple(layer.kernel_size) != (1, 1):
            problems.append(f"{name} (a {tuple(layer.kernel_size)} convolution; only 1x1 ones are linear)")
            continue
        want = tuple(weight.shape[:2]) if weight.dim() > 1 else tuple(weight.shape)
        got = tuple(module.shape)[:2] if len(module.shape) > 1 else tuple(module.shape)
        if got and got != want:
            problems.append(f"{name} shape {list(got)} != the model's {list(want)}")
        if module.bias is not None and (getattr(layer, "bias", None) is None
                                        or layer.bias.shape != module.bias.shape):
            problems.append(f"{name} changes a bias the model's layer does not have")
    return problems


def shape_model(model: str) -> torch.nn.Module:
    """``model``'s transformer with shapes only (no weights): an 8B model is checked without loading 15 GB."""
    with init_empty_weights():
        return ErnieImageTransformer2DModel.from_config(family_for(model).transformer_config(model))


def check_fits(path: str | Path, modules: dict[str, Module], transformer: torch.nn.Module) -> None:
    problems = fit_problems(modules, transformer)
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise UserError(f"LoRA {path} does not match the model: {'; '.join(problems[:3])}{more}")


def base_weights(model: str | None, names: list[str]) -> dict[str, torch.Tensor]:
    """The named layers' weights of ``model`` (DoRA's changes depend on them)."""
    if not names:
        return {}
    if model is None:
        raise UserError(f"{names[0]} uses DoRA, whose change depends on the base weights: pass --model")
    transformer = family_for(model).load_transformer(model, dtype="fp32")
    out = {}
    for name in names:
        layer = find_layer(transformer, name)
        if layer is None:
            raise UserError(f"module {name}: no such layer in {model}")
        out[name] = layer.weight.detach()
    return out


def convert_modules(modules: dict[str, Module], rank: int | None, model: str | None = None,
                    drop_bias: bool = False) -> tuple[dict[str, LoraModule], dict[str, float]]:
    """Plain LoRAs for every module (a truncated SVD at ``rank`` where a module is not one), and the
    relative error of each module that needed it."""
    if drop_bias:
        modules = {n: m for n, m in ((n, without_bias(m)) for n, m in modules.items()) if m is not None}
    odd = [n for n, m in modules.items() if not is_plain(m)]
    if odd and rank is None:
        raise UserError(f"{len(odd)} module(s) are not plain LoRAs (e.g. {odd[0]}: {kind(modules[odd[0]])}); "
                        "pass --rank R to approximate them by a truncated SVD")
    bases = base_weights(model, [n for n in odd if modules[n].dora is not None])
    plain, errors = {}, {}
    for name, module in modules.items():
        try:
            plain[name], error = to_plain(module, rank or 1, bases.get(name))
        except UserError as exc:
            raise UserError(f"module {name}: {exc}") from None
        if name in odd:
            errors[name] = error
    return plain, errors


def merge_modules(loras: list[dict[str, Module]], weights: list[float], rank: int,
                  bases: dict[str, torch.Tensor] | None = None) -> tuple[dict[str, LoraModule], float]:
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
                if lora[name].bias is not None:
                    raise UserError(f"module {name}: a bias change cannot be merged into a LoRA (lora convert "
                                    "--drop-bias first)")
                up, down = factors(lora[name], (bases or {}).get(name))
                ups.append(up * w)
                downs.append(down)
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
        conv = any(lora[name].conv for lora in loras if name in lora)
        merged[name] = LoraModule(down.float().contiguous(), up.float().contiguous(), float(r), conv)
    return merged, (kept / total if total else 1.0)


@torch.no_grad()
def fuse_into(transformer, modules: dict[str, Module], strength: float = 1.0) -> None:
    """Every module's change at ``strength`` written into the model's weights, exactly as its loader applies it."""
    for name, module in modules.items():
        layer = find_layer(transformer, name)
        if layer is None or getattr(layer, "weight", None) is None:
            raise UserError(f"module {name!r}: no such layer in the model")
        problems = fit_problems({name: module}, transformer)
        if problems:
            raise UserError(f"module {problems[0]}")
        weight, bias = apply(module, layer.weight, getattr(layer, "bias", None), strength)
        layer.weight.copy_(weight.to(layer.weight.dtype))
        if bias is not None and module.bias is not None:
            layer.bias.copy_(bias.to(layer.bias.dtype))
