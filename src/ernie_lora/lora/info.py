"""``lora info`` and ``lora verify`` from the header and raw bytes alone: no torch, an answer in well under
a second. The rules are the readers' own (``layouts.module_plan``, ``layouts.loader_plan``); only
``--model`` (does it fit this model?) loads torch and diffusers, to build the model's shapes.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from .header import METADATA_PREFIX, RawTensor, provenance, raw_digest, read_raw, resolve_lora_path
from .layouts import (
    LOADERS,
    LoaderPlan,
    ModulePlan,
    alpha_config,
    layout_name,
    loader_plan,
    module_plans,
    parse_keys,
    same_plan,
)


@dataclass
class LoraInfo:
    path: Path
    format: str
    modules: dict[str, ModulePlan]
    alpha_source: str
    size_bytes: int
    provenance: dict[str, str] = field(default_factory=dict)
    loaders: list[tuple[LoaderPlan, bool | None, str]] = field(default_factory=list)
    fits: str | None = None  # None: not checked; "yes" or the first mismatch

    @property
    def kinds(self) -> dict[str, int]:
        return dict(Counter(m.label for m in self.modules.values()))

    @property
    def ranks(self) -> dict[int, int]:  # rank -> number of LoRA modules
        return dict(Counter(m.rank for m in self.modules.values() if m.kind == "LoRA"))

    @property
    def alphas(self) -> dict[float, int]:
        return dict(Counter(m.alpha for m in self.modules.values() if m.kind == "LoRA"))


def _alphas(raw: dict[str, RawTensor], parsed, path: Path) -> dict[str, float]:
    """The ``.alpha`` tensors' values (scalars)."""
    values = {}
    for key, k in parsed.items():
        if k.role == "alpha":
            array = raw[key].as_float64()
            if array.size != 1:
                raise UserError(f"LoRA {path}: {key} holds {array.size} values; an alpha is one number")
            values[key] = float(array.reshape(-1)[0])
    return values


def _read(path: Path) -> tuple[dict[str, RawTensor], dict[str, str], dict, str, dict[str, ModulePlan], str]:
    raw, header = read_raw(path)
    parsed = parse_keys(list(raw), path)
    config, source = alpha_config(parsed, header, path)
    shapes = {key: t.shape for key, t in raw.items()}
    plans = module_plans(parsed, shapes, _alphas(raw, parsed, path), config, path)
    for key, k in parsed.items():
        if not raw[key].finite():
            raise UserError(f"LoRA {path}: module {k.module} holds NaN or infinite values")
    return raw, header, parsed, source, plans, layout_name(parsed)


def loader_verdicts(path: Path, plans: dict[str, ModulePlan], raw: dict[str, RawTensor], parsed, header
                    ) -> list[tuple[LoaderPlan, bool | None, str]]:
    """For each loader: what it makes of the file, whether that is the change the file means (None: it does
    not load the file), and a line saying why."""
    shapes = {key: t.shape for key, t in raw.items()}
    alphas = _alphas(raw, parsed, path)
    verdicts = []
    for loader in LOADERS:
        plan = loader_plan(loader, dict(parsed), header, path)
        if not plan.loads:
            verdicts.append((plan, None, plan.note))
            continue
        seen = module_plans(plan.kept, shapes, alphas, plan.config, path)
        wrong = [n for n, m in plans.items() if n not in seen or not same_plan(m, seen[n])]
        detail = plan.note
        if wrong:
            a, b = plans[wrong[0]], seen.get(wrong[0])
            ratio = (f"{b.scale / a.scale:.3g}x the meant delta" if b is not None and a.kind == b.kind == "LoRA"
                     and a.scale else "not the meant delta")
            detail += f": {ratio} in {len(wrong)} of {len(plans)} modules (e.g. {wrong[0]})"
        verdicts.append((plan, not wrong, detail))
    return verdicts


def lora_info(path: str | Path, model: str | None = None) -> LoraInfo:
    path = resolve_lora_path(path)
    raw, header, parsed, source, plans, layout = _read(path)
    info = LoraInfo(path, layout, plans, source, path.stat().st_size, provenance(header),
                    loader_verdicts(path, plans, raw, parsed, header))
    if model is not None:
        # deliberate: only a fit check needs the model's shapes, and with them torch and diffusers
        from .formats import read_lora_file
        from .tools import fit_problems, shape_model

        problems = fit_problems(read_lora_file(path).modules, shape_model(model))
        info.fits = "yes" if not problems else f"no: {'; '.join(problems[:3])}"
    return info


def verify_lora(path: str | Path) -> tuple[int, str]:
    """(exit code, what was checked): 0 when the file reads and its stored tensor hash matches, or when it
    carries no hash (a file from another tool: nothing to compare); 1 on a hash mismatch."""
    path = resolve_lora_path(path)
    raw, header, *_ = _read(path)  # header integrity, every key in a known layout, shapes that chain, finite
    stored = header.get(METADATA_PREFIX + "tensor_sha256")
    if stored is None:
        return 0, "no provenance (a file from another tool): header, keys and shapes check out, no hash to compare"
    actual = raw_digest(raw)
    if actual != stored:
        return 1, f"tensor hash mismatch: stored {stored[:16]}..., computed {actual[:16]}..."
    return 0, f"header, layout and tensor hash ({stored[:16]}...) all check out"
