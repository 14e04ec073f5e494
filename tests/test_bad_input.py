"""Every bad input of the spine: a one-line error naming the file or key, and nothing written over."""

import hashlib
import pickle

import pytest
import torch
import yaml
from PIL import Image

from conftest import run_cli, tiny_config
from test_generate import make_lora


def _config_file(tmp_path, dataset, **overrides):
    cfg = tiny_config(dataset, tmp_path / "cache", **overrides)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return path


def _one_line_error(code, err):
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip() and "%|" not in ln]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def _tree_digest(folder):
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_missing_dataset(tmp_path, capsys):
    cfg = _config_file(tmp_path, tmp_path / "nowhere")
    line = _one_line_error(*run_cli(["train", str(cfg), "-o", str(tmp_path / "run")], capsys)[::2])
    assert "nowhere: not a folder" in line


def test_empty_dataset(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    cfg = _config_file(tmp_path, tmp_path / "empty")
    line = _one_line_error(*run_cli(["train", str(cfg), "-o", str(tmp_path / "run")], capsys)[::2])
    assert "no images found" in line


@pytest.mark.parametrize("corrupt, expected", [
    (lambda d: (d / "poster_00000.png").write_bytes(b""), "poster_00000.png: zero-byte file"),
    (lambda d: (d / "poster_00001.png").write_bytes((d / "poster_00001.png").read_bytes()[:60]), "poster_00001.png:"),
    (lambda d: [(d / "poster_00002.txt").unlink(), (d / "metadata.jsonl").unlink()],
     "poster_00002.png: missing caption"),
    (lambda d: (d / "poster_00003.txt").write_bytes(b"\xff\xfe bad"), "poster_00003.txt: caption is not UTF-8"),
])
def test_each_kind_of_corrupt_file_stops_training(poster_dataset, tmp_path, capsys, corrupt, expected):
    corrupt(poster_dataset)
    cfg = _config_file(tmp_path, poster_dataset)
    line = _one_line_error(*run_cli(["train", str(cfg), "-o", str(tmp_path / "run")], capsys)[::2])
    assert expected in line and "ernie-lora dataset check" in line
    assert not (tmp_path / "run" / "lora.safetensors").exists()
    assert not (tmp_path / "run" / "config.yaml").exists()  # after fixing the data, the same command works


@pytest.mark.parametrize("override, key", [("lora.rank=0", "lora.rank"), ("train.lr=0", "train.lr"),
                                           ("train.lr=-1", "train.lr"), ("lora.rank=-4", "lora.rank")])
def test_rank_and_lr_must_be_positive(poster_dataset, tmp_path, capsys, override, key):
    cfg = _config_file(tmp_path, poster_dataset)
    line = _one_line_error(*run_cli(["train", str(cfg), "--set", override, "-o", str(tmp_path / "r")], capsys)[::2])
    assert f"{key}: Input should be greater than 0" in line and "cfg.yaml" in line


def test_existing_run_is_refused_and_untouched(poster_dataset, tmp_path, capsys):
    cfg = _config_file(tmp_path, poster_dataset)
    run = tmp_path / "run"
    assert run_cli(["train", str(cfg), "-o", str(run)], capsys)[0] == 0
    before = _tree_digest(run)
    line = _one_line_error(*run_cli(["train", str(cfg), "-o", str(run)], capsys)[::2])
    assert "already holds a run (config.yaml, run.json" in line
    assert line.endswith("; pass --resume to continue it or --overwrite to replace it")
    assert _tree_digest(run) == before
    # --resume of a finished run changes nothing either; --overwrite replaces it
    assert run_cli(["train", str(cfg), "-o", str(run), "--resume"], capsys)[0] == 0
    assert run_cli(["train", str(cfg), "-o", str(run), "--overwrite", "--set", "train.steps=2"], capsys)[0] == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002"]


def test_resume_needs_a_checkpoint_and_the_same_config(poster_dataset, tmp_path, capsys):
    cfg = _config_file(tmp_path, poster_dataset)
    line = _one_line_error(*run_cli(["train", str(cfg), "-o", str(tmp_path / "new"), "--resume"], capsys)[::2])
    assert "no checkpoint to resume from" in line
    run_cli(["train", str(cfg), "-o", str(tmp_path / "run")], capsys)
    line = _one_line_error(*run_cli(["train", str(cfg), "-o", str(tmp_path / "run"), "--resume",
                                     "--set", "lora.rank=8", "--set", "train.lr=0.002"], capsys)[::2])
    assert "config differs from the run" in line and "pass --force" in line
    assert "lora.rank (4 -> 8), train.lr (0.001 -> 0.002)" in line  # every differing key, in one line
    # where and how often to save, and for how long, may change
    code, _, err = run_cli(["train", str(cfg), "-o", str(tmp_path / "run"), "--resume", "--set",
                            "checkpoint.every=3", "--set", "train.steps=7"], capsys)
    assert code == 0, err
    code, _, err = run_cli(["train", str(cfg), "-o", str(tmp_path / "run"), "--resume", "--force",
                            "--set", "train.lr=0.002", "--set", "train.steps=8"], capsys)
    assert code == 0, err
    import json

    starts = json.loads((tmp_path / "run" / "run.json").read_text())["starts"]
    assert [s["resumed"] for s in starts] == [False, True, True]
    assert all(s["ernie_lora"] and s["git_commit"] and s["command"] for s in starts)
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train"]["lr"] == 0.002

    # a run begun before a config key existed resumes: the missing key takes its default
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    del saved["data"]["sampling"], saved["model"]["block_swap"]
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(saved))
    code, out, err = run_cli(["train", str(cfg), "-o", str(tmp_path / "run"), "--resume", "--set", "train.lr=0.002",
                              "--set", "train.steps=8"], capsys)
    assert code == 0 and "already complete" in out, err
    # a run whose config.yaml is gone is refused: nothing says how it was trained
    (tmp_path / "run" / "config.yaml").unlink()
    line = _one_line_error(*run_cli(["train", str(cfg), "-o", str(tmp_path / "run"), "--resume",
                                     "--set", "train.steps=8"], capsys)[::2])
    assert "config.yaml is missing" in line and "--force" in line


