"""Every key a recipe's train: section accepts changes what that recipe does, or is refused in one line;
a key a recipe cannot honour is not in its config at all."""

import json
from dataclasses import dataclass

import pytest
import torch
from pydantic import BaseModel
from safetensors.torch import load_file

from conftest import tiny_config
from ernie_lora.config import DistillRunConfig, DpoRunConfig, TrainRunConfig, load_yaml_model
from ernie_lora.errors import UserError

BASE = {"steps": 2, "batch_size": 2, "lr": 1e-2, "mixed_precision": "no", "gradient_checkpointing": False,
        "seed": 3, "max_grad_norm": 1.0, "compile": False}
# a value other than the baseline's for every key any recipe accepts
CHANGES = {
    "steps": 3, "batch_size": 1, "grad_accum": 2, "lr": 3e-2, "lr_scheduler": "linear", "warmup_steps": 2,
    "optimizer": "adamw8bit", "weight_decay": 0.5, "betas": [0.5, 0.9], "max_grad_norm": 1e-8,
    "mixed_precision": "bf16", "gradient_checkpointing": True, "compile": True, "seed": 4, "device": "cuda",
    "timesteps.sampling": "uniform", "timesteps.logit_mean": 1.5, "timesteps.logit_std": 0.3,
    "timesteps.shift": "none", "fsdp": True,
    # two stages adding up to BASE's 2 steps, the second at its own lr
    "stages": [{"resolution": 32, "steps": 1}, {"resolution": 32, "steps": 1, "lr": 0.05}],
}
# refused on this CPU machine, with the line users get
REFUSED = {"optimizer": "adamw8bit needs", "device": "has no CUDA GPU"}
RECIPES = {"train": TrainRunConfig, "dpo": DpoRunConfig, "distill": DistillRunConfig}


def train_keys(config: type[BaseModel]) -> list[str]:
    """Every leaf key of a run config's train: section, dotted (timesteps.shift)."""
    def walk(model: type[BaseModel], prefix: str) -> list[str]:
        keys = []
        for name, info in model.model_fields.items():
            kind = info.annotation
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                keys += walk(kind, f"{prefix}{name}.")
            else:
                keys.append(prefix + name)
        return keys
    return walk(config.model_fields["train"].annotation, "")


@dataclass
class Observed:
    weights: dict[str, torch.Tensor]
    setup: dict
    compiled: int
    printed: str


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from ernie_lora.data.synthetic import write_synthetic_dataset

    root = tmp_path_factory.mktemp("keys")
    data = write_synthetic_dataset(root / "data", count=4, kind="poster", seed=1, size=32)
    meta = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": a["text"], "chosen": str(data / a["file_name"]),
                                         "rejected": str(data / b["file_name"])}) + "\n"
                             for a, b in zip(meta[0::2], meta[1::2], strict=True)))
    return root, data, pairs


def _nested(train: dict) -> dict:
    out: dict = {}
    for key, value in train.items():
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def run_recipe(recipe: str, world, name: str, change: dict, monkeypatch, capsys) -> Observed:
    from diffusers import ErnieImageTransformer2DModel

    from ernie_lora.recipes.distill import run_distill
    from ernie_lora.recipes.dpo import run_dpo
    from ernie_lora.recipes.lora import train

    root, data, pairs = world
    compiled = []  # compiling for real takes a minute on a CPU: the call itself is what the key changes
    monkeypatch.setattr(ErnieImageTransformer2DModel, "compile_repeated_blocks", lambda self: compiled.append(1))
    train_section = _nested({**BASE, **change})
    out, cache = root / recipe / name, root / f"cache-{recipe}"
    common = {"model": {"name": "tiny", "dtype": "fp32"}, "lora": {"rank": 4, "alpha": 8},
              "checkpoint": {"every": 50, "keep": 1}}
    if recipe == "train":
        cfg = tiny_config(data, cache, train=train_section, checkpoint=common["checkpoint"])
        result = train(cfg, out, progress=False)
    elif recipe == "dpo":
        cfg = DpoRunConfig.model_validate({**common, "train": train_section, "dpo": {"beta": 500.0},
                                           "data": {"pairs": str(pairs), "resolution": 32, "cache_dir": str(cache)}})
        result = run_dpo(cfg, out, progress=False)
    else:
        cfg = DistillRunConfig.model_validate({
            **common, "train": train_section, "distill": {"student_steps": 2, "fake_updates": 1},
            "teachers": [{"guidance": 2.0}], "data": {"synthetic_prompts": 4, "resolution": 32,
                                                      "cache_dir": str(cache)}})
        result = run_distill(cfg, out, progress=False)
    return Observed(load_file(out / "lora.safetensors"), result.setup, len(compiled), capsys.readouterr().out)


@pytest.fixture(scope="module")
def baselines():
    return {}


def _differs(a: Observed, b: Observed) -> bool:
    weights = a.weights.keys() != b.weights.keys() or any(not torch.equal(a.weights[k], b.weights[k])
                                                           for k in a.weights)
    return weights or a.setup != b.setup or a.compiled != b.compiled


def test_every_key_has_a_change_to_check():
    for recipe, config in RECIPES.items():
        missing = set(train_keys(config)) - set(CHANGES)
        assert not missing, f"{recipe}: add a value for {sorted(missing)} to CHANGES (and see that it changes the run)"


@pytest.mark.parametrize("recipe, key", [(r, k) for r, c in RECIPES.items() for k in train_keys(c)])
def test_each_accepted_train_key_changes_what_the_recipe_does(recipe, key, world, baselines, monkeypatch, capsys):
    if key == "device" and torch.cuda.is_available():
        pytest.skip("a CUDA machine runs train.device: cuda")
    if recipe not in baselines:
        baselines[recipe] = run_recipe(recipe, world, "baseline", {}, monkeypatch, capsys)
    change = {key: CHANGES[key]}
    if key in REFUSED:
        with pytest.raises(UserError, match=REFUSED[key]):
            run_recipe(recipe, world, key, change, monkeypatch, capsys)
        return
    observed = run_recipe(recipe, world, key, change, monkeypatch, capsys)
    if key == "fsdp":  # one process has nothing to shard; tests/test_distributed.py runs it in two
        assert "train.fsdp with one process: nothing to shard" in observed.printed
        return
    assert _differs(observed, baselines[recipe]), f"{recipe}: train.{key} = {CHANGES[key]!r} changed nothing"


@pytest.mark.parametrize("config, key", [
    (DistillRunConfig, "train.timesteps"), (DistillRunConfig, "train.fsdp"), (DistillRunConfig, "model.quantize"),
    (DistillRunConfig, "model.block_swap"), (DpoRunConfig, "train.fsdp"), (DpoRunConfig, "model.block_swap"),
])
def test_a_key_a_recipe_cannot_honour_is_refused(config, key, tmp_path):
    section, leaf = key.split(".")
    path = tmp_path / "cfg.yaml"
    extra = {"data": {"pairs": "p.jsonl"}} if config is DpoRunConfig else {}
    path.write_text(json.dumps({**extra, section: {leaf: {"sampling": "uniform"} if leaf == "timesteps" else 1}}))
    with pytest.raises(UserError, match=rf"{key}: unknown key"):
        load_yaml_model(path, config)
