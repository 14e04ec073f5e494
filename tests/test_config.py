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
        ("train:\n  stages: []\n", r"train\.stages: give at least one stage"),
        ("train:\n  stages: [{resolution: 32}]\n", r"train\.stages\.0\.steps: Field required"),
        ("train:\n  stages: [{resolution: 32, steps: 2, rate: 1}]\n", r"train\.stages\.0\.rate: unknown key"),
        ("train:\n  steps: 3\n  stages: [{resolution: 32, steps: 2}]\n", r"stages add up to 2 steps"),
        ("data:\n  validation: 0.9\n", r"data\.validation: .*between 0 and 0\.5"),
        ("checkpoint:\n  best: fidelity\n", r"checkpoint\.best: Input should be 'val_loss', 'layout' or 'text'"),
        ("checkpoint:\n  best: text\n", r"checkpoint\.best: text is chosen on validation"),
        ("validation:\n  sigmas: [0, 0.5]\n", r"validation\.sigmas: give at least one sigma"),
        ("logging:\n  trackers: [mlflow]\n", r"logging\.trackers\.0: Input should be 'tensorboard' or 'wandb'"),
    ],
)
def test_bad_configs_fail_naming_the_key(tmp_path, text, message):
    with pytest.raises(UserError, match=message) as info:
        load_train_config(_write(tmp_path, text))
    assert "\n" not in str(info.value)
    assert "c.yaml" in str(info.value)


def test_set_overrides_and_relative_paths(tmp_path, monkeypatch):
    path = _write(tmp_path, "data:\n  path: imgs\nlora:\n  rank: 8\n")
    cfg = load_train_config(path, ["lora.rank=32", "train.lr=5e-5", "lora.targets=[to_q, to_v]"])
    assert cfg.lora.rank == 32 and cfg.train.lr == 5e-5 and cfg.lora.targets == ["to_q", "to_v"]
    assert cfg.data.path == str((tmp_path / "imgs").resolve())
    with pytest.raises(UserError, match="expected key.sub=value"):
        load_train_config(path, ["lora.rank"])
    # a path typed with --set is relative to where it was typed, not to the config file
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_train_config(path, ["data.path=mine", "data.cache_dir=../c"])
    assert (cfg.data.path, cfg.data.cache_dir) == (str(elsewhere / "mine"), str(tmp_path / "c"))
    with pytest.raises(UserError, match=r"lora\.rank"):
        load_train_config(path, ["lora.rank=0"])
    with pytest.raises(UserError, match="no such file"):
        load_train_config(tmp_path / "missing.yaml")


def test_the_micro_lora_config_trains_a_dataset_end_to_end(tmp_path, capsys, monkeypatch):
    """configs/micro-lora.yaml, shrunk, as the README runs it: validation, best checkpoint, samples, report."""
    from conftest import run_cli
    from ernie_lora.data.synthetic import write_synthetic_dataset

    write_synthetic_dataset(tmp_path / "data" / "my-posters", 12, "poster", 0, ("purple",))
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(["train", str(REPO / "configs" / "micro-lora.yaml"), "--set", "data.path=data/my-posters",
                              "--output", "runs/mine", "--set", "train.steps=4", "--set", "train.warmup_steps=1",
                              "--set", "checkpoint.every=2", "--set", "validation.every=2", "--set",
                              "validation.samples=1", "--set", "sample.every=2", "--set", "sample.steps=2"], capsys)
    assert code == 0, err
    run = tmp_path / "runs" / "mine"
    assert (tmp_path / "data" / "my-posters" / ".ernie_lora_cache").is_dir()  # the cache in the dataset folder
    assert (run / "best" / "lora.safetensors").exists() and (run / "lora.safetensors").exists()
    assert "| step | val_loss | layout |" in (run / "report.md").read_text()
    assert "checkpoint" in out + err and f"report: {Path('runs/mine/report.md')}" in out
