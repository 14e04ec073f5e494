"""Diffusion-DPO for flow matching: align a LoRA with preference pairs, read top to bottom.

1. pairs: a JSONL file (``rank scores`` exports one), or made in the micro world (``proof``);
   latents of both images and the prompt's embedding cached as in the LoRA recipe;
2. model: the DiT with a LoRA (fresh, or ``lora.init_from`` to align an existing style LoRA). The
   reference is the same DiT with the LoRA at its starting weights: the base itself for a fresh LoRA
   (B = 0), the starting LoRA otherwise. Its weights are swapped in for a no-grad forward each step;
3. each step: chosen and rejected latents share noise and sigma; e = per-sample mean squared velocity
   error, for the policy and the reference;
       loss = -log sigmoid(-beta/2 * ((e_w - e_w,ref) - (e_l - e_l,ref))) + lambda * e_w
   (Wallace et al. 2023 with the flow-matching target; lambda is the SFT anchor). With
   ``dpo.rejected_scale: sdpo`` the rejected gradient is scaled down so that, to first order, the step
   cannot raise the chosen error (the failure where both errors rise; Diffusion-SDPO's safeguard);
4. metrics per step (loss, implicit accuracy, reward margin, chosen and rejected error vs the
   reference, the rejected-gradient scale) in ``metrics.csv`` and ``metrics.png``; checkpoints and
   ``--resume`` as in the LoRA recipe;
5. with ``proof``: layout fidelity on fresh prompts for the base, SFT on the chosen images, and DPO,
   as a table in ``report.md`` and a grid in ``comparison.png``.
"""

from __future__ import annotations

import contextlib
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from .. import __version__
from ..config import DpoRunConfig, TrainRunConfig, dump_config
from ..data.buckets import Bucket, make_buckets
from ..data.cache import CachedSample, build_caches, load_embedding, load_latent
from ..data.dataset import CACHE_DIR_NAME
from ..data.preference import pair_items, read_pairs, write_synthetic_pairs
from ..errors import UserError
from ..flow import noisy_latents, predict_velocity, sample_sigmas, velocity_target
from ..io import atomic_write_text
from ..lora.adapters import export_adapter
from ..models.loading import load_component_config, load_transformer, parse_dtype, pixel_multiple
from .lora import BucketBatches, add_training_lora, make_optimizer, pick_device, timestep_shift
from .run_dir import (
    RunResult,
    check_resume_config,
    load_lora_checkpoint,
    prepare_run_dir,
    read_metrics,
    save_lora_checkpoint,
    write_metrics,
)

METRICS = ("loss", "dpo_loss", "accuracy", "margin", "chosen_vs_ref", "rejected_vs_ref", "rejected_scale", "lr")


def _write_metrics(output: Path, history: list[dict]) -> None:
    write_metrics(output, history, METRICS, METRICS[:-1],
                  "DPO: loss, implicit accuracy, reward margin, errors vs the reference")


@dataclass
class PairSample:
    chosen: CachedSample
    rejected: CachedSample

    @property
    def bucket(self) -> Bucket:  # what BucketBatches groups by
        return self.chosen.bucket


