"""Pretrain micro ERNIE on the synthetic layout world: the VAE, then the DiT. Reads top to bottom.

1. render the pretraining set (held-out concepts excluded) in memory, deterministic by seed;
2. VAE: reconstruction (MSE) + a small KL term, on layouts drawn in random colours: the VAE is a
   general image codec (as FLUX.2's is), so held-out colours stay representable and only the DiT
   has never seen them; then the batch-norm statistics of its patchified latents, which
   ``ErnieImagePipeline`` uses to (un)normalise latents;
3. DiT: flow matching on normalised latents and the frozen text encoder's embeddings, full
   fine-tuning with an EMA of the weights (small diffusion models sample much better from the EMA);
4. evaluate: sample fresh layouts of seen concepts and score their layout fidelity;
5. save the pipeline (safetensors) with loss plots, a sample grid and ``training_report.json``.

``ernie-lora pretrain-micro configs/micro-pretrain.yaml --output DIR`` reproduces the shipped weights
from the seed (same machine and thread count: CPU reductions are deterministic, not portable).
"""

from __future__ import annotations

import copy
import json
import random
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.optimization import get_scheduler
from PIL import Image
from tqdm.auto import tqdm

from ..config import MicroPretrainConfig
from ..data.synthetic import BANDS, HELD_OUT, caption, pretraining_colours, render, sample_layout
from ..errors import UserError
from ..eval.layout import score_image
from ..flow import noisy_latents, sample_sigmas, velocity_target
from ..io import atomic_write_json, write_entries_atomically
from ..models import ERNIE_IMAGE
from ..models.family import PIPELINE_BN_EPS
from ..models.micro_arch import build_untrained_micro
from ..plots import save_image_grid, save_loss_plot


def render_world(count: int, seed: int, random_colours: bool = False) -> tuple[torch.Tensor, list[str]]:
    """``count`` images as uint8 [N, 3, 64, 64], and their captions: the DiT's are pretraining concepts of the
    pretrain split (no caption of the train, validation or test splits, no held-out colour or structure).

    ``random_colours`` draws every theme in a random RGB colour and every structure, held-out ones
    included (the VAE's data: a general codec; only the DiT never sees the held-out concepts).
    """
    rng = random.Random(seed)
    pixels = np.empty((count, 64, 64, 3), dtype=np.uint8)
    captions = []
    for i in tqdm(range(count), desc="rendering the synthetic world", unit="img", mininterval=1):
        if random_colours:
            layout = sample_layout(rng, colours=pretraining_colours(), bands=BANDS)
        else:
            layout = sample_layout(rng, colours=pretraining_colours(), split="pretrain")
        rgb = (rng.randrange(256), rng.randrange(256), rng.randrange(256)) if random_colours else None
        pixels[i] = np.asarray(render(layout, seed=rng.randrange(1 << 30), rgb=rgb))
        captions.append(caption(layout))
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), captions


def to_unit(batch: torch.Tensor) -> torch.Tensor:
    return batch.float() / 127.5 - 1.0


def train_vae(vae, pixels: torch.Tensor, cfg: MicroPretrainConfig, g: torch.Generator) -> list[float]:
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = get_scheduler("cosine", opt, num_warmup_steps=50, num_training_steps=cfg.vae_steps)
    losses = []
    bar = tqdm(range(cfg.vae_steps), desc="VAE", unit="step")
    for _ in bar:
        x = to_unit(pixels[torch.randint(len(pixels), (cfg.vae_batch,), generator=g)])
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=g)).sample
        kl = 0.5 * (posterior.mean.pow(2) + posterior.var - 1.0 - posterior.logvar).mean()
        loss = F.mse_loss(recon, x) + cfg.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval()
    return losses


@torch.no_grad()
def set_latent_statistics(vae, pixels: torch.Tensor, chunk: int = 256) -> None:
    """Per-channel mean/var of the patchified latents into ``vae.bn`` (what the pipeline normalises with)."""
    total, total_sq, n = 0.0, 0.0, 0
    for i in range(0, len(pixels), chunk):
        lat = vae.encode(to_unit(pixels[i : i + chunk])).latent_dist.mode()
        lat = ERNIE_IMAGE.patchify(lat).double()
        total = total + lat.sum(dim=(0, 2, 3))
        total_sq = total_sq + lat.pow(2).sum(dim=(0, 2, 3))
        n += lat.shape[0] * lat.shape[2] * lat.shape[3]
    mean = total / n
    var = total_sq / n - mean.pow(2)
    vae.bn.running_mean.copy_(mean.float())
    vae.bn.running_var.copy_((var - PIPELINE_BN_EPS).clamp_min(1e-6).float())


@torch.no_grad()
def encode_world(pipe, pixels: torch.Tensor, captions: list[str], chunk: int = 256):
    latents = torch.cat([ERNIE_IMAGE.encode_images(pipe.vae, to_unit(pixels[i : i + chunk]))
                         for i in range(0, len(pixels), chunk)])
    unique = sorted(set(captions)) + [""]
    table = {text: pipe.encode_prompt(text, device="cpu")[0] for text in unique}
    return latents, [table[c] for c in captions], table[""]


