"""Training you can watch: the resolution curriculum, validation and the best checkpoint, live output (lines,
JSON, TensorBoard) and the report every run ends with."""

import csv
import json

import pytest
import torch
from PIL import Image

from conftest import tiny_config
from ernie_lora.config import TrainRunConfig
from ernie_lora.data.synthetic import write_synthetic_dataset
from ernie_lora.lora.files import read_lora
from ernie_lora.recipes.lora import train
from ernie_lora.recipes.validation import BestCheckpoint

STAGES = [{"resolution": 32, "steps": 3}, {"resolution": 64, "steps": 3, "lr": 5e-4, "batch_size": 1}]


@pytest.fixture
def posters64(tmp_path):
    return write_synthetic_dataset(tmp_path / "data64", count=6, kind="poster", seed=2, size=64)


def staged_config(dataset, cache, stages=STAGES, **overrides) -> TrainRunConfig:
    """tiny_config with a curriculum: train.steps and data.resolution come from the stages."""
    raw = tiny_config(dataset, cache, **overrides).model_dump(mode="json", exclude_unset=True)
    del raw["data"]["resolution"], raw["train"]["steps"]
    raw["train"]["stages"] = stages
    return TrainRunConfig.model_validate(raw)


def _lora(path):
    return read_lora(path)[0]


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _rows(path) -> list[dict]:
    return list(csv.DictReader(path.open()))


def test_stages_set_steps_and_resolution_and_refuse_a_contradiction(posters64, tmp_path):
    cfg = staged_config(posters64, tmp_path / "c")
    assert (cfg.train.steps, cfg.data.resolution) == (6, 64)
    with pytest.raises(ValueError, match="train.stages add up to 6 steps"):
        TrainRunConfig.model_validate({"train": {"steps": 5, "stages": STAGES}})
    with pytest.raises(ValueError, match="the largest stage is 64"):
        TrainRunConfig.model_validate({"data": {"resolution": 32}, "train": {"stages": STAGES}})


def test_a_two_stage_run_trains_each_stage_at_its_resolution_and_lr(posters64, tmp_path):
    cfg = staged_config(posters64, tmp_path / "cache",
                        sample={"every": 3, "prompts": ['a poster with title "SALE"'], "steps": 2})
    result = train(cfg, tmp_path / "run", progress=False)
    lrs = [float(r["lr"]) for r in _rows(tmp_path / "run" / "metrics.csv")]
    assert lrs == pytest.approx([1e-3] * 3 + [5e-4] * 3)
    # the curriculum's latents at both resolutions were cached up front
    assert result.cache.encoded_latents == 12
    grids = {p.name: Image.open(p).size for p in (tmp_path / "run" / "samples").glob("*.png")}
    assert set(grids) == {"step-000000.png", "step-000003.png", "step-000006.png"}
    assert grids["step-000003.png"][0] < grids["step-000006.png"][0]  # stage 1 samples at 32px, stage 2 at 64px
    state = torch.load(tmp_path / "run" / "checkpoints" / "step-000006" / "training_state.pt", weights_only=True)
    assert {"data-0", "data-1"} <= state.keys()


def test_a_two_stage_run_resumes_exactly_from_a_checkpoint_in_stage_two(posters64, tmp_path):
    cfg = staged_config(posters64, tmp_path / "cache")
    train(cfg, tmp_path / "straight", progress=False)
    # checkpoints every 2 steps: stopped after step 5, resumed from step 4 (stage 2, lr 5e-4, batch 1)
    train(cfg, tmp_path / "resumed", stop_after=5, progress=False)
    assert (tmp_path / "resumed" / "checkpoints" / "step-000004").exists()
    train(cfg, tmp_path / "resumed", resume=True, progress=False)
    assert _same(_lora(tmp_path / "straight" / "lora.safetensors"), _lora(tmp_path / "resumed" / "lora.safetensors"))
    assert (tmp_path / "straight" / "metrics.csv").read_text() == (tmp_path / "resumed" / "metrics.csv").read_text()


