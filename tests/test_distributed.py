"""Two CPU processes (gloo) train the same LoRA as one process with the same global batch."""

import socket
import subprocess
import sys

import torch
import yaml

from conftest import tiny_config
from ernie_lora.lora.files import read_lora
from ernie_lora.recipes.lora import train


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(config, output, *extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "ernie_lora.cli", "train", str(config), "--output", str(output),
           *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _loss_rows(path):
    return [tuple(float(x) for x in line.split(",")) for line in path.read_text().splitlines()[1:]]


def test_two_processes_equal_one_with_the_same_global_batch_and_resume(poster_dataset, tmp_path):
    shared = {"data": {"caption_dropout": 0.3}, "checkpoint": {"every": 2, "keep": 2}}
    single = tiny_config(poster_dataset, tmp_path / "cache", train={"batch_size": 4, "steps": 4}, **shared)
    train(single, tmp_path / "one", progress=False)

    per_process = tiny_config(poster_dataset, tmp_path / "cache", train={"batch_size": 2, "steps": 4}, **shared)
    config = tmp_path / "two.yaml"
    config.write_text(yaml.safe_dump(per_process.model_dump(mode="json")))
    # two processes, with a checkpoint and a resume on the way: 2 steps, then resume to 4
    _torchrun(config, tmp_path / "two", "--set", "train.steps=2")
    _torchrun(config, tmp_path / "two", "--resume")
    a, _ = read_lora(tmp_path / "one" / "lora.safetensors")
    b, _ = read_lora(tmp_path / "two" / "lora.safetensors")
    assert a.keys() == b.keys()
    # all-reduce sums in another order than one process does; Adam amplifies that on near-zero gradients
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
    for (s1, l1, *_), (s2, l2, *_) in zip(_loss_rows(tmp_path / "one" / "metrics.csv"),
                                        _loss_rows(tmp_path / "two" / "metrics.csv"), strict=True):
        assert s1 == s2 and abs(l1 - l2) < 1e-5


def test_fsdp_shards_the_base_and_trains_the_same_lora(poster_dataset, tmp_path):
    """FSDP2 over two processes: the frozen base split in halves, the LoRA equal to one process's, resume
    included; sampling during training runs on both processes (the forward gathers the shards)."""
    shared = {"data": {"caption_dropout": 0.3}, "checkpoint": {"every": 2, "keep": 2},
              "sample": {"every": 2, "prompts": ["a purple poster"], "steps": 2, "width": 32, "height": 32}}
    single = tiny_config(poster_dataset, tmp_path / "cache", train={"batch_size": 4, "steps": 4}, **shared)
    train(single, tmp_path / "one", progress=False)

    sharded = tiny_config(poster_dataset, tmp_path / "cache", train={"batch_size": 2, "steps": 4, "fsdp": True},
                          **shared)
    config = tmp_path / "fsdp.yaml"
    config.write_text(yaml.safe_dump(sharded.model_dump(mode="json")))
    out = _torchrun(config, tmp_path / "fsdp", "--set", "train.steps=2")
    assert "fsdp: the frozen base is sharded over 2 processes" in out
    held = [line for line in out.splitlines() if line.startswith("fsdp: process")]
    assert len(held) == 2, out
    for line in held:  # "fsdp: process R holds H of W frozen block weights": half each, a row's remainder at most
        h, w = int(line.split()[4]), int(line.split()[6])
        assert abs(h - w / 2) <= 64, line
    _torchrun(config, tmp_path / "fsdp", "--resume")
    a, _ = read_lora(tmp_path / "one" / "lora.safetensors")
    b, _ = read_lora(tmp_path / "fsdp" / "lora.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
    assert sorted(p.name for p in (tmp_path / "fsdp" / "samples").iterdir()) == ["step-000000.png", "step-000002.png",
                                                                                  "step-000004.png"]
