"""The shared engine every recipe runs on, as small pieces a recipe calls in order (no base class):

1. ``open_run``: the run folder (refuse to overwrite, resume only with the same config), processes, device;
2. ``setup_model``: the DiT with its LoRA (fresh or ``lora.init_from``), quantisation, block swap, FSDP,
   gradient checkpointing, regional compile;
3. ``make_optimisation``: optimizer, LR schedule, gradient averaging across processes, clipping;
4. ``Checkpoints``: LoRA files and everything an exact resume needs (optimizer, schedule, data position,
   every random generator), written atomically;
5. ``train_steps``: the loop: gradient accumulation, a metrics CSV row per step, progress with s/step and
   ETA, a line when a checkpoint or sample is written, plots;
6. ``lora_metadata``: the provenance block of every LoRA file a recipe hands out.

A recipe supplies its data, its ``micro_step`` (forward and backward of one micro-batch, returning its
metrics) and its outputs.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import pickle
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from accelerate import PartialState
from diffusers import ErnieImagePipeline, FlowMatchEulerDiscreteScheduler
from diffusers.optimization import get_scheduler
from peft import LoraConfig as PeftLoraConfig
from pydantic import BaseModel
from tqdm.auto import tqdm

from .. import __version__
from ..config import BaseModelConfig, LoggingConfig, LoraConfig, SampleConfig, TrainConfig
from ..cpu_threads import pick_cpu_threads
from ..errors import RunStopped, UserError
from ..io import atomic_write_text
from ..lora.adapters import (
    ADAPTER_NAME,
    add_lora,
    load_lora_into_adapter,
    lora_state_dict,
    peft_config_metadata,
    resolve_targets,
    set_lora_state,
)
from ..lora.files import read_lora, read_lora_shapes, save_lora
from ..lora.formats import read_lora_file
from ..lora.header import trigger_of
from ..lora.tools import check_fits, fuse_into
from ..models import ErnieImageFamily, parse_dtype
from ..models.block_swap import BlockSwap, move_buffers
from ..models.quantize import quantize_base
from ..plots import save_image_grid, save_metric_plots
from .run_dir import (
    check_resume_config,
    checkpoint_dirs,
    checkpoint_problem,
    prepare_run_dir,
    record_run,
    save_checkpoint,
)

# -- 1. the run ------------------------------------------------------------------------------------------


@dataclass
class Run:
    output: Path
    recipe: str
    resume: bool
    device: torch.device
    world: int = 1  # processes (torchrun / accelerate launch)
    rank: int = 0
    procs: PartialState | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wait(self) -> None:
        if self.procs is not None:
            self.procs.wait_for_everyone()


def pick_device(requested: str | None) -> torch.device:
    """``train.device``, checked: a device this machine has (default: cuda when there is one)."""
    if not requested:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise UserError(f"train.device: {requested!r} is not a device (cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"train.device: {requested} asked for, but this machine has no CUDA GPU")
    return device


def open_run(output: str | Path, cfg: BaseModel, recipe: str, *, resume: bool, overwrite: bool, force: bool = False,
             distributed: bool = False) -> Run:
    """The run folder made ready (an existing run is refused unless resumed or overwritten) and the device.

    ``distributed``: the recipe runs under ``torchrun`` / ``accelerate launch`` (one process per device);
    other recipes refuse to run in several processes."""
    output = Path(output).expanduser()
    procs = PartialState(cpu=not torch.cuda.is_available()) if distributed else None
    world = procs.num_processes if procs else int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not distributed:
        raise UserError(f"ernie-lora {recipe} runs in one process; launch it without torchrun / accelerate")
    run = Run(output, recipe, resume, pick_device(cfg.train.device) if world == 1 else procs.device, world,
              procs.process_index if procs else 0, procs)
    if run.is_main:
        prepare_run_dir(output, resume, overwrite)
        if resume:
            check_resume_config(output, cfg, force)
    run.wait()
    pick_cpu_threads(cfg.model.name, cfg.model.revision, run.device, announce=run.is_main)
    if world == 1 and threading.current_thread() is threading.main_thread():
        # SIGTERM (the studio's Stop, a scheduler's preemption) ends the run after the current step with a
        # checkpoint, so --resume continues it exactly; several processes would each stop at their own step
        _STOP.clear()
        signal.signal(signal.SIGTERM, lambda signum, frame: _STOP.set())
    return run


_STOP = threading.Event()



def close_run(run: Run) -> None:
    """Every process waits until the main one has written its files, then leaves the process group (a
    process that exits first, gloo threads running, aborts)."""
    if run.procs is not None and run.world > 1:
        run.wait()
        torch.distributed.destroy_process_group()


def start_run(run: Run, cfg: BaseModel) -> None:
    """Written only once data and model are ready: a run that failed on them leaves no run to refuse later."""
    if run.is_main:
        record_run(run.output, cfg, run.recipe, run.resume)


# -- 2. the model ----------------------------------------------------------------------------------------


@dataclass
class TrainedModel:
    """The DiT with the trained LoRA, and what was set up around it."""

    transformer: torch.nn.Module
    peft_config: PeftLoraConfig
    targets: list[str]
    params: list[torch.nn.Parameter]
    device: torch.device
    autocast: torch.dtype | None
    block_swap: BlockSwap | None = None
    setup: dict = field(default_factory=dict)  # what was done, for tests and reports

    def autocast_context(self):
        """``train.mixed_precision``: bf16 autocast over the fp32 LoRA, or nothing."""
        return torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None)

    def after_backward(self) -> None:
        if self.block_swap is not None:
            self.block_swap.park_all()


def add_training_lora(transformer, lora_cfg: LoraConfig) -> tuple[PeftLoraConfig, list[str], list[torch.nn.Parameter]]:
    """The configured LoRA on the DiT (fresh, or started from ``lora.init_from``), its weights in fp32 over
    the base's dtype; returns the peft config, the target modules and the trainable parameters."""
    targets = resolve_targets(transformer, lora_cfg.targets)
    peft_config = add_lora(transformer, lora_cfg.rank, lora_cfg.alpha, targets, lora_cfg.dropout)
    if lora_cfg.init_from:
        load_lora_into_adapter(transformer, lora_cfg.init_from, peft_config, f"lora.init_from {lora_cfg.init_from}")
    params = [p for p in transformer.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    return peft_config, targets, params


def setup_model(run: Run, family: ErnieImageFamily, model_cfg: BaseModelConfig, lora_cfg: LoraConfig,
                tcfg: TrainConfig, *, quantize: str = "none", block_swap: int = 0, fsdp: bool = False,
                assistant: tuple[str, float] | None = None) -> TrainedModel:
    """Load the DiT alone, fuse an ``assistant`` LoRA (path, strength) into it if given, and put the trained
    LoRA on it, with every memory setting the config asks for."""
    fsdp = fsdp and run.world > 1
    # block swap and FSDP load the base into CPU memory and move to the GPU only what it holds
    transformer = family.load_transformer(model_cfg.name, dtype=parse_dtype(model_cfg.dtype),
                                          device="cpu" if block_swap or fsdp else run.device,
                                          revision=model_cfg.revision)
    if assistant is not None:
        modules = read_lora_file(assistant[0]).modules
        check_fits(assistant[0], modules, transformer)
        fuse_into(transformer, modules, assistant[1])  # exactly as generate applies it; before quantising
        if run.is_main:
            print(f"assistant LoRA {assistant[0]} fused into the base at strength {assistant[1]:g} "
                  f"({len(modules)} modules)")
    quantize_base(transformer, quantize)
    torch.manual_seed(tcfg.seed)  # LoRA A init
    peft_config, targets, params = add_training_lora(transformer, lora_cfg)
    if tcfg.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    swap = BlockSwap(transformer, block_swap, run.device) if block_swap else None
    if fsdp:
        shard_frozen_base(transformer, family, params, run.device, run.world)
        blocks = [p for p in family.blocks(transformer).parameters() if not p.requires_grad]
        held, whole = sum(p.to_local().numel() for p in blocks), sum(p.numel() for p in blocks)
        if run.is_main:
            print(f"fsdp: the frozen base is sharded over {run.world} processes; the LoRA is replicated")
        print(f"fsdp: process {run.rank} holds {held} of {whole} frozen block weights", flush=True)
    if tcfg.compile:
        transformer.compile_repeated_blocks()  # diffusers: torch.compile of each repeated block
    transformer.train()
    autocast = torch.bfloat16 if tcfg.mixed_precision == "bf16" else None
    setup = {"device": str(run.device), "base_dtype": model_cfg.dtype, "quantize": quantize,
             "gradient_checkpointing": transformer.is_gradient_checkpointing, "compiled": tcfg.compile,
             "block_swap": block_swap, "fsdp": fsdp, "autocast": str(autocast) if autocast else "no"}
    return TrainedModel(transformer, peft_config, targets, params, run.device, autocast, swap, setup)


def shard_frozen_base(transformer, family: ErnieImageFamily, lora_params: list[torch.nn.Parameter],
                      device: torch.device, world: int) -> None:
    """FSDP2 over the frozen base only: each block (then the rest) is a unit whose weights are split over
    the processes and gathered for its forward and backward. The LoRA is left out of the sharding, so
    it stays a plain tensor on every process: saving, resuming and the gradient average are unchanged."""
    # deferred: torch.distributed's FSDP modules load only for a sharded run
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    ignored = set(lora_params)
    for block in family.blocks(transformer):
        fully_shard(block, mesh=mesh, ignored_params=ignored)
    fully_shard(transformer, mesh=mesh, ignored_params=ignored)
    for p in lora_params:  # FSDP moved the shards to the mesh's device; the LoRA follows by hand
        p.data = p.data.to(device)
    move_buffers(transformer, device)


# -- 3. optimisation -------------------------------------------------------------------------------------


def make_optimizer(params, tcfg: TrainConfig, lr: float | None = None) -> torch.optim.Optimizer:
    lr = tcfg.lr if lr is None else lr
    if tcfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb  # optional: CUDA machines only
        except ImportError:
            raise UserError("train.optimizer: adamw8bit needs bitsandbytes (pip install 'ernie-lora[bnb]')") from None
        if not torch.cuda.is_available():
            raise UserError("train.optimizer: adamw8bit needs a CUDA GPU; use adamw on CPU")
        return bnb.optim.AdamW8bit(params, lr=lr, betas=tcfg.betas, weight_decay=tcfg.weight_decay)
    return torch.optim.AdamW(params, lr=lr, betas=tcfg.betas, weight_decay=tcfg.weight_decay)


@dataclass
class Optimisation:
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    max_grad_norm: float | None
    world: int = 1

    def step(self) -> tuple[float, float]:
        """Average gradients across processes (as DDP does), clip, step; returns (gradient norm, lr)."""
        if self.world > 1:
            for p in self.params:
                torch.distributed.all_reduce(p.grad)
                p.grad /= self.world
        norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm or math.inf))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm, self.scheduler.get_last_lr()[0]

    def set_base_lr(self, lr: float) -> None:
        """A new peak lr on the same schedule (a curriculum stage's own lr): the schedule's factor at the
        current step now multiplies ``lr``. Idempotent, so a resumed stage sets it again."""
        self.scheduler.base_lrs = [lr] * len(self.optimizer.param_groups)
        for group, factor in zip(self.optimizer.param_groups, self.scheduler.lr_lambdas, strict=True):
            group["initial_lr"] = lr
            group["lr"] = lr * factor(self.scheduler.last_epoch)