def test_a_stage_resolution_the_model_cannot_take_is_refused(posters64, tmp_path):
    from ernie_lora.errors import UserError

    cfg = staged_config(posters64, tmp_path / "c", stages=[{"resolution": 34, "steps": 1}, {"resolution": 64,
                                                                                           "steps": 1}])
    with pytest.raises(UserError, match="train.stages: resolution 34 is not a multiple of 4"):
        train(cfg, tmp_path / "run", progress=False)


def test_validation_loss_is_identical_for_identical_weights(poster_dataset, tmp_path):
    """Step 0 is the base in every run (LoRA B = 0): its validation loss is the same whatever the seed or lr;
    fixed noise makes it so. Later steps differ with the training."""
    val = {"data": {"validation": 0.34}, "validation": {"every": 3, "samples": 0}}
    a = train(tiny_config(poster_dataset, tmp_path / "cache", **val), tmp_path / "a", progress=False)
    b = train(tiny_config(poster_dataset, tmp_path / "cache", train={"seed": 9, "lr": 3e-3}, **val), tmp_path / "b",
              progress=False)
    assert [r["step"] for r in a.validation] == [0, 3, 6]
    assert a.validation[0]["val_loss"] == b.validation[0]["val_loss"]
    assert a.validation[-1]["val_loss"] != b.validation[-1]["val_loss"]
    # the validation share is held out: 2 of the 6 images, never trained on, recorded in the file
    assert len(a.cache.samples) == 4
    assert json.loads(read_lora(tmp_path / "a" / "lora.safetensors")[1]["ernie_lora.image_count"]) == 4
    written = _rows(tmp_path / "a" / "validation.csv")
    assert [float(r["val_loss"]) for r in written] == pytest.approx([r["val_loss"] for r in a.validation])


def test_best_checkpoint_picks_the_right_step_of_a_constructed_run(tmp_path):
    lowest = BestCheckpoint(tmp_path / "a", "val_loss")
    chosen = [lowest.consider(step, {"val_loss": v}) for step, v in [(0, 0.5), (2, 0.3), (4, 0.4), (6, 0.3)]]
    assert chosen == [True, True, False, False] and (lowest.step, lowest.value) == (2, 0.3)
    highest = BestCheckpoint(tmp_path / "b", "layout")
    for step, v in [(0, 0.1), (2, 0.7), (4, float("nan")), (6, 0.6)]:
        highest.consider(step, {"layout": v, "val_loss": 0.0})
    assert highest.step == 2
    assert not BestCheckpoint(tmp_path / "c", "text").consider(2, {"val_loss": 0.1})  # no such score: no pick


def test_the_best_checkpoint_of_a_run_is_the_lora_of_its_best_step(poster_dataset, tmp_path):
    extra = {"data": {"validation": 0.34}, "validation": {"every": 2, "samples": 0},
             "checkpoint": {"every": 2, "keep": 2, "best": "val_loss"}, "train": {"lr": 2e-2}}
    result = train(tiny_config(poster_dataset, tmp_path / "cache", **extra), tmp_path / "run", progress=False)
    losses = {r["step"]: r["val_loss"] for r in result.validation}
    best_step = min(losses, key=lambda s: (losses[s], s))
    record = json.loads((tmp_path / "run" / "best" / "best.json").read_text())
    assert record == {"metric": "val_loss", "value": losses[best_step], "step": best_step}
    best = _lora(tmp_path / "run" / "best" / "lora.safetensors")
    if best_step == 0:
        assert all(not t.any() for k, t in best.items() if "lora_B" in k)
    else:  # constant lr: a run of best_step steps is the first best_step steps of this one
        extra["train"]["steps"] = best_step
        train(tiny_config(poster_dataset, tmp_path / "cache", **extra), tmp_path / "short", progress=False)
        assert _same(best, _lora(tmp_path / "short" / "lora.safetensors"))


def test_checkpoint_best_needs_a_validation_set():
    with pytest.raises(ValueError, match="checkpoint.best: val_loss is chosen on validation; set data.validation"):
        TrainRunConfig.model_validate({"checkpoint": {"best": "val_loss"}})
    with pytest.raises(ValueError, match="needs validation.samples > 0 and layout"):
        TrainRunConfig.model_validate({"data": {"validation": 0.2}, "checkpoint": {"best": "layout"},
                                       "validation": {"samples": 0}})
    with pytest.raises(ValueError, match="between 0 and 0.5"):
        TrainRunConfig.model_validate({"data": {"validation": 0.7}})


