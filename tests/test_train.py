import json
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from PIL import Image

from conftest import REPO, tiny_config
from ernie_lora.config import load_train_config
from ernie_lora.data.cache import load_embedding, load_latent
from ernie_lora.flow import noisy_latents, velocity_target
from ernie_lora.lora.adapters import set_lora_state
from ernie_lora.lora.files import read_lora
from ernie_lora.models import ERNIE_IMAGE, build_tiny_pipeline
from ernie_lora.recipes.lora import train


def _same_lora(a_path, b_path) -> bool:
    a, _ = read_lora(a_path)
    b, _ = read_lora(b_path)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_run_writes_lora_plots_samples_and_keeps_last_checkpoints(poster_dataset, tmp_path):
    cfg = tiny_config(poster_dataset, tmp_path / "cache",
                      sample={"every": 3, "prompts": ['a poster with title "SALE"', "blue theme"], "steps": 2})
    result = train(cfg, tmp_path / "run", progress=False)
    run = tmp_path / "run"
    assert result.steps_done == 6
    assert Image.open(run / "metrics.png").format == "PNG"
    # step 0 is the base's samples: the report's "before"
    assert [p.name for p in sorted((run / "samples").glob("*.png"))] == ["step-000000.png", "step-000003.png",
                                                                          "step-000006.png"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000004", "step-000006"]
    report = (run / "report.md").read_text()
    assert "6 steps" in report and "samples/step-000000.png" not in report and "lora.safetensors" in report
    assert Image.open(run / "report.png").size[1] > 300  # curves and the before/after grid
    rows = (run / "metrics.csv").read_text().splitlines()
    assert rows[0] == "step,loss,lr,grad_norm" and len(rows) == 7
    tensors, meta = read_lora(run / "lora.safetensors")
    assert all(k.startswith("transformer.") and (".lora_A." in k or ".lora_B." in k) for k in tensors)
    assert any("mlp.gate_proj" in k for k in tensors) and any("to_out.0" in k for k in tensors)
    peft = json.loads(meta["lora_adapter_metadata"])
    # the scale alpha / rank = 2 is folded into lora_B: the file says alpha = rank; the trained settings stay
    assert peft["transformer.r"] == 4 and peft["transformer.lora_alpha"] == 4
    assert (meta["ernie_lora.rank"], meta["ernie_lora.alpha"], meta["ernie_lora.scale_folded"]) == ("4", "8.0", "2.0")
    assert json.loads(meta["ernie_lora.steps"]) == 6 and json.loads(meta["ernie_lora.image_count"]) == 6
    assert meta["ernie_lora.base_model"] == "tiny" and len(meta["ernie_lora.dataset_hash"]) == 64
    assert yaml.safe_load((run / "config.yaml").read_text())["lora"]["rank"] == 4


@pytest.mark.parametrize("extra", [{}, {"lora": {"dropout": 0.2}, "train": {"grad_accum": 2}}])
def test_resume_is_bit_exact(poster_dataset, tmp_path, extra):
    cfg = tiny_config(poster_dataset, tmp_path / "cache", **extra)
    train(cfg, tmp_path / "straight", progress=False)
    # stopped after step 3; the last checkpoint is step 2, so step 3 is redone after the resume
    train(cfg, tmp_path / "resumed", stop_after=3, progress=False)
    assert not (tmp_path / "resumed" / "lora.safetensors").exists()
    train(cfg, tmp_path / "resumed", resume=True, progress=False)
    assert _same_lora(tmp_path / "straight" / "lora.safetensors", tmp_path / "resumed" / "lora.safetensors")
    assert (tmp_path / "straight" / "metrics.csv").read_text() == (tmp_path / "resumed" / "metrics.csv").read_text()


def test_killed_process_resumes_to_identical_weights(poster_dataset, tmp_path):
    """A real SIGKILL mid-run (whatever it interrupts), then --resume, equals an uninterrupted run."""
    overrides = {"train": {"steps": 14}, "checkpoint": {"every": 3, "keep": 2}}
    cfg = tiny_config(poster_dataset, tmp_path / "cache", **overrides)
    config_file = tmp_path / "cfg.yaml"
    config_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "ernie_lora.cli", "train", str(config_file), "--output", str(run)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "checkpoints" / "step-000006").exists() and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "lora.safetensors").exists(), "the run finished before it could be killed"
    train(cfg, run, resume=True, progress=False)  # the kill is what needs a process of its own
    train(cfg, tmp_path / "straight", progress=False)
    assert _same_lora(tmp_path / "straight" / "lora.safetensors", run / "lora.safetensors")
    # whatever the kill interrupted, the resumed run left no temp file and every checkpoint is whole
    from ernie_lora.recipes.run_dir import checkpoint_problem

    assert not [p for p in run.rglob("*") if p.name.startswith(".tmp") or p.name.endswith(".tmp")]
    assert all(checkpoint_problem(c) is None for c in (run / "checkpoints").iterdir())


