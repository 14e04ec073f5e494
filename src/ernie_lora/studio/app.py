"""ernie-lora studio: datasets, jobs, LoRAs and annotation in one offline web app.

The studio never trains by itself: a job is an ``ernie-lora`` process (``jobs.Runner``) writing its usual
run folder, and the pages read what it writes. Everything is served from the package (no CDN). Safety:
loopback only unless a token is given (then every request carries it: ``?token=`` once, then a cookie);
without a token, a Host that is not a loopback name is refused (DNS rebinding); request bodies are
limited (uploads 32 MiB, everything else 1 MiB); every path comes from a sanitised name looked up
inside ``ROOT``, never from a path a user typed.
"""

from __future__ import annotations

import hmac
import io
import tempfile
import threading
import time
from pathlib import Path

import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field

from ..data.categories import inside
from ..data.dataset import read_metadata
from ..errors import UserError
from ..web import TOKEN_COOKIE, check_bind, given_token, refusal
from .configs import PRESETS, fields, preset, to_yaml, validate
from .datasets import MAX_UPLOAD_BYTES, Datasets, lint, safe_name
from .jobs import RESUMABLE, JobStore, ProgressFiles, Runner

STATIC = Path(__file__).parent / "static"
MAX_BODY = 1024 * 1024
LORA_FORMATS = {"diffusers": "diffusers", "comfyui": "comfy", "kohya": "kohya"}
MAX_PLAYGROUND_PROMPTS = 12


class NameBody(BaseModel):
    name: str = Field(min_length=1, max_length=80)


class CaptionBody(BaseModel):
    text: str = Field(max_length=20_000)


class LintBody(BaseModel):
    text: str = Field(max_length=20_000)


class AutoCaptionBody(BaseModel):
    images: list[str] | None = None  # None: every image
    overwrite: bool = False


class JobBody(BaseModel):
    name: str = Field(min_length=1, max_length=80)
    recipe: str
    preset: str = ""
    dataset: str = ""
    device: str = ""  # "" = the first free device
    config: dict


class PlanBody(BaseModel):
    recipe: str
    dataset: str = ""
    config: dict
    vram: float | None = Field(default=None, gt=0, le=4096)


class PlaygroundLora(BaseModel):
    run: str
    strength: float = Field(default=1.0, ge=-4, le=4)


class PlaygroundBody(BaseModel):
    prompts: list[str] = Field(min_length=1, max_length=MAX_PLAYGROUND_PROMPTS)
    loras: list[PlaygroundLora] = Field(default_factory=list, max_length=8)
    seed: int = Field(default=0, ge=0, le=2**31)
    steps: int = Field(default=20, ge=1, le=100)
    guidance: float = Field(default=3.0, ge=0, le=30)


