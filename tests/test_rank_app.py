"""The annotation server as people run it: `ernie-lora rank serve` in its own process, over loopback."""

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from ernie_lora.rank.simulate import write_quality_dataset


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, folder: Path, *extra: str, host: str = "127.0.0.1"):
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "ernie_lora.cli", "rank", "serve", str(folder), "--host", host,
               "--port", str(self.port), *extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited: {self.proc.stderr.read()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.1)
        raise AssertionError("server did not start in 60 s")

    def kill(self, sig=signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)


def _request(url: str, body: dict | None = None, headers: dict | None = None, timeout: float = 30) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            return r.status, (json.loads(raw) if r.headers.get("content-type", "").startswith("application/json")
                              else {"bytes": len(raw)})
    except urllib.error.HTTPError as exc:
        return exc.code, {}


@pytest.fixture
def dataset(tmp_path) -> Path:
    return write_quality_dataset(tmp_path / "images", prompts=20, per_prompt=2, seed=0)


@pytest.fixture
def server(dataset):
    srv = Server(dataset)
    yield srv
    srv.kill()


def _votes_in_db(dataset: Path) -> dict[tuple[int, str], str]:
    """(pair id, annotator) -> outcome."""
    with sqlite3.connect(dataset / "annotations.sqlite") as con:
        rows = con.execute("SELECT pair_id, annotator, outcome FROM votes").fetchall()
    return {(pid, who): outcome for pid, who, outcome in rows}


def test_ten_annotators_at_once_lose_and_duplicate_no_vote(server, dataset):
    answered: dict[str, list[int]] = {}
    errors: list[str] = []

    def annotate(name: str) -> None:
        mine = answered.setdefault(name, [])
        status, pair = _request(f"{server.base}/api/next?annotator={name}")
        deadline = time.time() + 90
        while len(mine) < 12 and time.time() < deadline:
            if status != 200:
                errors.append(f"{name}: {status}")
                return
            outcome = ("left", "right", "tie")[pair["pair_id"] % 3]
            status, reply = _request(f"{server.base}/api/vote",
                                     {"pair_id": pair["pair_id"], "outcome": outcome, "annotator": name})
            if status != 200 or not reply["recorded"]:
                errors.append(f"{name}: vote on {pair['pair_id']}: {status} {reply}")
                return
            mine.append(pair["pair_id"])
            pair = reply["next"]

    threads = [threading.Thread(target=annotate, args=(f"annotator-{k}",)) for k in range(10)]
    started = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "annotators still voting after 120 s"
    assert not errors, errors
    assert time.time() - started < 120
    sent = {(pid, name) for name, mine in answered.items() for pid in mine}
    assert len(sent) == 120
    assert set(_votes_in_db(dataset)) == sent  # every answered vote stored, nothing else, nothing twice
    with sqlite3.connect(dataset / "annotations.sqlite") as con:
        rounds = con.execute("SELECT MAX(round) FROM pairs").fetchone()[0]
        unanswered = con.execute("SELECT p.round FROM pairs p WHERE NOT EXISTS "
                                 "(SELECT 1 FROM votes v WHERE v.pair_id = p.id)").fetchall()
    assert rounds >= 5 and all(r == rounds for r, in unanswered)  # a round began only once the last was done


def test_kill_9_keeps_every_answered_vote_and_a_restart_continues(dataset):
    server = Server(dataset)
    answered = []
    stop = threading.Event()

    def annotate() -> None:
        try:
            _, pair = _request(f"{server.base}/api/next?annotator=ann")
            while not stop.is_set():
                _, reply = _request(f"{server.base}/api/vote",
                                    {"pair_id": pair["pair_id"], "outcome": "left", "annotator": "ann"}, timeout=5)
                answered.append(pair["pair_id"])  # only once the response arrived
                pair = reply["next"]
        except (OSError, KeyError):
            pass  # the server died mid-request: that vote's response never arrived

    worker = threading.Thread(target=annotate)
    worker.start()
    deadline = time.time() + 60
    while len(answered) < 25 and time.time() < deadline:
        time.sleep(0.01)
    server.kill(signal.SIGKILL)
    stop.set()
    worker.join(timeout=30)
    assert len(answered) >= 25
    stored = {pid for pid, _ in _votes_in_db(dataset)}
    assert set(answered) <= stored
    assert len(stored) - len(answered) <= 1  # at most the vote whose response was cut off

    restarted = Server(dataset)
    try:
        status, pair = _request(f"{restarted.base}/api/next?annotator=ann")
        assert status == 200 and pair["progress"]["votes"] == len(stored)
        assert pair["pair_id"] not in stored
    finally:
        restarted.kill()


