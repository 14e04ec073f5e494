"""Jobs: the studio's ``ernie-lora`` commands, run one at a time, their state kept in SQLite.

A job is a recipe (train, dpo, distill), its config (``ROOT/jobs/<id>/config.yaml``) and its run folder
(``ROOT/runs/<name>``). Its process writes ``--progress json`` lines to ``ROOT/jobs/<id>/progress.jsonl``
and stderr to ``log.txt`` in its own session, so the studio only reads files and sends signals: a studio
restarted (even after ``kill -9``) adopts a job process that is still running, and marks one that died
without a last event (``done``, ``stopped``, ``error``) as interrupted, to be resumed from its last
checkpoint exactly as ``--resume`` does.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..io import atomic_write_text

RECIPES = ("train", "dpo", "distill")
STATES = ("queued", "running", "stopping", "stopped", "interrupted", "done", "failed")
ACTIVE = ("running", "stopping")
RESUMABLE = ("stopped", "interrupted", "failed")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    recipe TEXT NOT NULL,
    preset TEXT NOT NULL DEFAULT '',
    dataset TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL,
    pid INTEGER,
    resume INTEGER NOT NULL DEFAULT 0,
    message TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    device TEXT NOT NULL DEFAULT '',
    ran_on TEXT NOT NULL DEFAULT ''
);
"""
# columns added after the first release, for a studio.sqlite made before them
ADDED_COLUMNS = {"device": "TEXT NOT NULL DEFAULT ''", "ran_on": "TEXT NOT NULL DEFAULT ''"}


@dataclass
class Job:
    id: int
    name: str
    recipe: str
    preset: str
    dataset: str
    state: str
    pid: int | None
    resume: int
    message: str
    created: float
    started: float | None
    finished: float | None
    device: str = ""  # the device asked for; "" = the first free one
    ran_on: str = ""  # the device its latest process ran on

    def as_dict(self) -> dict:
        return asdict(self)


class JobStore:
    """The jobs table; every change is one committed transaction (WAL), so a kill loses nothing written."""

    def __init__(self, root: Path):
        self.root = root
        self.jobs_dir, self.runs_dir = root / "jobs", root / "runs"
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.path = root / "studio.sqlite"
        self._lock = threading.Lock()
        with self._connect() as con:
            con.execute("PRAGMA journal_mode=WAL")
            con.executescript(SCHEMA)
            have = {row["name"] for row in con.execute("PRAGMA table_info(jobs)")}
            for column, kind in ADDED_COLUMNS.items():
                if column not in have:
                    con.execute(f"ALTER TABLE jobs ADD COLUMN {column} {kind}")

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=30)
        con.row_factory = sqlite3.Row
        return con

    def folder(self, job: Job) -> Path:
        return self.jobs_dir / str(job.id)

    def run_dir(self, job: Job) -> Path:
        return self.runs_dir / job.name

    def create(self, name: str, recipe: str, config_yaml: str, preset: str = "", dataset: str = "",
               device: str = "") -> Job:
        with self._lock, self._connect() as con:
            cur = con.execute("INSERT INTO jobs (name, recipe, preset, dataset, state, created, device) "
                              "VALUES (?,?,?,?,?,?,?)", (name, recipe, preset, dataset, "queued", time.time(), device))
            job_id = cur.lastrowid
        folder = self.jobs_dir / str(job_id)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / "config.yaml", config_yaml)
        return self.get(job_id)

    def get(self, job_id: int) -> Job | None:
        with self._connect() as con:
            row = con.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return Job(**dict(row)) if row else None

    def all(self) -> list[Job]:
        with self._connect() as con:
            return [Job(**dict(r)) for r in con.execute("SELECT * FROM jobs ORDER BY id")]

    def name_taken(self, name: str) -> bool:
        with self._connect() as con:
            return con.execute("SELECT 1 FROM jobs WHERE name = ?", (name,)).fetchone() is not None \
                or (self.runs_dir / name).exists()

    def update(self, job_id: int, **fields) -> None:
        with self._lock, self._connect() as con:
            con.execute(f"UPDATE jobs SET {', '.join(f'{k} = ?' for k in fields)} WHERE id = ?",
                        (*fields.values(), job_id))


def read_events(path: Path) -> list[dict]:
    """The JSON lines of a progress file (a torn last line, being written, is skipped)."""
    if not path.exists():
        return []
    return _parse_lines(path.read_bytes().splitlines())


def _parse_lines(lines: list[bytes]) -> list[dict]:
    events = []
    for line in lines:
        try:
            event = json.loads(line.decode("utf-8", errors="replace"))
        except json.JSONDecodeError:
            continue
        if isinstance(event, dict):
            events.append(event)
    return events


class ProgressFiles:
    """``read_events`` for files that only grow: each call reads the bytes appended since the last one, so
    polling every job each second costs what was written, not every file's whole length."""

    def __init__(self) -> None:
        self._seen: dict[Path, tuple[int, int, list[dict]]] = {}  # path: (inode, complete bytes read, events)
        self._lock = threading.Lock()

    def events(self, path: Path) -> list[dict]:
        try:
            stat = path.stat()
        except FileNotFoundError:
            return []
        with self._lock:
            inode, offset, events = self._seen.get(path, (stat.st_ino, 0, []))
            if inode != stat.st_ino or stat.st_size < offset:  # replaced or truncated: read it again
                offset, events = 0, []
            if stat.st_size > offset:
                with path.open("rb") as handle:
                    handle.seek(offset)
                    chunk = handle.read(stat.st_size - offset)
                complete = chunk.rfind(b"\n") + 1  # a line being written is read when it is whole
                events = events + _parse_lines(chunk[:complete].splitlines())
                offset += complete
            self._seen[path] = (stat.st_ino, offset, events)
            return list(events)