class Studio:
    """What the pages act on: the studio folder, its datasets, jobs and LoRAs."""

    def __init__(self, root: Path):
        self.root = root.resolve()
        self.datasets = Datasets(self.root)
        self.jobs = JobStore(self.root)
        self.runner = Runner(self.jobs)
        self.progress = ProgressFiles()
        self.playground_dir = self.root / "playground"
        self._pipes: dict[str, object] = {}
        self._pipe_lock = threading.Lock()

    # -- jobs ---------------------------------------------------------------------------------------------
    def job_view(self, job, detail: bool = False) -> dict:
        view = job.as_dict()
        folder, run = self.jobs.folder(job), self.jobs.run_dir(job)
        events = self.progress.events(folder / "progress.jsonl")
        steps = {}
        for event in events:
            if event.get("event") == "step":
                steps[event["step"]] = event  # a resumed run redoes steps: the last value counts
        last = steps[max(steps)] if steps else {}
        view.update(step=last.get("step", 0), total=last.get("total"), loss=last.get("loss"),
                    s_per_step=last.get("s_per_step"), eta_s=last.get("eta_s"),
                    resumable=job.state in RESUMABLE,
                    lora=(run / "lora.safetensors").is_file())
        if detail:
            view["losses"] = [[s, e.get("loss")] for s, e in sorted(steps.items()) if e.get("loss") is not None]
            view["validation"] = [[e.get("step"), e.get("val_loss")] for e in events
                                  if e.get("event") == "validation" and e.get("val_loss") is not None]
            samples = []
            for e in events:
                if e.get("event") == "samples" and e.get("image"):
                    rel = self._run_relative(run, e["image"])
                    if rel and rel not in samples:
                        samples.append(rel)
            view["samples"] = samples
            view["events"] = [e for e in events if e.get("event") not in ("step",)][-20:]
            log = folder / "log.txt"
            view["log"] = log.read_text(encoding="utf-8", errors="replace")[-6000:] if log.exists() else ""
            config = folder / "config.yaml"
            view["config"] = config.read_text(encoding="utf-8") if config.exists() else ""
        return view

    def _run_relative(self, run: Path, path: str) -> str | None:
        """An event's file (absolute, or relative to the studio folder the job runs in) as a path in its run."""
        full = (self.root / path).resolve()  # an absolute path stays itself
        return str(full.relative_to(run.resolve())) if full.is_relative_to(run.resolve()) else None

    def create_job(self, body: JobBody) -> dict:
        name = safe_name(body.name, "job name")
        if self.jobs.name_taken(name):
            raise UserError(f"job name {name!r} is taken (a job or a run folder has it)")
        dataset = self.datasets.folder(body.dataset) if body.dataset else None
        config, problems = validate(body.recipe, body.config, self.root, self.jobs.jobs_dir, dataset)
        if problems:
            raise UserError(f"{problems[0]['key']}: {problems[0]['message']}")
        if body.device and body.device not in self.runner.devices:
            raise UserError(f"device {body.device!r}: choose from {', '.join(self.runner.devices)} (or any)")
        job = self.jobs.create(name, body.recipe, to_yaml(config), body.preset, body.dataset, body.device)
        self.runner.tick()
        return self.job_view(self.jobs.get(job.id))

    def job(self, job_id: int):
        job = self.jobs.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id}")
        return job

    # -- LoRAs -----------------------------------------------------------------------------------------------
    def loras(self) -> list[dict]:
        from ..lora.info import lora_info

        out = []
        for run in sorted(p for p in self.jobs.runs_dir.iterdir() if p.is_dir()):
            for rel in ("lora.safetensors", "best/lora.safetensors"):
                path = run / rel
                if not path.is_file():
                    continue
                try:
                    info = lora_info(path)
                except UserError as exc:
                    out.append({"run": run.name, "file": rel, "error": str(exc)})
                    continue
                out.append({"run": run.name, "file": rel, "bytes": info.size_bytes, "layout": info.format,
                            "modules": len(info.modules), "kinds": info.kinds, "trigger": info.trigger,
                            "ranks": {str(r): n for r, n in info.ranks.items()},
                            "provenance": {k: v[:300] for k, v in info.provenance.items() if k != "training_config"},
                            "loaders": [{"loader": view.loader, "loads": view.loads, "as_meant": same,
                                         "detail": detail} for view, same, detail in info.loaders]})
        return out

    def lora_path(self, run: str, file: str = "lora.safetensors") -> Path:
        if file not in ("lora.safetensors", "best/lora.safetensors"):
            raise UserError(f"file {file!r}: not a LoRA of a run")
        path = self.jobs.runs_dir / safe_name(run, "run") / file
        if not path.is_file() or not inside(self.jobs.runs_dir, path):
            raise UserError(f"run {run!r}: no {file}")
        return path

    def prompt_set(self, count: int, run: str = "") -> dict:
        """Held-out prompts for the playground, checked against the captions of the dataset ``run`` trained
        on when the studio knows it (a job made here)."""
        job = next((j for j in self.jobs.all() if j.name == run and j.dataset), None) if run else None
        trained: set[str] = set()
        if job is not None and job.dataset in self.datasets.names():
            metadata, _ = read_metadata(self.datasets.folder(job.dataset))
            trained = {self.datasets.caption(path, metadata) for path in self.datasets.images(job.dataset)}
        return {"prompts": held_out_prompts(count, trained), "checked_against": job.dataset if job else None}

    def run_model(self, run: str) -> tuple[str, str, int]:
        """(model name, dtype, resolution) the run trained on, from its config.yaml."""
        import yaml

        config = yaml.safe_load((self.jobs.runs_dir / safe_name(run, "run") / "config.yaml").read_text()) or {}
        model = config.get("model", {})
        return model.get("name", "micro"), model.get("dtype", "fp32"), int(config.get("data", {}).get("resolution",
                                                                                                        64))

    def playground(self, body: PlaygroundBody) -> dict:
        """Each prompt generated without and with the chosen LoRAs (same seed), and both scored: layout
        fidelity where the prompt is in the layout language, OCR recall where it quotes text; means over
        the prompt set beside each other."""
        from ..generate import LoraSpec, generate, lora_triggers, prompts_with_triggers
        from ..models import ERNIE_IMAGE

        prompts = [p.strip() for p in body.prompts]
        for number, prompt in enumerate(prompts, start=1):
            if not prompt or len(prompt) > 2000:
                raise UserError(f"prompt {number}: give 1 to 2000 characters")
        paths = [self.lora_path(lora.run) for lora in body.loras]
        prompts = prompts_with_triggers(prompts, lora_triggers(paths))  # before and after: the same words
        model, dtype, side = self.run_model(body.loras[0].run) if body.loras else ("micro", "fp32", 64)
        out = self.playground_dir / time.strftime("%Y%m%d-%H%M%S")
        with self._pipe_lock:  # one generation at a time; the pipeline stays loaded between calls
            pipe = self._pipes.get(model)
            if pipe is None:
                pipe = self._pipes[model] = ERNIE_IMAGE.load_pipeline(model, dtype=dtype)
                pipe.set_progress_bar_config(disable=True)
            common = dict(steps=body.steps, guidance=body.guidance, seed=body.seed, width=side, height=side,
                          dtype=dtype, pipe=pipe, model=model)
            before = generate(prompts, out_dir=out / "before", **common)
            after = generate(prompts, loras=[LoraSpec(p, lo.strength) for p, lo in
                                             zip(paths, body.loras, strict=True)], out_dir=out / "after", **common)
        rows = [{"prompt": prompt, "before": str(b.relative_to(self.root)), "after": str(a.relative_to(self.root)),
                 "scores": {"before": _scores(b, prompt), "after": _scores(a, prompt)}}
                for prompt, b, a in zip(prompts, before, after, strict=True)]
        means = {}
        for metric in ("layout", "text"):
            pairs = [(r["scores"]["before"][metric], r["scores"]["after"][metric]) for r in rows
                     if r["scores"]["before"][metric] is not None]
            if pairs:
                means[metric] = {"before": round(sum(b for b, _ in pairs) / len(pairs), 3),
                                 "after": round(sum(a for _, a in pairs) / len(pairs), 3), "prompts": len(pairs)}
        return {"rows": rows, "means": means}


