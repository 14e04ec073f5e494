"""Few-step Turbo LoRAs by distribution matching (DMD2), with teachers by timestep range, read top to bottom.

1. prompts (a text file, or synthetic layout captions) embedded once, with the empty prompt for CFG;
2. one DiT, several LoRA adapters on it (the memory of one model, not three):
   - ``student`` (what is trained and saved): base + LoRA, sampled with K Euler steps at guidance 1, the
     same sampler ``ErnieImagePipeline`` runs, so the file works in ``generate --lora F --steps K``;
     ``lora.init_from`` starts it from a user's LoRA (the slow teacher's own LoRA, made fast);
   - ``fake``: the online score of the student's outputs, trained with the flow-matching loss;
   - teachers: the base (adapters off) or base + a LoRA file, each owning a range of sigma, so a
     layout LoRA can own the noisy early steps and another the details;
3. optionally, a warm start: the first ``regression_steps`` regress the student's K-step samples onto
   the teachers' own ODE samples from the same noise. Then each step, for ``fake_updates`` rounds: the
   student generates (no grad), the fake score learns to denoise those samples. Then the student
   generates once more, running its first k steps without
   grad and step k (drawn at random) with grad (DMD2's backward simulation), giving x0 at every step;
   x0 is noised to a random sigma, and the teacher owning that sigma (with CFG) and the fake score
   predict x0 (x0 = x_t - sigma v). The distribution-matching gradient (fake - real) / mean|x0 - real|
   enters as loss = 0.5 * MSE(x0, stopgrad(x0 - grad)).
4. checkpoints of both LoRAs, metrics and plots as in the other recipes; the student is saved as a
   plain diffusers-format LoRA;
5. with ``proof``: teacher at its full step count, student and base at each of ``proof.steps``:
   layout fidelity and the Frechet distance of image features to renders of the prompts.
"""

from __future__ import annotations

import contextlib
import random
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler
from peft import LoraConfig as PeftLoraConfig
from tqdm.auto import tqdm

from .. import __version__
from ..config import DistillRunConfig, dump_config
from ..data.cache import build_caches, load_embedding
from ..errors import UserError
from ..flow import predict_velocity
from ..io import atomic_write_text
from ..lora.adapters import (
    ADAPTER_NAME,
    add_lora_from_file,
    export_adapter,
    load_lora_into_adapter,
    lora_state_dict,
    peft_config_metadata,
    set_lora_state,
)
from ..lora.files import read_lora, save_lora
from ..models.loading import load_component_config, load_transformer, parse_dtype, pixel_multiple
from .lora import add_training_lora, pick_device
from .run_dir import (
    RunResult,
    latest_checkpoint,
    load_training_state,
    prepare_run_dir,
    read_metrics,
    restore_rng_state,
    rng_state,
    save_checkpoint,
    write_metrics,
)

STUDENT, FAKE = ADAPTER_NAME, "fake"
METRICS = ("dmd_loss", "fake_loss", "grad_norm", "student_step", "regression_loss")


