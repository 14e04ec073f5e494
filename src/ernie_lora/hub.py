"""Reaching the Hugging Face hub: one quick probe, so that a machine without it answers at once.

huggingface_hub retries a connection that fails (about 23 s of back-off per file, minutes for a model of
a dozen files) before it looks in its cache. When the hub's host cannot be reached at all, loaders are
given the cached snapshot's folder instead of the hub id: a cached model loads at once, an uncached one
fails at once.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

PROBE_SECONDS = 3.0
PROBE_KEPT_SECONDS = 60.0
_probed: list = []  # [when, reason] of the last probe


def unreachable_reason() -> str | None:
    """None when the hub (or the HTTPS proxy in front of it) accepts a connection; else why not, in words.
    The answer is kept for a minute: a long-lived process (the studio) sees the network come and go."""
    now = time.monotonic()
    if _probed and now - _probed[0] < PROBE_KEPT_SECONDS:
        return _probed[1]
    reason = _probe()
    _probed[:] = [now, reason]
    return reason


def _probe() -> str | None:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    if proxy and _bypasses_proxy(urlsplit(constants.ENDPOINT).hostname or ""):
        proxy = None
    address = proxy or constants.ENDPOINT
    target = urlsplit(address if "://" in address else "http://" + address)  # a proxy may be given as host:port
    host = target.hostname or ""
    port = target.port or (443 if target.scheme == "https" else 80)
    where = f"{'proxy ' if proxy else ''}{host}:{port}"
    answer: list[str | None] = []

    def connect() -> None:
        try:
            with socket.create_connection((host, port), timeout=PROBE_SECONDS):
                answer.append(None)
        except OSError as exc:
            answer.append(f"{where} cannot be reached ({exc.strerror or exc})")

    # in a thread: the name lookup before the connection has no timeout of its own
    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(PROBE_SECONDS)
    return answer[0] if answer else f"{where} cannot be reached (no answer in {PROBE_SECONDS:g} s)"


def _bypasses_proxy(host: str) -> bool:
    """NO_PROXY as requests and httpx read it: ``*``, or the host or a domain it is in."""
    entries = (os.environ.get("NO_PROXY") or os.environ.get("no_proxy") or "").split(",")
    for entry in (e.strip().lstrip(".").lower() for e in entries):
        if entry == "*" or (entry and (host == entry or host.endswith("." + entry))):
            return True
    return False


class NotCached(OSError):
    """A hub id that is not in the local cache while the hub cannot be reached; the message says both."""


def is_hub_id(name: str) -> bool:
    """owner/name that is not a folder here."""
    return "/" in name and not Path(name).expanduser().exists()


def local_source(name: str, revision: str | None = None) -> str:
    """What a loader should open for ``name``: the name itself, or, for a hub id while the hub cannot be reached,
    the folder of its cached snapshot. (Given the hub id, loaders still ask the hub for some files even with
    ``local_files_only``, e.g. transformers for adapter_config.json, each with its retries.)"""
    reason = unreachable_reason() if is_hub_id(name) else None
    if reason is None:
        return name
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name, revision=revision, local_files_only=True)
    except Exception:  # any miss (no refs, no snapshot folder) means the same to the user
        raise NotCached(f"it is not in the Hugging Face cache and {reason}") from None
