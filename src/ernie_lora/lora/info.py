"""``lora info`` and ``lora verify`` from the header and raw bytes alone: no torch, an answer in well under
a second. The rules are the readers' own (``layouts.module_plan``, ``layouts.loader_plan``); only
``--model`` (does it fit this model?) loads torch and diffusers, to build the model's shapes.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from .header import METADATA_PREFIX, RawTensor, provenance, raw_digest, read_raw, resolve_lora_path, trigger_of
from .layouts import (
    LOADERS,
    Key,
    LoaderPlan,
    ModulePlan,
    alpha_config,
    alpha_value,
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
    trigger: str | None = None  # the trigger word the header records (ours or ModelSpec's)

    @property
    def kinds(self) -> dict[str, int]:
        return dict(Counter(m.label for m in self.modules.values()))

    @property
    def ranks(self) -> dict[int, int]:  # rank -> number of LoRA modules
        return dict(Counter(m.rank for m in self.modules.values() if m.kind == "LoRA"))

    @property
    def alphas(self) -> dict[float, int]:
        return dict(Counter(m.alpha for m in self.modules.values() if m.kind == "LoRA"))


@dataclass
class _Read:
    raw: dict[str, RawTensor]
    header: dict[str, str]
    parsed: dict[str, Key]
    shapes: dict[str, tuple[int, ...]]
    alphas: dict[str, float]  # the ``.alpha`` tensors' values
    alpha_source: str
    plans: dict[str, ModulePlan]


def _read(path: Path) -> _Read:
    """The file read once: header, keys, shapes, alphas and each module's plan; every tensor finite."""
    raw, header = read_raw(path)
    parsed = parse_keys(list(raw), path)
    config, source = alpha_config(parsed, header, path)
    shapes = {key: t.shape for key, t in raw.items()}
    alphas = {key: alpha_value(key, raw[key].as_float64().reshape(-1).tolist(), path)
              for key, k in parsed.items() if k.role == "alpha"}
    plans = module_plans(parsed, shapes, alphas, config, path)
    for key, k in parsed.items():
        if not raw[key].finite():
            raise UserError(f"LoRA {path}: module {k.module} holds NaN or infinite values")
    return _Read(raw, header, parsed, shapes, alphas, source, plans)


def loader_verdicts(path: Path, read: _Read) -> list[tuple[LoaderPlan, bool | None, str]]:
    """For each loader: what it makes of the file, whether that is the change the file means (None: it does
    not load the file), and a line saying why."""
    plans, verdicts = read.plans, []
    for loader in LOADERS:
        plan = loader_plan(loader, dict(read.parsed), read.header, path)
        if not plan.loads:
            verdicts.append((plan, None, plan.note))
            continue
        seen = module_plans(plan.kept, read.shapes, read.alphas, plan.config, path)
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
    read = _read(path)
    info = LoraInfo(path, layout_name(read.parsed), read.plans, read.alpha_source, path.stat().st_size,
                    provenance(read.header), loader_verdicts(path, read), trigger=trigger_of(read.header))
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
    read = _read(path)  # header integrity, every key in a known layout, shapes that chain, finite
    stored = read.header.get(METADATA_PREFIX + "tensor_sha256")
    if stored is None:
        return 0, "no provenance (a file from another tool): header, keys and shapes check out, no hash to compare"
    actual = raw_digest(read.raw)
    if actual != stored:
        return 1, f"tensor hash mismatch: stored {stored[:16]}..., computed {actual[:16]}..."
    return 0, f"header, layout and tensor hash ({stored[:16]}...) all check out"