def _scores(path: Path, prompt: str) -> dict:
    """An image's objective scores for its prompt; None where the prompt gives the score nothing to check."""
    from PIL import Image

    from ..eval.layout import score_image
    from ..eval.text import score_image_text

    with Image.open(path) as image:
        rgb = image.convert("RGB")
    layout = score_image(rgb, prompt)
    text = score_image_text(rgb, prompt)
    return {"layout": None if layout is None else round(layout.score, 3),
            "structure": None if layout is None else round(layout.structure, 3),
            "colour": None if layout is None else round(layout.colour, 3),
            "text": None if text is None else round(text, 3)}


def held_out_prompts(count: int, trained: set[str]) -> list[str]:
    """Test-split prompts of the synthetic world, none of them a caption in ``trained``: a score on
    prompts a LoRA was trained on would measure memory, not what it learnt."""
    from ..data.synthetic import split_captions

    return [p for p in split_captions(count + len(trained), "test", seed=11) if p not in trained][:count]


def create_app(root: Path, token: str | None = None, run_jobs: bool = True) -> FastAPI:
    studio = Studio(root)
    app = FastAPI(title="ernie-lora studio", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.studio = studio
    if run_jobs:
        studio.runner.start_thread()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ())[1:])}: "
                                                 f"{e.get('msg', '')}" for e in exc.errors())}, status_code=422)

    @app.exception_handler(UserError)
    async def user_error(request: Request, exc: UserError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        limit = MAX_UPLOAD_BYTES + 1024 if request.url.path.endswith("/upload") else MAX_BODY
        refused = refusal(request, limit, token)
        if refused:
            return JSONResponse({"detail": refused[1]}, status_code=refused[0])
        if not token:
            return await call_next(request)
        given = given_token(request)
        if not hmac.compare_digest(given.encode(), token.encode()):
            return JSONResponse({"detail": "missing or wrong token"}, status_code=401)
        response = await call_next(request)
        if request.query_params.get("token"):
            response.set_cookie(TOKEN_COOKIE, given, httponly=True, samesite="strict")
        return response

    # -- the page and its files -------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return (STATIC / "index.html").read_text(encoding="utf-8")

    @app.get("/static/{path:path}")
    def static(path: str) -> FileResponse:
        full = (STATIC / path).resolve()
        if not inside(STATIC, full) or not full.is_file():
            raise HTTPException(404, "no such file")
        return FileResponse(full)

    @app.get("/favicon.ico")
    def favicon() -> Response:
        return Response(status_code=204)

    # -- datasets -----------------------------------------------------------------------------------------
    @app.get("/api/datasets")
    def datasets() -> list[dict]:
        return [{"name": n, "images": len(studio.datasets.images(n))} for n in studio.datasets.names()]

    @app.post("/api/datasets")
    def create_dataset(body: NameBody) -> dict:
        return {"name": studio.datasets.create(body.name)}

    @app.get("/api/datasets/{name}")
    def dataset(name: str, resolution: int = 1024) -> dict:
        if not 16 <= resolution <= 4096 or resolution % 16:
            raise HTTPException(422, "resolution: a multiple of 16 from 16 to 4096")
        return studio.datasets.listing(name, resolution)

    @app.put("/api/datasets/{name}/images/{filename}/upload")
    async def upload(name: str, filename: str, request: Request, replace: bool = False) -> dict:
        data = await request.body()
        return {"name": studio.datasets.upload(name, filename, data, replace)}

    @app.delete("/api/datasets/{name}/images/{image}")
    def delete_image(name: str, image: str) -> dict:
        studio.datasets.delete(name, image)
        return {"deleted": image}

    @app.put("/api/datasets/{name}/images/{image}/caption")
    def save_caption(name: str, image: str, body: CaptionBody) -> dict:
        studio.datasets.save_caption(name, image, body.text)
        return {"saved": image, **lint(body.text)}

    @app.post("/api/datasets/{name}/autocaption")
    def autocaption(name: str, body: AutoCaptionBody) -> dict:
        from ..captions.auto import auto_caption_image
        from ..io import open_image

        names = body.images if body.images is not None else [p.name for p in studio.datasets.images(name)]
        results = []
        for image in names:
            path = studio.datasets.image_path(name, image)
            caption, found = auto_caption_image(open_image(path))
            txt = path.with_suffix(".txt")
            write = found and (body.overwrite or not txt.exists() or not txt.read_text(errors="replace").strip())
            if write:
                studio.datasets.save_caption(name, image, caption)
            results.append({"name": image, "caption": caption, "found_text": found, "written": write})
        return {"results": results}

    @app.get("/api/datasets/{name}/check")
    def check(name: str, resolution: int = 256) -> dict:
        return studio.datasets.check(name, resolution)

    @app.get("/files/datasets/{name}/{image}")
    def dataset_image(name: str, image: str, thumb: int = 0) -> Response:
        path = studio.datasets.image_path(name, image)
        if not path.is_file() or not inside(studio.datasets.root, path):
            raise HTTPException(404, "no such image")
        if thumb:
            return Response(studio.datasets.thumbnail(name, image, max(32, min(512, thumb))), media_type="image/png")
        return FileResponse(path)

    @app.post("/api/lint")
    def lint_text(body: LintBody) -> dict:
        return lint(body.text)

    # -- jobs -----------------------------------------------------------------------------------------------
    @app.get("/api/presets")
    def presets() -> list[dict]:
        return [preset(key) for key in PRESETS]

    @app.get("/api/fields/{recipe}")
    def form_fields(recipe: str) -> list[dict]:
        if recipe not in ("train", "dpo", "distill"):
            raise HTTPException(404, "no such recipe")
        return fields(recipe)

    @app.post("/api/jobs/validate")
    def validate_job(body: PlanBody) -> dict:
        dataset = studio.datasets.folder(body.dataset) if body.dataset else None
        _, problems = validate(body.recipe, body.config, studio.root, studio.jobs.jobs_dir, dataset)
        return {"problems": problems}

    @app.post("/api/jobs/plan")
    def plan_job(body: PlanBody) -> dict:
        """``ernie-lora plan`` on the form's config (its own process: it loads torch)."""
        import subprocess
        import sys

        if body.recipe != "train":
            return {"text": "the memory plan is for LoRA training configs"}
        dataset = studio.datasets.folder(body.dataset) if body.dataset else None
        config, problems = validate(body.recipe, body.config, studio.root, studio.jobs.jobs_dir, dataset)
        if problems:
            return {"text": f"fix first: {problems[0]['key']}: {problems[0]['message']}"}
        with tempfile.TemporaryDirectory(dir=studio.root) as tmp:
            path = Path(tmp) / "plan.yaml"
            path.write_text(to_yaml(config), encoding="utf-8")
            cmd = [sys.executable, "-m", "ernie_lora.cli", "plan", str(path)]
            if body.vram:
                cmd += ["--vram", f"{body.vram:g}"]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=studio.root)
        return {"text": done.stdout if done.returncode == 0 else done.stderr.strip()[-2000:]}

    @app.get("/api/devices")
    def devices() -> list[str]:
        return studio.runner.devices

    @app.get("/api/jobs")
    def jobs() -> list[dict]:
        return [studio.job_view(job) for job in studio.jobs.all()]

    @app.post("/api/jobs")
    def create_job(body: JobBody) -> dict:
        return studio.create_job(body)

    @app.get("/api/jobs/{job_id}")
    def job(job_id: int) -> dict:
        return studio.job_view(studio.job(job_id), detail=True)

    @app.post("/api/jobs/{job_id}/stop")
    def stop(job_id: int) -> dict:
        job = studio.job(job_id)
        if job.state not in ("queued", "running"):
            raise HTTPException(409, f"job {job.name} is {job.state}; only a queued or running job stops")
        studio.runner.stop(job)
        return studio.job_view(studio.job(job_id))

    @app.post("/api/jobs/{job_id}/resume")
    def resume(job_id: int) -> dict:
        job = studio.job(job_id)
        if job.state not in RESUMABLE:
            raise HTTPException(409, f"job {job.name} is {job.state}; only a stopped, interrupted or failed job "
                                     "resumes")
        studio.runner.resume(job)
        return studio.job_view(studio.job(job_id))

    @app.post("/api/jobs/{job_id}/clone")
    def clone(job_id: int) -> dict:
        import yaml

        job = studio.job(job_id)
        config = yaml.safe_load((studio.jobs.folder(job) / "config.yaml").read_text(encoding="utf-8"))
        n = 2
        while studio.jobs.name_taken(f"{job.name}-{n}"):
            n += 1
        return {"name": f"{job.name}-{n}", "recipe": job.recipe, "preset": job.preset, "dataset": job.dataset,
                "device": job.device, "config": config}

    @app.get("/files/runs/{run}/{path:path}")
    def run_file(run: str, path: str) -> FileResponse:
        folder = studio.jobs.runs_dir / safe_name(run, "run")
        full = (folder / path).resolve()
        if not inside(folder, full) or not full.is_file() or full.suffix.lower() not in (".png", ".md", ".csv",
                                                                                           ".safetensors"):
            raise HTTPException(404, "no such file")
        return FileResponse(full)

    # -- LoRAs ----------------------------------------------------------------------------------------------
    @app.get("/api/loras")
    def loras() -> list[dict]:
        return studio.loras()

    @app.get("/api/loras/{run}/download")
    def download(run: str, format: str = "diffusers", file: str = "lora.safetensors") -> Response:
        from ..lora.formats import read_lora_file, write_modules
        from ..lora.header import provenance
        from ..lora.tools import convert_modules

        if format not in LORA_FORMATS:
            raise HTTPException(422, f"format: choose from {', '.join(LORA_FORMATS)}")
        path = studio.lora_path(run, file)
        lora = read_lora_file(path)
        plain, _ = convert_modules(lora.modules, None, None, False)
        with tempfile.TemporaryDirectory() as tmp:
            written = write_modules(Path(tmp) / "lora.safetensors", plain, LORA_FORMATS[format],
                                    provenance(lora.header))
            data = Path(written).read_bytes()
        name = f"{safe_name(run)}-{format}.safetensors"
        return Response(data, media_type="application/octet-stream",
                        headers={"Content-Disposition": f'attachment; filename="{name}"'})

    @app.post("/api/playground")
    def playground(body: PlaygroundBody) -> dict:
        return studio.playground(body)

    @app.get("/api/playground/prompts")
    def playground_prompts(count: int = 6, run: str = "") -> dict:
        return studio.prompt_set(max(1, min(count, MAX_PLAYGROUND_PROMPTS)), run)

    @app.get("/files/playground/{path:path}")
    def playground_file(path: str) -> FileResponse:
        full = (studio.playground_dir / path).resolve()
        if not inside(studio.playground_dir, full) or not full.is_file() or full.suffix != ".png":
            raise HTTPException(404, "no such file")
        return FileResponse(full)

    # -- rank: the annotation app of a dataset, mounted under /rank/<dataset>/ -----------------------------
    rank_apps: dict[str, FastAPI] = {}

    @app.api_route("/rank/{name}/{rest:path}", methods=["GET", "POST"])
    async def rank(name: str, rest: str, request: Request) -> Response:
        from ..data.categories import list_images
        from ..rank.app import create_app as create_rank_app
        from ..rank.store import AnnotationStore

        folder = studio.datasets.folder(name)
        if name not in rank_apps:
            images = list_images(folder)
            if len(images) < 2:
                raise HTTPException(409, f"dataset {name}: {len(images)} image(s); annotation needs at least two")
            store = AnnotationStore.create_or_open(studio.root / "annotations" / f"{name}.sqlite", folder, images)
            rank_apps[name] = create_rank_app(store, None)  # this server's guard already checked the request
        return await _forward(rank_apps[name], request, "/" + rest)

    return app


