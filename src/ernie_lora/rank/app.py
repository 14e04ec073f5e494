"""The annotation web app: two images side by side, ← / → / ↓ (tie) / s (skip), u to undo.

Everything is served from here (no CDN): the page, its script, and the images, which are looked up by
id in the database and sent only when the file, symlinks resolved, lies inside the dataset folder.
With a token every request must carry it (``?token=``, the ``X-Token`` header, or the cookie the page
sets on first visit): the server's own token (the organiser, who may act as anyone) or an annotator's
invite token (``ernie-lora rank invite``), which acts only as that annotator, so nobody can vote or undo in
another's name. Without a token the server listens on loopback only and answers only requests whose Host
is a loopback name (a web page on another site cannot reach it by DNS rebinding). Bodies over 64 KiB are
refused; every bad request gets a 4xx, never a 500.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field

from ..data.categories import inside, list_images
from ..errors import UserError
from ..web import TOKEN_COOKIE, check_bind, given_token, refusal
from .store import OUTCOMES, AnnotationStore

ANNOTATOR_COOKIE = "ernie_lora_annotator"
MAX_BODY = 64 * 1024  # a vote is ~100 bytes
MAX_ID = 2**62  # SQLite integers are 64-bit: a larger id would fail inside the database, not as a 4xx


def invite_token(secret: str, annotator: str) -> str:
    """The token that lets ``annotator`` (and no one else) vote on a server started with ``--token secret``."""
    return hmac.new(secret.encode(), f"annotator:{annotator}".encode(), hashlib.sha256).hexdigest()[:32]


class VoteRequest(BaseModel):
    pair_id: int = Field(ge=0, le=MAX_ID)
    outcome: str = Field(pattern="^(" + "|".join(OUTCOMES) + ")$")
    annotator: str = Field(min_length=1, max_length=64)


class AnnotatorRequest(BaseModel):
    annotator: str = Field(min_length=1, max_length=64)


def create_app(store: AnnotationStore, token: str | None = None) -> FastAPI:
    root = store.root
    app = FastAPI(title="ernie-lora annotation", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own answer echoes the input, and a NaN in it cannot be written as JSON (a 500)
        return JSONResponse({"detail": [{"loc": list(e.get("loc", ())), "msg": e.get("msg", "")}
                                        for e in exc.errors()]}, status_code=422)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        """Body size, the Host header (no token) and who is asking (with a token)."""
        refused = refusal(request, MAX_BODY, token)
        if refused:
            return JSONResponse({"error": refused[1]}, status_code=refused[0])
        request.state.annotator = None  # None: anyone (no token, or the organiser's token)
        if not token:
            return await call_next(request)
        given = given_token(request)
        claimed = (request.query_params.get("annotator") if request.query_params.get("token")
                   else request.cookies.get(ANNOTATOR_COOKIE)) or ""
        if hmac.compare_digest(given.encode(), token.encode()):
            claimed = ""
        elif not (claimed and hmac.compare_digest(given.encode(), invite_token(token, claimed).encode())):
            return JSONResponse({"error": "missing or wrong token"}, status_code=401)
        request.state.annotator = claimed or None
        response = await call_next(request)
        if request.query_params.get("token"):
            response.set_cookie(TOKEN_COOKIE, given, httponly=True, samesite="strict")
            if claimed:
                response.set_cookie(ANNOTATOR_COOKIE, claimed, httponly=True, samesite="strict")
        return response

    def as_annotator(request: Request, annotator: str) -> None:
        invited = request.state.annotator
        if invited is not None and annotator != invited:
            raise HTTPException(403, f"this invite is {invited}'s; it cannot act as {annotator}")

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE

    @app.get("/favicon.ico")
    def favicon() -> Response:
        return Response(status_code=204)

    @app.get("/api/next")
    def next_pair(request: Request, annotator: str) -> dict:
        if not 0 < len(annotator) <= 64:
            raise HTTPException(422, "annotator: 1 to 64 characters")
        as_annotator(request, annotator)
        return store.next_pair(annotator)

    @app.post("/api/vote")
    def vote(request: Request, body: VoteRequest) -> dict:
        as_annotator(request, body.annotator)
        try:
            new = store.vote(body.pair_id, body.outcome, body.annotator)
        except UserError as exc:
            raise HTTPException(404, str(exc)) from None
        return {"recorded": new, "next": store.next_pair(body.annotator)}  # committed before the next pair

    @app.post("/api/undo")
    def undo(request: Request, body: AnnotatorRequest) -> dict:
        as_annotator(request, body.annotator)
        pair = store.undo(body.annotator)
        return {"undone": pair is not None, "next": pair or store.next_pair(body.annotator)}

    @app.get("/img/{image_id}")
    def image(image_id: int) -> FileResponse:
        if not 0 <= image_id <= MAX_ID:
            raise HTTPException(404, "no such image")
        rel = store.image_path(image_id)
        path = root / rel if rel else None
        if path is None or not inside(root, path) or not path.is_file():
            raise HTTPException(404, "no such image")
        return FileResponse(path, headers={"Cache-Control": "private, max-age=3600"})

    return app


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>ernie-lora: which is better?</title>
<style>
body { font-family: system-ui, sans-serif; margin: 0; background: #111; color: #eee; }
header { display: flex; gap: 1.5em; align-items: center; padding: .6em 1em; background: #222; }
main { display: flex; gap: 1em; padding: 1em; justify-content: center; }
figure { flex: 1; margin: 0; text-align: center; max-width: 48vw; }
figure img { width: min(46vw, 76vh); aspect-ratio: auto; object-fit: contain; border: 3px solid #333;
             cursor: pointer; background: #222; }
figcaption { font-size: .85em; color: #aaa; margin-top: .4em; }
#status { padding: 0 1em; color: #9c9; } kbd { background: #333; padding: 0 .3em; border-radius: 3px; }
</style></head><body>
<header><label>annotator <input id="annotator" size="14" autocomplete="name"></label>
<span id="progress">-</span>
<span><kbd>&larr;</kbd> left <kbd>&rarr;</kbd> right <kbd>&darr;</kbd> tie <kbd>s</kbd> skip <kbd>u</kbd> undo</span>
</header>
<div id="status">type your name, then judge: which image is better?</div>
<main><figure><img id="left" alt="left image"><figcaption id="left-prompt"></figcaption></figure>
<figure><img id="right" alt="right image"><figcaption id="right-prompt"></figcaption></figure></main>
<script>
const $ = (id) => document.getElementById(id);
let pair = null, busy = false;
const invited = new URLSearchParams(location.search).get("annotator");
$("annotator").value = invited || localStorage.getItem("annotator") || "";
if (invited) $("annotator").readOnly = true;  // an invite acts as this annotator only
function name() { return $("annotator").value.trim(); }
function show(data) {
  const p = data.progress || {};
  $("progress").textContent = `round ${p.round} · ${p.round_voted}/${p.round_pairs} pairs this round · ` +
    `${p.votes} votes in all · ${p.mine} yours · ${p.images} images`;
  if (data.done) { pair = null; $("status").textContent = "done: every image has met every other"; return; }
  pair = data;
  $("left").src = "img/" + data.left.id; $("right").src = "img/" + data.right.id;
  $("left-prompt").textContent = data.left.prompt; $("right-prompt").textContent = data.right.prompt;
  $("status").textContent = `pair ${data.pair_id}`;
}
async function call(url, body) {
  busy = true;
  try {
    const r = await fetch(url, body ? {method: "POST", headers: {"Content-Type": "application/json"},
                                       body: JSON.stringify(body)} : {});
    if (!r.ok) { $("status").textContent = `error ${r.status}: ${await r.text()}`; return null; }
    return await r.json();
  } catch (e) { $("status").textContent = "server unreachable: " + e; return null; }
  finally { busy = false; }
}
async function load() {
  if (!name() || busy) return;  // one request at a time: a second load or a key during one is dropped
  localStorage.setItem("annotator", name());
  const data = await call("api/next?annotator=" + encodeURIComponent(name()));
  if (data) show(data);
}
async function vote(outcome) {
  if (!pair || busy) return;
  const data = await call("api/vote", {pair_id: pair.pair_id, outcome, annotator: name()});
  if (data) show(data.next);
}
async function undo() {
  if (busy || !name()) return;
  const data = await call("api/undo", {annotator: name()});
  if (data) show(data.next);
}
$("annotator").addEventListener("change", load);
$("left").addEventListener("click", () => vote("left"));
$("right").addEventListener("click", () => vote("right"));
document.addEventListener("keydown", (e) => {
  if (e.target === $("annotator")) { if (e.key === "Enter") { $("annotator").blur(); load(); } return; }
  const keys = {ArrowLeft: "left", ArrowRight: "right", ArrowDown: "tie", s: "skip"};
  if (keys[e.key]) { e.preventDefault(); vote(keys[e.key]); }
  else if (e.key === "u") { undo(); }
});
load();
</script></body></html>
"""


def serve(folder: Path, db: Path | None, host: str, port: int, token: str | None) -> None:
    """List the folder's images into the database and serve the app until interrupted."""
    check_bind(host, token, "vote")
    images = list_images(folder)
    if len(images) < 2:
        raise UserError(f"{folder}: {len(images)} image(s); annotation needs at least two")
    store = AnnotationStore.create_or_open(db or Path(folder) / "annotations.sqlite", folder, images)
    print(f"annotating {len(images)} images of {folder} into {store.path}: http://{host}:{port}/"
          + (f"?token={token}" if token else ""), flush=True)
    uvicorn.run(create_app(store, token), host=host, port=port, log_level="warning")
