"""The studio: a real server process, its API, a restart after SIGKILL, and the whole workflow in chromium."""

import json
import os
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
            expect(page.locator("#caption")).to_have_value(__import__("re").compile("OPEN DAY"), timeout=60_000)
            for png in pngs:  # the rest as a designer would paste them
                if png.stem not in ("poster_00000", "words"):
                    page.request.put(f"{studio.base}/api/datasets/posters/images/{png.name}/caption",
                                     data={"text": (source / f"{png.stem}.txt").read_text()})
            page.click("#tab-jobs")
            page.select_option("#preset", "micro-demo")
            page.fill("#job-name", "purple")
            page.select_option("#job-dataset", "posters")
            for key, value in (("train.steps", "150"), ("checkpoint.every", "10"), ("sample.every", "10"),
                               ("sample.steps", "6"), ("validation.every", "10"), ("validation.samples", "0"),
                               ("train.warmup_steps", "2")):
                page.fill(f'[name="{key}"]', value)
                page.press(f'[name="{key}"]', "Tab")
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
            with page.expect_download() as download:
                row.locator("a.download", has_text="Download comfyui").click()
            saved = tmp_path / "downloaded.safetensors"
            download.value.save_as(saved)
            assert read_lora_file(saved).layout.startswith("ComfyUI") or read_lora_file(saved).modules
            page.fill("#pg-prompt", 'a poster with title "OPEN DAY", title band at the top, centered layout, '
                                    "purple theme")
            page.click("#pg-generate")
            expect(page.locator("#status")).to_contain_text("generated with 1 LoRA(s)", timeout=120_000)
            page.wait_for_function("['pg-before', 'pg-after'].every(id => document.getElementById(id).naturalWidth)")
            expect(page.locator(".pair")).to_contain_text("layout")
            if shots:
                page.screenshot(path=str(Path(shots) / "studio-loras.png"), full_page=True)
            browser.close()
    finally:
        studio.kill()
