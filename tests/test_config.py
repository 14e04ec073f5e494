from pathlib import Path

import pytest

from conftest import REPO
from ernie_lora.config import TrainRunConfig, load_train_config, load_yaml_model
from ernie_lora.errors import UserError

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_validates(path):
    if path.name == "micro-pretrain.yaml":
        from ernie_lora.recipes.pretrain_micro import MicroPretrainConfig

        assert isinstance(load_yaml_model(path, MicroPretrainConfig), MicroPretrainConfig)
    elif path.name == "micro-dpo.yaml":
        from ernie_lora.config import DpoRunConfig, load_dpo_config

        assert isinstance(load_dpo_config(path), DpoRunConfig)
    elif path.name == "micro-turbo.yaml":
        from ernie_lora.config import DistillRunConfig, load_distill_config

        assert isinstance(load_distill_config(path), DistillRunConfig)
    else:
        assert isinstance(load_train_config(path), TrainRunConfig)


def test_8b_config_holds_the_defaults_users_expect():
    cfg = load_train_config(REPO / "configs" / "ernie-image-lora.yaml")
    assert cfg.model.name == "baidu/ERNIE-Image"
    assert (cfg.lora.rank, cfg.train.lr, cfg.train.steps, cfg.train.batch_size) == (16, 1e-4, 3000, 1)
    assert cfg.data.resolution == 1024 and cfg.train.mixed_precision == "bf16" and cfg.model.dtype == "bf16"
    assert cfg.train.gradient_checkpointing and cfg.lora.targets == "attn_mlp"


def test_defaults_work_without_a_file():
    cfg = TrainRunConfig()
    assert cfg.lora.rank == 16 and cfg.train.timesteps.shift == "official"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text, message",
    [
        ("lora:\n  rnak: 4\n", r"lora\.rnak: unknown key"),
        ("trian:\n  steps: 4\n", r"trian: unknown key"),
        ("lora:\n  rank: 0\n", r"lora\.rank: Input should be greater than 0 \(got 0\)"),
        ("lora:\n  rank: -2\n", r"lora\.rank: Input should be greater than 0"),
        ("train:\n  lr: 0\n", r"train\.lr: Input should be greater than 0"),
        ("train:\n  lr: -1e-4\n", r"train\.lr: Input should be greater than 0"),
        ("train:\n  steps: many\n", r"train\.steps: Input should be a valid integer"),
        ("lora:\n  targets: everything\n", r"lora\.targets"),
        ("data:\n  caption_dropout: 2\n", r"data\.caption_dropout"),
        ("lora: [1, 2\n", r"c\.yaml:2: invalid YAML"),
        ("- a\n- b\n", r"top level must be a mapping"),
    ],
)
def test_bad_configs_fail_naming_the_key(tmp_path, text, message):
    with pytest.raises(UserError, match=message) as info:
        load_train_config(_write(tmp_path, text))
    assert "\n" not in str(info.value)
    assert "c.yaml" in str(info.value)


def test_set_overrides_and_relative_paths(tmp_path):
    path = _write(tmp_path, "data:\n  path: imgs\nlora:\n  rank: 8\n")
    cfg = load_train_config(path, ["lora.rank=32", "train.lr=5e-5", "lora.targets=[to_q, to_v]"])
    assert cfg.lora.rank == 32 and cfg.train.lr == 5e-5 and cfg.lora.targets == ["to_q", "to_v"]
    assert cfg.data.path == str((tmp_path / "imgs").resolve())
    with pytest.raises(UserError, match="expected key.sub=value"):
        load_train_config(path, ["lora.rank"])
    with pytest.raises(UserError, match=r"lora\.rank"):
        load_train_config(path, ["lora.rank=0"])
    with pytest.raises(UserError, match="no such file"):
        load_train_config(tmp_path / "missing.yaml")