def make_optimisation(params, tcfg: TrainConfig, world: int = 1) -> Optimisation:
    optimizer = make_optimizer(params, tcfg)
    # diffusers' "constant" ignores num_warmup_steps; with a warmup it is "constant_with_warmup"
    name = "constant_with_warmup" if tcfg.lr_scheduler == "constant" and tcfg.warmup_steps else tcfg.lr_scheduler
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=tcfg.warmup_steps, num_training_steps=tcfg.steps)
    return Optimisation(params, optimizer, scheduler, tcfg.max_grad_norm, world)


# -- 4. checkpoints ----------------------------------------------------------------------------------------


class GeneratorState:
    """A torch generator as checkpoint state."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def state_dict(self) -> dict:
        return {"state": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["state"])


class PythonRandomState:
    """A ``random.Random`` as checkpoint state."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def state_dict(self) -> dict:
        return {"state": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        self.rng.setstate(state["state"])


def _global_rng() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_global_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpoints:
    """Checkpoint folders ``step-N/``: each adapter's raw weights (``{file: adapter name}``), and in
    ``training_state.pt`` the step, every stateful object (optimizer, schedule, data order, generators)
    and the global RNG. Written atomically, the last ``keep`` kept."""

    def __init__(self, run: Run, every: int, keep: int, total_steps: int, model: TrainedModel,
                 states: dict[str, object], adapters: dict[str, str] | None = None):
        self.run, self.every, self.keep, self.total = run, every, keep, total_steps
        self.model, self.states = model, states
        self.adapters = adapters or {"lora.safetensors": ADAPTER_NAME}

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.total

    def save(self, step: int) -> Path:
        def write(folder: Path) -> None:
            for file, adapter in self.adapters.items():
                save_lora(folder / file, lora_state_dict(self.model.transformer, adapter),
                          peft_config_metadata(self.model.peft_config))
            torch.save({"step": step, "rng": _global_rng(), **{k: v.state_dict() for k, v in self.states.items()}},
                       folder / "training_state.pt")
        return save_checkpoint(self.run.output, step, write, self.keep)

    def latest_or_save(self, step: int) -> Path:
        """The checkpoint of ``step``: the one just written when it was due, else a new one."""
        return checkpoint_dirs(self.run.output)[-1][1] if self.due(step) else self.save(step)

    def restore(self) -> int:
        """Load the newest intact checkpoint into the live objects (a damaged one is skipped, with a line saying
        which and why); returns its step."""
        for _, folder in reversed(checkpoint_dirs(self.run.output)):
            problem = checkpoint_problem(folder)
            if problem is None:
                try:
                    weights = {file: read_lora(folder / file)[0] for file in self.adapters}
                    # our own file; weights_only keeps torch.load from unpickling arbitrary objects all the same
                    state = torch.load(folder / "training_state.pt", map_location="cpu", weights_only=True)
                    missing = [key for key in ("step", "rng", *self.states) if key not in state]
                    if missing:
                        raise KeyError(", ".join(missing))
                except (UserError, OSError, RuntimeError, EOFError, KeyError, ValueError,
                        pickle.UnpicklingError) as exc:
                    problem = f"unreadable ({type(exc).__name__}: {str(exc)[:120]})"
            if problem is not None:
                if self.run.is_main:
                    print(f"resume: skipped checkpoint {folder}: {problem}", file=sys.stderr)
                continue
            for file, adapter in self.adapters.items():
                set_lora_state(self.model.transformer, weights[file], str(folder / file), adapter)
            for key, obj in self.states.items():
                obj.load_state_dict(state[key])
            _set_global_rng(state["rng"])
            if self.run.is_main:
                print(f"resume: from {folder}", file=sys.stderr)
            return int(state["step"])
        raise UserError(f"--resume: no intact checkpoint in {self.run.output / 'checkpoints'} (each one is "
                        "damaged; see the lines above)")


# -- 5. metrics, progress, the loop -----------------------------------------------------------------------


class MetricsLog:
    """``metrics.csv``, one row per step, appended and flushed as it trains. On resume the rows up to the
    checkpoint's step are kept (a torn or later row is dropped) and the file rewritten atomically."""

    def __init__(self, run: Run, fields: tuple[str, ...], step: int):
        self.path, self.fields = run.output / "metrics.csv", ("step", *fields)
        self.history: list[dict] = [r for r in self._read() if r["step"] <= step] if step else []
        self.file = None
        if run.is_main:
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=self.fields, lineterminator="\n")
            writer.writeheader()
            writer.writerows(self._formatted(r) for r in self.history)
            atomic_write_text(self.path, buf.getvalue())
            self.file = open(self.path, "a", encoding="utf-8", newline="")  # noqa: SIM115 (closed by close())
            self.writer = csv.DictWriter(self.file, fieldnames=self.fields, lineterminator="\n")

    def _read(self) -> list[dict]:
        if not self.path.exists():
            return []
        rows = []
        for row in csv.DictReader(io.StringIO(self.path.read_text(encoding="utf-8"))):
            try:
                rows.append({"step": int(row["step"]), **{k: float(row[k]) for k in self.fields[1:]}})
            except (KeyError, TypeError, ValueError):
                break  # a torn last line, or a file of an older layout: everything after it is redone
        return rows

    @staticmethod
    def _formatted(row: dict) -> dict:
        return {k: f"{v:.8g}" if isinstance(v, float) else v for k, v in row.items()}

    def add(self, row: dict) -> None:
        self.history.append(row)
        if self.file is not None:
            self.writer.writerow(self._formatted(row))
            self.file.flush()

    def plot(self, title: str, plotted: tuple[str, ...]) -> Path | None:
        if self.file is None or not self.history:
            return None
        series = {k: [r[k] for r in self.history] for k in plotted}
        return save_metric_plots([r["step"] for r in self.history], series, self.path.with_suffix(".png"), title)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


