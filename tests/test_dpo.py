"""Diffusion-DPO on the flow-matching target: the loss by hand, the reference, pairs files, resume."""

import json
import math

import pytest
import torch

from conftest import run_cli
from ernie_lora.config import DpoRunConfig
from ernie_lora.data.preference import read_pairs
from ernie_lora.errors import UserError
from ernie_lora.lora.files import read_lora
from ernie_lora.recipes.dpo import ReferenceWeights, dpo_loss, run_dpo, sdpo_scale


def test_dpo_loss_matches_a_hand_computed_case():
    # policy improves the chosen error by 0.02 and worsens the rejected by 0.02 relative to the reference:
    # inside = -beta/2 * ((0.10 - 0.12) - (0.20 - 0.18)) = -50 * (-0.04) = 2; loss = log(1 + e^-2)
    loss, inside = dpo_loss(torch.tensor([0.10]), torch.tensor([0.20]), torch.tensor([0.12]), torch.tensor([0.18]),
                            beta=100.0)
    assert inside.item() == pytest.approx(2.0)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-2.0)), rel=1e-6)  # 0.126928
    equal, _ = dpo_loss(torch.tensor([0.3]), torch.tensor([0.5]), torch.tensor([0.3]), torch.tensor([0.5]), 100.0)
    assert equal.item() == pytest.approx(math.log(2.0))  # policy = reference: log 2


def test_sdpo_scale_keeps_the_chosen_error_from_rising():
    g_w = [torch.tensor([1.0, 0.0])]
    assert sdpo_scale(g_w, [torch.tensor([2.0, 0.0])]) == pytest.approx(0.5)  # <g_w, g_w - 0.5 g_l> = 0
    assert sdpo_scale(g_w, [torch.tensor([0.0, 3.0])]) == 1.0  # orthogonal: nothing to guard
    assert sdpo_scale(g_w, [torch.tensor([-1.0, 0.0])]) == 1.0  # opposed: the rejected term helps the chosen
    assert sdpo_scale(g_w, [torch.tensor([0.5, 0.0])]) == 1.0  # never scaled up


def test_the_reference_of_a_fresh_lora_is_the_base():
    from ernie_lora.lora.adapters import add_lora, resolve_targets
    from ernie_lora.models import ERNIE_IMAGE

    torch.manual_seed(0)
    model = ERNIE_IMAGE.load_transformer("tiny", dtype="fp32")
    add_lora(model, 4, 8.0, resolve_targets(model, "attn_mlp"))
    reference = ReferenceWeights(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # training moved the LoRA away from its start
    kwargs = dict(hidden_states=torch.randn(1, model.config.in_channels, 4, 4), timestep=torch.tensor([500.0]),
                  text_bth=torch.randn(1, 3, model.config.text_in_dim), text_lens=torch.tensor([3]), return_dict=False)
    with torch.no_grad():
        trained = model(**kwargs)[0]
        with reference.active():
            ref = model(**kwargs)[0]
        model.disable_adapters()
        base = model(**kwargs)[0]
        model.enable_adapters()
        again = model(**kwargs)[0]
    assert torch.equal(ref, base) and not torch.allclose(trained, base)
    assert torch.equal(again, trained)  # the trained weights are back


def _pairs_file(dataset, tmp_path, pick_a_pic: bool = False):
    meta = [json.loads(line) for line in (dataset / "metadata.jsonl").read_text().splitlines()]
    rows = []
    for a, b in zip(meta[0::2], meta[1::2], strict=True):
        if pick_a_pic:
            rows.append({"caption": a["text"], "jpg_0": str(dataset / b["file_name"]),
                         "jpg_1": str(dataset / a["file_name"]), "label_0": 0})
        else:
            rows.append({"prompt": a["text"], "chosen": str(dataset / a["file_name"]),
                         "rejected": str(dataset / b["file_name"])})
    path = tmp_path / ("pickapic.jsonl" if pick_a_pic else "pairs.jsonl")
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_pairs_files_ours_and_pick_a_pic_and_their_errors(poster_dataset, tmp_path):
    ours = read_pairs(_pairs_file(poster_dataset, tmp_path))
    theirs = read_pairs(_pairs_file(poster_dataset, tmp_path, pick_a_pic=True))
    assert [(p.prompt, p.chosen, p.rejected) for p in ours] == [(p.prompt, p.chosen, p.rejected) for p in theirs]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "chosen": "a.png", "rejected": "b.png"}\n')
    with pytest.raises(UserError, match=rf"{bad}:1: chosen image .*a.png does not exist"):
        read_pairs(bad)
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(UserError, match=rf"{bad}:1: needs prompt/chosen/rejected"):
        read_pairs(bad)


