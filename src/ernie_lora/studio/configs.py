"""Job configs in the studio: presets (the shipped ``configs/`` files), the form's fields (from the
recipe's pydantic model) and validation with the errors the CLI would give, before anything starts."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml
from pydantic import ValidationError

from ..config import DistillRunConfig, DpoRunConfig, TrainRunConfig, safe_load_yaml
from ..data.categories import inside
from ..errors import UserError

MODELS = {"train": TrainRunConfig, "dpo": DpoRunConfig, "distill": DistillRunConfig}
# an installed wheel carries the presets as ernie_lora/configs/ (setup.py); a clone has them in configs/
_PACKAGED = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = _PACKAGED if _PACKAGED.is_dir() else Path(__file__).resolve().parents[3] / "configs"
PRESETS = {  # key: (label, recipe, config file)
    "micro-demo": ("micro ERNIE demo (CPU, minutes)", "train", "micro-lora.yaml"),
    "8b-24gb": ("ERNIE-Image 8B LoRA, 24 GB GPU", "train", "ernie-image-lora-24gb.yaml"),
    "8b-80gb": ("ERNIE-Image 8B LoRA, 80 GB GPU", "train", "ernie-image-lora.yaml"),
    "dpo": ("DPO on preference pairs (micro proof)", "dpo", "micro-dpo.yaml"),
    "turbo": ("Turbo distillation, 2 steps (micro)", "distill", "micro-turbo.yaml"),
}


def preset(key: str) -> dict:
    """A preset's recipe and config (as a plain dict, its dataset path left for the studio to set)."""
    if key not in PRESETS:
        raise UserError(f"preset {key!r}: choose from {', '.join(PRESETS)}")
    label, recipe, file = PRESETS[key]
    path = CONFIGS / file
    if not path.is_file():
        raise UserError(f"preset {key}: {path} is missing (reinstall ernie-lora, or run the studio from a clone)")
    config = safe_load_yaml(path.read_text(encoding="utf-8"), str(path)) or {}
    if recipe == "train":
        config.setdefault("data", {}).pop("path", None)
    return {"key": key, "label": label, "recipe": recipe, "config": config}


def fields(recipe: str) -> list[dict]:
    """The form: one entry per key (dotted), with its type, default, bounds, choices and help."""
    schema = MODELS[recipe].model_json_schema()
    defs = schema.get("$defs", {})
    out: list[dict] = []

    def resolve(node: dict) -> dict:
        while "$ref" in node:
            node = defs[node["$ref"].rsplit("/", 1)[1]]
        return node

    def walk(node: dict, prefix: str) -> None:
        for name, prop in resolve(node).get("properties", {}).items():
            key = f"{prefix}{name}"
            options = [resolve(p) for p in prop.get("anyOf", [prop])]
            nullable = any(o.get("type") == "null" for o in options)
            main = next((o for o in options if o.get("type") != "null"), options[0])
            if main.get("type") == "object" and "properties" in main:
                walk(main, key + ".")
                continue
            kind = main.get("type", "json")
            if "enum" in main:
                kind = "enum"
            elif kind not in ("integer", "number", "string", "boolean"):
                kind = "json"  # lists and mappings: edited as JSON
            out.append({"key": key, "type": kind, "nullable": nullable, "default": prop.get("default"),
                        "enum": main.get("enum"), "minimum": main.get("minimum", main.get("exclusiveMinimum")),
                        "maximum": main.get("maximum", main.get("exclusiveMaximum")),
                        "help": prop.get("description") or main.get("description") or ""})

    walk(schema, "")
    return out


def _get(data: dict, dotted: str):
    node = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def validate(recipe: str, config: dict, root: Path, job_dir: Path, dataset: Path | None = None
             ) -> tuple[dict, list[dict]]:
    """(the config as it will be written, its problems as ``{key, message}``): pydantic's checks, and
    every path it names must lie inside the studio's folder."""
    if recipe not in MODELS:
        return config, [{"key": "recipe", "message": f"{recipe!r}: choose from {', '.join(MODELS)}"}]
    if not isinstance(config, dict):
        return {}, [{"key": "", "message": "the config must be a mapping of sections"}]
    config = copy.deepcopy(config)
    if dataset is not None and recipe == "train":
        config.setdefault("data", {})["path"] = str(dataset)
    problems = []
    model = MODELS[recipe]
    try:
        model.model_validate(config)
    except ValidationError as exc:
        for err in exc.errors():
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
            problems.append({"key": ".".join(str(p) for p in err["loc"]), "message": msg})
    named = [(dotted, _get(config, dotted)) for dotted in model.PATHS]
    named += [(f"teachers.{i}.lora", t.get("lora")) for i, t in enumerate(config.get("teachers") or [])
              if isinstance(t, dict)]
    name = _get(config, "model.name")
    if isinstance(name, str) and name.startswith((".", "/", "~")):
        named.append(("model.name", name))
    for dotted, value in named:
        if isinstance(value, str) and value and not inside(root, (job_dir / Path(value).expanduser()).resolve()):
            problems.append({"key": dotted, "message": f"{value!r} is outside the studio folder {root}"})
    return config, problems


def to_yaml(config: dict) -> str:
    return yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