class Progress:
    """What a run shows while it trains: a bar with one speed (s/step) and the ETA (``bar``), one JSON object
    per line for every step and event (``json``), or nothing (``off``; ``True`` / ``False`` mean bar / off);
    every file a run writes gets a line (or a JSON event) saying what and where. The trackers (TensorBoard,
    W&B) get every step's metrics and every image written."""

    def __init__(self, run: Run, total: int, initial: int, mode: bool | str, trackers: Trackers | None = None):
        mode = {True: "bar", False: "off"}.get(mode, mode)
        if mode not in ("bar", "json", "off"):
            raise UserError(f"--progress {mode!r}: choose bar, json or off")
        self.mode = mode if run.is_main else "off"
        self.total, self.started, self.first = total, time.perf_counter(), initial
        self.trackers = trackers
        self.bar = tqdm(total=total, initial=initial, desc=run.recipe, unit="step", disable=self.mode != "bar",
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n}/{total} [{elapsed}<{remaining}{postfix}]")

    def update(self, step: int, shown: dict[str, float], logged: dict[str, float] | None = None) -> None:
        """Step ``step`` is done: ``shown`` goes to the bar (or JSON line), ``logged`` to the trackers."""
        if self.trackers is not None and logged:
            self.trackers.log(logged, step)
        per_step = (time.perf_counter() - self.started) / max(1, step - self.first)
        if self.mode == "json":
            self.emit("step", step=step, total=self.total, **{k: round(v, 6) for k, v in shown.items()},
                      s_per_step=round(per_step, 4), eta_s=round(per_step * (self.total - step), 1))
            return
        self.bar.set_postfix({**{k: f"{v:.4g}" for k, v in shown.items()}, "s/step": f"{per_step:.2f}"})
        self.bar.update(step - self.bar.n)

    def note(self, text: str, event: str = "note", image: Path | None = None, **fields) -> None:
        """A line for people (``text``), or in json mode the event with its fields; ``image`` (a PNG just
        written, with ``step`` in the fields) also goes to the trackers."""
        if image is not None and self.trackers is not None:
            self.trackers.image(event, image, int(fields.get("step", 0)))
        if self.mode == "json":
            self.emit(event, **({"image": image} if image is not None else {}), **fields)
        elif self.mode == "bar":
            self.bar.write(text)

    def log(self, values: dict[str, float], step: int) -> None:
        """Metrics that are not a step's (validation, scores): to the trackers."""
        if self.trackers is not None:
            self.trackers.log(values, step)

    @staticmethod
    def emit(event: str, **fields) -> None:
        print(json.dumps({"event": event, **fields}, default=str), flush=True)

    def close(self) -> None:
        self.bar.close()
        if self.trackers is not None:
            self.trackers.close()