def _cfg(pairs, tmp_path, **train):
    return DpoRunConfig.model_validate({
        "model": {"name": "tiny", "dtype": "fp32"},
        "data": {"pairs": str(pairs), "resolution": 32, "cache_dir": str(tmp_path / "cache")},
        "lora": {"rank": 4, "alpha": 8},
        "train": {"steps": 4, "batch_size": 2, "lr": 1e-3, "mixed_precision": "no", "gradient_checkpointing": False,
                  "seed": 3, **train},
        "dpo": {"beta": 500.0, "sft_weight": 0.5},
        "checkpoint": {"every": 2, "keep": 2},
    })


def test_dpo_trains_logs_and_resumes_exactly(poster_dataset, tmp_path):
    pairs = _pairs_file(poster_dataset, tmp_path)
    straight = run_dpo(_cfg(pairs, tmp_path), tmp_path / "straight", progress=False)
    assert straight.steps_done == 4 and straight.history[0]["dpo_loss"] == pytest.approx(math.log(2), abs=1e-6)
    header = (tmp_path / "straight" / "metrics.csv").read_text().splitlines()[0]
    assert header == "step,loss,dpo_loss,accuracy,margin,chosen_vs_ref,rejected_vs_ref,rejected_scale,lr,grad_norm"
    assert (tmp_path / "straight" / "metrics.png").read_bytes()[:4] == b"\x89PNG"
    # the report: curves, the reference (before) and the aligned LoRA (after) on pair prompts, the config
    assert straight.report == tmp_path / "straight" / "report.md"
    text = straight.report.read_text()
    assert "# DPO run straight" in text and "4 steps in" in text and "| dpo_loss |" in text and "beta:" in text
    assert (tmp_path / "straight" / "report" / "before.png").exists()
    assert (tmp_path / "straight" / "report.png").exists()
    run_dpo(_cfg(pairs, tmp_path), tmp_path / "resumed", stop_after=2, progress=False)
    assert not (tmp_path / "resumed" / "report.md").exists()  # a report is written when a run ends
    run_dpo(_cfg(pairs, tmp_path), tmp_path / "resumed", resume=True, progress=False)
    a, _ = read_lora(tmp_path / "straight" / "lora.safetensors")
    b, meta = read_lora(tmp_path / "resumed" / "lora.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert meta["ernie_lora.recipe"] == "dpo" and meta["ernie_lora.beta"] == "500.0"


def test_sdpo_scales_the_rejected_gradient(poster_dataset, tmp_path):
    pairs = _pairs_file(poster_dataset, tmp_path)
    cfg = _cfg(pairs, tmp_path, steps=3)
    cfg.dpo.rejected_scale = "sdpo"
    result = run_dpo(cfg, tmp_path / "sdpo", progress=False)
    scales = [row["rejected_scale"] for row in result.history]
    assert all(0.0 < s <= 1.0 for s in scales) and all(math.isfinite(r["loss"]) for r in result.history)
    assert min(scales) < 1.0  # the guard acted on this data (0.99 at step 2 when measured)


def test_dpo_cli_refuses_a_config_without_pairs(tmp_path, capsys):
    config = tmp_path / "dpo.yaml"
    config.write_text("model:\n  name: tiny\n")
    code, _, err = run_cli(["dpo", str(config), "--output", str(tmp_path / "run")], capsys)
    assert code == 2 and "data.pairs" in err


def test_starting_from_a_lora_makes_it_the_reference(poster_dataset, tmp_path):
    """Aligning an existing LoRA: at step one the policy is the reference, so the DPO loss is log 2."""
    pairs = _pairs_file(poster_dataset, tmp_path)
    first = run_dpo(_cfg(pairs, tmp_path, steps=2), tmp_path / "first", progress=False)
    cfg = _cfg(pairs, tmp_path, steps=1)
    cfg.lora.init_from = str(first.output / "lora.safetensors")
    second = run_dpo(cfg, tmp_path / "second", progress=False)
    assert second.history[0]["dpo_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert second.history[0]["chosen_vs_ref"] == pytest.approx(0.0, abs=1e-7)


def test_the_shipped_micro_config_runs_its_proof_end_to_end(tmp_path, capsys):
    """configs/micro-dpo.yaml, shrunk: a concept LoRA, pairs from its samples of train-split prompts, SFT
    baseline with its own steps, DPO, the report table and intervals on held-out prompts of the asked split."""
    from conftest import REPO
    from ernie_lora.data.synthetic import split_of

    code, out, err = run_cli(["dpo", str(REPO / "configs" / "micro-dpo.yaml"), "--output", str(tmp_path / "run"),
                              "--set", "train.steps=2", "--set", "proof.pair_prompts=3", "--set", "proof.candidates=3",
                              "--set", "proof.min_margin=0", "--set", "proof.eval_prompts=2", "--set", "proof.steps=4",
                              "--set", "proof.split=validation", "--set", "proof.eval_seeds=1",
                              "--set", "proof.sft_steps=3", "--set", "proof.concept_images=4",
                              "--set", "proof.concept_steps=2", "--set", f"data.cache_dir={tmp_path / 'cache'}"],
                             capsys)
    assert code == 0, err
    proof = tmp_path / "run"
    report = (proof / "report.md").read_text()
    for row in ("| start LoRA |", "| SFT on chosen |", "| DPO |", "- DPO - start LoRA: ", "- DPO - SFT on chosen: ",
                "DPO aligns a concept LoRA (`concept/`)"):
        assert row in report
    assert (proof / "concept" / "run" / "lora.safetensors").exists()
    assert "2 samples of 2 validation-split prompts (none a pair prompt)" in report
    assert "overlap with the 3 training prompts: 0" in out
    assert {split_of(p.prompt) for p in read_pairs(proof / "pairs" / "pairs.jsonl")} == {"train"}
    assert len(list((proof / "eval" / "dpo").glob("*.png"))) == 2
    assert (proof / "comparison.png").exists() and (proof / "run" / "lora.safetensors").exists()
    assert "step,loss" in (proof / "sft" / "run" / "metrics.csv").read_text()
    assert len((proof / "sft" / "run" / "metrics.csv").read_text().splitlines()) == 1 + 3  # proof.sft_steps


def test_dpo_moves_the_model_toward_the_chosen_image_of_each_pair(poster_dataset, tmp_path):
    """Measured outside the run (its own metrics would not see chosen and rejected swapped): after DPO, the
    flow error on each pair's chosen image falls relative to the reference more than on the rejected one."""
    from ernie_lora.data.buckets import Bucket, resize_and_crop
    from ernie_lora.data.cache import image_to_tensor
    from ernie_lora.data.dataset import load_rgb
    from ernie_lora.lora.formats import read_lora_file
    from ernie_lora.lora.tools import fuse_into
    from ernie_lora.models import ERNIE_IMAGE, build_tiny_pipeline

    pairs_path = _pairs_file(poster_dataset, tmp_path)
    cfg = _cfg(pairs_path, tmp_path, steps=8)
    cfg.dpo.sft_weight = 0.0  # the preference alone
    result = run_dpo(cfg, tmp_path / "run", progress=False)
    pipe = build_tiny_pipeline(0)
    policy = build_tiny_pipeline(0).transformer
    fuse_into(policy, read_lora_file(result.output / "lora.safetensors").modules)
    generator = torch.Generator().manual_seed(0)

    def errors(model, latents, text, noise, sigma):
        x_t = (1 - sigma) * latents + sigma * noise
        pred = ERNIE_IMAGE.predict_velocity(model, x_t, torch.full((len(latents),), sigma), [text] * len(latents))
        return ((pred - (noise - latents)) ** 2).flatten(1).mean(1)

    shift = {"chosen": [], "rejected": []}
    with torch.no_grad():
        for pair in read_pairs(pairs_path):
            text = pipe.encode_prompt(pair.prompt, device="cpu")[0]
            for role, path in (("chosen", pair.chosen), ("rejected", pair.rejected)):
                pixels = image_to_tensor(resize_and_crop(load_rgb(path), Bucket(32, 32)))
                latent = ERNIE_IMAGE.encode_images(pipe.vae, pixels).expand(8, -1, -1, -1)
                for sigma in (0.3, 0.6, 0.9):
                    noise = torch.randn(latent.shape, generator=generator)
                    gap = (errors(policy, latent, text, noise, sigma)
                           - errors(pipe.transformer, latent, text, noise, sigma))
                    shift[role].append(float(gap.mean()))
    chosen, rejected = (sum(v) / len(v) for v in (shift["chosen"], shift["rejected"]))
    assert chosen < rejected, (chosen, rejected)


def test_dpo_from_a_lora_with_a_trigger_fills_its_pairs_prompts_and_records_it(poster_dataset, tmp_path, monkeypatch):
    from conftest import tiny_config
    from ernie_lora.recipes import dpo
    from ernie_lora.recipes.lora import train

    train(tiny_config(poster_dataset, tmp_path / "cache", data={"trigger_word": "ohwx"}, train={"steps": 1}),
          tmp_path / "sft", progress=False)
    rows = [json.loads(line) for line in _pairs_file(poster_dataset, tmp_path).read_text().splitlines()]
    rows[0]["prompt"] = "a [trigger] " + rows[0]["prompt"]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    encoded = []
    build = dpo.build_caches
    monkeypatch.setattr(dpo, "build_caches", lambda items, *a, **k: (encoded.extend(i.caption for i in items),
                                                                      build(items, *a, **k))[1])
    cfg = _cfg(pairs, tmp_path, steps=1)
    cfg.lora.init_from = str(tmp_path / "sft" / "lora.safetensors")
    run_dpo(cfg, tmp_path / "dpo", progress=False)
    assert encoded.count("a ohwx " + rows[0]["prompt"][len("a [trigger] "):]) == 2  # chosen and rejected
    assert not any("[trigger]" in caption for caption in encoded)
    _, meta = read_lora(tmp_path / "dpo" / "lora.safetensors")
    assert meta["modelspec.trigger_phrase"] == "ohwx"