def test_lora_that_does_not_match_the_model(tmp_path, capsys):
    good = make_lora(tmp_path / "good.safetensors")
    from ernie_lora.lora.files import read_lora, save_lora

    tensors, _ = read_lora(good)
    tensors["transformer.layers.0.self_attention.to_q.lora_A.weight"] = torch.zeros(4, 99)
    tensors["transformer.layers.7.self_attention.to_q.lora_A.weight"] = torch.zeros(4, 64)
    tensors["transformer.layers.7.self_attention.to_q.lora_B.weight"] = torch.zeros(64, 4)
    bad = save_lora(tmp_path / "bad.safetensors", tensors)
    line = _one_line_error(*run_cli(["generate", "x", "-m", "tiny", "--width", "32", "--height", "32",
                                     "--lora", str(bad), "-o", str(tmp_path / "o")], capsys)[::2])
    assert "bad.safetensors does not match the model" in line
    assert "layers.0.self_attention.to_q shape [64, 99] != the model's [64, 64]" in line
    assert "layers.7.self_attention.to_q (no such layer in the model)" in line
    assert not (tmp_path / "o").exists()


class _Trap:
    def __reduce__(self):
        return (open, ("/tmp/ernie-lora-unpickled-marker", "w"))


@pytest.mark.parametrize("name", ["evil.pt", "evil.safetensors", "evil.ckpt"])
def test_pickled_lora_is_refused_never_unpickled(tmp_path, capsys, name):
    import os

    marker = "/tmp/ernie-lora-unpickled-marker"
    if os.path.exists(marker):
        os.unlink(marker)
    path = tmp_path / name
    path.write_bytes(pickle.dumps({"w": _Trap()}))
    line = _one_line_error(*run_cli(["generate", "x", "-m", "tiny", "--width", "32", "--height", "32",
                                     "--lora", str(path), "-o", str(tmp_path / "o")], capsys)[::2])
    assert name in line and ("only .safetensors" in line or "not a valid safetensors" in line)
    assert not os.path.exists(marker)


def test_missing_lora_file_and_init_from_mismatch(poster_dataset, tmp_path, capsys):
    line = _one_line_error(*run_cli(["generate", "x", "-m", "tiny", "--lora", str(tmp_path / "nope.safetensors")],
                                    capsys)[::2])
    assert "nope.safetensors: no such file" in line
    other = make_lora(tmp_path / "r8.safetensors", rank=8)
    from ernie_lora.lora.files import read_lora, save_lora

    tensors = {k: v[:, :3] if ".lora_B." in k else v[:3] for k, v in read_lora(other)[0].items()}

    mism = save_lora(tmp_path / "mism.safetensors", tensors)
    cfg = _config_file(tmp_path, poster_dataset, lora={"init_from": str(mism)})
    code, _, err = run_cli(["train", str(cfg), "-o", str(tmp_path / "run")], capsys)
    line = _one_line_error(code, err)
    assert "lora.init_from" in line and "mism.safetensors does not match the configured adapter" in line
    assert "has rank 3 (rank 4)" in line


def test_bad_image_size_for_dataset_check_is_only_a_warning(tmp_path, capsys):
    d = tmp_path / "d"
    d.mkdir()
    Image.new("RGB", (8, 8)).save(d / "a.png")
    (d / "a.txt").write_text("tiny")
    code, out, _ = run_cli(["dataset", "check", str(d)], capsys)
    assert code == 0 and "warning: a.png: 8x8 is smaller than its bucket 1024x1024; it will be upscaled 128.00x" in out
