"""Few-step distillation: the student's sampler is the pipeline's, teachers by sigma, a tiny run end to end."""

import numpy as np
import pytest
import torch

from conftest import run_cli
from ernie_lora.config import DistillRunConfig
from ernie_lora.errors import UserError
from ernie_lora.lora.files import read_lora
from ernie_lora.models import ERNIE_IMAGE
from ernie_lora.proofs import frechet_distance
from ernie_lora.recipes.distill import run_distill
from ernie_lora.recipes.dmd import Teacher, teacher_for


def test_the_students_euler_steps_are_the_pipelines():
    """What the student is trained through equals what `generate --steps K --guidance 1` runs."""
    from diffusers import ErnieImagePipeline

    from ernie_lora.models import build_tiny_pipeline

    pipe: ErnieImagePipeline = build_tiny_pipeline(0)
    pipe.set_progress_bar_config(disable=True)
    emb = pipe.encode_prompt("a poster", "cpu")[0]
    channels = pipe.transformer.config.in_channels
    noise = torch.randn(1, channels, 2, 2, generator=torch.Generator().manual_seed(0))
    expected = pipe(prompt_embeds=[emb], height=32, width=32, num_inference_steps=3, guidance_scale=1.0,
                    latents=noise.clone(), output_type="latent", use_pe=False).images
    sigmas = ERNIE_IMAGE.euler_sigmas("tiny", 3)
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0 and len(sigmas) == 4
    x = noise.clone()
    with torch.no_grad():
        for i in range(3):
            v = ERNIE_IMAGE.predict_velocity(pipe.transformer, x, sigmas[i].expand(1), [emb])
            x = x + (sigmas[i + 1] - sigmas[i]) * v
    torch.testing.assert_close(x, expected, rtol=1e-4, atol=1e-5)


def test_teachers_own_their_sigma_ranges():
    layout, detail = Teacher("layout", 0.5, 1.0, 3.0), Teacher(None, 0.0, 0.5, 4.0)
    assert teacher_for([layout, detail], 0.9) is layout and teacher_for([layout, detail], 0.1) is detail
    assert teacher_for([layout, detail], 0.5) is layout  # where ranges touch, the first listed
    with pytest.raises(UserError, match="no teacher owns sigma"):
        teacher_for([layout], 0.2)
    with pytest.raises(ValueError, match="no t_range holds sigma"):
        DistillRunConfig.model_validate({"teachers": [{"t_range": [0.5, 1.0]}]})


def test_frechet_distance():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 3))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(a, a + [2.0, 0.0, 0.0]) == pytest.approx(4.0, rel=1e-6)  # |mean shift|^2


def _cfg(tmp_path, teachers, **train):
    return DistillRunConfig.model_validate({
        "model": {"name": "tiny", "dtype": "fp32"},
        "data": {"synthetic_prompts": 6, "resolution": 32, "cache_dir": str(tmp_path / "cache")},
        "lora": {"rank": 4, "alpha": 4},
        "teachers": teachers,
        "distill": {"student_steps": 2, "fake_updates": 2},
        "train": {"steps": 3, "batch_size": 2, "lr": 1e-3, "mixed_precision": "no", "seed": 1, **train},
        "checkpoint": {"every": 1, "keep": 2},
        "provenance": {"creator": "Studio K", "licence": "CC-BY-4.0", "consent": "own work"},
    })