class Trackers:
    """TensorBoard and / or Weights & Biases (``logging.trackers``) through accelerate's trackers: scalars
    per step, images when a grid is written. Loaded only when a run asks for one."""

    def __init__(self, run: Run, logging_cfg: LoggingConfig, config: BaseModel):
        self.trackers = []
        if not run.is_main or not logging_cfg.trackers:
            return
        for name in logging_cfg.trackers:
            self.trackers.append(_open_tracker(name, run, logging_cfg, config))

    def log(self, values: dict[str, float], step: int) -> None:
        finite = {k: v for k, v in values.items() if isinstance(v, float | int) and math.isfinite(v)}
        for tracker in self.trackers:
            tracker.log(finite, step=step)

    def image(self, name: str, path: Path, step: int) -> None:
        if not self.trackers:
            return
        import numpy as np
        from PIL import Image

        with Image.open(path) as im:
            pixels = np.asarray(im.convert("RGB"))
        for tracker in self.trackers:
            tracker.log_images({name: [pixels] if tracker.name == "wandb" else pixels[None]}, step=step,
                               **({} if tracker.name == "wandb" else {"dataformats": "NHWC"}))

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []


def _open_tracker(name: str, run: Run, logging_cfg: LoggingConfig, config: BaseModel):
    # deferred: tensorboard / wandb are optional extras, imported only by runs that ask for them
    from accelerate.tracking import TensorBoardTracker, WandBTracker

    tracker = (TensorBoardTracker(run.output.name, run.output / "logs") if name == "tensorboard"
               else WandBTracker(logging_cfg.project, name=run.output.name, dir=str(run.output)))
    try:
        tracker.start()
    except ImportError as exc:  # ModuleNotFoundError included
        raise UserError(f"logging.trackers: {name} is not installed ({exc.name}); "
                        f"pip install 'ernie-lora[{name}]'") from None
    flat: dict[str, int | float | str | bool] = {}

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                flat[prefix + key] = value if isinstance(value, int | float | str | bool) else str(value)
    walk(config.model_dump(mode="json"), "")
    tracker.store_init_configuration(flat)
    return tracker