def euler_sigmas(model: str, steps: int, revision: str | None = None) -> torch.Tensor:
    """The K+1 sigmas ``ErnieImagePipeline`` steps through for ``steps`` steps (shift applied), ending at 0."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(load_component_config(model, "scheduler", revision))
    scheduler.set_timesteps(sigmas=torch.linspace(1.0, 0.0, steps + 1)[:-1].numpy())
    return scheduler.sigmas.float()


@dataclass
class Teacher:
    adapter: str | None  # None: the base with adapters off
    low: float
    high: float
    guidance: float


def teacher_for(teachers: list[Teacher], sigma: float) -> Teacher:
    """The teacher whose [low, high] holds sigma (the first, where ranges touch)."""
    for t in teachers:
        if t.low <= sigma <= t.high:
            return t
    raise UserError(f"no teacher owns sigma {sigma:.3f}; teachers' t_range must cover [0, 1]")


class Adapters:
    """Which LoRA the forward pass runs: one adapter, or none (the base)."""

    def __init__(self, transformer):
        self.transformer = transformer

    @contextlib.contextmanager
    def use(self, name: str | None):
        if name is None:
            self.transformer.disable_adapters()
            try:
                yield
            finally:
                self.transformer.enable_adapters()
        else:
            self.transformer.set_adapter(name)
            try:
                yield
            finally:
                self.transformer.set_adapter(STUDENT)
        # peft makes the active adapter trainable: only the student and the fake score ever train
        for n, p in self.transformer.named_parameters():
            if "lora_" in n:
                p.requires_grad_(f".{STUDENT}." in n or f".{FAKE}." in n)


def adapter_params(transformer, name: str) -> list[torch.nn.Parameter]:
    return [p for n, p in transformer.named_parameters() if "lora_" in n and f".{name}." in n]


def run_distill(cfg: DistillRunConfig, output: str | Path, *, resume: bool = False, overwrite: bool = False,
                stop_after: int | None = None, progress: bool = True) -> RunResult:
    output = Path(output).expanduser()
    prepare_run_dir(output, resume, overwrite)
    tcfg, dcfg = cfg.train, cfg.distill
    device = pick_device(tcfg.device)
    dtype = parse_dtype(cfg.model.dtype)

    # -- 1. prompts ---------------------------------------------------------------------------------
    prompts = _prompts(cfg)
    cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else output.parent / ".ernie_lora_cache"
    cached = build_caches([], [], cache_dir, cfg.model.name, prompts=prompts, text_dtype=cfg.model.dtype,
                          device=device, revision=cfg.model.revision)
    embeddings = [load_embedding(cached.prompt_files[p]) for p in prompts]
    empty = load_embedding(cached.empty_text_file)

    # -- 2. one DiT, its adapters -------------------------------------------------------------------
    transformer = load_transformer(cfg.model.name, dtype=dtype, device=device, revision=cfg.model.revision)
    torch.manual_seed(tcfg.seed)
    peft_config, targets, _ = add_training_lora(transformer, cfg.lora)
    teachers = []
    for i, t in enumerate(cfg.teachers):
        name = None
        if t.lora:
            name = f"teacher{i}"
            add_lora_from_file(transformer, t.lora, name)
        teachers.append(Teacher(name, t.t_range[0], t.t_range[1], t.guidance))
    # the fake score starts where the (first) teacher is: the base, or its LoRA when it has one
    fake_config = PeftLoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, target_modules=targets,
                                 init_lora_weights=True)
    transformer.add_adapter(fake_config, adapter_name=FAKE)
    if cfg.teachers[0].lora:
        try:  # the teacher's delta, when its modules and ranks are the fake score's; else a fresh start
            load_lora_into_adapter(transformer, cfg.teachers[0].lora, fake_config, "teachers[0].lora", FAKE)
        except UserError:
            pass
    transformer.set_adapter(STUDENT)
    adapters = Adapters(transformer)
    with adapters.use(STUDENT):
        pass  # settles requires_grad: student and fake trainable, teachers frozen
    student_params, fake_params = adapter_params(transformer, STUDENT), adapter_params(transformer, FAKE)
    for p in student_params + fake_params:
        p.data = p.data.float()
    transformer.train()
    opt_student = torch.optim.AdamW(student_params, lr=tcfg.lr, betas=(0.0, 0.99), weight_decay=0.0)
    opt_fake = torch.optim.AdamW(fake_params, lr=dcfg.fake_lr or tcfg.lr, betas=(0.0, 0.99), weight_decay=0.0)
    sigmas = euler_sigmas(cfg.model.name, dcfg.student_steps, cfg.model.revision).to(device)
    generator = torch.Generator().manual_seed(tcfg.seed)
    prompt_rng = random.Random(tcfg.seed)
    # latents are resolution / the VAE's factor (pixel_multiple is that factor x the DiT's patch size)
    multiple = pixel_multiple(cfg.model.name, cfg.model.revision)
    if cfg.data.resolution % multiple:
        raise UserError(f"data.resolution: {cfg.data.resolution} must be a multiple of {multiple}")
    latent_side = cfg.data.resolution * transformer.config.patch_size // multiple
    channels = transformer.config.in_channels
    num_train_timesteps = int(load_component_config(cfg.model.name, "scheduler", cfg.model.revision)
                              .get("num_train_timesteps", 1000))
    history: list[dict] = []
    step = 0
    if resume:
        ckpt = latest_checkpoint(output)
        set_lora_state(transformer, read_lora(ckpt / "lora.safetensors")[0], "student checkpoint")
        set_lora_state(transformer, read_lora(ckpt / "fake.safetensors")[0], "fake checkpoint", adapter_name=FAKE)
        state = load_training_state(ckpt)
        opt_student.load_state_dict(state["opt_student"])
        opt_fake.load_state_dict(state["opt_fake"])
        restore_rng_state(state["rng"], generator)
        prompt_rng.setstate(state["prompt_rng"])
        step = int(state["step"])
        history = [r for r in read_metrics(output / "metrics.csv", METRICS) if r["step"] <= step]
    atomic_write_text(output / "config.yaml", dump_config(cfg))

    def velocity(x_t: torch.Tensor, sigma: torch.Tensor, texts: list[torch.Tensor]) -> torch.Tensor:
        return predict_velocity(transformer, x_t, sigma, texts, num_train_timesteps).float()

    def guided(x_t, sigma, texts, guidance: float) -> torch.Tensor:
        if guidance <= 1.0:
            return velocity(x_t, sigma, texts)
        both = velocity(torch.cat([x_t, x_t]), torch.cat([sigma, sigma]), [empty] * len(texts) + texts)
        uncond, cond = both.chunk(2)
        return uncond + guidance * (cond - uncond)

    def student_sample(texts, grad_step: int | None) -> torch.Tensor:
        """Euler steps from noise; returns x0 predicted at ``grad_step`` (with grad), or the final sample."""
        n = len(texts)
        x = torch.randn((n, channels, latent_side, latent_side), generator=generator).to(device)
        last = dcfg.student_steps if grad_step is None else grad_step
        with adapters.use(STUDENT):
            with torch.no_grad():
                for i in range(last):
                    x = x + (sigmas[i + 1] - sigmas[i]) * velocity(x, sigmas[i].expand(n), texts)
            if grad_step is None:
                return x
            s = sigmas[grad_step].expand(n)
            return x - sigmas[grad_step] * velocity(x, s, texts)  # x0 = x_t - sigma v

    def noise_to(x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = x0.shape[0]
        sigma = dcfg.min_sigma + (dcfg.max_sigma - dcfg.min_sigma) * torch.rand(n, generator=generator)
        eps = torch.randn(x0.shape, generator=generator).to(device)
        sigma = sigma.to(device)
        return (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * eps, sigma, eps

    teacher_sigmas = (euler_sigmas(cfg.model.name, dcfg.teacher_steps, cfg.model.revision).to(device)
                      if dcfg.regression_steps else None)

    def teacher_sample(z: torch.Tensor, texts: list[torch.Tensor]) -> torch.Tensor:
        """The teachers' ODE from noise z: Euler steps, each by the teacher owning its sigma."""
        steps = teacher_sigmas
        x = z
        for i in range(dcfg.teacher_steps):
            teacher = teacher_for(teachers, float(steps[i]))
            with adapters.use(teacher.adapter):
                v = guided(x, steps[i].expand(len(texts)), texts, teacher.guidance)
            x = x + (steps[i + 1] - steps[i]) * v
        return x

    def _checkpoint(step: int) -> None:
        if step % cfg.checkpoint.every and step != tcfg.steps:
            return

        def write(folder: Path) -> None:
            for adapter, file in ((STUDENT, "lora.safetensors"), (FAKE, "fake.safetensors")):
                save_lora(folder / file, lora_state_dict(transformer, adapter), peft_config_metadata(peft_config))
            torch.save({"step": step, "opt_student": opt_student.state_dict(), "opt_fake": opt_fake.state_dict(),
                        "rng": rng_state(generator), "prompt_rng": prompt_rng.getstate()},
                       folder / "training_state.pt")
        save_checkpoint(output, step, write, cfg.checkpoint.keep)
        _write_metrics(output, history)

    ode_pairs = None
    if dcfg.regression_steps and step < dcfg.regression_steps:
        pair_gen = torch.Generator().manual_seed(tcfg.seed + 1)  # the same pairs again on resume
        pair_texts = [embeddings[i % len(embeddings)] for i in range(dcfg.regression_pairs)]
        z = torch.randn((dcfg.regression_pairs, channels, latent_side, latent_side), generator=pair_gen).to(device)
        with torch.no_grad():
            targets = torch.cat([teacher_sample(z[b:b + tcfg.batch_size], pair_texts[b:b + tcfg.batch_size])
                                 for b in range(0, dcfg.regression_pairs, tcfg.batch_size)])
        ode_pairs = (z, pair_texts, targets)
    nan = float("nan")

    # -- 3. the loop ----------------------------------------------------------------------------------
    bar = tqdm(total=tcfg.steps, initial=step, desc="distill", unit="step", disable=not progress)
    while step < tcfg.steps:
        if ode_pairs is not None and step < dcfg.regression_steps:  # warm start: regress onto the teachers' ODE
            z, pair_texts, targets = ode_pairs
            idx = [prompt_rng.randrange(len(pair_texts)) for _ in range(tcfg.batch_size)]
            x, texts = z[idx], [pair_texts[i] for i in idx]
            with adapters.use(STUDENT):
                for i in range(dcfg.student_steps):
                    x = x + (sigmas[i + 1] - sigmas[i]) * velocity(x, sigmas[i].expand(len(idx)), texts)
            loss = F.mse_loss(x, targets[idx])
            loss.backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(student_params, tcfg.max_grad_norm or 1e9))
            opt_student.step()
            opt_student.zero_grad(set_to_none=True)
            step += 1
            history.append({"step": step, "dmd_loss": nan, "fake_loss": nan, "grad_norm": grad_norm,
                            "student_step": nan, "regression_loss": loss.item()})
            bar.set_postfix(regression=f"{loss.item():.4f}")
            bar.update()
            _checkpoint(step)
            continue
        texts = [embeddings[prompt_rng.randrange(len(embeddings))] for _ in range(tcfg.batch_size)]
        fake_losses = []
        for _ in range(dcfg.fake_updates):  # the fake score follows the student's current outputs
            with torch.no_grad():
                x0 = student_sample(texts, grad_step=dcfg.student_steps - 1).detach()
            x_t, sigma, eps = noise_to(x0)
            with adapters.use(FAKE):
                loss_fake = F.mse_loss(velocity(x_t, sigma, texts), eps - x0)
            loss_fake.backward()
            torch.nn.utils.clip_grad_norm_(fake_params, 1.0)
            opt_fake.step()
            opt_fake.zero_grad(set_to_none=True)
            fake_losses.append(loss_fake.item())

        k = int(torch.randint(dcfg.student_steps, (1,), generator=generator))  # backward simulation
        x0 = student_sample(texts, grad_step=k)
        with torch.no_grad():
            x_t, sigma, _ = noise_to(x0.detach())
            real = torch.empty_like(x0)
            for i in range(len(texts)):  # each sample's teacher owns its sigma
                teacher = teacher_for(teachers, float(sigma[i]))
                with adapters.use(teacher.adapter):
                    v = guided(x_t[i:i + 1], sigma[i:i + 1], texts[i:i + 1], teacher.guidance)
                real[i:i + 1] = x_t[i:i + 1] - sigma[i] * v
            with adapters.use(FAKE):
                fake = x_t - sigma.view(-1, 1, 1, 1) * velocity(x_t, sigma, texts)
            weight = (x0.detach() - real).abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
            grad = torch.nan_to_num((fake - real) / weight)
        loss = 0.5 * F.mse_loss(x0, (x0 - grad).detach())
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(student_params, tcfg.max_grad_norm or 1e9))
        opt_student.step()
        opt_student.zero_grad(set_to_none=True)
        step += 1
        history.append({"step": step, "dmd_loss": loss.item(), "fake_loss": statistics.mean(fake_losses),
                        "grad_norm": grad_norm, "student_step": float(k), "regression_loss": nan})
        bar.set_postfix(dmd=f"{loss.item():.4f}", fake=f"{history[-1]['fake_loss']:.4f}")
        bar.update()
        _checkpoint(step)
        if stop_after is not None and step >= stop_after and step < tcfg.steps:
            bar.close()
            return RunResult(output, step, history)
    bar.close()
    _write_metrics(output, history)
    metadata = {"base_model": cfg.model.name, "recipe": "distill", "student_steps": dcfg.student_steps,
                "guidance": 1.0, "rank": cfg.lora.rank, "alpha": cfg.lora.alpha, "steps": step,
                "tool": f"ernie-lora {__version__}", "training_config": cfg.model_dump(mode="json")}
    export_adapter(output / "lora.safetensors", transformer, peft_config, metadata, STUDENT)
    report = _proof(cfg, output, history) if cfg.proof else None
    return RunResult(output, step, history, report)


