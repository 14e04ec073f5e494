"""The bad-input corpus of the annotation server: every hostile request gets a 4xx (never a 500), changes no
vote, and with a token set no annotator can act in another's name. Requests go to the ASGI app directly."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from ernie_lora.data.categories import list_images
from ernie_lora.rank.app import MAX_BODY, create_app, invite_token
from ernie_lora.rank.simulate import write_quality_dataset
from ernie_lora.rank.store import AnnotationStore

SECRET = "s3cret"


def call(app, method: str, url: str, body: bytes | None = None, headers: dict | None = None,
         host: str = "127.0.0.1:8765") -> tuple[int, bytes]:
    """One request through the ASGI app: (status, body)."""
    parts = urlsplit(url)
    head = {"host": host, **({"content-type": "application/json", "content-length": str(len(body))}
                             if body is not None else {}), **(headers or {})}
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": parts.path, "raw_path": parts.path.encode(), "query_string": parts.query.encode(),
             "root_path": "", "headers": [(k.lower().encode(), v.encode()) for k, v in head.items()],
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8765)}
    incoming = [{"type": "http.request", "body": body or b"", "more_body": False}]
    sent: list[dict] = []

    async def receive():
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> tuple[Path, AnnotationStore]:
    folder = tmp_path_factory.mktemp("annotate")
    write_quality_dataset(folder, prompts=2, per_prompt=3, seed=0)
    store = AnnotationStore.create_or_open(folder / "annotations.sqlite", folder, list_images(folder))
    return folder, store


@dataclass
class Request:
    name: str
    method: str
    url: str
    body: bytes | None = None
    headers: dict | None = None
    host: str = "127.0.0.1:8765"
    token: bool = False  # sent to the server started with --token SECRET
    status: int | tuple[int, ...] = 422


def j(obj) -> bytes:
    return json.dumps(obj).encode()


ALICE = invite_token(SECRET, "alice")
REQUESTS = [
    Request("image id out of range", "GET", "/img/99999999999999999999999999", status=404),
    Request("image id negative", "GET", "/img/-5", status=404),
    Request("image id not a number", "GET", "/img/abc"),
    Request("image id a float", "GET", "/img/1.5"),
    Request("image id NaN", "GET", "/img/NaN"),
    Request("image path traversal", "GET", "/img/..%2F..%2Fetc%2Fpasswd", status=(404, 422)),
    Request("next without annotator", "GET", "/api/next"),
    Request("next with a 65-character annotator", "GET", "/api/next?annotator=" + "a" * 65),
    Request("vote pair id out of range", "POST", "/api/vote",
            j({"pair_id": 2**70, "outcome": "left", "annotator": "a"})),
    Request("vote pair id negative", "POST", "/api/vote", j({"pair_id": -1, "outcome": "left", "annotator": "a"})),
    Request("vote pair id NaN", "POST", "/api/vote", b'{"pair_id": NaN, "outcome": "left", "annotator": "a"}'),
    Request("vote pair id Infinity", "POST", "/api/vote",
            b'{"pair_id": Infinity, "outcome": "left", "annotator": "a"}'),
    Request("vote pair id a string", "POST", "/api/vote", j({"pair_id": "one", "outcome": "left", "annotator": "a"})),
    Request("vote unknown pair", "POST", "/api/vote", j({"pair_id": 123456, "outcome": "left", "annotator": "a"}),
            status=404),
    Request("vote unknown outcome", "POST", "/api/vote", j({"pair_id": 1, "outcome": "both", "annotator": "a"})),
    Request("vote empty annotator", "POST", "/api/vote", j({"pair_id": 1, "outcome": "left", "annotator": ""})),
    Request("vote body not JSON", "POST", "/api/vote", b"pair_id=1&outcome=left"),
    Request("vote body a list", "POST", "/api/vote", j([1, "left", "a"])),
    Request("vote body deeply nested", "POST", "/api/vote", b"[" * 5000 + b"]" * 5000, status=(400, 422)),
    Request("vote body over 64 KiB", "POST", "/api/vote",
            j({"pair_id": 1, "outcome": "left", "annotator": "a", "pad": "x" * MAX_BODY}), status=413),
    Request("vote without Content-Length", "POST", "/api/vote", None, status=411),
    Request("vote with a lying Content-Length", "POST", "/api/vote", j({"pair_id": 1}),
            headers={"content-length": "999999999"}, status=413),
    Request("undo empty annotator", "POST", "/api/undo", j({"annotator": ""})),
    Request("undo body not JSON", "POST", "/api/undo", b"\xff\xfe"),
    Request("DNS rebinding: a foreign Host", "GET", "/api/next?annotator=a", host="evil.example:8765", status=403),
    Request("DNS rebinding: a foreign Host on the page", "GET", "/", host="attacker.test", status=403),
    Request("no token", "GET", "/api/next?annotator=alice", token=True, status=401),
    Request("wrong token", "GET", "/api/next?annotator=alice&token=guess", token=True, status=401),
    Request("an invite used for another annotator", "GET", f"/api/next?annotator=bob&token={ALICE}", token=True,
            status=401),
    Request("an invite voting as another annotator", "POST", "/api/vote",
            j({"pair_id": 1, "outcome": "left", "annotator": "bob"}),
            headers={"x-token": ALICE, "cookie": "ernie_lora_annotator=alice"}, token=True, status=403),
    Request("an invite undoing another annotator's vote", "POST", "/api/undo", j({"annotator": "bob"}),
            headers={"x-token": ALICE, "cookie": "ernie_lora_annotator=alice"}, token=True, status=403),
    Request("an invite with a forged annotator cookie", "POST", "/api/undo", j({"annotator": "bob"}),
            headers={"x-token": ALICE, "cookie": "ernie_lora_annotator=bob"}, token=True, status=401),
]


def _votes(store: AnnotationStore) -> list:
    return store.votes()


@pytest.mark.parametrize("request_", REQUESTS, ids=[r.name for r in REQUESTS])
def test_bad_request_is_a_4xx_and_changes_no_vote(served, request_: Request):
    _, store = served
    app = create_app(store, SECRET if request_.token else None)
    before = _votes(store)
    status, body = call(app, request_.method, request_.url, request_.body, request_.headers, request_.host)
    expected = request_.status if isinstance(request_.status, tuple) else (request_.status,)
    assert status in expected, (status, body[:300])
    assert 400 <= status < 500
    assert _votes(store) == before


def test_the_http_corpus_and_the_cli_corpus_make_at_least_100_cases():
    from test_corpus import CASES

    assert len(CASES) + len(REQUESTS) >= 100 and len(REQUESTS) >= 30


def test_invites_let_each_annotator_act_only_as_themselves(served):
    _, store = served
    app = create_app(store, SECRET)
    alice = {"x-token": ALICE, "cookie": "ernie_lora_annotator=alice"}
    # the invite link sets both cookies; the page then fetches without the token in the URL
    status, _ = call(app, "GET", f"/?annotator=alice&token={ALICE}")
    assert status == 200
    status, body = call(app, "GET", "/api/next?annotator=alice", headers=alice)
    assert status == 200
    pair = json.loads(body)
    status, _ = call(app, "POST", "/api/vote", j({"pair_id": pair["pair_id"], "outcome": "left",
                                                 "annotator": "alice"}), headers=alice)
    assert status == 200
    mine = len([v for v in store.votes() if v.annotator == "alice"])
    # bob cannot undo alice's vote with his own invite, nor with alice's name on his token
    bob = {"x-token": invite_token(SECRET, "bob"), "cookie": "ernie_lora_annotator=bob"}
    assert call(app, "POST", "/api/undo", j({"annotator": "alice"}), headers=bob)[0] == 403
    assert len([v for v in store.votes() if v.annotator == "alice"]) == mine
    # the organiser's token may act as anyone
    assert call(app, "POST", "/api/undo", j({"annotator": "alice"}), headers={"x-token": SECRET})[0] == 200
    assert len([v for v in store.votes() if v.annotator == "alice"]) == mine - 1


def test_loopback_hosts_are_served_without_a_token(served):
    _, store = served
    app = create_app(store)
    for host in ("127.0.0.1:8765", "localhost:8765", "[::1]:8765", "localhost"):
        assert call(app, "GET", "/api/next?annotator=c", host=host)[0] == 200, host