def train_steps(run: Run, tcfg: TrainConfig, step: int, micro_step: Callable[[int, float], dict[str, float]],
                model: TrainedModel, optimisation: Optimisation, checkpoints: Checkpoints, log: MetricsLog,
                progress: Progress, shown: tuple[str, ...], plot: tuple[str, tuple[str, ...]],
                on_step: Callable[[int], None] | None = None, stop_after: int | None = None) -> int:
    """Optimizer steps from ``step`` to ``tcfg.steps``: ``micro_step(step, scale)`` runs forward and backward
    of one micro-batch of optimizer step ``step`` (0-based) with its loss multiplied by ``scale``
    (1 / grad_accum) and returns its metrics; their
    mean over the micro-batches, the lr and the gradient norm are logged per step. ``stop_after`` ends the
    loop after that step as if the process were killed (tests use it). Returns the last step done."""
    while step < tcfg.steps:
        sums: dict[str, float] = {}
        for _ in range(tcfg.grad_accum):
            for key, value in micro_step(step, 1.0 / tcfg.grad_accum).items():
                sums[key] = sums.get(key, 0.0) + value / tcfg.grad_accum
            model.after_backward()
        grad_norm, lr = optimisation.step()
        step += 1
        row = {**sums, "lr": lr, "grad_norm": grad_norm}
        log.add({"step": step, **row})
        progress.update(step, {k: sums[k] for k in shown if k in sums}, row)
        if run.is_main and checkpoints.due(step):
            folder = checkpoints.save(step)
            chart = log.plot(*plot)
            progress.note(f"step {step}: checkpoint {folder}" + (f"; plot {chart}" if chart else ""),
                          event="checkpoint", step=step, path=folder, plot=chart)
        if on_step is not None:
            on_step(step)
        if _STOP.is_set() and step < tcfg.steps:
            folder = checkpoints.latest_or_save(step) if run.is_main else None
            progress.note(f"step {step}: stopped on request; checkpoint {folder} (--resume continues)",
                          event="stopped", step=step, path=folder)
            raise RunStopped(f"stopped at step {step}: resume with --resume")
        if stop_after is not None and step >= stop_after:
            break
    return step