def _prompts(cfg: DistillRunConfig) -> list[str]:
    if cfg.data.prompts_file:
        path = Path(cfg.data.prompts_file)
        if not path.is_file():
            raise UserError(f"data.prompts_file: {path} does not exist")
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not prompts:
            raise UserError(f"data.prompts_file: {path} holds no prompts")
        return prompts
    from ..data.synthetic import caption, pretraining_colours, sample_layout

    rng = random.Random(cfg.data.seed)
    return sorted({caption(sample_layout(rng, None, pretraining_colours())) for _ in range(cfg.data.synthetic_prompts)})


def _write_metrics(output: Path, history: list[dict]) -> None:
    plotted = METRICS[:3] + (("regression_loss",) if any(r["regression_loss"] == r["regression_loss"]
                                                          for r in history) else ())
    write_metrics(output, history, METRICS, plotted, "distillation: DMD loss, fake-score loss, student gradient norm"
                  + (", regression warm start" if len(plotted) > 3 else ""))


# -- 5. the proof on micro ----------------------------------------------------------------------------
def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FID's formula on any features: |mu_a - mu_b|^2 + Tr(Sa + Sb - 2 (Sa Sb)^1/2)."""
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root, _ = linalg.sqrtm(sa @ sb, disp=False)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(sa + sb - 2 * np.real(root)))