def dpo_loss(err_w: torch.Tensor, err_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample Diffusion-DPO loss and its logit ("inside"): positive when the policy prefers the
    chosen image more than the reference does."""
    inside = -0.5 * beta * ((err_w - ref_w) - (err_l - ref_l))
    return -F.logsigmoid(inside), inside


def sdpo_scale(g_w: list[torch.Tensor], g_l: list[torch.Tensor]) -> float:
    """Largest scale s <= 1 of the rejected gradient for which stepping along -(g_w - s g_l) does not
    raise the chosen error to first order: <g_w, g_w - s g_l> >= 0."""
    dot = sum(float((a * b).sum()) for a, b in zip(g_w, g_l, strict=True))
    if dot <= 0:
        return 1.0
    return min(1.0, sum(float((a * a).sum()) for a in g_w) / dot)


class ReferenceWeights:
    """Swap the LoRA's starting weights in for the reference forward, and the trained ones back."""

    def __init__(self, transformer):
        self.params = {n: p for n, p in transformer.named_parameters() if p.requires_grad}
        self.start = {n: p.detach().clone() for n, p in self.params.items()}

    @contextlib.contextmanager
    def active(self):
        trained = {n: p.detach().clone() for n, p in self.params.items()}
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self.start[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(trained[n])


def run_dpo(cfg: DpoRunConfig, output: str | Path, *, resume: bool = False, overwrite: bool = False,
            stop_after: int | None = None, progress: bool = True) -> RunResult:
    output = Path(output).expanduser()
    config_dict = cfg.model_dump(mode="json")
    prepare_run_dir(output, resume, overwrite)
    if resume:
        check_resume_config(output, config_dict, DpoRunConfig)
    tcfg = cfg.train
    device = pick_device(tcfg.device)

    # -- 1. pairs and caches --------------------------------------------------------------------------
    multiple = pixel_multiple(cfg.model.name, cfg.model.revision)
    buckets = make_buckets(cfg.data.resolution, cfg.data.bucket_multiple or multiple, cfg.data.max_aspect_ratio)
    pairs_file = Path(cfg.data.pairs) if cfg.data.pairs else output / "pairs" / "pairs.jsonl"
    pair_report = None
    if cfg.proof and not pairs_file.exists():
        p = cfg.proof
        print(f"making preference pairs: {p.pair_prompts} {p.kind} prompts x {p.candidates} samples of "
              f"{cfg.model.name}")
        pair_report = write_synthetic_pairs(
            pairs_file.parent, model=cfg.model.name, kind=p.kind, prompts=p.pair_prompts, candidates=p.candidates,
            min_margin=p.min_margin, seed=p.seed, sampling=_proof_sampling(cfg))
    pairs = read_pairs(pairs_file)
    chosen_items, rejected_items = pair_items(pairs)
    cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else pairs_file.parent / CACHE_DIR_NAME
    cached = build_caches(chosen_items + rejected_items, buckets, cache_dir, cfg.model.name, crop=cfg.data.crop,
                          vae_dtype=cfg.model.vae_dtype, text_dtype=cfg.model.dtype, device=device,
                          revision=cfg.model.revision)
    n_pairs = len(pairs)
    samples = []
    for i, pair in enumerate(pairs):
        chosen, rejected = cached.samples[i], cached.samples[n_pairs + i]
        if chosen.bucket != rejected.bucket:
            raise UserError(f"{pairs_file}: pair {i + 1} ({pair.chosen.name}, {pair.rejected.name}) falls in two "
                            "aspect buckets; DPO needs both images in one shape (crop or resize them alike)")
        samples.append(PairSample(chosen, rejected))

    # -- 2. policy and reference ----------------------------------------------------------------------
    transformer = load_transformer(cfg.model.name, dtype=parse_dtype(cfg.model.dtype), device=device,
                                   revision=cfg.model.revision)
    sched_cfg = load_component_config(cfg.model.name, "scheduler", cfg.model.revision)
    shift = timestep_shift(tcfg.timesteps.shift, sched_cfg)
    torch.manual_seed(tcfg.seed)
    peft_config, _, params = add_training_lora(transformer, cfg.lora)
    reference = ReferenceWeights(transformer)  # the starting weights: the base when B = 0
    if tcfg.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    optimizer = make_optimizer(params, tcfg)
    lr_scheduler = get_scheduler(tcfg.lr_scheduler, optimizer, num_warmup_steps=tcfg.warmup_steps,
                                 num_training_steps=tcfg.steps)
    generator = torch.Generator().manual_seed(tcfg.seed)
    batches = BucketBatches(samples, tcfg.batch_size, tcfg.seed)
    history: list[dict] = []
    step = 0
    if resume:
        step = load_lora_checkpoint(output, transformer, optimizer, lr_scheduler, batches, generator)
        history = [row for row in read_metrics(output / "metrics.csv", METRICS) if row["step"] <= step]
    atomic_write_text(output / "config.yaml", dump_config(cfg))
    num_train_timesteps = int(sched_cfg.get("num_train_timesteps", 1000))
    autocast_dtype = torch.bfloat16 if tcfg.mixed_precision == "bf16" else None
    beta, sft_weight = cfg.dpo.beta, cfg.dpo.sft_weight

    def errors(x_t, target, sigmas, texts) -> torch.Tensor:
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            pred = predict_velocity(transformer, x_t, sigmas, texts, num_train_timesteps)
        return F.mse_loss(pred.float(), target, reduction="none").flatten(1).mean(dim=1)

    # -- 3. the loop ----------------------------------------------------------------------------------
    bar = tqdm(total=tcfg.steps, initial=step, desc="dpo", unit="step", disable=not progress)
    while step < tcfg.steps:
        sums = dict.fromkeys(METRICS[:-1], 0.0)
        for _ in range(tcfg.grad_accum):
            batch = batches.next()
            n = len(batch)
            x_w = torch.stack([load_latent(s.chosen.latent_file) for s in batch])
            x_l = torch.stack([load_latent(s.rejected.latent_file) for s in batch])
            noise = torch.randn(x_w.shape, generator=generator)  # shared by chosen and rejected
            sigmas = sample_sigmas(n, generator, tcfg.timesteps.sampling, shift, tcfg.timesteps.logit_mean,
                                   tcfg.timesteps.logit_std)
            texts = [load_embedding(s.chosen.text_file) for s in batch]
            x0 = torch.cat([x_w, x_l]).to(device, torch.float32)
            noise2, sigmas2 = torch.cat([noise, noise]).to(device), torch.cat([sigmas, sigmas]).to(device)
            x_t, target = noisy_latents(x0, noise2, sigmas2), velocity_target(x0, noise2).float()
            with torch.no_grad(), reference.active():
                ref_w, ref_l = errors(x_t, target, sigmas2, texts + texts).chunk(2)
            err_w, err_l = errors(x_t, target, sigmas2, texts + texts).chunk(2)
            per_pair, inside = dpo_loss(err_w, err_l, ref_w, ref_l, beta)
            loss = per_pair.mean() + sft_weight * err_w.mean()
            if not torch.isfinite(loss):
                raise UserError(f"step {step + 1}: loss is {loss.item()}; lower train.lr or dpo.beta")
            scale = 1.0
            if cfg.dpo.rejected_scale == "sdpo":
                # d loss / d e_w = beta/2 sigmoid(-inside) = -(d loss / d e_l): the two halves of the gradient
                c = (0.5 * beta * torch.sigmoid(-inside)).detach()
                g_w = torch.autograd.grad((c * err_w).mean(), params, retain_graph=True)
                g_l = torch.autograd.grad((c * err_l).mean(), params, retain_graph=sft_weight > 0)
                g_sft = torch.autograd.grad(err_w.mean(), params) if sft_weight > 0 else [0.0] * len(params)
                scale = sdpo_scale(g_w, g_l)
                for p, a, b, s in zip(params, g_w, g_l, g_sft, strict=True):
                    g = (a - scale * b + sft_weight * s) / tcfg.grad_accum
                    p.grad = g if p.grad is None else p.grad + g
            else:
                (loss / tcfg.grad_accum).backward()
            values = {"loss": loss.item(), "dpo_loss": per_pair.mean().item(),
                      "accuracy": (inside > 0).float().mean().item(), "margin": inside.mean().item(),
                      "chosen_vs_ref": (err_w - ref_w).mean().item(), "rejected_vs_ref": (err_l - ref_l).mean().item(),
                      "rejected_scale": scale}
            for key, value in values.items():
                sums[key] += value / tcfg.grad_accum
        if tcfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, tcfg.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        history.append({"step": step, **sums, "lr": lr_scheduler.get_last_lr()[0]})
        bar.set_postfix(loss=f"{sums['loss']:.4f}", acc=f"{sums['accuracy']:.2f}")
        bar.update()
        if step % cfg.checkpoint.every == 0 or step == tcfg.steps:
            save_lora_checkpoint(output, step, cfg.checkpoint.keep, transformer, peft_config, optimizer,
                                 lr_scheduler, batches, generator)
            _write_metrics(output, history)
        if stop_after is not None and step >= stop_after and step < tcfg.steps:
            bar.close()
            return RunResult(output, step, history)
    bar.close()
    _write_metrics(output, history)
    metadata = {"base_model": cfg.model.name, "recipe": "dpo", "rank": cfg.lora.rank, "alpha": cfg.lora.alpha,
                "steps": step, "pairs": n_pairs, "beta": beta, "tool": f"ernie-lora {__version__}",
                "creator": cfg.provenance.creator, "licence": cfg.provenance.licence,
                "consent": cfg.provenance.consent, "training_config": config_dict}
    export_adapter(output / "lora.safetensors", transformer, peft_config, metadata)
    report = _proof(cfg, output, pairs, pair_report, history) if cfg.proof else None
    return RunResult(output, step, history, report)


# -- 5. the micro-world proof -------------------------------------------------------------------------
def _proof_sampling(cfg: DpoRunConfig) -> dict:
    side = cfg.data.resolution
    return {"steps": cfg.proof.steps, "guidance": cfg.proof.guidance, "width": side, "height": side,
            "dtype": "fp32"}


def _proof(cfg: DpoRunConfig, output: Path, pairs, pair_report, history: list[dict]) -> dict:
    """Base vs SFT-on-chosen vs DPO: layout fidelity of fresh prompts, same seeds for all three."""
    import random

    from PIL import Image

    from ..data.synthetic import caption, pretraining_colours, sample_layout
    from ..eval.layout import score_folder
    from ..generate import LoraSpec, generate
    from ..plots import save_image_grid
    from .lora import train as train_sft

    p = cfg.proof
    rng = random.Random(p.seed + 10_007)  # fresh prompts: not the ones the pairs were made from
    prompts = [caption(sample_layout(rng, p.kind, pretraining_colours())) for _ in range(p.eval_prompts)]
    sampling = {**_proof_sampling(cfg), "seed": 50_000 + p.seed}
    contenders = {"base": None, "DPO": output / "lora.safetensors"}
    if p.compare_sft:
        sft_data = output / "sft" / "data"  # the chosen images with their prompts: plain SFT on them
        sft_data.mkdir(parents=True, exist_ok=True)
        for i, pair in enumerate(pairs):
            target = sft_data / f"{i:05d}{pair.chosen.suffix}"
            if not target.exists():
                target.write_bytes(pair.chosen.read_bytes())
            (sft_data / f"{i:05d}.txt").write_text(pair.prompt + "\n", encoding="utf-8")
        sft_cfg = TrainRunConfig.model_validate({
            "model": cfg.model.model_dump(), "lora": cfg.lora.model_dump(),
            "data": {"path": str(sft_data), "resolution": cfg.data.resolution, "caption_dropout": 0.0},
            "train": {**cfg.train.model_dump(), "steps": cfg.train.steps},
            "checkpoint": {"every": cfg.train.steps, "keep": 1}, "sample": {"every": 0, "prompts": []}})
        print(f"SFT baseline: the same LoRA recipe on the {len(pairs)} chosen images, {cfg.train.steps} steps")
        train_sft(sft_cfg, output / "sft" / "run", overwrite=True, progress=False)
        contenders = {"base": None, "SFT on chosen": output / "sft" / "run" / "lora.safetensors",
                      "DPO": output / "lora.safetensors"}
    results, images = {}, {}
    for name, lora in contenders.items():
        folder = output / "eval" / name.lower().replace(" ", "-")
        paths = generate(prompts, model=cfg.model.name, loras=[LoraSpec(lora, 1.0)] if lora else None,
                         out_dir=folder, **sampling)
        scores = [s.score for _, _, s in score_folder(folder) if s is not None]
        results[name] = {"mean": statistics.mean(scores), "median": statistics.median(scores),
                         "perfect": sum(s >= 0.999 for s in scores) / len(scores)}
        images[name] = paths
    shown = min(8, len(prompts))
    grid = save_image_grid([Image.open(path) for name in contenders for path in images[name][:shown]],
                           output / "comparison.png", labels=[n for n in contenders for _ in range(shown)],
                           columns=shown)
    last = history[-max(1, len(history) // 10):]
    lines = [
        f"# DPO on {cfg.model.name}: {p.kind} layouts",
        "",
        f"Pairs: {len(pairs)}, the best of {p.candidates} samples of a prompt against each one at least "
        f"{p.min_margin} worse in layout fidelity" + (f" (chosen mean {pair_report.chosen_mean:.3f}, rejected mean "
                                                  f"{pair_report.rejected_mean:.3f})" if pair_report else "") + ".",
        f"DPO: beta {cfg.dpo.beta:g}, SFT anchor {cfg.dpo.sft_weight:g}, rejected scale {cfg.dpo.rejected_scale}, "
        f"rank {cfg.lora.rank}, {cfg.train.steps} steps of {cfg.train.batch_size} pairs, lr {cfg.train.lr:g}.",
        f"Last 10 % of steps: implicit accuracy {statistics.mean(r['accuracy'] for r in last):.2f}, chosen error vs "
        f"reference {statistics.mean(r['chosen_vs_ref'] for r in last):+.5f}, rejected "
        f"{statistics.mean(r['rejected_vs_ref'] for r in last):+.5f}.",
        "",
        f"Layout fidelity on {len(prompts)} fresh prompts, the same seeds for each "
        f"({p.steps} steps, guidance {p.guidance:g}):",
        "",
        "| | mean | median | share perfect |",
        "|---|---|---|---|",
        *[f"| {name} | {r['mean']:.3f} | {r['median']:.3f} | {r['perfect']:.2f} |" for name, r in results.items()],
        "",
        f"`comparison.png`: one row per model ({', '.join(contenders)}), the first {shown} prompts. "
        "`metrics.png`: the training curves.",
        "",
    ]
    atomic_write_text(output / "report.md", "\n".join(lines))
    print("\n".join(line for line in lines if line.startswith("|")))
    print(f"report {output / 'report.md'}; grid {grid}")
    return results
