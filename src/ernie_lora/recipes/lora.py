"""Flow-matching LoRA fine-tuning of ERNIE-Image (SFT), read top to bottom.

1. check the dataset, bucket it, cache latents and text embeddings (VAE and text encoder then unloaded);
2. load the DiT, inject a peft LoRA on the chosen linear layers, everything else frozen;
3. train: x_sigma = (1 - sigma) x0 + sigma noise, predict the velocity noise - x0, MSE;
4. checkpoint atomically (LoRA, optimizer, LR schedule, RNG states, data position), sample, plot;
5. write RUN/lora.safetensors in diffusers format.

``--resume`` continues bit-exactly: every random draw comes from state that is checkpointed.
"""

from __future__ import annotations

import csv
import io
import math
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import PartialState
from diffusers import ErnieImagePipeline, FlowMatchEulerDiscreteScheduler
from diffusers.optimization import get_scheduler
from peft import LoraConfig as PeftLoraConfig
from tqdm.auto import tqdm

from .. import __version__
from ..config import TrainRunConfig, dump_config
from ..data.buckets import make_buckets
from ..data.cache import CachedDataset, CachedSample, build_caches, load_embedding, load_latent
from ..data.categories import list_images
from ..data.dataset import CACHE_DIR_NAME, Item, check_dataset
from ..data.sampling import aesthetic_levels, sample_weights
from ..errors import UserError
from ..flow import noisy_latents, predict_velocity, sample_sigmas, velocity_target
from ..io import atomic_write_text, sha256_text
from ..lora.adapters import add_lora, export_adapter, load_lora_into_adapter, resolve_targets
from ..models.block_swap import BlockSwap, move_buffers
from ..models.loading import (
    component_fingerprint,
    load_component_config,
    load_pipeline,
    load_transformer,
    parse_dtype,
    pixel_multiple,
)
from ..models.quantize import quantize_base
from ..plots import save_image_grid, save_loss_plot
from .run_dir import check_resume_config, load_lora_checkpoint, prepare_run_dir, save_lora_checkpoint


class BucketBatches:
    """Batches that share a bucket, in an order fixed by (seed, epoch): the position is all resume needs.

    With several processes these are global batches; a bucket's last batch is dropped when it has
    fewer samples than there are processes (every process needs at least one).
    """

    def __init__(self, samples: list[CachedSample], batch_size: int, seed: int, min_size: int = 1,
                 weights: list[float] | None = None):
        self.samples, self.batch_size, self.seed, self.min_size = samples, batch_size, seed, min_size
        # hierarchical sampling: an epoch is len(samples) draws with replacement by these weights
        self.weights = torch.tensor(weights, dtype=torch.float64) if weights is not None else None
        self.epoch, self.index = 0, 0
        self._batches = self._epoch_batches(0)

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        drawn = range(len(self.samples))
        if self.weights is not None:
            drawn = torch.multinomial(self.weights, len(self.samples), replacement=True, generator=g).tolist()
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for i in drawn:
            s = self.samples[i]
            by_bucket.setdefault((s.bucket.width, s.bucket.height), []).append(i)
        batches = []
        for key in sorted(by_bucket):
            idx = by_bucket[key]
            order = [idx[j] for j in torch.randperm(len(idx), generator=g).tolist()]
            batches += [order[k : k + self.batch_size] for k in range(0, len(order), self.batch_size)]
        batches = [b for b in batches if len(b) >= self.min_size]
        if not batches:
            raise UserError(f"no bucket holds {self.min_size} images (one per process); add images or use "
                            "fewer processes")
        return [batches[j] for j in torch.randperm(len(batches), generator=g).tolist()]

    def next(self) -> list[CachedSample]:
        if self.index >= len(self._batches):
            self.epoch, self.index = self.epoch + 1, 0
            self._batches = self._epoch_batches(self.epoch)
        batch = self._batches[self.index]
        self.index += 1
        return [self.samples[i] for i in batch]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._batches = self._epoch_batches(self.epoch)