def _proof(cfg: DistillRunConfig, output: Path, history: list[dict]) -> dict:
    from PIL import Image

    from ..data.synthetic import caption, parse_caption, pretraining_colours, render, sample_layout
    from ..eval.aesthetic import builtin_features
    from ..eval.layout import score_folder
    from ..generate import LoraSpec, generate
    from ..plots import save_image_grid

    p, dcfg = cfg.proof, cfg.distill
    rng = random.Random(p.seed + 20_011)
    prompts = [caption(sample_layout(rng, None, pretraining_colours())) for _ in range(p.eval_prompts)]
    reference = np.stack([builtin_features(render(parse_caption(t), seed=i)) for i, t in enumerate(prompts)])
    side = cfg.data.resolution
    teacher = cfg.teachers[0]
    teacher_lora = [LoraSpec(Path(teacher.lora), 1.0)] if teacher.lora else []
    student = [LoraSpec(output / "lora.safetensors", 1.0)]
    few = sorted(set(p.steps), reverse=True)
    runs = [("teacher", p.teacher_steps, teacher.guidance, teacher_lora)]
    runs += [(f"student {k} steps", k, 1.0, student) for k in few]
    slow = "teacher" if teacher.lora else "base"
    runs += [(f"{slow} {k} steps", k, teacher.guidance, teacher_lora) for k in few]
    runs += [(f"{slow} {k} steps, CFG 1", k, 1.0, teacher_lora) for k in few]  # CFG can hurt at few steps
    results, images = {}, {}
    for name, steps, guidance, loras in runs:
        folder = output / "eval" / name.replace(", ", "-").replace(" ", "-")
        paths = generate(prompts, model=cfg.model.name, loras=loras, out_dir=folder, steps=steps, guidance=guidance,
                         width=side, height=side, dtype="fp32", seed=70_000 + p.seed)
        scores = [s.score for _, _, s in score_folder(folder) if s is not None]
        feats = np.stack([builtin_features(Image.open(path)) for path in paths])
        results[name] = {"steps": steps, "guidance": guidance, "fidelity": statistics.mean(scores),
                         "median": statistics.median(scores), "fd": frechet_distance(feats, reference)}
        images[name] = paths
    shown = min(8, len(prompts))
    grid = save_image_grid([Image.open(path) for name, *_ in runs for path in images[name][:shown]],
                           output / "comparison.png", labels=[name for name, *_ in runs for _ in range(shown)],
                           columns=shown)
    t = results["teacher"]["fidelity"]
    lines = [
        f"# Turbo LoRA on {cfg.model.name}: {dcfg.student_steps}-step student by distribution matching",
        "",
        f"Student: rank {cfg.lora.rank} LoRA, {cfg.train.steps} steps of {cfg.train.batch_size} prompts, "
        f"{dcfg.fake_updates} fake-score updates per step; teachers: "
        + "; ".join(f"{t.lora or 'base'} on sigma {t.t_range[0]:g}-{t.t_range[1]:g} (CFG {t.guidance:g})"
                    for t in cfg.teachers) + ".",
        "",
        f"{len(prompts)} fresh prompts of the synthetic world, the same seeds for every row. Layout fidelity "
        "(mean, median) and the Frechet distance of 60 image statistics to renders of the prompts (lower "
        "is closer):",
        "",
        "| | steps | CFG | fidelity | median | vs teacher | Frechet distance |",
        "|---|---|---|---|---|---|---|",
        *[f"| {name} | {r['steps']} | {r['guidance']:g} | {r['fidelity']:.3f} | {r['median']:.3f} | "
          f"{(r['fidelity'] - t) / t:+.1%} | {r['fd']:.3f} |" for name, r in results.items()],
        "",
        f"`comparison.png`: rows {', '.join(name for name, *_ in runs)}; `metrics.png`: the training curves. "
        f"The student runs in `ernie-lora generate --model {cfg.model.name} --lora lora.safetensors "
        f"--steps {dcfg.student_steps} --guidance 1`.",
        "",
    ]
    atomic_write_text(output / "report.md", "\n".join(lines))
    print("\n".join(line for line in lines if line.startswith("|")))
    print(f"report {output / 'report.md'}; grid {grid}")
    return results