def test_distill_with_two_teachers_resumes_exactly_and_the_student_generates(tmp_path, capsys):
    from ernie_lora.generate import LoraSpec, generate
    from ernie_lora.lora.adapters import add_lora, lora_state_dict, peft_config_metadata, resolve_targets
    from ernie_lora.lora.files import save_lora

    # a "layout" LoRA owns the noisy half of the sigmas, the base the rest
    torch.manual_seed(5)
    model = ERNIE_IMAGE.load_transformer("tiny", dtype="fp32")
    config = add_lora(model, 4, 4.0, resolve_targets(model, "attn"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    save_lora(tmp_path / "layout.safetensors", lora_state_dict(model), peft_config_metadata(config))
    teachers = [{"lora": str(tmp_path / "layout.safetensors"), "t_range": [0.5, 1.0], "guidance": 2.0},
                {"t_range": [0.0, 0.5], "guidance": 2.0}]
    straight = run_distill(_cfg(tmp_path, teachers), tmp_path / "straight", progress=False)
    assert straight.steps_done == 3 and all(np.isfinite(r["dmd_loss"]) for r in straight.history)
    text = (tmp_path / "straight" / "report.md").read_text()
    assert straight.report and "# Turbo distillation run straight" in text and "| dmd_loss |" in text
    assert "Before: the base model at 2 steps without CFG" in text and "student_steps: 2" in text
    assert (tmp_path / "straight" / "report" / "after.png").exists()
    run_distill(_cfg(tmp_path, teachers), tmp_path / "resumed", stop_after=1, progress=False)
    run_distill(_cfg(tmp_path, teachers), tmp_path / "resumed", resume=True, progress=False)
    a, meta = read_lora(tmp_path / "straight" / "lora.safetensors")
    b, _ = read_lora(tmp_path / "resumed" / "lora.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert meta["ernie_lora.recipe"] == "distill" and meta["ernie_lora.student_steps"] == "2"
    # the same provenance block as a trained LoRA, shown by lora info
    code, out, _ = run_cli(["lora", "info", str(tmp_path / "straight" / "lora.safetensors")], capsys)
    for text in ("creator: Studio K", "licence: CC-BY-4.0", "consent: own work", "base_model_hash:", "recipe: distill",
                 "trained:   rank 4, alpha 4.0"):
        assert code == 0 and text in out, text
    assert not any("fake" in k or "teacher" in k for k in a)  # only the student is in the file
    # the student is a plain LoRA: the pipeline loads it and samples 2 steps at guidance 1
    paths = generate(["a poster"], model="tiny", loras=[LoraSpec(tmp_path / "straight" / "lora.safetensors", 1.0)],
                     steps=2, guidance=1.0, width=32, height=32, dtype="fp32", out_dir=tmp_path / "gen")
    assert len(paths) == 1 and paths[0].exists()
    code, _, err = run_cli(["distill", str(tmp_path / "missing.yaml")], capsys)
    assert code == 2 and "no such file" in err


def test_the_shipped_micro_config_runs_its_proof_end_to_end(tmp_path, capsys):
    """configs/micro-turbo.yaml, shrunk: distil, then teacher / student / base rows and the grid."""
    from conftest import REPO

    code, out, err = run_cli(["distill", str(REPO / "configs" / "micro-turbo.yaml"), "--output",
                              str(tmp_path / "run"), "--set", "train.steps=2", "--set", "data.synthetic_prompts=4",
                              "--set", "proof.eval_prompts=3", "--set", "proof.steps=[2]",
                              "--set", f"data.cache_dir={tmp_path / 'cache'}"], capsys)
    assert code == 0, err
    assert (tmp_path / "run" / "run" / "lora.safetensors").exists()
    report = (tmp_path / "run" / "report.md").read_text()
    for row in ("| teacher | 24 |", "| student 2 steps | 2 | 1 |", "| base 2 steps | 2 | 3 |",
                "| base 2 steps, CFG 1 | 2 | 1 |", "- student 2 steps - base 2 steps"):
        assert row in report
    assert "3 test-split prompts of the synthetic world (none a training prompt)" in report
    assert "overlap with the 4 training prompts: 0" in out
    assert (tmp_path / "run" / "comparison.png").exists()


def test_regression_warm_start_on_teacher_ode_pairs_then_dmd_resumes_exactly(tmp_path):
    def cfg():
        c = _cfg(tmp_path, [{"t_range": [0.0, 1.0], "guidance": 2.0}], steps=4)
        c.distill.regression_steps, c.distill.regression_pairs, c.distill.teacher_steps = 2, 4, 3
        return c

    straight = run_distill(cfg(), tmp_path / "straight", progress=False)
    rows = straight.history
    assert all(np.isfinite(r["regression_loss"]) and np.isnan(r["dmd_loss"]) for r in rows[:2])
    assert all(np.isfinite(r["dmd_loss"]) and np.isnan(r["regression_loss"]) for r in rows[2:])
    run_distill(cfg(), tmp_path / "resumed", stop_after=1, progress=False)  # stopped inside the warm start
    run_distill(cfg(), tmp_path / "resumed", resume=True, progress=False)
    a, _ = read_lora(tmp_path / "straight" / "lora.safetensors")
    b, _ = read_lora(tmp_path / "resumed" / "lora.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


# -- distribution matching on a Gaussian toy: the recipe's own step, scores known in closed form --------------

REAL_MEAN, REAL_STD = torch.tensor([3.0, -2.0]), torch.tensor([0.5, 0.5])


def _gaussian_x0(x_t, sigma, mean, log_std):
    """E[x0 | x_t] for x0 ~ N(mean, diag(std^2)) and x_t = (1 - sigma) x0 + sigma eps: the exact denoiser."""
    a, s, var = (1 - sigma).view(-1, 1), sigma.view(-1, 1), torch.exp(2 * log_std)
    return mean + a * var / (a * a * var + s * s) * (x_t - a * mean)


def _gaussian_dmd(fake_updates: int, steps: int = 200, seed: int = 0, batch: int = 64):
    """A student x0 = mean + std * z learns N(REAL_MEAN, REAL_STD^2) through ``distribution_matching_step``;
    the fake score is the exact denoiser of a Gaussian whose mean and std it learns from the student's
    samples, starting at the teacher's (as DMD starts the fake score from the teacher)."""
    from ernie_lora.recipes.dmd import distribution_matching_step

    g = torch.Generator().manual_seed(seed)
    mean, log_std = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    fake_mean = REAL_MEAN.clone().requires_grad_(True)
    fake_log_std = REAL_STD.log().requires_grad_(True)
    opt, opt_fake = torch.optim.Adam([mean, log_std], lr=0.05), torch.optim.Adam([fake_mean, fake_log_std], lr=0.1)

    def student():
        return mean + torch.exp(log_std) * torch.randn(batch, 2, generator=g)

    def noise_to(x0):
        sigma = 0.02 + 0.96 * torch.rand(x0.shape[0], generator=g)
        eps = torch.randn(x0.shape, generator=g)
        return (1 - sigma.view(-1, 1)) * x0 + sigma.view(-1, 1) * eps, sigma, eps

    def fake_update(x0):
        x_t, sigma, _ = noise_to(x0)
        loss = ((_gaussian_x0(x_t, sigma, fake_mean, fake_log_std) - x0) ** 2).mean()
        opt_fake.zero_grad()
        loss.backward()
        opt_fake.step()
        return loss.item()

    for _ in range(steps):
        opt.zero_grad()
        distribution_matching_step(student, fake_update, student, noise_to,
                                   lambda x_t, s: _gaussian_x0(x_t, s, REAL_MEAN, REAL_STD.log()),
                                   lambda x_t, s: _gaussian_x0(x_t, s, fake_mean, fake_log_std), fake_updates)
        opt.step()
    return mean.detach(), log_std.detach().exp()


def test_distribution_matching_moves_a_gaussian_student_onto_the_teachers_distribution():
    mean, std = _gaussian_dmd(fake_updates=5)  # from N(0, 1): 3.6 away in mean, twice the std
    assert torch.allclose(mean, REAL_MEAN, atol=0.1) and torch.allclose(std, REAL_STD, atol=0.05), (mean, std)


def test_without_fake_score_updates_the_student_does_not_move():
    """The fake score is what tells the student where it stands: never updated, it equals the teacher and
    the gradient is zero."""
    mean, std = _gaussian_dmd(fake_updates=0, steps=20)
    assert torch.equal(mean, torch.zeros(2)) and torch.equal(std, torch.ones(2))