@dataclass
class TrainResult:
    output: Path
    steps_done: int
    final_loss: float | None
    cache: CachedDataset


def pick_device(requested: str | None) -> torch.device:
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_optimizer(params, cfg) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UserError("train.optimizer: adamw8bit needs bitsandbytes (pip install 'ernie-lora[bnb]')") from None
        if not torch.cuda.is_available():
            raise UserError("train.optimizer: adamw8bit needs a CUDA GPU; use adamw on CPU")
        return bnb.optim.AdamW8bit(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def timestep_shift(shift: str | float, sched_cfg: dict) -> float:
    """``timesteps.shift`` as a number: "official" is the model scheduler's own shift, "none" is 1."""
    if shift == "official":
        return float(sched_cfg.get("shift", 1.0))
    return 1.0 if shift == "none" else float(shift)


def add_training_lora(transformer, lora_cfg) -> tuple[PeftLoraConfig, list[str], list[torch.nn.Parameter]]:
    """The configured LoRA on the DiT (fresh, or loaded from ``lora.init_from``), its weights in fp32
    over the bf16 base; returns the peft config, the target modules and the trainable parameters."""
    targets = resolve_targets(transformer, lora_cfg.targets)
    peft_config = add_lora(transformer, lora_cfg.rank, lora_cfg.alpha, targets, lora_cfg.dropout)
    if lora_cfg.init_from:
        load_lora_into_adapter(transformer, lora_cfg.init_from, peft_config, f"lora.init_from {lora_cfg.init_from}")
    params = [p for p in transformer.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    return peft_config, targets, params


def dataset_hash(items: list[Item]) -> str:
    """The dataset's content: image bytes and captions, independent of model, bucket and cache."""
    return sha256_text("|".join(sorted(f"{item.sha256}:{sha256_text(item.caption)}" for item in items)))


def train(
    cfg: TrainRunConfig,
    output: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    stop_after: int | None = None,
    progress: bool = True,
) -> TrainResult:
    """Run the LoRA recipe. ``stop_after`` ends the run after that step as if killed (tests use it).

    Under ``accelerate launch`` / ``torchrun`` with N processes, ``train.batch_size`` is per process:
    every process draws the same global batch, noise and timesteps, trains on its slice, and the
    LoRA gradients are averaged across processes (what DDP does), so N processes of batch b train
    the same LoRA as one process of batch N*b. The main process alone writes files.
    """
    procs = PartialState(cpu=not torch.cuda.is_available())  # one process unless launched distributed
    world, rank, is_main = procs.num_processes, procs.process_index, procs.is_main_process
    output = Path(output).expanduser()
    config_dict = cfg.model_dump(mode="json")
    if is_main:
        prepare_run_dir(output, resume, overwrite)
        if resume:
            check_resume_config(output, config_dict)
    procs.wait_for_everyone()
    tcfg = cfg.train
    device = pick_device(cfg.train.device) if world == 1 else procs.device

    # -- 1. data: check, bucket, cache ---------------------------------------------------------------
    multiple = pixel_multiple(cfg.model.name, cfg.model.revision)
    step_px = cfg.data.bucket_multiple or multiple
    if step_px % multiple:
        raise UserError(f"data.bucket_multiple: {step_px} must be a multiple of {multiple} (what the model needs)")
    buckets = make_buckets(cfg.data.resolution, step_px, cfg.data.max_aspect_ratio)
    report = check_dataset(cfg.data.path, min_side=min(min(b.width, b.height) for b in buckets))
    report.raise_if_errors()
    cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else Path(cfg.data.path) / CACHE_DIR_NAME
    with procs.main_process_first():  # the main process encodes; the others find everything cached
        cached = build_caches(
            report.items, buckets, cache_dir, cfg.model.name, crop=cfg.data.crop, prompts=cfg.sample.prompts,
            vae_dtype=cfg.model.vae_dtype, text_dtype=cfg.model.dtype, device=device, revision=cfg.model.revision,
            styles=cfg.data.caption_styles,
        )

    # -- 2. model: the DiT alone, a LoRA on it --------------------------------------------------------
    weight_dtype = parse_dtype(cfg.model.dtype)
    swap_count = cfg.model.block_swap
    fsdp = tcfg.fsdp and world > 1
    # block swap and FSDP load the base into CPU memory and move to the GPU only what it holds
    transformer = load_transformer(cfg.model.name, dtype=weight_dtype,
                                   device="cpu" if swap_count or fsdp else device, revision=cfg.model.revision)
    quantize_base(transformer, cfg.model.quantize)
    sched_cfg = load_component_config(cfg.model.name, "scheduler", cfg.model.revision)
    shift = timestep_shift(tcfg.timesteps.shift, sched_cfg)
    num_train_timesteps = int(sched_cfg.get("num_train_timesteps", 1000))

    torch.manual_seed(tcfg.seed)  # LoRA A init
    peft_config, targets, params = add_training_lora(transformer, cfg.lora)
    if tcfg.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    block_swap = BlockSwap(transformer, swap_count, device) if swap_count else None
    if fsdp:
        shard_frozen_base(transformer, params, device, world)
        if is_main:
            print(f"fsdp: the frozen base is sharded over {world} processes; the LoRA is replicated")
    if tcfg.compile:
        transformer.compile_repeated_blocks()  # diffusers: torch.compile each ErnieImageSharedAdaLNBlock
    transformer.train()

    optimizer = make_optimizer(params, tcfg)
    lr_scheduler = get_scheduler(
        tcfg.lr_scheduler, optimizer, num_warmup_steps=tcfg.warmup_steps, num_training_steps=tcfg.steps
    )
    generator = torch.Generator().manual_seed(tcfg.seed)  # noise, sigmas, caption dropout
    batches = BucketBatches(cached.samples, tcfg.batch_size * world, tcfg.seed, min_size=world,
                            weights=_sampling_weights(cfg, cached.samples))
    empty_embedding = load_embedding(cached.empty_text_file)
    history: list[tuple[int, float, float]] = []
    step = 0

    if resume:
        step = load_lora_checkpoint(output, transformer, optimizer, lr_scheduler, batches, generator)
        history = [row for row in _read_loss_csv(output / "loss.csv") if row[0] <= step]
        if step >= tcfg.steps and (output / "lora.safetensors").exists():
            print(f"{output}: already complete at step {step}; nothing to do (raise train.steps to go on)")
            return TrainResult(output, step, history[-1][1] if history else None, cached)

    # written only now: a run that failed on its data or model leaves no run behind to refuse later
    if is_main:
        atomic_write_text(output / "config.yaml", dump_config(cfg))
    # under FSDP every process runs the sampler's forward passes (they gather the shards); the main one writes
    sampler = _Sampler(cfg, cached, transformer, device) if cfg.sample.prompts and (is_main or fsdp) else None
    autocast_dtype = torch.bfloat16 if tcfg.mixed_precision == "bf16" else None
    loss_file = _open_loss_csv(output / "loss.csv", history) if is_main else None
    bar = tqdm(total=tcfg.steps, initial=step, desc="training", unit="step", disable=not (progress and is_main))
    started, last_loss, start_step = time.perf_counter(), (history[-1][1] if history else None), step

    # -- 3. the loop ----------------------------------------------------------------------------------
    while step < tcfg.steps:
        total = 0.0
        for _ in range(tcfg.grad_accum):
            batch = batches.next()  # the global batch; every process draws the same random numbers for it
            n = len(batch)
            # caption dropout swaps in the cached "" embedding (what the pipeline's CFG negative uses)
            drop = (torch.rand(n, generator=generator) < cfg.data.caption_dropout).tolist()
            n_styles = len(cfg.data.caption_styles)  # one style per sample, drawn only when there is a choice
            style = [0] * n
            if n_styles > 1:
                style = torch.randint(n_styles, (n,), generator=generator).tolist()
            mine = list(range(rank, n, world))  # this process's slice of the global batch (never empty)
            x0 = torch.stack([load_latent(batch[i].latent_file) for i in mine]).to(device, torch.float32)
            noise = torch.randn((n, *x0.shape[1:]), generator=generator)  # one bucket: one latent shape
            sigmas = sample_sigmas(n, generator, tcfg.timesteps.sampling, shift, tcfg.timesteps.logit_mean,
                                   tcfg.timesteps.logit_std)
            texts = [empty_embedding if drop[i] else load_embedding(batch[i].text_files[style[i]]) for i in mine]
            noise_mine, sigmas_mine = noise[mine].to(device), sigmas[mine].to(device)
            x_t = noisy_latents(x0, noise_mine, sigmas_mine)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                pred = predict_velocity(transformer, x_t, sigmas_mine, texts, num_train_timesteps)
            per_sample = F.mse_loss(pred.float(), velocity_target(x0, noise_mine).float(), reduction="none")
            per_sample = per_sample.flatten(1).mean(dim=1)
            # sum / global n is this slice's share of the global mean; x world undoes the gradient average
            loss = per_sample.sum() / n * world / tcfg.grad_accum
            if not torch.isfinite(loss):
                raise UserError(f"step {step + 1}: loss is {loss.item()}; lower train.lr or use mixed_precision bf16")
            loss.backward()
            if block_swap:
                block_swap.park_all()
            logged = per_sample.detach().sum()
            if world > 1:
                torch.distributed.all_reduce(logged)
            total += logged.item() / n / tcfg.grad_accum
        if world > 1:  # average the LoRA gradients across processes, as DDP would
            for p in params:
                torch.distributed.all_reduce(p.grad)
                p.grad /= world
        if tcfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, tcfg.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        last_loss = total
        lr = lr_scheduler.get_last_lr()[0]
        history.append((step, total, lr))
        if loss_file is not None:
            loss_file.write(f"{step},{total:.8g},{lr:.8g}\n")
            loss_file.flush()
        elapsed = time.perf_counter() - started
        bar.set_postfix(loss=f"{total:.4f}", s_it=f"{elapsed / (step - start_step):.2f}")
        bar.update()

        if is_main and (step % cfg.checkpoint.every == 0 or step == tcfg.steps):
            save_lora_checkpoint(output, step, cfg.checkpoint.keep, transformer, peft_config, optimizer,
                                 lr_scheduler, batches, generator)
            save_loss_plot([h[0] for h in history], [h[1] for h in history], output / "loss.png")
        if sampler and cfg.sample.every and step % cfg.sample.every == 0 and step != tcfg.steps:
            sampler.run(output / "samples" / f"step-{step:06d}.png", write=is_main)
        if stop_after is not None and step >= stop_after and step < tcfg.steps:
            bar.close()
            if loss_file is not None:
                loss_file.close()
            return TrainResult(output, step, last_loss, cached)
    bar.close()
    if loss_file is not None:
        loss_file.close()
    if sampler:
        sampler.run(output / "samples" / f"step-{step:06d}.png", write=is_main)
    if not is_main:
        return TrainResult(output, step, last_loss, cached)

    # -- 4. outputs -----------------------------------------------------------------------------------
    save_loss_plot([h[0] for h in history], [h[1] for h in history], output / "loss.png")
    metadata = {
        "base_model": cfg.model.name,
        "base_revision": cfg.model.revision or "",
        "rank": cfg.lora.rank,
        "alpha": cfg.lora.alpha,
        "targets": targets,
        "steps": step,
        "base_model_hash": component_fingerprint(cfg.model.name, "transformer", cfg.model.revision),
        "dataset_hash": dataset_hash(report.items),
        "captions_hash": sha256_text("\n".join(sorted(s.caption for s in cached.samples))),
        "image_count": len(cached.samples),
        "creator": cfg.provenance.creator,
        "licence": cfg.provenance.licence,
        "consent": cfg.provenance.consent,
        "tool": f"ernie-lora {__version__}",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "training_config": config_dict,
    }
    export_adapter(output / "lora.safetensors", transformer, peft_config, metadata)
    return TrainResult(output, step, last_loss, cached)


def _sampling_weights(cfg: TrainRunConfig, samples: list[CachedSample]) -> list[float] | None:
    scfg = cfg.data.sampling
    if scfg.by == "uniform":
        return None
    root = Path(cfg.data.path)
    entries = {e.path: e for e in list_images(root, outside_links=True)}
    ordered = [entries[s.image.relative_to(root).as_posix()] for s in samples]
    aesthetic = aesthetic_levels(scfg.aesthetic) if scfg.aesthetic else None
    return sample_weights(ordered, aesthetic, scfg.temperature, scfg.depth)


def shard_frozen_base(transformer, lora_params: list[torch.nn.Parameter], device: torch.device, world: int) -> None:
    """FSDP2 over the frozen base only: each block (then the rest) is a unit whose weights are split over
    the processes and gathered for its forward and backward. The LoRA is left out of the sharding, so
    it stays a plain tensor on every process: saving, resuming and the gradient average are unchanged."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    ignored = set(lora_params)
    for block in transformer.layers:
        fully_shard(block, mesh=mesh, ignored_params=ignored)
    fully_shard(transformer, mesh=mesh, ignored_params=ignored)
    for p in lora_params:  # FSDP moved the shards to the mesh's device; the LoRA follows by hand
        p.data = p.data.to(device)
    move_buffers(transformer, device)


def _read_loss_csv(path: Path) -> list[tuple[int, float, float]]:
    if not path.exists():
        return []
    rows = []
    for row in csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"))):
        rows.append((int(row["step"]), float(row["loss"]), float(row["lr"])))
    return rows


def _open_loss_csv(path: Path, history: list[tuple[int, float, float]]):
    """Rewrite loss.csv with the rows up to the resumed step (atomically), then append from there."""
    lines = ["step,loss,lr"] + [f"{s},{loss:.8g},{lr:.8g}" for s, loss, lr in history]
    atomic_write_text(path, "\n".join(lines) + "\n")
    return open(path, "a", encoding="utf-8")


class _Sampler:
    """Generates the configured prompts with the training transformer and cached embeddings."""

    def __init__(self, cfg: TrainRunConfig, cached: CachedDataset, transformer, device: torch.device):
        self.cfg = cfg.sample
        parts = load_pipeline(cfg.model.name, dtype=cfg.model.vae_dtype, device=device,
                              components=("vae", "scheduler"), revision=cfg.model.revision)
        self.pipe = ErnieImagePipeline(
            transformer=transformer, vae=parts.vae, text_encoder=None, tokenizer=None,
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(parts.scheduler.config),
        )
        self.pipe.set_progress_bar_config(disable=True)
        self.embeds = [load_embedding(cached.prompt_files[p]) for p in self.cfg.prompts]
        self.negative = load_embedding(cached.empty_text_file)
        self.width = self.cfg.width or cfg.data.resolution
        self.height = self.cfg.height or cfg.data.resolution

    @torch.no_grad()
    def run(self, path: Path, write: bool = True) -> Path:
        transformer = self.pipe.transformer
        was_training = transformer.training
        transformer.eval()
        images = []
        for i, emb in enumerate(self.embeds):
            generator = torch.Generator().manual_seed(self.cfg.seed + i)
            out = self.pipe(
                prompt_embeds=[emb], negative_prompt_embeds=[self.negative], height=self.height, width=self.width,
                num_inference_steps=self.cfg.steps, guidance_scale=self.cfg.guidance, generator=generator,
                use_pe=False,
            )
            images.append(out.images[0])
        # the pipeline decodes with the VAE's dtype; keep the DiT in training mode afterwards
        transformer.train(was_training)
        if not write:
            return path
        columns = min(len(images), max(1, math.ceil(math.sqrt(len(images)))))
        return save_image_grid(images, path, labels=self.cfg.prompts, columns=columns)
