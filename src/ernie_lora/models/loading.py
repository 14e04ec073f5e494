"""Load ERNIE-Image pipelines and components through diffusers' own classes (the family's loader).

A model name is one of:
- ``micro``: micro ERNIE, pretrained on the synthetic layout world, weights shipped in the package;
- ``tiny`` or ``tiny:SEED``: the random tiny pipeline (tests, no download);
- a local diffusers folder (``model_index.json`` inside);
- a Hugging Face hub id such as ``baidu/ERNIE-Image`` or ``baidu/ERNIE-Image-Turbo``.

When the weights are not on this machine and cannot be downloaded, one clear error says how to
fetch them; when the hub cannot be reached at all, the cached snapshot is read (``hub.py``), so a
cached model loads and that error comes at once instead of after huggingface_hub's retries.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from diffusers import ErnieImagePipeline, ErnieImageTransformer2DModel
from huggingface_hub import snapshot_download

from .. import hub
from ..errors import UserError
from . import tiny
from .micro_arch import MICRO_DIR
from .tiny import build_tiny_pipeline

BASE_MODEL = "baidu/ERNIE-Image"  # the hub ids; family.py holds them as the families' own
TURBO_MODEL = "baidu/ERNIE-Image-Turbo"
COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler", "pe", "pe_tokenizer")

DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name]
    except KeyError:
        raise UserError(f"unknown dtype {name!r}; use one of fp32, bf16, fp16") from None


def tiny_seed(name: str) -> int | None:
    """The seed of a ``tiny`` / ``tiny:SEED`` name, or None for any other name."""
    if name == "tiny":
        return 0
    if name.startswith("tiny:"):
        try:
            return int(name.split(":", 1)[1])
        except ValueError:
            raise UserError(f"model {name!r}: the tiny model takes an integer seed, e.g. tiny:3") from None
    return None


def resolve_name(name: str) -> str:
    """``micro`` -> the shipped folder; every other name is returned as given."""
    if name != "micro":
        return name
    if not (MICRO_DIR / "model_index.json").exists():
        raise UserError(f"model 'micro': its weights are missing from {MICRO_DIR}; re-create them with "
                        "`ernie-lora pretrain-micro configs/micro-pretrain.yaml --output " + str(MICRO_DIR) + "`")
    return str(MICRO_DIR)


def _is_local(name: str) -> bool:
    return Path(name).expanduser().exists()


def _source(name: str) -> str:
    """What from_pretrained gets: a local folder path, or a hub id of the form owner/name."""
    if _is_local(name):
        return str(Path(name).expanduser())
    if "/" not in name:
        raise UserError(
            f"model {name!r}: not a local folder, not a hub id (owner/name), not 'micro' or 'tiny'; "
            f"try {BASE_MODEL} or {TURBO_MODEL}"
        )
    return name


def _opened(source: str, revision: str | None) -> tuple[str, str | None]:
    """(what from_pretrained opens, the revision it asks for): a hub id at its revision, or, while the hub is out
    of reach, the cached snapshot of that revision (a folder: no revision left to ask for)."""
    opened = hub.local_source(source, revision)
    return opened, (revision if opened == source else None)


def _missing_weights_error(name: str, cause: Exception) -> UserError:
    why = str(cause) if isinstance(cause, hub.NotCached) else (
        f"weights not found locally and could not be downloaded ({type(cause).__name__})")
    return UserError(
        f"model {name!r}: {why}. Fetch them once with `hf download {name} --local-dir DIR` and use DIR as the model "
        f"(--model DIR, or model.name: DIR in a config; or set HF_HOME to the cache that holds them)"
    )


def load_pipeline(
    name: str = BASE_MODEL,
    *,
    dtype: str | torch.dtype = "bf16",
    device: str | torch.device = "cpu",
    components: tuple[str, ...] | None = None,
    with_pe: bool = False,
    revision: str | None = None,
) -> ErnieImagePipeline:
    """Load an ``ErnieImagePipeline``.

    ``components`` limits what is loaded (e.g. ``("vae",)`` for latent caching); the rest is None.
    The Prompt Enhancer (a 3B LLM) is loaded only with ``with_pe``.
    """
    torch_dtype = parse_dtype(dtype)
    name = resolve_name(name)
    wanted = set(COMPONENTS if components is None else components)
    if with_pe:
        wanted |= {"pe", "pe_tokenizer"}
    else:
        wanted -= {"pe", "pe_tokenizer"}
    seed = tiny_seed(name)
    if seed is not None:
        pipe = build_tiny_pipeline(seed)
        for comp in COMPONENTS:
            if comp not in wanted and getattr(pipe, comp, None) is not None:
                setattr(pipe, comp, None)  # register_modules keeps the config entry, drops the module
        if torch_dtype != torch.float32:  # the tiny model is built in fp32
            pipe.to(dtype=torch_dtype)
        return _for_inference(pipe.to(device))
    # diffusers skips a component passed as None; that is how a partial pipeline is loaded.
    skip = {comp: None for comp in COMPONENTS if comp not in wanted}
    source = _source(name)
    try:
        opened, revision = _opened(source, revision)
        pipe = ErnieImagePipeline.from_pretrained(opened, revision=revision, dtype=torch_dtype, **skip)
    except (OSError, ValueError) as exc:
        if _is_local(name):
            raise UserError(f"model folder {source}: not a diffusers ERNIE-Image folder ({exc})") from None
        raise _missing_weights_error(name, exc) from None
    return _for_inference(pipe.to(device))


def _for_inference(pipe: ErnieImagePipeline) -> ErnieImagePipeline:
    if pipe.transformer is not None:
        contiguous_attention_input(pipe.transformer)
    return pipe


def contiguous_attention_input(transformer: ErnieImageTransformer2DModel, enable: bool = True) -> None:
    """Hand each block's attention a contiguous input (``enable=False`` takes that away again).

    ERNIE's blocks run sequence-first and give attention ``x.permute(1, 0, 2)``; on that strided view
    q/k/v (and peft's lora_A) run as batched ``bmm`` instead of one ``addmm``, measured slower with two
    CPU threads (bench/lora_inference.py). One copy of the block's input costs less."""
    handles = transformer.__dict__.pop("_contiguous_attention_hooks", [])
    for handle in handles:
        handle.remove()
    if enable:
        transformer._contiguous_attention_hooks = [
            block.self_attention.register_forward_pre_hook(_contiguous_first_argument) for block in transformer.layers]


def _contiguous_first_argument(module: torch.nn.Module, args: tuple) -> tuple | None:
    return (args[0].contiguous(), *args[1:]) if args else None


def load_transformer(
    name: str = BASE_MODEL,
    *,
    dtype: str | torch.dtype = "bf16",
    device: str | torch.device = "cpu",
    revision: str | None = None,
) -> ErnieImageTransformer2DModel:
    """Load only the DiT (what training from cached latents and embeddings needs)."""
    torch_dtype = parse_dtype(dtype)
    name = resolve_name(name)
    if tiny_seed(name) is not None:
        return load_pipeline(name, dtype=torch_dtype, device=device, components=("transformer",)).transformer
    source = _source(name)
    try:
        opened, revision = _opened(source, revision)
        model = ErnieImageTransformer2DModel.from_pretrained(opened, revision=revision, subfolder="transformer",
                                                             dtype=torch_dtype)
    except (OSError, ValueError) as exc:
        if _is_local(name):
            raise UserError(f"model folder {source}: no transformer/ inside ({exc})") from None
        raise _missing_weights_error(name, exc) from None
    return model.to(device)


def component_fingerprint(name: str, component: str, revision: str | None = None) -> str:
    """A short identity of one component's weights, computed without loading them (for cache keys).

    Local folders (and hub snapshots already in the HF cache) are fingerprinted from their config
    files and the head and tail bytes of each weight file, so other weights in the same folder
    never reuse a cache made with the old ones. A hub id that is not cached falls back to its name
    and revision.
    """
    h = hashlib.sha256(f"{component}|".encode())
    name = resolve_name(name)
    if tiny_seed(name) is not None:
        h.update(f"{name}|{json.dumps(_tiny_configs(), sort_keys=True, default=str)}".encode())
        return h.hexdigest()[:16]
    folder = Path(name).expanduser() if _is_local(name) else _cached_snapshot(name, revision)
    if folder is None:
        h.update(f"{name}@{revision or 'main'}".encode())
        return h.hexdigest()[:16]
    comp_dir = folder / component
    files = sorted(p for p in comp_dir.rglob("*") if p.is_file()) if comp_dir.is_dir() else []
    if not files:
        raise UserError(f"model {name}: no {component}/ folder in {folder}")
    for path in files:
        h.update(path.name.encode())
        with open(path, "rb") as f:
            h.update(f.read(1 << 20))
            size = path.stat().st_size
            if size > 2 << 20:
                f.seek(size - (1 << 20))
                h.update(f.read())
        h.update(str(path.stat().st_size).encode())
    return h.hexdigest()[:16]


def _cached_snapshot(repo_id: str, revision: str | None) -> Path | None:
    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except Exception:
        return None


def _tiny_configs() -> dict:
    return {k: getattr(tiny, k) for k in dir(tiny) if k.startswith("TINY_")}


def load_component_config(name: str, component: str, revision: str | None = None) -> dict:
    """A component's config.json (no weights loaded): e.g. the scheduler's shift, the VAE's block count."""
    name = resolve_name(name)
    seed = tiny_seed(name)
    if seed is not None:
        return dict({
            "transformer": tiny.TINY_TRANSFORMER_CONFIG,
            "vae": tiny.TINY_VAE_CONFIG,
            "scheduler": tiny.TINY_SCHEDULER_CONFIG,
        }[component])
    folder = Path(name).expanduser() if _is_local(name) else _cached_snapshot(name, revision)
    if folder is None:
        raise _missing_weights_error(name, FileNotFoundError(component))
    cfg_name = "scheduler_config.json" if component == "scheduler" else "config.json"
    path = folder / component / cfg_name
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"model {name}: cannot read {component}/{cfg_name} ({exc})") from None