# -- samples during training ------------------------------------------------------------------------------


class Sampler:
    """Generates fixed prompts with the training transformer and cached embeddings, as a grid PNG."""

    def __init__(self, family: ErnieImageFamily, model_cfg: BaseModelConfig, scfg: SampleConfig,
                 embeddings: list[torch.Tensor], negative: torch.Tensor, transformer, device: torch.device,
                 side: int, labels: list[str] | None = None):
        parts = family.load_pipeline(model_cfg.name, dtype=model_cfg.vae_dtype, device=device,
                                     components=("vae", "scheduler"), revision=model_cfg.revision)
        self.pipe = ErnieImagePipeline(
            transformer=transformer, vae=parts.vae, text_encoder=None, tokenizer=None,
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(parts.scheduler.config),
        )
        self.pipe.set_progress_bar_config(disable=True)
        self.cfg, self.embeddings, self.negative = scfg, embeddings, negative
        self.labels = labels if labels is not None else scfg.prompts
        self.side = side

    @torch.no_grad()
    def images(self, side: int | None = None) -> list:
        """One image per prompt (seed ``sample.seed + i``), ``side`` pixels square unless sample.width /
        height are set (a curriculum samples at each stage's resolution)."""
        transformer = self.pipe.transformer
        was_training = transformer.training
        transformer.eval()
        side = side or self.side
        width, height = self.cfg.width or side, self.cfg.height or side
        images = []
        for i, emb in enumerate(self.embeddings):
            generator = torch.Generator().manual_seed(self.cfg.seed + i)
            out = self.pipe(
                prompt_embeds=[emb], negative_prompt_embeds=[self.negative], height=height, width=width,
                num_inference_steps=self.cfg.steps, guidance_scale=self.cfg.guidance, generator=generator,
                use_pe=False,
            )
            images.append(out.images[0])
        transformer.train(was_training)
        return images

    def save_grid(self, images: list, path: Path) -> Path:
        columns = min(len(images), max(1, math.ceil(math.sqrt(len(images)))))
        return save_image_grid(images, path, labels=self.labels, columns=columns)

    def run(self, path: Path, write: bool = True, side: int | None = None) -> Path:
        images = self.images(side)
        return self.save_grid(images, path) if write else path