def train_dit(transformer, latents, embeds, empty, cfg: MicroPretrainConfig, g: torch.Generator, shift: float):
    transformer.train()
    transformer.requires_grad_(True)
    ema = copy.deepcopy(transformer).requires_grad_(False)
    params = list(transformer.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.dit_lr, weight_decay=0.01, betas=(0.9, 0.99))
    sched = get_scheduler("cosine", opt, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.dit_steps)
    losses = []
    bar = tqdm(range(cfg.dit_steps), desc="DiT", unit="step")
    for _ in bar:
        idx = torch.randint(len(latents), (cfg.dit_batch,), generator=g)
        x0 = latents[idx]
        drop = (torch.rand(cfg.dit_batch, generator=g) < cfg.caption_dropout).tolist()
        texts = [empty if d else embeds[i] for i, d in zip(idx.tolist(), drop, strict=True)]
        noise = torch.randn(x0.shape, generator=g)
        sigmas = sample_sigmas(cfg.dit_batch, g, "logit_normal", shift)
        pred = ERNIE_IMAGE.predict_velocity(transformer, noisy_latents(x0, noise, sigmas), sigmas, texts)
        loss = F.mse_loss(pred, velocity_target(x0, noise))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            for e, p in zip(ema.parameters(), params, strict=True):
                e.lerp_(p, 1 - cfg.ema_decay)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}")
    transformer.load_state_dict(ema.state_dict())
    transformer.eval().requires_grad_(False)
    return losses


@torch.no_grad()
def evaluate(pipe, count: int, seed: int, steps: int, guidance: float, colours=None):
    """Median layout fidelity of ``count`` samples of test-split captions (seen concepts unless ``colours``)."""
    rng = random.Random(seed)
    layouts = [sample_layout(rng, colours=colours or pretraining_colours(), split="test") for _ in range(count)]
    prompts = [caption(layout) for layout in layouts]
    images, scores = [], []
    for i, prompt in enumerate(prompts):
        image = pipe(prompt, height=64, width=64, num_inference_steps=steps, guidance_scale=guidance,
                     generator=torch.Generator().manual_seed(seed + i), use_pe=False).images[0]
        images.append(image)
        scores.append(score_image(image, prompt).score)
    return statistics.median(scores), scores, images, prompts


def pretrain_micro(cfg: MicroPretrainConfig, output: str | Path, overwrite: bool = False) -> dict:
    output = Path(output)
    if (output / "model_index.json").exists() and not overwrite:
        raise UserError(f"output {output}: already holds a model; pass --overwrite to replace it")
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    pipe = build_untrained_micro(cfg.seed)
    pipe.set_progress_bar_config(disable=True)
    phases = {}

    t = time.perf_counter()
    pixels, captions = render_world(cfg.images, cfg.seed)
    vae_pixels, _ = render_world(cfg.images, cfg.seed + 1, random_colours=True)
    phases["render"] = time.perf_counter() - t

    t = time.perf_counter()
    vae_losses = train_vae(pipe.vae, vae_pixels, cfg, g)
    set_latent_statistics(pipe.vae, pixels)
    phases["vae"] = time.perf_counter() - t

    t = time.perf_counter()
    latents, embeds, empty = encode_world(pipe, pixels, captions)
    dit_losses = train_dit(pipe.transformer, latents, embeds, empty, cfg, g, pipe.scheduler.config.shift)
    phases["dit"] = time.perf_counter() - t

    t = time.perf_counter()
    median, scores, images, prompts = evaluate(pipe, cfg.eval_count, cfg.seed + 10_000, cfg.eval_steps,
                                               cfg.eval_guidance)
    phases["eval"] = time.perf_counter() - t

    report: dict = {}

    def write(folder: Path) -> None:  # into a temp folder, then each entry renamed into place
        pipe.save_pretrained(folder, safe_serialization=True)
        save_loss_plot(list(range(1, len(vae_losses) + 1)), vae_losses, folder / "vae_loss.png", "micro VAE loss")
        save_loss_plot(list(range(1, len(dit_losses) + 1)), dit_losses, folder / "dit_loss.png", "micro DiT loss")
        save_image_grid(images[:24], folder / "samples.png", columns=8)
        with torch.no_grad():  # held-out colours must survive the VAE: reconstruct some
            rng = random.Random(cfg.seed + 2)
            held = [render(sample_layout(rng, colours=HELD_OUT["colours"], bands=HELD_OUT["bands"]), seed=i)
                    for i in range(4)]
            held = torch.from_numpy(np.stack([np.asarray(im) for im in held])).permute(0, 3, 1, 2)
            originals = to_unit(torch.cat([pixels[:4], held]))
            recon = pipe.vae.decode(pipe.vae.encode(originals).latent_dist.mode()).sample
        as_pil = [Image.fromarray(((t.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())
                  for t in torch.cat([originals, recon])]
        save_image_grid(as_pil, folder / "vae_reconstructions.png", columns=8)
        params = {name: sum(p.numel() for p in getattr(pipe, name).parameters())
                  for name in ("transformer", "vae", "text_encoder")}
        report.update({
            "config": cfg.model_dump(),
            "parameters": params,
            "threads": torch.get_num_threads(),
            "seconds": {k: round(v, 1) for k, v in phases.items()} | {"total": round(time.perf_counter() - started, 1)},
            "vae_final_loss": float(np.mean(vae_losses[-50:])),
            "dit_final_loss": float(np.mean(dit_losses[-50:])),
            "eval": {"count": cfg.eval_count, "steps": cfg.eval_steps, "guidance": cfg.eval_guidance,
                     "median_layout_fidelity": median, "mean_layout_fidelity": float(np.mean(scores)),
                     "prompts": prompts[:8], "scores": [round(s, 3) for s in scores]},
        })
        atomic_write_json(folder / "training_report.json", report)

    write_entries_atomically(output, write, last="model_index.json")
    print(json.dumps({k: report[k] for k in ("parameters", "seconds", "vae_final_loss", "dit_final_loss")}))
    print(f"median layout fidelity on {cfg.eval_count} fresh prompts of seen concepts: {median:.3f}")
    return report
