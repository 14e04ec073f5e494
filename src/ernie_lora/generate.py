"""Inference: ERNIE-Image with any number of LoRAs at their strengths, fused or not, Turbo, Prompt Enhancer.

Every image is ``ErnieImagePipeline``'s own call. LoRAs are fused into the weights for the call by
default (the base's speed), or added to their layers' outputs at each step (``--no-fuse``,
``lora.live``); either way the delta is the one diffusers' ``load_lora_weights`` applies, so with the
same seed the pixels are diffusers' own to float rounding (tested).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from . import __version__
from .captions.expand import expand_prompt
from .captions.trigger import fill_placeholder, has_placeholder, names_trigger
from .cpu_threads import pick_cpu_threads
from .errors import UserError
from .io import atomic_write
from .lora.files import read_lora_shapes
from .lora.formats import read_lora_file
from .lora.header import trigger_of
from .lora.live import LiveLoras
from .lora.modules import is_plain
from .lora.tools import check_fits, fuse_into
from .models import ERNIE_IMAGE_TURBO, family_for

MAX_SIDE = 4096
SUMMED_STRENGTH_WARNING = 1.5


@dataclass
class LoraSpec:
    path: Path
    strength: float = 1.0


def parse_lora_spec(spec: str) -> LoraSpec:
    """``PATH`` or ``PATH:STRENGTH``."""
    path, strength = spec, 1.0
    if ":" in spec:
        head, tail = spec.rsplit(":", 1)
        try:
            strength, path = float(tail), head
        except ValueError:
            path = spec
    return LoraSpec(Path(path).expanduser(), strength)


def validate_size(width: int, height: int, multiple: int) -> None:
    for flag, value in (("--width", width), ("--height", height)):
        if value <= 0 or value % multiple or value > MAX_SIDE:
            raise UserError(f"{flag}: {value} must be a positive multiple of {multiple} and at most {MAX_SIDE}")


def interference_warnings(loras: list[LoraSpec], module_sets: list[set[str]]) -> list[str]:
    """Stacking warnings: adapters fight each other when many touch the same layers or strengths add up."""
    warnings = []
    total = sum(abs(spec.strength) for spec in loras)
    if total > SUMMED_STRENGTH_WARNING:
        warnings.append(f"summed LoRA strength {total:.2f} > {SUMMED_STRENGTH_WARNING}: expect over-saturated, "
                        "muddy images (adapter interference)")
    if len(module_sets) > 2:
        shared = set.intersection(*module_sets)
        if shared:
            warnings.append(f"{len(module_sets)} LoRAs all modify the same {len(shared)} modules: expect interference")
    return warnings


def lora_triggers(paths: list[Path]) -> dict[str, str]:
    """Each LoRA file's trigger word, by file name. Headers only, so a bad file fails here, before an 8B model
    loads."""
    found = {}
    for path in paths:
        word = trigger_of(read_lora_shapes(path)[1])
        if word:
            found[Path(path).name] = word
    return found


def prompts_with_triggers(prompts: list[str], triggers: dict[str, str]) -> list[str]:
    """``[trigger]`` in each prompt filled with the LoRAs' trigger words; a note for each trigger that some
    prompts leave out (the LoRA may then do little: it learned to answer to that word)."""
    if not triggers:
        if any(has_placeholder(p) for p in prompts):
            raise UserError("a prompt says [trigger] but no LoRA given records a trigger word")
        return prompts
    words = ", ".join(dict.fromkeys(triggers.values()))
    filled = [fill_placeholder(p, words) for p in prompts]
    for name, word in triggers.items():
        missing = sum(not names_trigger(p, word) for p in filled)
        if missing:
            print(f"note: {name} was trained with the trigger word {word!r}; {missing} of {len(filled)} prompts do "
                  "not say it (write it, or [trigger])", file=sys.stderr)
    return filled


def _slug(text: str, length: int = 40) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:length] or "image"


def _free_path(folder: Path, stem: str) -> Path:
    path, n = folder / f"{stem}.png", 1
    while path.exists():  # never overwrite an earlier image
        path, n = folder / f"{stem}-{n}.png", n + 1
    return path


def _read_loras(pipe, loras: list[LoraSpec]) -> list:
    files = [read_lora_file(spec.path) for spec in loras]
    for spec, lora in zip(loras, files, strict=True):
        check_fits(spec.path, lora.modules, pipe.transformer)
    return files


def _written(lora, fuse: bool) -> dict:
    """The modules of a LoRA file written into the weights: all when fused; unfused, those that are not
    plain linear LoRAs (``LiveLoras`` adds the plain ones at each step instead)."""
    return {n: m for n, m in lora.modules.items() if fuse or not is_plain(m) or m.conv}


def _apply_loras(pipe, loras: list[LoraSpec], files: list, fuse: bool) -> tuple[list[str], LiveLoras | None]:
    """Put read LoRA files on the pipeline; (warnings to show, the unfused LoRAs' hooks if any)."""
    warnings = interference_warnings(loras, [set(lora.modules) for lora in files])
    if fuse:  # every module written into the weights at its strength, exactly as its loader applies it
        for spec, lora in zip(loras, files, strict=True):
            fuse_into(pipe.transformer, lora.modules, spec.strength)
        return warnings, None
    live, notes = [], []
    for spec, lora in zip(loras, files, strict=True):
        other = _written(lora, fuse)
        plain = {n: m for n, m in lora.modules.items() if n not in other}
        if other:
            fuse_into(pipe.transformer, other, spec.strength)
            notes.append(f"{spec.path.name}: {len(other)} module(s) beyond plain LoRA (DoRA, LoHa, LoKr or full "
                         "deltas) written into the weights at their strength")
        live.append((plain, spec.strength))
    return notes + warnings, LiveLoras(pipe.transformer, live)


def load_loras(pipe, loras: list[LoraSpec], fuse: bool = False) -> list[str]:
    """Load LoRA files of any layout into the pipeline at their strengths, for good; returns warnings.

    Fused: every module is written into the weights (``fuse_into``: float64, as the file's loader
    applies it). Unfused: plain LoRAs are added to their layers' outputs at each step (``LiveLoras``,
    the delta diffusers' ``load_lora_weights`` + ``set_adapters`` apply, to float rounding); modules
    that are not plain LoRAs (DoRA's ``dora_scale``, LoHa, LoKr, full deltas) are written into the
    weights at their strength.
    """
    return _apply_loras(pipe, loras, _read_loras(pipe, loras), fuse)[0]


@contextmanager
def loras_applied(pipe, loras: list[LoraSpec], fuse: bool = True) -> Iterator[list[str]]:
    """The LoRAs on ``pipe`` inside the block (yields warnings); afterwards the pipeline is exactly as
    before: unfused LoRAs' hooks removed and every weight a LoRA was written into restored bit for bit from a
    copy kept in CPU memory (subtracting the delta again would leave rounding behind)."""
    files = _read_loras(pipe, loras)
    layers = dict(pipe.transformer.named_modules())
    saved = {}  # only what will be written: unfused plain LoRAs leave the weights alone
    for name in sorted({name for lora in files for name in _written(lora, fuse)}):
        layer = layers[name]
        bias = getattr(layer, "bias", None)
        saved[name] = (layer.weight.detach().to("cpu", copy=True),
                       None if bias is None else bias.detach().to("cpu", copy=True))
    live = None
    try:
        warnings, live = _apply_loras(pipe, loras, files, fuse)
        yield warnings
    finally:
        if live is not None:
            live.remove()
        layers = dict(pipe.transformer.named_modules())
        with torch.no_grad():
            for name, (weight, bias) in saved.items():
                layers[name].weight.copy_(weight)
                if bias is not None:
                    layers[name].bias.copy_(bias)


def generate(
    prompts: list[str],
    *,
    model: str | None = None,
    loras: list[LoraSpec] | None = None,
    fuse: bool = True,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int = 0,
    width: int | None = None,
    height: int | None = None,
    turbo: bool = False,
    use_pe: bool = False,
    negative_prompt: str = "",
    out_dir: str | Path = "outputs",
    dtype: str = "bf16",
    device: str | None = None,
    pipe=None,
) -> list[Path]:
    """Generate one PNG per prompt (seed, seed+1, ...) with prompt, seed, model and LoRAs in its metadata.

    LoRAs are fused for the call by default (their strengths are fixed for it: the base's speed) and
    ``fuse=False`` adds them at each step instead. A ``pipe`` passed in is handed back as it came: hooks removed,
    fused weights restored bit-exactly; a pipeline loaded here is not restored (it is dropped anyway)."""
    if not prompts:
        raise UserError("no prompts given (pass them as arguments or with --prompts-file)")
    family = ERNIE_IMAGE_TURBO if turbo else family_for(model)  # Turbo: 8 steps at guidance 1 by default
    model = model or family.hub_id
    steps = steps or family.default_steps
    guidance = guidance if guidance is not None else family.default_guidance
    if steps <= 0:
        raise UserError(f"--steps: {steps} must be > 0")
    loras = loras or []
    prompts = prompts_with_triggers(prompts, lora_triggers([spec.path for spec in loras]))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    caller_pipe = pipe is not None
    pick_cpu_threads(model, None, device)
    if pipe is None:
        pipe = family.load_pipeline(model, dtype=dtype, device=device, with_pe=use_pe)
    multiple = pipe.vae_scale_factor * pipe.transformer.config.patch_size
    native = int(pipe.vae.config.get("sample_size", 1024))  # 1024 for ERNIE-Image, 64 for micro
    width, height = width or native, height or native
    validate_size(width, height, multiple)
    model_pe = use_pe and getattr(pipe, "pe", None) is not None
    if use_pe and not model_pe:
        print(f"note: {model} has no Prompt Enhancer weights; expanding prompts with the rule-based expander",
              file=sys.stderr)
    out_dir = Path(out_dir)
    written = []
    applied = loras_applied(pipe, loras, fuse) if loras and caller_pipe else nullcontext(None)
    with applied as warnings:
        if warnings is None and loras:
            warnings = load_loras(pipe, loras, fuse)
        for warning in warnings or []:
            print(f"warning: {warning}", file=sys.stderr)
        out_dir.mkdir(parents=True, exist_ok=True)  # only once the LoRAs fit: a refused call leaves nothing
        for i, prompt in enumerate(prompts):
            image_seed = seed + i
            revised = expand_prompt(prompt) if use_pe and not model_pe else None
            result = pipe(
                prompt=revised or prompt, negative_prompt=negative_prompt, height=height, width=width,
                num_inference_steps=steps, guidance_scale=guidance,
                generator=torch.Generator(device="cpu").manual_seed(image_seed), use_pe=model_pe,
            )
            image: Image.Image = result.images[0]
            info = PngInfo()
            fields = {
                "prompt": prompt,
                "seed": image_seed,
                "model": model,
                "loras": json.dumps([{"path": str(s.path), "strength": s.strength} for s in loras]),
                "fused": fuse,
                "steps": steps,
                "guidance": guidance,
                "width": width,
                "height": height,
                "negative_prompt": negative_prompt,
                "prompt_enhancer": "model" if model_pe else ("rules" if use_pe else "off"),
                "software": f"ernie-lora {__version__}",
            }
            if result.revised_prompts or revised:
                fields["revised_prompt"] = result.revised_prompts[0] if result.revised_prompts else revised
            for key, value in fields.items():
                info.add_text(key, str(value))
            path = _free_path(out_dir, f"{i:03d}-{_slug(prompt)}")
            atomic_write(path, lambda tmp, image=image, info=info: image.save(tmp, format="PNG", pnginfo=info))
            written.append(path)
    return written
