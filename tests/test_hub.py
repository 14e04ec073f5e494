"""Hub ids on a machine that cannot reach the hub: a cached model loads from the cache, an uncached one fails
with one line that says why, and nothing but the probe tries to connect (huggingface_hub retries each file for
23 s: a captioning model took 2.5 min to fail, and over 5 min to load from the cache).

The hub is made unreachable for real: a subprocess whose HF_ENDPOINT is a local port nothing listens on.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

SCRIPT = """
import socket

attempts = []
connect = socket.socket.connect
socket.socket.connect = lambda self, address: (attempts.append(address), connect(self, address))[1]

from ernie_lora import hub
from ernie_lora.captions.vlm import CaptionModel
from ernie_lora.errors import UserError
from ernie_lora.eval.aesthetic import Encoder
from ernie_lora.models.loading import load_pipeline

print("reason:", hub.unreachable_reason())
print("pipeline:", type(load_pipeline("someone/cached-ernie", dtype="fp32").transformer).__name__)
print("captioner:", type(CaptionModel("someone/cached-vlm", max_new_tokens=2).model).__name__)
for load in (lambda: load_pipeline("someone/not-cached", dtype="fp32"), lambda: CaptionModel("someone/not-cached"),
             lambda: Encoder("hf:someone/not-cached")):
    try:
        load()
    except UserError as exc:
        print("error:", exc)
print("connections:", len(attempts))
"""


def _cache_as_download(cache: Path, repo_id: str, folder: Path) -> None:
    """``folder``'s files laid out as huggingface_hub's cache holds a download of ``repo_id``."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, root / "snapshots" / commit)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # free once closed: a connection to it is refused


def test_an_unreachable_hub_loads_cached_models_and_refuses_the_others_at_once(tiny_folder, tiny_smolvlm, tmp_path):
    _cache_as_download(tmp_path / "hf" / "hub", "someone/cached-ernie", tiny_folder)
    _cache_as_download(tmp_path / "hf" / "hub", "someone/cached-vlm", tiny_smolvlm)
    port = _closed_port()
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": f"http://127.0.0.1:{port}",
           "HF_HUB_OFFLINE": "0", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"reason: 127.0.0.1:{port} cannot be reached")
    assert lines[1:3] == ["pipeline: ErnieImageTransformer2DModel", "captioner: Idefics3ForConditionalGeneration"]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 3
    assert all("someone/not-cached" in e and f"not in the Hugging Face cache and 127.0.0.1:{port} cannot be reached"
               in e for e in errors), errors
    assert lines[-1] == "connections: 1"  # the probe; no loader tried the hub (each try would retry for 23 s)


def test_the_probe_is_kept_for_a_minute_then_asked_again(monkeypatch):
    from ernie_lora import hub

    answers, clock = iter(["huggingface.co:443 cannot be reached (down)", None]), [1000.0]
    monkeypatch.setattr(hub, "_probe", lambda: next(answers))
    monkeypatch.setattr(hub.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(hub, "_probed", [])
    assert hub.unreachable_reason() == "huggingface.co:443 cannot be reached (down)"
    clock[0] += hub.PROBE_KEPT_SECONDS - 1
    assert hub.unreachable_reason() == "huggingface.co:443 cannot be reached (down)"  # not asked again
    clock[0] += 2
    assert hub.unreachable_reason() is None  # the network came back: a studio left running sees it


def test_the_probe_goes_through_the_proxy_unless_no_proxy_names_the_hub(monkeypatch):
    from ernie_lora import hub

    tried = []

    def connect(address, timeout):
        tried.append(address)
        raise OSError(111, "Connection refused")

    monkeypatch.setattr(hub.socket, "create_connection", connect)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "https://huggingface.co")
    monkeypatch.setenv("HTTPS_PROXY", "proxy.example:3128")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    assert hub._probe() == "proxy proxy.example:3128 cannot be reached (Connection refused)"
    monkeypatch.setenv("NO_PROXY", "localhost, .huggingface.co")
    assert hub._probe() == "huggingface.co:443 cannot be reached (Connection refused)"
    assert tried == [("proxy.example", 3128), ("huggingface.co", 443)]


def test_a_probe_that_hangs_answers_after_its_timeout(monkeypatch):
    import threading

    from ernie_lora import hub

    released = threading.Event()

    def stuck(address, timeout):  # a name lookup that does not answer
        released.wait(60)
        raise OSError("released by the test")

    monkeypatch.setattr(hub.socket, "create_connection", stuck)
    monkeypatch.setattr(hub, "PROBE_SECONDS", 0.2)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "https://huggingface.co")
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    try:
        assert hub._probe() == "huggingface.co:443 cannot be reached (no answer in 0.2 s)"
    finally:
        released.set()