# -- 6. provenance ----------------------------------------------------------------------------------------


def trigger_word(cfg: BaseModel) -> str | None:
    """The word a run's LoRA answers to: the config's ``data.trigger_word``, else that of the LoRA it starts
    from (``lora.init_from``), which the new LoRA inherits."""
    trigger = getattr(cfg.data, "trigger_word", None)  # only the LoRA recipe's data section has the key
    if not trigger and cfg.lora.init_from:
        trigger = trigger_of(read_lora_shapes(cfg.lora.init_from)[1])
    return trigger


def lora_metadata(cfg: BaseModel, recipe: str, family: ErnieImageFamily, model: TrainedModel, steps: int,
                  **extra) -> dict:
    """The provenance block of every LoRA file a recipe writes (``lora info`` shows it), with its trigger word."""
    name, revision = cfg.model.name, cfg.model.revision
    trigger = trigger_word(cfg)
    if trigger:
        extra["trigger_word"] = trigger
    return {
        "recipe": recipe,
        "base_model": name,
        "base_revision": revision or "",
        "base_model_hash": family.fingerprint(name, "transformer", revision),
        "model_family": family.name,
        "rank": cfg.lora.rank,
        "alpha": cfg.lora.alpha,
        "targets": model.targets,
        "steps": steps,
        **extra,
        "creator": cfg.provenance.creator,
        "licence": cfg.provenance.licence,
        "consent": cfg.provenance.consent,
        "tool": f"ernie-lora {__version__}",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "training_config": cfg.model_dump(mode="json"),
    }
