"""The studio: a real server process, its API, a restart after SIGKILL, and the whole workflow in chromium."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from ernie_lora.data.synthetic import text_poster, write_synthetic_dataset
from test_rank_app import _chromium


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Studio:
    def __init__(self, root: Path, *extra: str):
        self.root, self.port = root, _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "ernie_lora.cli", "studio", "--root", str(root), "--port", str(self.port), *extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                urllib.request.urlopen(self.base + "/api/jobs", timeout=2)
                return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.1)
        self.kill()
        raise RuntimeError("the studio did not start: " + self.proc.stdout.read().decode(errors="replace"))

    def call(self, path: str, body=None, method: str | None = None, data: bytes | None = None):
        payload = data if data is not None else (None if body is None else json.dumps(body).encode())
        method = method or ("POST" if payload else "GET")
        headers = {"Content-Type": "application/json"} if body is not None else {}
        request = urllib.request.Request(self.base + path, data=payload, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


def _job_config(steps: int, every: int) -> dict:
    from ernie_lora.studio.configs import preset

    config = preset("micro-demo")["config"]
    config["train"].update(steps=steps, warmup_steps=2)
    config["checkpoint"].update(every=every)
    config["sample"].update(every=every, steps=6)
    config["validation"].update(every=every, samples=0, scores=[])
    config["checkpoint"]["best"] = None
    return config


def _wait(studio: Studio, job_id: int, states: tuple[str, ...], timeout: float = 240) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        _, job = studio.call(f"/api/jobs/{job_id}")
        if job["state"] in states:
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} still {job['state']}: {job['log'][-2000:]}")


def test_a_killed_studio_restarts_with_every_job_in_its_state(tmp_path):
    """SIGKILL the studio mid-job: restarted, it shows the finished job done, adopts the running one (its
    process kept going), keeps the queued one queued; a job process that dies is interrupted and resumes."""
    root = tmp_path / "studio"
    write_synthetic_dataset(root / "datasets" / "posters", count=12, kind="poster", seed=0, colours=("purple",),
                            size=64)
    studio = Studio(root)
    try:
        made = [studio.call("/api/jobs", {"name": name, "recipe": "train", "dataset": "posters",
                                           "config": _job_config(steps, 10)})[1]
                for name, steps in (("short", 10), ("long", 3000), ("waiting", 10))]
        ids = [job["id"] for job in made]
        assert [job["state"] for job in made] == ["running", "queued", "queued"]
        _wait(studio, ids[0], ("done",))
        long_job = _wait(studio, ids[1], ("running",))
        deadline = time.time() + 120
        while studio.call(f"/api/jobs/{ids[1]}")[1]["step"] < 3 and time.time() < deadline:
            time.sleep(0.2)
    finally:
        studio.proc.send_signal(signal.SIGKILL)
        studio.proc.wait()
    pid = long_job["pid"]
    os.kill(pid, 0)  # the job outlived the studio
    studio = Studio(root)
    try:
        states = {job["name"]: job for job in studio.call("/api/jobs")[1]}
        assert (states["short"]["state"], states["long"]["state"], states["waiting"]["state"]) == \
            ("done", "running", "queued")
        assert states["long"]["pid"] == pid and states["short"]["lora"]
        os.kill(pid, signal.SIGKILL)  # now the job dies without a last word (a crash, an OOM kill)
        job = _wait(studio, ids[1], ("interrupted",), timeout=30)
        assert "resume" in job["message"] and job["resumable"]
        _wait(studio, ids[2], ("running", "done"), timeout=30)  # the queue moves on
        status, _ = studio.call(f"/api/jobs/{ids[0]}/resume", method="POST", data=b"{}")
        assert status == 409  # a finished job does not resume
        _wait(studio, ids[2], ("done",))
        studio.call(f"/api/jobs/{ids[1]}/resume", method="POST", data=b"{}")
        job = _wait(studio, ids[1], ("running",), timeout=60)
        deadline = time.time() + 120
        while "resume: from" not in studio.call(f"/api/jobs/{ids[1]}")[1]["log"] and time.time() < deadline:
            time.sleep(0.3)
        assert "resume: from" in studio.call(f"/api/jobs/{ids[1]}")[1]["log"]  # from its last checkpoint
        studio.call(f"/api/jobs/{ids[1]}/stop", method="POST", data=b"{}")
        job = _wait(studio, ids[1], ("stopped",), timeout=120)
        assert any(e.get("event") == "stopped" for e in job["events"])
    finally:
        studio.kill()


def test_uploads_names_and_paths_stay_inside_the_studio(tmp_path):
    root = tmp_path / "studio"
    studio = Studio(root)
    try:
        assert studio.call("/api/datasets", {"name": "../escape"})[1]["name"] == "escape"
        png = tmp_path / "a.png"
        text_poster("SALE", size=128).save(png)
        assert studio.call("/api/datasets/escape/images/..%2F..%2Fevil.png/upload", data=png.read_bytes(),
                           method="PUT")[0] == 404  # a path in the name matches no route
        status, answer = studio.call("/api/datasets/escape/images/..evil%20(1).png/upload", data=png.read_bytes(),
                                     method="PUT")
        assert status == 200 and answer["name"] == "evil-1.png"
        assert (root / "datasets" / "escape" / "evil-1.png").exists()
        status, answer = studio.call("/api/datasets/escape/images/x.png/upload", data=b"not an image", method="PUT")
        assert status == 400 and "not an image" in answer["detail"]
        status, answer = studio.call("/api/datasets/escape/images/evil-1.png/upload", data=png.read_bytes(),
                                     method="PUT")
        assert status == 400 and "exists" in answer["detail"]  # never a silent overwrite
        config = _job_config(10, 10)
        config["data"]["cache_dir"] = str(tmp_path / "outside")
        status, answer = studio.call("/api/jobs", {"name": "j", "recipe": "train", "dataset": "escape",
                                                   "config": config})
        assert status == 400 and answer["detail"].startswith("data.cache_dir:") and "outside" in answer["detail"]
        config = _job_config(10, 10)
        config["train"]["lr"] = -1
        _, answer = studio.call("/api/jobs/validate", {"recipe": "train", "dataset": "escape", "config": config})
        assert [p["key"] for p in answer["problems"]] == ["train.lr"]
        status, answer = studio.call("/api/jobs", {"name": "k", "recipe": "train", "dataset": "escape",
                                                   "device": "cuda:7", "config": _job_config(10, 10)})
        assert status == 400 and answer["detail"] == "device 'cuda:7': choose from cpu (or any)"
        status, answer = studio.call("/api/playground", {"prompts": ["a poster", "   "]})
        assert status == 400 and answer["detail"] == "prompt 2: give 1 to 2000 characters"
        assert studio.call("/files/runs/..%2F..%2Fetc/passwd")[0] in (400, 404)
        assert studio.call("/static/..%2F..%2Fapp.py")[0] == 404
        request = urllib.request.Request(studio.base + "/api/jobs", headers={"Host": "evil.example"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 403
    finally:
        studio.kill()
    done = subprocess.run([sys.executable, "-m", "ernie_lora.cli", "studio", "--root", str(root), "--host", "0.0.0.0"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--token" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_the_whole_workflow_in_a_real_browser(tmp_path):
    """Upload PNGs, fix a flagged caption, auto-caption one image, start a micro job from its preset, watch
    loss and samples, stop, resume, finish, download the LoRA and generate with it in the playground."""
    from playwright.sync_api import expect, sync_playwright

    from ernie_lora.lora.formats import read_lora_file

    source = write_synthetic_dataset(tmp_path / "source", count=12, kind="poster", seed=0, colours=("purple",),
                                     size=64)
    text_poster("OPEN DAY", "every friday", "top", size=256).save(source / "words.png")
    pngs = sorted(source.glob("*.png"))
    studio = Studio(tmp_path / "studio")
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=_chromium(), headless=True, args=["--no-sandbox"])
            page = browser.new_page(accept_downloads=True)
            page.goto(studio.base + "/")
            page.fill("#new-dataset", "posters")
            page.click("#create-dataset")
            expect(page.locator("#status")).to_contain_text("dataset posters created")
            page.set_input_files("#upload", [str(p) for p in pngs])
            expect(page.locator("#status")).to_contain_text(f"{len(pngs)} of {len(pngs)} uploaded", timeout=30_000)
            expect(page.locator(".thumb")).to_have_count(len(pngs))
            expect(page.locator(".thumb.flagged")).to_have_count(len(pngs))  # no captions yet: lint flags them
            page.locator(".thumb", has_text="poster_00000").click()
            page.fill("#caption", "poster")
            expect(page.locator("#lint")).to_contain_text("trigger word only")
            good = (source / "poster_00000.txt").read_text().strip()
            page.fill("#caption", good)
            expect(page.locator("#lint")).to_contain_text("lint: no findings")
            page.click("#save-caption")
            expect(page.locator(".thumb.flagged")).to_have_count(len(pngs) - 1)
            page.locator(".thumb", has_text="words.png").click()
            page.click("#autocaption-one")
            expect(page.locator("#caption")).to_have_value(re.compile("OPEN DAY"), timeout=60_000)
            for png in pngs:  # the rest as a designer would paste them
                if png.stem not in ("poster_00000", "words"):
                    page.request.put(f"{studio.base}/api/datasets/posters/images/{png.name}/caption",
                                     data={"text": (source / f"{png.stem}.txt").read_text()})
            page.click("#tab-jobs")
            page.select_option("#preset", "micro-demo")
            # the chosen preset fills the form when its fields have loaded: type after that
            page.wait_for_function("(f => f.dataset.seq && f.dataset.loaded === f.dataset.seq)"
                                   "(document.getElementById('job-form'))")
            page.fill("#job-name", "purple")
            page.select_option("#job-dataset", "posters")
            for key, value in (("train.steps", "150"), ("checkpoint.every", "10"), ("sample.every", "10"),
                               ("sample.steps", "6"), ("validation.every", "10"), ("validation.samples", "0"),
                               ("train.warmup_steps", "2")):
                page.fill(f'[name="{key}"]', value)
                page.press(f'[name="{key}"]', "Tab")
            page.fill('[name="data.trigger_word"]', "purple")  # a word micro knows; the captions say it already
            page.press('[name="data.trigger_word"]', "Tab")
            page.fill('[name="validation.scores"]', "[]")
            page.press('[name="validation.scores"]', "Tab")
            page.select_option('[name="checkpoint.best"]', "")
            page.fill('[name="train.lr"]', "-1")  # the config's own error, before anything starts
            page.press('[name="train.lr"]', "Tab")
            expect(page.locator("#problems")).to_contain_text("train.lr")
            page.fill('[name="train.lr"]', "0.002")
            page.press('[name="train.lr"]', "Tab")
            expect(page.locator("#problems li")).to_have_count(0)
            page.click("#start")
            expect(page.locator("#job-state")).to_have_text("running", timeout=30_000)
            expect(page.locator("#loss-chart canvas")).to_have_count(1, timeout=120_000)
            expect(page.locator("#samples img").first).to_be_visible(timeout=120_000)
            page.click("#stop-job")
            expect(page.locator("#job-state")).to_have_text("stopped", timeout=120_000)
            stopped_at = int(page.locator("#job-progress").inner_text().split()[1])
            assert 0 < stopped_at < 150
            page.click("#resume-job")
            expect(page.locator("#job-state")).to_have_text("done", timeout=240_000)
            expect(page.locator("#job-progress")).to_contain_text("step 150 of 150")
            expect(page.locator("#log")).to_contain_text("resume: from")
            shots = os.environ.get("STUDIO_SCREENSHOTS")  # README's pictures: STUDIO_SCREENSHOTS=docs pytest -k browser
            if shots:
                page.set_viewport_size({"width": 1280, "height": 900})
                page.screenshot(path=str(Path(shots) / "studio-job.png"), full_page=True)
            page.click("#tab-loras")
            row = page.locator(".lora-row", has_text="purple / lora.safetensors")
            expect(row).to_contain_text("diffusers")
            expect(row.locator(".trigger")).to_have_text("trigger word: purple (write it in a prompt, or [trigger])")
            with page.expect_download() as download:
                row.locator("a.download", has_text="Download comfyui").click()
            saved = tmp_path / "downloaded.safetensors"
            download.value.save_as(saved)
            assert read_lora_file(saved).layout.startswith("ComfyUI") or read_lora_file(saved).modules
            page.click("#pg-heldout")
            expect(page.locator("#status")).to_contain_text("none a caption of posters")
            held_out = page.input_value("#pg-prompts").splitlines()
            assert len(held_out) == 6 and all(p.startswith(("a poster", "an infographic", "a comic", "a ui"))
                                              for p in held_out)
            trained = {p.read_text().strip() for p in (tmp_path / "studio" / "datasets" / "posters").glob("*.txt")}
            assert not set(held_out) & trained
            # two prompts of the set: one in the layout language with quoted text, one plain
            page.fill("#pg-prompts", 'a poster with title "OPEN DAY", title band at the top, centered layout, '
                                     'purple theme\na quiet lake at dawn')
            page.click("#pg-generate")
            expect(page.locator("#status")).to_contain_text("generated 2 prompt(s) with 1 LoRA(s)", timeout=120_000)
            page.wait_for_function("document.querySelectorAll('.pg-after').length == 2 && "
                                   "[...document.querySelectorAll('.pg-before, .pg-after')].every(i => i.naturalWidth)")
            expect(page.locator(".pg-row").first).to_contain_text("layout")
            expect(page.locator(".pg-row").first).to_contain_text("text")
            expect(page.locator(".pg-row").nth(1)).to_contain_text("nothing in this prompt to score")
            means = page.locator("#pg-means")
            expect(means).to_contain_text("layout")
            expect(means).to_contain_text("text")
            if shots:
                page.screenshot(path=str(Path(shots) / "studio-loras.png"), full_page=True)
            browser.close()
    finally:
        studio.kill()


def test_held_out_prompts_leave_out_the_captions_a_run_trained_on():
    from ernie_lora.studio.app import held_out_prompts

    first = held_out_prompts(4, set())
    assert len(first) == 4 and len(set(first)) == 4
    without = held_out_prompts(4, {first[0], first[2]})
    assert len(without) == 4 and first[0] not in without and first[2] not in without
    assert [p for p in first if p in without] == [first[1], first[3]]  # same order, the rest drawn on


def test_the_wheel_carries_the_presets_and_the_page(tmp_path):
    """An installed studio (no clone) offers the same presets: setup.py puts configs/ into the wheel."""
    import shutil
    import zipfile

    repo, copy = Path(__file__).resolve().parents[1], tmp_path / "repo"  # a copy: the build writes build/ in place
    copy.mkdir()
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "configs"):
        (shutil.copytree if (repo / name).is_dir() else shutil.copy)(repo / name, copy / name)
    shutil.copytree(repo / "src", copy / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "wheel"), str(copy)], check=True, timeout=300,
                   env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    [wheel] = (tmp_path / "wheel").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    from ernie_lora.studio.configs import PRESETS

    assert {f"ernie_lora/configs/{file}" for _, _, file in PRESETS.values()} <= names
    static = repo / "src" / "ernie_lora" / "studio" / "static"
    assert {f"ernie_lora/studio/static/{p.relative_to(static).as_posix()}" for p in static.rglob("*")
            if p.is_file()} <= names


def test_progress_files_read_only_what_was_appended_and_wait_for_whole_lines(tmp_path):
    from ernie_lora.studio.jobs import ProgressFiles, read_events

    path, files = tmp_path / "progress.jsonl", ProgressFiles()
    assert files.events(path) == []
    path.write_text('{"event": "step", "step": 1}\n{"event": "step", "step": 2}\n')
    assert [e["step"] for e in files.events(path)] == [1, 2]
    with path.open("a") as handle:
        handle.write('{"event": "step", "st')  # a line being written
    assert [e["step"] for e in files.events(path)] == [1, 2]
    with path.open("a") as handle:
        handle.write('ep": 3}\nnot json\n')
    assert files.events(path) == read_events(path) == [{"event": "step", "step": s} for s in (1, 2, 3)]
    path.write_text('{"event": "done"}\n')  # rewritten shorter: read again from the start
    assert files.events(path) == [{"event": "done"}]


FAKE_JOB = """
import json, os, sys, time
from pathlib import Path
name = Path(sys.argv[sys.argv.index("--output") + 1]).name
print(json.dumps({"event": "start", "cuda": os.environ.get("CUDA_VISIBLE_DEVICES")}), flush=True)
while not Path("release-" + name).exists():
    time.sleep(0.02)