def test_images_only_from_the_folder_traversal_and_symlinks_refused(server, dataset, tmp_path):
    status, pair = _request(f"{server.base}/api/next?annotator=ann")
    assert _request(f"{server.base}/img/{pair['left']['id']}")[0] == 200
    secret = tmp_path / "secret.png"
    shutil.copy(dataset / pair["left"]["path"], secret)
    (dataset / "link.png").symlink_to(secret)
    with sqlite3.connect(dataset / "annotations.sqlite") as con:  # rows a tampered database could hold
        con.execute("INSERT INTO images (id, path, prompt, category) VALUES (900, '../secret.png', '', '')")
        con.execute("INSERT INTO images (id, path, prompt, category) VALUES (901, 'link.png', '', '')")
        con.execute(f"INSERT INTO images (id, path, prompt, category) VALUES (902, '{secret}', '', '')")
    for image_id in (900, 901, 902, 99999):
        assert _request(f"{server.base}/img/{image_id}")[0] == 404, image_id
    assert _request(f"{server.base}/img/..%2F..%2Fsecret.png")[0] in (404, 422)
    assert _request(f"{server.base}/img/../../secret.png")[0] == 404


def test_a_token_is_required_on_every_request(dataset):
    server = Server(dataset, "--token", "s3cret")
    try:
        for path in ("/", "/api/next?annotator=a", "/img/1"):
            assert _request(server.base + path)[0] == 401
            assert _request(server.base + path, headers={"X-Token": "wrong"})[0] == 401
        assert _request(server.base + "/api/next?annotator=a", headers={"X-Token": "s3cret"})[0] == 200
        assert _request(server.base + "/api/next?annotator=a&token=s3cret")[0] == 200
        assert _request(server.base + "/api/vote", {"pair_id": 1, "outcome": "left", "annotator": "a"})[0] == 401
    finally:
        server.kill()


def test_binding_beyond_loopback_needs_a_token(dataset):
    done = subprocess.run([sys.executable, "-m", "ernie_lora.cli", "rank", "serve", str(dataset), "--host", "0.0.0.0",
                           "--port", str(_free_port())], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--token" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        if os.environ.get("CI"):
            pytest.fail("chromium missing: scripts/install_browser.sh installs it (apt-get install chromium)")
        pytest.skip("chromium missing: run scripts/install_browser.sh")
    return found


def test_the_page_in_a_real_browser(server, dataset):
    """Headless chromium: name, keys ← → ↓ s, the next pair each time, undo, and progress kept on reload."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), headless=True, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(server.base + "/")
        page.fill("#annotator", "Ada")
        page.press("#annotator", "Enter")
        expect(page.locator("#status")).to_contain_text("pair ")
        seen = []
        for key in ("ArrowLeft", "ArrowRight", "ArrowDown", "s"):
            pair = page.locator("#status").inner_text()
            seen.append(pair)
            page.wait_for_function("['left', 'right'].every(id => document.getElementById(id).naturalWidth > 0)",
                                   timeout=10_000)  # both images load from the server
            page.keyboard.press(key)
            expect(page.locator("#status")).not_to_have_text(pair)
        assert len(set(seen)) == 4
        expect(page.locator("#progress")).to_contain_text("4 yours")
        page.reload()  # the name is remembered and the database keeps the votes
        expect(page.locator("#progress")).to_contain_text("4 yours")
        page.keyboard.press("u")
        expect(page.locator("#progress")).to_contain_text("3 yours")
        expect(page.locator("#status")).to_have_text(seen[-1])  # the undone pair comes back
        browser.close()
    stored = _votes_in_db(dataset)
    assert sorted(stored.values()) == ["left", "right", "tie"]
    assert {who for _, who in stored} == {"Ada"}