def test_sigterm_stops_after_a_step_with_a_checkpoint_and_resume_finishes_the_same(poster_dataset, tmp_path,
                                                                                   monkeypatch):
    """Stop (SIGTERM, what the studio sends) lands between steps: a checkpoint of that step, RunStopped, and
    --resume then equals an uninterrupted run."""
    import inspect
    import os

    from ernie_lora.errors import RunStopped
    from ernie_lora.recipes import engine

    cfg = tiny_config(poster_dataset, tmp_path / "cache", train={"steps": 8}, checkpoint={"every": 4, "keep": 3})
    real = engine.train_steps

    def signalled_at_step_5(*args, **kwargs):
        bound = inspect.signature(real).bind(*args, **kwargs)
        on_step = bound.arguments.get("on_step")

        def signalling(step):
            if on_step is not None:
                on_step(step)
            if step == 5:
                os.kill(os.getpid(), signal.SIGTERM)  # through the handler open_run installed
        bound.arguments["on_step"] = signalling
        return real(*bound.args, **bound.kwargs)

    monkeypatch.setattr(engine, "train_steps", signalled_at_step_5)
    with pytest.raises(RunStopped, match="stopped at step 5"):
        train(cfg, tmp_path / "stopped", progress=False)
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "stopped" / "checkpoints").iterdir()) == ["step-000004", "step-000005"]
    assert not (tmp_path / "stopped" / "lora.safetensors").exists()
    train(cfg, tmp_path / "stopped", resume=True, progress=False)
    train(cfg, tmp_path / "straight", progress=False)
    assert _same_lora(tmp_path / "straight" / "lora.safetensors", tmp_path / "stopped" / "lora.safetensors")
    assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL  # the handler stays; the flag is cleared per run


def test_caption_dropout_uses_the_cached_empty_embedding(poster_dataset, tmp_path):
    """Dropout 1.0 on real captions trains exactly like dropout 0.0 on empty captions."""
    dropped = train(tiny_config(poster_dataset, tmp_path / "c1", data={"caption_dropout": 1.0}), tmp_path / "a",
                    progress=False)
    for txt in poster_dataset.glob("*.txt"):
        txt.write_text("")
    empty = train(tiny_config(poster_dataset, tmp_path / "c2", data={"caption_dropout": 0.0}), tmp_path / "b",
                  progress=False)
    assert _same_lora(tmp_path / "a" / "lora.safetensors", tmp_path / "b" / "lora.safetensors")
    assert dropped.final_loss == empty.final_loss


def _flow_loss(transformer, cached, seed=0, draws=8) -> float:
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    with torch.no_grad():
        for _ in range(draws):
            for s in cached.samples:
                x0 = load_latent(s.latent)[None]
                text = load_embedding(s.text)
                noise = torch.randn(x0.shape, generator=g)
                sigma = torch.rand(1, generator=g) * 0.8 + 0.1
                pred = ERNIE_IMAGE.predict_velocity(transformer, noisy_latents(x0, noise, sigma), sigma, [text])
                total += torch.nn.functional.mse_loss(pred, velocity_target(x0, noise)).item()
    return total / (draws * len(cached.samples))


def test_training_lowers_the_flow_loss_on_its_data(poster_dataset, tmp_path):
    cfg = tiny_config(poster_dataset, tmp_path / "cache", train={"steps": 60, "lr": 1e-2},
                      data={"caption_dropout": 0.0}, checkpoint={"every": 60})
    result = train(cfg, tmp_path / "run", progress=False)
    pipe = build_tiny_pipeline(0)
    before = _flow_loss(pipe.transformer, result.cache)
    pipe.load_lora_weights(str(tmp_path / "run" / "lora.safetensors"))
    after = _flow_loss(pipe.transformer, result.cache)
    assert after < 0.92 * before, (before, after)  # measured: 0.87