def _alive(pid: int | None, marker: str) -> bool:
    """Whether ``pid`` is a live process whose command line holds ``marker`` (not a recycled pid)."""
    if not pid:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        status = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return marker in cmdline and status != "Z"


def local_devices() -> list[str]:
    """The devices jobs run on: every visible CUDA GPU, or the CPU where there is none."""
    import torch  # deferred: only the job queue needs it, once

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [f"cuda:{index}" for index in range(count)] or ["cpu"]


def device_env(device: str) -> dict[str, str]:
    """The environment that gives a job process only ``device`` (its ``cuda`` is that GPU)."""
    if not device.startswith("cuda:"):
        return {}
    index = int(device.split(":", 1)[1])
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return {"CUDA_VISIBLE_DEVICES": visible[index] if index < len(visible) else str(index)}


class Runner:
    """Starts queued jobs, one at a time per device, and follows them; ``tick`` is called by a thread and by
    tests. A job asking for a device waits for it; one asking for none takes the first free device."""

    def __init__(self, store: JobStore, command: list[str] | None = None, devices: list[str] | None = None):
        self.store = store
        self.command = command or [sys.executable, "-m", "ernie_lora.cli"]
        self._devices = devices
        self._procs: dict[int, subprocess.Popen] = {}
        self._thread: threading.Thread | None = None
        self._halt = threading.Event()
        self._tick_lock = threading.Lock()

    @property
    def devices(self) -> list[str]:
        if self._devices is None:
            self._devices = local_devices()
        return self._devices

    def marker(self, job: Job) -> str:
        return str(self.store.folder(job) / "config.yaml")

    def start_thread(self, every: float = 0.5) -> None:
        def loop():
            while not self._halt.wait(every):
                self.tick()
        self.tick()
        self._thread = threading.Thread(target=loop, name="studio-jobs", daemon=True)
        self._thread.start()

    def halt(self) -> None:
        self._halt.set()

    def tick(self) -> None:
        with self._tick_lock:
            for job in self.store.all():
                if job.state in ACTIVE and not self._running(job):
                    self._finish(job)
            jobs = self.store.all()
            # a job from a studio.sqlite older than devices ran on the default one
            busy = {job.ran_on or self.devices[0] for job in jobs if job.state in ACTIVE}
            queued = [job for job in jobs if job.state == "queued"]
            for device in self.devices:
                if device in busy:
                    continue
                job = next((j for j in queued if j.device in ("", device)), None)
                if job is not None:
                    queued.remove(job)
                    self._launch(job, device)

    def _running(self, job: Job) -> bool:
        proc = self._procs.get(job.id)
        if proc is not None:
            return proc.poll() is None
        return _alive(job.pid, self.marker(job))  # adopted after a restart: not our child

    def _launch(self, job: Job, device: str) -> None:
        folder, run = self.store.folder(job), self.store.run_dir(job)
        has_checkpoint = (run / "checkpoints").is_dir() and any((run / "checkpoints").iterdir())
        cmd = [*self.command, job.recipe, self.marker(job), "--output", str(run), "--progress", "json"]
        if job.resume:
            cmd.append("--resume" if has_checkpoint else "--overwrite")  # nothing to resume: start again
        with open(folder / "progress.jsonl", "a", encoding="utf-8") as out, \
                open(folder / "log.txt", "a", encoding="utf-8") as err:
            err.write(f"$ ernie-lora {' '.join(cmd[len(self.command):])}   # on {device}\n")
            err.flush()
            env = {**os.environ, "PYTHONUNBUFFERED": "1", **device_env(device)}
            # its own session: the studio's Ctrl-C or death does not take the job with it
            proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=self.store.root,
                                    env=env, start_new_session=True)
        self._procs[job.id] = proc
        self.store.update(job.id, state="running", pid=proc.pid, started=time.time(), finished=None, message="",
                          ran_on=device)

    def _finish(self, job: Job) -> None:
        """The process is gone: its state from its last event (or its exit status when it was ours)."""
        proc = self._procs.pop(job.id, None)
        code = proc.returncode if proc is not None else None
        events = [e for e in read_events(self.store.folder(job) / "progress.jsonl")
                  if e.get("event") in ("done", "stopped", "error", "start")]
        last = events[-1].get("event") if events else None
        if last == "done" or (last is None and code == 0):
            state, message = "done", ""
        elif last == "stopped" or job.state == "stopping":
            state, message = "stopped", "stopped on request; resume continues from the last checkpoint"
        elif last == "error":
            state, message = "failed", str(events[-1].get("message", ""))[:500]
        else:
            state = "interrupted"
            message = ("the process ended without finishing" + (f" (exit status {code})" if code is not None else "")
                       + "; resume continues from the last checkpoint")
        self.store.update(job.id, state=state, pid=None, finished=time.time(), message=message)

    def stop(self, job: Job) -> None:
        if job.state == "queued":
            self.store.update(job.id, state="stopped", message="removed from the queue before it started")
        elif job.state == "running":
            self.store.update(job.id, state="stopping")
            try:
                os.kill(job.pid, signal.SIGTERM)  # the run saves a checkpoint after its current step
            except (ProcessLookupError, TypeError):
                pass

    def resume(self, job: Job) -> None:
        with open(self.store.folder(job) / "progress.jsonl", "a", encoding="utf-8") as out:
            out.write(json.dumps({"event": "start", "resume": True}) + "\n")  # the old last event no longer counts
        self.store.update(job.id, state="queued", resume=1, message="")
        self.tick()