print(json.dumps({"event": "done"}), flush=True)
"""


def test_one_job_at_a_time_per_device_and_a_pinned_job_waits_for_its_device(tmp_path, monkeypatch):
    from ernie_lora.studio.jobs import JobStore, Runner, device_env, read_events

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    script = tmp_path / "fake_job.py"
    script.write_text(FAKE_JOB)
    store = JobStore(tmp_path / "studio")
    runner = Runner(store, command=[sys.executable, str(script)], devices=["cuda:0", "cuda:1"])
    ids = {name: store.create(name, "train", "{}\n", device=device).id
           for name, device in (("a", ""), ("b", "cuda:0"), ("c", ""), ("d", "cuda:1"))}

    def settle(names: dict[str, str]) -> dict:
        deadline = time.time() + 30
        while time.time() < deadline:
            runner.tick()
            jobs = {j.name: j for j in store.all()}
            if all(jobs[n].state == s for n, s in names.items()):
                return jobs
            time.sleep(0.05)
        raise AssertionError({n: j.state for n, j in jobs.items()})

    def cuda(name: str) -> str:
        deadline = time.time() + 30
        while time.time() < deadline:
            starts = [e for e in read_events(store.folder(store.get(ids[name])) / "progress.jsonl") if "cuda" in e]
            if starts:
                return starts[-1]["cuda"]
            time.sleep(0.05)
        raise AssertionError(f"job {name} never started")

    try:
        jobs = settle({"a": "running", "b": "queued", "c": "running", "d": "queued"})
        assert (jobs["a"].ran_on, jobs["c"].ran_on) == ("cuda:0", "cuda:1")
        assert (cuda("a"), cuda("c")) == ("0", "1")  # each process sees only its GPU
        (store.root / "release-a").touch()
        jobs = settle({"a": "done", "b": "running", "c": "running", "d": "queued"})  # d waits for cuda:1
        assert jobs["b"].ran_on == "cuda:0" and cuda("b") == "0"
        (store.root / "release-c").touch()
        jobs = settle({"c": "done", "d": "running"})
        assert jobs["d"].ran_on == "cuda:1" and cuda("d") == "1"
    finally:
        for name in ids:
            (store.root / f"release-{name}").touch()
        settle({name: "done" for name in ids})
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert device_env("cuda:1") == {"CUDA_VISIBLE_DEVICES": "5"} and device_env("cpu") == {}


def test_a_studio_database_from_before_devices_opens_with_its_jobs(tmp_path):
    import sqlite3

    from ernie_lora.studio.jobs import SCHEMA, JobStore

    (tmp_path / "studio").mkdir()
    old = SCHEMA.replace(",\n    device TEXT NOT NULL DEFAULT '',\n    ran_on TEXT NOT NULL DEFAULT ''", "")
    assert "device" not in old
    with sqlite3.connect(tmp_path / "studio" / "studio.sqlite") as con:
        con.executescript(old)
        con.execute("INSERT INTO jobs (name, recipe, state, created) VALUES ('old', 'train', 'done', 1.0)")
    [job] = JobStore(tmp_path / "studio").all()
    assert (job.name, job.state, job.device, job.ran_on) == ("old", "done", "", "")