def test_lora_loads_unchanged_in_diffusers_and_alpha_is_honoured(poster_dataset, tmp_path):
    cfg = tiny_config(poster_dataset, tmp_path / "cache", lora={"rank": 4, "alpha": 2})
    train(cfg, tmp_path / "run", progress=False)
    path = tmp_path / "run" / "lora.safetensors"
    pipe = build_tiny_pipeline(0)
    pipe.load_lora_weights(str(path), adapter_name="mine")
    config = pipe.transformer.peft_config["mine"]
    assert (config.r, config.lora_alpha) == (4, 4)  # the file folds alpha / rank = 0.5 into lora_B
    layer = pipe.transformer.layers[0].self_attention.to_q
    assert layer.scaling["mine"] == pytest.approx(1.0)
    # the adapter diffusers built computes the trained update: 0.5 * B @ A of the raw (checkpointed) weights
    raw, _ = read_lora(tmp_path / "run" / "checkpoints" / "step-000006" / "lora.safetensors")
    a = raw["transformer.layers.0.self_attention.to_q.lora_A.weight"]
    b = raw["transformer.layers.0.self_attention.to_q.lora_B.weight"]
    x = torch.randn(3, layer.in_features)
    torch.testing.assert_close(layer(x) - layer.base_layer(x), x @ (0.5 * b @ a).T, rtol=1e-5, atol=1e-6)
    # and set_lora_state round-trips the checkpoint's raw weights
    other = build_tiny_pipeline(0).transformer
    from ernie_lora.lora.adapters import add_lora

    add_lora(other, 4, 2, ["to_q", "to_k", "to_v", "to_out.0", "gate_proj", "up_proj", "linear_fc2"])
    set_lora_state(other, raw)
    torch.testing.assert_close(other.layers[0].self_attention.to_q(x), layer(x))


def test_shipped_tiny_config_trains_from_the_repo(tmp_path):
    cfg = load_train_config(REPO / "configs" / "tiny-lora.yaml", [f"data.cache_dir={tmp_path / 'cache'}"])
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.steps_done == cfg.train.steps
    assert (tmp_path / "run" / "lora.safetensors").exists() and (tmp_path / "run" / "metrics.png").exists()
    assert len(list((tmp_path / "run" / "samples").glob("*.png"))) == 3  # steps 0, 6 and 12


def test_gradient_checkpointing_trains_the_same_lora(poster_dataset, tmp_path):
    plain = tiny_config(poster_dataset, tmp_path / "cache", train={"steps": 3}, lora={"dropout": 0.1})
    ckpt = tiny_config(poster_dataset, tmp_path / "cache", train={"steps": 3, "gradient_checkpointing": True},
                       lora={"dropout": 0.1})
    train(plain, tmp_path / "a", progress=False)
    train(ckpt, tmp_path / "b", progress=False)
    a, _ = read_lora(tmp_path / "a" / "lora.safetensors")
    b, _ = read_lora(tmp_path / "b" / "lora.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_bf16_base_with_bf16_autocast_trains_fp32_lora_weights(poster_dataset, tmp_path):
    cfg = tiny_config(poster_dataset, tmp_path / "cache", model={"name": "tiny", "dtype": "bf16"},
                      train={"steps": 3, "mixed_precision": "bf16", "gradient_checkpointing": True})
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.final_loss is not None and torch.isfinite(torch.tensor(result.final_loss))
    tensors, _ = read_lora(tmp_path / "run" / "lora.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    pipe = build_tiny_pipeline(0)
    pipe.to(dtype=torch.bfloat16)
    pipe.load_lora_weights(str(tmp_path / "run" / "lora.safetensors"))  # loads into a bf16 pipeline
    image = pipe("x", height=32, width=32, num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 32, 32, 3)


def test_an_assistant_lora_trains_on_the_base_with_it_fused_and_stays_out_of_the_file(poster_dataset, tmp_path):
    """model.assistant_lora (a Turbo LoRA, say) = training on a base folder with that LoRA fused into it; the
    written LoRA holds only what was trained, and strength 0 is the plain base."""
    from ernie_lora.lora.formats import read_lora_file
    from ernie_lora.lora.tools import fuse_into
    from test_generate import make_lora

    assistant = make_lora(tmp_path / "turbo.safetensors", seed=5, alpha=4.0, std=0.05)
    pipe = build_tiny_pipeline(0)
    fuse_into(pipe.transformer, read_lora_file(assistant).modules, 1.0)
    pipe.save_pretrained(tmp_path / "fused-base")

    def run(out: str, **model_keys) -> dict:
        cfg = tiny_config(poster_dataset, tmp_path / f"cache-{out}", model={"name": "tiny", "dtype": "fp32",
                                                                           **model_keys})
        train(cfg, tmp_path / out, progress=False)
        return read_lora(tmp_path / out / "lora.safetensors")[0]

    with_assistant = run("assistant", assistant_lora=str(assistant))
    on_fused = run("fused", name=str(tmp_path / "fused-base"))
    plain, zero = run("plain"), run("zero", assistant_lora=str(assistant), assistant_strength=0.0)
    assert with_assistant.keys() == plain.keys()  # the trained modules only
    assert all(torch.equal(with_assistant[k], on_fused[k]) for k in plain)
    assert all(torch.equal(zero[k], plain[k]) for k in plain)
    assert not all(torch.equal(with_assistant[k], plain[k]) for k in plain)
