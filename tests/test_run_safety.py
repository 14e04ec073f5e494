"""Nothing lost: --overwrite removes only what a run of ours wrote, --resume falls back past a damaged
checkpoint, temp files of a killed run are cleaned by the next run that owns the folder, and every file
a run keeps is written whole (checksummed checkpoints)."""

import hashlib
import json

import torch

from conftest import run_cli, tiny_config
from ernie_lora.lora.files import read_lora
from ernie_lora.recipes.lora import train
from ernie_lora.recipes.run_dir import CHECKSUMS, MARKER, checkpoint_problem


def _digest(folder):
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _error_line(code, err):
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip() and "%|" not in ln]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def _config(tmp_path, dataset, **overrides):
    import yaml

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tiny_config(dataset, tmp_path / "cache", **overrides).model_dump(mode="json")))
    return path


def test_overwrite_refuses_a_folder_that_ernie_lora_did_not_write(poster_dataset, tmp_path, capsys):
    cfg = _config(tmp_path, poster_dataset)
    mine = tmp_path / "my-project"  # a user's folder that happens to use our output names
    for name in ("samples", "eval", "checkpoints", "pairs", "sft"):
        (mine / name).mkdir(parents=True)
        (mine / name / "keep.png").write_bytes(b"my work " + name.encode())
    (mine / "report.md").write_text("my notes")
    before = _digest(mine)
    line = _error_line(*run_cli(["train", str(cfg), "-o", str(mine), "--overwrite"], capsys)[::2])
    assert f"no {MARKER}, so ernie-lora did not write it" in line
    assert _digest(mine) == before
    (mine / "run").mkdir()  # the demo's folders obey the same rule
    (mine / "before_after.png").write_bytes(b"mine too")
    before = _digest(mine)
    line = _error_line(*run_cli(["demo", "-o", str(mine), "--overwrite"], capsys)[::2])
    assert f"no {MARKER}, so ernie-lora did not write it" in line
    assert _digest(mine) == before


def test_overwrite_removes_only_the_runs_files_and_refuses_a_run_folder_with_other_files(poster_dataset, tmp_path,
                                                                                        capsys):
    cfg = _config(tmp_path, poster_dataset)
    run = tmp_path / "run"
    assert run_cli(["train", str(cfg), "-o", str(run), "--set", "train.steps=2"], capsys)[0] == 0
    assert json.loads((run / MARKER).read_text())["kind"] == "run"
    (run / "my-notes.txt").write_text("do not lose me")
    before = _digest(run)
    line = _error_line(*run_cli(["train", str(cfg), "-o", str(run), "--overwrite"], capsys)[::2])
    assert "also holds my-notes.txt, which the run there did not write" in line
    assert _digest(run) == before
    (run / "my-notes.txt").unlink()
    assert run_cli(["train", str(cfg), "-o", str(run), "--overwrite", "--set", "train.steps=4"], capsys)[0] == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002", "step-000004"]


def test_a_run_from_before_markers_is_still_recognised(poster_dataset, tmp_path, capsys):
    cfg = _config(tmp_path, poster_dataset)
    run = tmp_path / "run"
    assert run_cli(["train", str(cfg), "-o", str(run), "--set", "train.steps=2"], capsys)[0] == 0
    (run / MARKER).unlink()  # as written by ernie-lora before markers: run.json says it is ours
    assert run_cli(["train", str(cfg), "-o", str(run), "--overwrite", "--set", "train.steps=2"], capsys)[0] == 0
    assert (run / MARKER).exists()


def test_resume_skips_a_truncated_checkpoint_and_still_trains_the_same_lora(poster_dataset, tmp_path, capsys):
    cfg = tiny_config(poster_dataset, tmp_path / "cache", checkpoint={"every": 2, "keep": 3})
    train(cfg, tmp_path / "straight", progress=False)
    run = tmp_path / "damaged"
    train(cfg, run, stop_after=4, progress=False)
    newest = run / "checkpoints" / "step-000004"
    assert json.loads((newest / CHECKSUMS).read_text()).keys() == {"lora.safetensors", "training_state.pt"}
    state = newest / "training_state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # a disk that filled up, a torn copy
    assert checkpoint_problem(newest) == "training_state.pt does not match its checksum (truncated or changed)"
    with open(run / "metrics.csv", "a") as f:  # a torn last line of the killed process
        f.write("5,0.12")
    capsys.readouterr()
    train(cfg, run, resume=True, progress=False)
    err = capsys.readouterr().err
    assert f"resume: skipped checkpoint {newest}: training_state.pt does not match its checksum" in err
    assert f"resume: from {run / 'checkpoints' / 'step-000002'}" in err
    a, _ = read_lora(tmp_path / "straight" / "lora.safetensors")
    b, _ = read_lora(run / "lora.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = (run / "metrics.csv").read_text().splitlines()
    assert [int(r.split(",")[0]) for r in rows[1:]] == [1, 2, 3, 4, 5, 6]
    assert checkpoint_problem(newest) is None  # step 4 was written again, whole


def test_resume_with_every_checkpoint_damaged_is_one_line(poster_dataset, tmp_path, capsys):
    cfg = _config(tmp_path, poster_dataset)
    run = tmp_path / "run"
    assert run_cli(["train", str(cfg), "-o", str(run), "--set", "train.steps=4"], capsys)[0] == 0
    for folder in (run / "checkpoints").iterdir():
        (folder / "lora.safetensors").write_bytes(b"")
    before = _digest(run)
    code, _, err = run_cli(["train", str(cfg), "-o", str(run), "--resume", "--set", "train.steps=6"], capsys)
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: --resume: no intact checkpoint in")
    assert sum("skipped checkpoint" in ln for ln in err.splitlines()) == 2
    changed = {k for k, v in _digest(run).items() if before.get(k) != v}
    assert changed <= {__import__("pathlib").Path("run.json")}, changed  # the checkpoints and LoRA untouched


def test_temp_files_of_a_killed_run_are_removed_by_the_next_run_there(poster_dataset, tmp_path, capsys):
    cfg = tiny_config(poster_dataset, tmp_path / "cache")
    run = tmp_path / "run"
    train(cfg, run, stop_after=2, progress=False)
    # what a process killed inside atomic_write / save_checkpoint leaves behind
    (run / ".lora.safetensors.k3j2.tmp").write_bytes(b"half a file")
    (run / "checkpoints" / ".tmp-step-000004").mkdir()
    (run / "checkpoints" / ".tmp-step-000004" / "training_state.pt").write_bytes(b"half")
    capsys.readouterr()
    train(cfg, run, resume=True, progress=False)
    err = capsys.readouterr().err
    assert "a temp file of an interrupted run" in err
    assert not (run / ".lora.safetensors.k3j2.tmp").exists()
    assert not (run / "checkpoints" / ".tmp-step-000004").exists()
    assert (run / "lora.safetensors").exists()