def test_json_progress_reports_steps_files_and_validation(poster_dataset, tmp_path, capsys):
    cfg = tiny_config(poster_dataset, tmp_path / "cache", data={"validation": 0.34},
                      validation={"every": 3, "samples": 1, "scores": ["layout"]},
                      checkpoint={"every": 3, "keep": 2, "best": "layout"},
                      sample={"every": 3, "prompts": ["blue theme"], "steps": 2})
    train(cfg, tmp_path / "run", progress="json")
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    kinds = [e["event"] for e in events]
    steps = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in steps] == [1, 2, 3, 4, 5, 6]
    assert all(e["eta_s"] >= 0 and e["s_per_step"] > 0 and "loss" in e for e in steps)
    assert steps[-1]["eta_s"] == 0
    checkpoints = [e for e in events if e["event"] == "checkpoint"]
    assert [e["step"] for e in checkpoints] == [3, 6] and all(
        (tmp_path / "run" / "checkpoints" / f"step-{e['step']:06d}").exists() for e in checkpoints)
    validations = [e for e in events if e["event"] == "validation"]
    assert [e["step"] for e in validations] == [0, 3, 6] and all("layout" in e and "val_loss" in e
                                                                 for e in validations)
    assert [e["step"] for e in events if e["event"] == "samples"] == [0, 3, 6]
    assert "best" in kinds and kinds[-2:] == ["lora", "report"]


def test_tensorboard_logs_hold_the_scalars_and_images(poster_dataset, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_config(poster_dataset, tmp_path / "cache", data={"validation": 0.34},
                      validation={"every": 3, "samples": 1}, logging={"trackers": ["tensorboard"]},
                      sample={"every": 3, "prompts": ["blue theme"], "steps": 2})
    train(cfg, tmp_path / "run", progress=False)
    folders = {p.parent for p in (tmp_path / "run" / "logs").rglob("events.out.tfevents.*")}
    tags: dict[str, set] = {"scalars": set(), "images": set()}
    values = {}
    for folder in folders:
        acc = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0})
        acc.Reload()
        for kind in tags:
            tags[kind] |= set(acc.Tags()[kind])
        values.update({t: [e.step for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]})
    assert {"loss", "lr", "grad_norm", "validation/val_loss", "validation/layout"} <= tags["scalars"]
    assert values["loss"] == [1, 2, 3, 4, 5, 6] and values["validation/val_loss"] == [0, 3, 6]
    assert {"samples", "validation"} <= {t.split("/")[0] for t in tags["images"]}


def test_every_train_run_ends_with_a_report(poster_dataset, tmp_path):
    cfg = tiny_config(poster_dataset, tmp_path / "cache", data={"validation": 0.34},
                      validation={"every": 3, "samples": 2}, checkpoint={"every": 3, "keep": 1, "best": "val_loss"})
    result = train(cfg, tmp_path / "run", progress=False)
    text = result.report.read_text()
    assert result.report == tmp_path / "run" / "report.md"
    for expected in ("| step | val_loss | layout |", "Best checkpoint by val_loss", "| val_loss |", "```yaml",
                     "peak memory", "lora.safetensors", "validation.csv"):
        assert expected in text, expected
    with Image.open(tmp_path / "run" / "report.png") as sheet:
        assert sheet.height > 400
    assert (tmp_path / "run" / "validation" / "step-000000.png").exists()


def test_cli_progress_json_keeps_stdout_json(poster_dataset, tmp_path, capsys):
    import yaml

    from conftest import run_cli

    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(tiny_config(poster_dataset, tmp_path / "cache").model_dump(mode="json")))
    code, out, err = run_cli(["train", str(config), "-o", str(tmp_path / "run"), "--progress", "json"], capsys)
    assert code == 0, err
    events = [json.loads(line) for line in out.splitlines()]  # every line of stdout is an event
    assert events[-1]["event"] == "done" and events[-1]["steps"] == 6
    assert events[-1]["report"] == str(tmp_path / "run" / "report.md")
    code, out, err = run_cli(["train", str(config), "-o", str(tmp_path / "b"), "--progress", "loud"], capsys)
    assert code == 2 and "choose bar, json or off" in err