async def _forward(sub: FastAPI, request: Request, path: str) -> Response:
    """Run ``request`` through a sub-application at ``path`` (its own routes), collecting its response."""
    body = await request.body()
    scope = {**request.scope, "path": path, "raw_path": path.encode(), "root_path": ""}
    headers = [(k, v) for k, v in scope["headers"] if k != b"host"] + [(b"host", b"127.0.0.1")]
    scope["headers"] = headers
    sent = {"status": 500, "headers": [], "body": io.BytesIO()}

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        if message["type"] == "http.response.start":
            sent["status"], sent["headers"] = message["status"], message.get("headers", [])
        elif message["type"] == "http.response.body":
            sent["body"].write(message.get("body", b""))

    await sub(scope, receive, send)
    headers = {k.decode(): v.decode() for k, v in sent["headers"] if k.lower() not in (b"content-length",)}
    return Response(sent["body"].getvalue(), status_code=sent["status"], headers=headers)


def serve(root: Path, host: str, port: int, token: str | None) -> None:
    check_bind(host, token, "reach the studio")
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    app = create_app(root, token)
    url = f"http://{host}:{port}/" + (f"?token={token}" if token else "")
    print(f"ernie-lora studio on {url} (folder {root.resolve()}); Ctrl-C stops the studio, not its jobs", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")

