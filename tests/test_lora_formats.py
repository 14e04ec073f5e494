"""LoRA files that go everywhere: one rule for what we write, every layout users have read, merge, fuse,
provenance, verify."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import run_cli, tiny_config
from ernie_lora.errors import UserError
from ernie_lora.generate import LoraSpec, generate, load_loras
from ernie_lora.lora.formats import FORMATS, loader_view, read_lora_file, read_modules, write_modules
from ernie_lora.lora.info import verify_lora
from ernie_lora.lora.layouts import LOADERS
from ernie_lora.lora.modules import LoraModule
from ernie_lora.lora.tools import fuse_into, merge_modules
from ernie_lora.models import build_tiny_pipeline
from test_generate import make_lora

SMALL = dict(width=32, height=32, steps=3, guidance=2.0, dtype="fp32", seed=4)
Q, OUT, FC1, FC2 = ("layers.0.self_attention.to_q", "layers.1.self_attention.to_out.0", "layers.0.mlp.gate_proj",
                    "layers.1.mlp.linear_fc2")


def _deltas(modules):
    return {name: m.delta() for name, m in modules.items()}


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _effective_weights(transformer):
    """Each linear / 1x1-conv layer's weight as the forward pass applies it (adapters included), [out, in]."""
    out = {}
    for name, layer in transformer.named_modules():
        base = getattr(layer, "base_layer", None)
        if base is None or not isinstance(base, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        n_in = base.weight.shape[1]
        eye = torch.eye(n_in, dtype=torch.float64)
        layer.double()
        with torch.no_grad():
            if isinstance(base, torch.nn.Conv2d):
                y = layer(eye[:, :, None, None])[:, :, 0, 0]
                bias = base.bias
            else:
                y, bias = layer(eye), base.bias
        out[name] = (y - (bias.double() if bias is not None else 0)).T
        layer.float()
    return out


@pytest.fixture
def known(tmp_path):
    """A diffusers-format LoRA with alpha != rank on attention and MLP layers (alpha in the header)."""
    return make_lora(tmp_path / "known.safetensors", seed=3, rank=4, alpha=6.0,
                     targets=("to_q", "to_v", "to_out.0", "gate_proj", "linear_fc2"), std=3.0)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A real training run with rank 4, alpha 8 (scale 2): its final file and the trained delta W of each
    module, computed from the last checkpoint's raw adapter weights (not by our reader)."""
    from ernie_lora.data.synthetic import write_synthetic_dataset
    from ernie_lora.recipes.lora import train

    tmp = tmp_path_factory.mktemp("run")
    data = write_synthetic_dataset(tmp / "data", count=4, kind="poster", seed=1, size=32)
    cfg = tiny_config(data, tmp / "cache", train={"steps": 2, "batch_size": 2, "lr": 5e-2, "mixed_precision": "no",
                                                   "gradient_checkpointing": False, "seed": 3},
                      checkpoint={"every": 2, "keep": 1})
    train(cfg, tmp / "run", progress=False)
    raw = load_file(tmp / "run" / "checkpoints" / "step-000002" / "lora.safetensors")
    scale = cfg.lora.alpha / cfg.lora.rank
    assert scale == 2.0
    deltas = {k.removeprefix("transformer.").removesuffix(".lora_A.weight"):
              scale * raw[k.replace("lora_A", "lora_B")].double() @ raw[k].double()
              for k in raw if k.endswith(".lora_A.weight")}
    return tmp / "run" / "lora.safetensors", deltas


# -- one rule for every file we write ----------------------------------------------------------------


def test_every_format_we_write_applies_the_trained_delta_in_every_loader(trained_run, tmp_path, capsys):
    path, trained = trained_run
    where = {"diffusers": {"diffusers", "ComfyUI"}, "comfy": {"diffusers", "ComfyUI"},
             "peft": {"diffusers", "peft"}, "kohya": {"ComfyUI", "kohya"}}
    for fmt in FORMATS:
        target = tmp_path / fmt if fmt == "peft" else tmp_path / f"{fmt}.safetensors"
        assert run_cli(["lora", "convert", str(path), str(target), "--format", fmt], capsys)[0] == 0
        file = target / "adapter_model.safetensors" if fmt == "peft" else target
        lora = read_lora_file(file)
        loaded = set()
        for loader in LOADERS:  # each loader's documented rule, run on the file
            view = loader_view(loader, lora.tensors, lora.header, file)
            if not view.loads:
                continue
            loaded.add(loader.name)
            assert set(view.modules) == set(trained), (fmt, loader.name)
            for name, delta in trained.items():
                assert _rel(view.modules[name].delta(), delta) < 1e-5, (fmt, loader.name, name)
        assert where[fmt] <= loaded, (fmt, loaded)
        if "diffusers" in loaded:  # diffusers itself, not our reading of its rule
            pipe = build_tiny_pipeline(0)
            base = {n: m.weight.detach().double().reshape(m.weight.shape[0], -1)
                    for n, m in pipe.transformer.named_modules() if n in trained}
            pipe.load_lora_weights(str(file), adapter_name="x")
            applied = _effective_weights(pipe.transformer)
            for name, delta in trained.items():
                assert _rel(applied[name] - base[name], delta) < 1e-5, (fmt, name)
    # the unfolded checkpoint file (alpha only in the header) is what ComfyUI gets wrong: 0.5x
    checkpoint = path.parent / "checkpoints" / "step-000002" / "lora.safetensors"
    code, out, _ = run_cli(["lora", "info", str(checkpoint)], capsys)
    comfy = next(line for line in out.splitlines() if line.startswith("  ComfyUI"))
    assert code == 0 and comfy.split()[1:3] == ["yes", "NO"] and "0.5x the meant delta" in comfy


def test_our_file_says_alpha_equals_rank_everywhere_and_keeps_the_trained_settings(trained_run, tmp_path, capsys):
    path, _ = trained_run
    lora = read_lora_file(path)
    assert lora.layout == "diffusers" and not any(k.endswith(".alpha") for k in lora.tensors)
    config = json.loads(lora.header["lora_adapter_metadata"])
    assert config["transformer.r"] == config["transformer.lora_alpha"] == 4
    assert {m.alpha for m in lora.modules.values()} == {4.0}
    code, out, _ = run_cli(["lora", "info", str(path)], capsys)
    assert code == 0 and "trained:   rank 4, alpha 8.0, scale 2.0 folded into lora_B" in out
    verdicts = {line.split()[0]: line.split()[1:3] for line in out.splitlines() if line.startswith("  ")}
    assert verdicts["diffusers"] == verdicts["ComfyUI"] == ["yes", "yes"]
    assert verdicts["peft"] == verdicts["kohya"] == ["no", "-"]
    kohya = tmp_path / "k.safetensors"
    run_cli(["lora", "convert", str(path), str(kohya), "--format", "kohya"], capsys)
    tensors = load_file(kohya)
    alphas = {k.removesuffix(".alpha"): float(v) for k, v in tensors.items() if k.endswith(".alpha")}
    ranks = {k.removesuffix(".lora_down.weight"): v.shape[0] for k, v in tensors.items() if "lora_down" in k}
    assert alphas and alphas == ranks


def test_resume_and_init_from_keep_the_trained_delta(trained_run, poster_dataset, tmp_path):
    """Folding is for exported files: a run started from our (folded) file starts at exactly its delta."""
    from ernie_lora.lora.adapters import adapter_modules
    from ernie_lora.models import ERNIE_IMAGE
    from ernie_lora.recipes.engine import add_training_lora

    path, trained = trained_run
    cfg = tiny_config(poster_dataset, tmp_path / "cache", lora={"rank": 4, "alpha": 2.0, "init_from": str(path)})
    transformer = ERNIE_IMAGE.load_transformer("tiny", dtype="fp32")
    config, _, _ = add_training_lora(transformer, cfg.lora)
    for name, module in adapter_modules(transformer, config).items():
        assert module.scale == 0.5
        assert _rel(module.delta(), trained[name]) < 1e-6, name


# -- every layout users have, from known factors ------------------------------------------------------


def _factors(seed, out, inp, rank):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rank, inp, generator=g) * 0.5, torch.randn(out, rank, generator=g) * 0.5


def _base():
    t = build_tiny_pipeline(0).transformer
    return {n: (m.weight.detach().double(), None if getattr(m, "bias", None) is None else m.bias.detach().double())
            for n, m in t.named_modules() if getattr(m, "weight", None) is not None and n}


def _flat(w):
    return w.reshape(w.shape[0], -1) if w.dim() > 1 else w


def layout_cases():
    """(name, tensors, header, expected(weights, strength) -> {module: (new weight, new bias)}), each built
    from known factors with the loader's formula written out here, independently of ernie_lora.lora."""
    cases = []
    a, b = _factors(1, 64, 64, 4)
    a2, b2 = _factors(2, 128, 64, 2)

    def lora_expect(mods):  # mods: {module: (down, up, scale)}
        def expect(base, t):
            return {n: (_flat(base[n][0]) + t * s * (u.double() @ d.double()), base[n][1]) for n, (d, u, s) in
                    mods.items()}
        return expect

    # ComfyUI LoraSave: lora_up/lora_down, .alpha, .diff (a norm's vector) and .diff_b (a bias)
    diff_norm = torch.linspace(-0.2, 0.3, 64)
    diff_b = torch.linspace(0.1, 0.5, 384)
    ad, bd = _factors(3, 384, 64, 3)

    def comfy_expect(base, t):
        out = lora_expect({Q: (a, b, 2.0 / 4)})(base, t)
        out["layers.0.adaLN_sa_ln"] = (base["layers.0.adaLN_sa_ln"][0] + t * diff_norm.double(), None)
        w, bias = base["adaLN_modulation.1"]
        out["adaLN_modulation.1"] = (w + t * 1.0 * bd.double() @ ad.double(), bias + t * diff_b.double())
        return out
    cases.append(("comfy-loraSave", {
        f"diffusion_model.{Q}.lora_down.weight": a, f"diffusion_model.{Q}.lora_up.weight": b,
        f"diffusion_model.{Q}.alpha": torch.tensor(2.0),
        "diffusion_model.layers.0.adaLN_sa_ln.diff": diff_norm,
        "diffusion_model.adaLN_modulation.1.lora_down.weight": ad,
        "diffusion_model.adaLN_modulation.1.lora_up.weight": bd,
        "diffusion_model.adaLN_modulation.1.diff_b": diff_b}, None, comfy_expect))
    # DiffSynth-Studio / OneTrainer original: bare module paths, .lora_A.default.weight, alpha = rank
    cases.append(("diffsynth-bare", {f"{Q}.lora_A.default.weight": a, f"{Q}.lora_B.default.weight": b,
                                     f"{FC1}.lora_A.default.weight": a2, f"{FC1}.lora_B.default.weight": b2},
                  None, lora_expect({Q: (a, b, 1.0), FC1: (a2, b2, 1.0)})))
    # OneTrainer LEGACY: lora_transformer_ with underscores, .alpha
    cases.append(("onetrainer-legacy", {
        "lora_transformer_layers_1_self_attention_to_out_0.lora_down.weight": a,
        "lora_transformer_layers_1_self_attention_to_out_0.lora_up.weight": b,
        "lora_transformer_layers_1_self_attention_to_out_0.alpha": torch.tensor(1.0)}, None,
        lora_expect({OUT: (a, b, 1.0 / 4)})))
    # ai-toolkit with transformer_only: false: the 1x1-conv x_embedder.proj and modules outside the blocks
    ax, bx = _factors(4, 64, 32, 4)
    at, bt = _factors(5, 64, 32, 4)
    af, bf = _factors(6, 32, 64, 4)
    cases.append(("ai-toolkit-all", {
        "diffusion_model.x_embedder.proj.lora_A.weight": ax[:, :, None, None],
        "diffusion_model.x_embedder.proj.lora_B.weight": bx[:, :, None, None],
        "diffusion_model.text_proj.lora_A.weight": at, "diffusion_model.text_proj.lora_B.weight": bt,
        "diffusion_model.final_linear.lora_A.weight": af, "diffusion_model.final_linear.lora_B.weight": bf,
        "diffusion_model.final_linear.alpha": torch.tensor(8.0)}, None,
        lora_expect({"x_embedder.proj": (ax, bx, 1.0), "text_proj": (at, bt, 1.0), "final_linear": (af, bf, 2.0)})))
    # musubi-tuner style: every linear, kohya names, alpha tensors
    musubi, expect = {}, {}
    for i, name in enumerate((Q, OUT, FC2, "time_embedding.linear_1", "adaLN_modulation.1", "final_norm.linear")):
        shape = {FC2: (64, 128), "adaLN_modulation.1": (384, 64), "final_norm.linear": (128, 64)}.get(name, (64, 64))
        d, u = _factors(10 + i, shape[0], shape[1], 2)
        stem = "lora_unet_" + name.replace(".", "_")
        musubi |= {f"{stem}.lora_down.weight": d, f"{stem}.lora_up.weight": u, f"{stem}.alpha": torch.tensor(1.0)}
        expect[name] = (d, u, 0.5)
    cases.append(("musubi-all", musubi, None, lora_expect(expect)))
    # peft DoRA (lora_magnitude_vector, per output row, strength inside the norm)
    mag = torch.linspace(0.5, 1.5, 64)

    def peft_dora(base, t):
        w = base[Q][0]
        changed = w + t * 0.5 * b.double() @ a.double()
        return {Q: (changed * (mag.double() / changed.norm(dim=1))[:, None], None)}
    cases.append(("peft-dora", {f"base_model.model.{Q}.lora_A.weight": a, f"base_model.model.{Q}.lora_B.weight": b,
                                f"base_model.model.{Q}.lora_magnitude_vector": mag},
                  {"lora_adapter_metadata": json.dumps({"transformer.r": 4, "transformer.lora_alpha": 2,
                                                        "transformer.target_modules": ["to_q"],
                                                        "transformer.use_dora": True})}, peft_dora))
    # ComfyUI / LyCORIS DoRA (dora_scale [1, in], per input column, blended by strength)
    dscale = torch.linspace(0.5, 1.5, 64)[None, :]

    def comfy_dora(base, t):
        w = base[Q][0]
        changed = w + 2.0 / 4 * b.double() @ a.double()
        full = changed * (dscale.double() / changed.norm(dim=0, keepdim=True))
        return {Q: (w + t * (full - w), None)}
    cases.append(("comfy-dora", {f"diffusion_model.{Q}.lora_down.weight": a, f"diffusion_model.{Q}.lora_up.weight": b,
                                 f"diffusion_model.{Q}.alpha": torch.tensor(2.0),
                                 f"diffusion_model.{Q}.dora_scale": dscale}, None, comfy_dora))
    # LyCORIS LoHa: hada_w1_a [out, r], hada_w1_b [r, in] (and w2 alike), alpha / r
    h1_down, h1_up = _factors(20, 64, 64, 3)
    h2_down, h2_up = _factors(21, 64, 64, 3)

    def loha(base, t):
        d = 6.0 / 3 * (h1_up.double() @ h1_down.double()) * (h2_up.double() @ h2_down.double())
        return {OUT: (base[OUT][0] + t * d, None)}
    stem = "lora_unet_layers_1_self_attention_to_out_0"
    cases.append(("lycoris-loha", {f"{stem}.hada_w1_a": h1_up, f"{stem}.hada_w1_b": h1_down,
                                   f"{stem}.hada_w2_a": h2_up, f"{stem}.hada_w2_b": h2_down,
                                   f"{stem}.alpha": torch.tensor(6.0)}, None, loha))
    # LyCORIS LoKr on linear_fc2 [64, 128] = kron([4, 8], [16, 16]): w1 factorised (rank 2), w2 full;
    # the scale is alpha / the factorised one's rank
    g = torch.Generator().manual_seed(22)
    k1a, k1b, k2 = torch.randn(4, 2, generator=g), torch.randn(2, 8, generator=g), torch.randn(16, 16, generator=g)

    def lokr(base, t):
        return {FC2: (base[FC2][0] + t * 1.0 / 2 * torch.kron(k1a.double() @ k1b.double(), k2.double()), None)}
    stem = "lora_unet_layers_1_mlp_linear_fc2"
    cases.append(("lycoris-lokr", {f"{stem}.lokr_w1_a": k1a, f"{stem}.lokr_w1_b": k1b, f"{stem}.lokr_w2": k2,
                                   f"{stem}.alpha": torch.tensor(1.0)}, None, lokr))
    return cases


CASES = {name: case for name, *case in layout_cases()}


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_foreign_layout_is_read_as_its_loader_applies_it(name, tmp_path):
    tensors, header, expect = CASES[name]
    path = tmp_path / f"{name}.safetensors"
    save_file(tensors, str(path), metadata=header)
    modules = read_modules(path)[0]
    base = _base()
    wanted = expect(base, 0.7)
    assert set(modules) == set(wanted)
    transformer = build_tiny_pipeline(0).transformer
    fuse_into(transformer, modules, 0.7)
    layers = dict(transformer.named_modules())
    for module, (weight, bias) in wanted.items():
        got = _flat(layers[module].weight.detach().double())
        torch.testing.assert_close(got, _flat(weight), rtol=1e-5, atol=1e-5 * float(weight.abs().max()))
        if bias is not None:
            torch.testing.assert_close(layers[module].bias.detach().double(), bias, rtol=1e-5, atol=1e-6)
    # generate applies it the same way (plain parts through diffusers, the rest written into the weights)
    pipe = build_tiny_pipeline(0)
    load_loras(pipe, [LoraSpec(path, 0.7)], fuse=True)
    layers = dict(pipe.transformer.named_modules())
    for module, (weight, _) in wanted.items():
        got = _flat(layers[module].weight.detach().double())
        torch.testing.assert_close(got, _flat(weight), rtol=1e-5, atol=1e-5 * float(weight.abs().max()))


@pytest.mark.parametrize("name", sorted(CASES))
def test_convert_reproduces_the_known_delta_or_prints_its_svd_error(name, tmp_path, capsys):
    tensors, header, expect = CASES[name]
    path = tmp_path / f"{name}.safetensors"
    save_file(tensors, str(path), metadata=header)
    base = _base()
    wanted = {n: _flat(w) - _flat(base[n][0]) for n, (w, _) in expect(base, 1.0).items()}
    plain_only = name in ("diffsynth-bare", "onetrainer-legacy", "ai-toolkit-all", "musubi-all")
    args = ["lora", "convert", str(path), str(tmp_path / "out.safetensors")]
    if not plain_only:
        code, _, err = run_cli(args, capsys)
        assert code == 2 and "not plain LoRAs" in err and "--rank" in err and len(err.strip().splitlines()) == 1
        args += ["--rank", "3", "--model", "tiny", "--drop-bias"]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    converted = read_modules(tmp_path / "out.safetensors")[0]
    printed = {line.split(":")[0].strip(): float(line.rsplit(" ", 1)[1]) for line in out.splitlines()
               if "relative error" in line and line.startswith("  ")}
    for module, delta in wanted.items():
        if delta.dim() < 2:
            assert module not in converted  # a norm's vector: left out with --drop-bias
            continue
        error = _rel(converted[module].delta(), delta)
        if module in printed:
            assert error == pytest.approx(printed[module], rel=1e-2, abs=1e-6), module
        else:
            assert error < 1e-6, module


def test_peft_patterns_are_honoured_and_a_stray_adapter_config_is_not(tmp_path):
    a, b = _factors(1, 64, 64, 4)
    a2, b2 = _factors(2, 128, 64, 2)
    tensors = {f"transformer.{Q}.lora_A.weight": a, f"transformer.{Q}.lora_B.weight": b,
               f"transformer.{FC1}.lora_A.weight": a2, f"transformer.{FC1}.lora_B.weight": b2}
    header = {"lora_adapter_metadata": json.dumps({"transformer.r": 4, "transformer.lora_alpha": 4,
                                                   "transformer.target_modules": ["to_q", "gate_proj"],
                                                   "transformer.rank_pattern": {"gate_proj": 2},
                                                   "transformer.alpha_pattern": {"to_q": 8, "gate_proj": 1}})}
    save_file(tensors, str(tmp_path / "patterns.safetensors"), metadata=header)
    modules = read_modules(tmp_path / "patterns.safetensors")[0]
    assert modules[Q].scale == 2.0 and modules[FC1].scale == 0.5
    pipe = build_tiny_pipeline(0)  # diffusers agrees: the same scales
    base = {n: m.weight.detach().double() for n, m in pipe.transformer.named_modules() if n in (Q, FC1)}
    pipe.load_lora_weights(str(tmp_path / "patterns.safetensors"), adapter_name="p")
    applied = _effective_weights(pipe.transformer)
    for name in (Q, FC1):
        assert _rel(applied[name] - base[name], modules[name].delta()) < 1e-6
    # rsLoRA: alpha / sqrt(rank)
    header = {"lora_adapter_metadata": json.dumps({"transformer.r": 4, "transformer.lora_alpha": 4,
                                                   "transformer.use_rslora": True})}
    save_file({k: v for k, v in tensors.items() if Q in k}, str(tmp_path / "rs.safetensors"), metadata=header)
    assert read_modules(tmp_path / "rs.safetensors")[0][Q].scale == 2.0
    # an adapter_config.json beside a file that is not peft's adapter_model.safetensors is not read
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 16}))
    save_file({k: v for k, v in tensors.items() if Q in k}, str(tmp_path / "plain.safetensors"))
    assert read_modules(tmp_path / "plain.safetensors")[0][Q].scale == 1.0
    peft_keys = {k.replace("transformer.", "base_model.model."): v for k, v in tensors.items() if Q in k}
    save_file(peft_keys, str(tmp_path / "adapter_model.safetensors"))
    assert read_modules(tmp_path / "adapter_model.safetensors")[0][Q].scale == 4.0


def test_peft_folder_loads_in_peft_itself(trained_run, tmp_path, capsys):
    from peft import PeftModel

    path, trained = trained_run
    assert run_cli(["lora", "convert", str(path), str(tmp_path / "adapter"), "--format", "peft"], capsys)[0] == 0
    transformer = build_tiny_pipeline(0).transformer
    base = {n: m.weight.detach().double() for n, m in transformer.named_modules() if n in trained}
    model = PeftModel.from_pretrained(transformer, str(tmp_path / "adapter"))
    applied = _effective_weights(model.base_model.model)
    for name, delta in trained.items():
        assert _rel(applied[name] - base[name].reshape(delta.shape), delta) < 1e-5, name
    # the folder is taken wherever a LoRA file is, and peft's own loader is named as applying it
    code, out, _ = run_cli(["lora", "info", str(tmp_path / "adapter")], capsys)
    assert code == 0 and "layout:    peft" in out
    assert next(ln for ln in out.splitlines() if ln.startswith("  peft")).split()[1:3] == ["yes", "yes"]


def test_lora_info_names_each_loaders_scale_and_verify_tells_foreign_from_broken(known, tmp_path, capsys):
    code, out, _ = run_cli(["lora", "info", str(known)], capsys)
    assert code == 0 and "alpha:     6 (10 modules)  [from header lora_adapter_metadata]" in out
    lines = {ln.split()[0]: ln for ln in out.splitlines() if ln.startswith("  ")}
    assert lines["diffusers"].split()[1:3] == ["yes", "yes"]
    assert lines["ComfyUI"].split()[1:3] == ["yes", "NO"] and "0.667x the meant delta in 10 of 10" in lines["ComfyUI"]
    foreign = tmp_path / "foreign.safetensors"
    a, b = _factors(1, 64, 64, 4)
    save_file({f"diffusion_model.{Q}.lora_A.weight": a, f"diffusion_model.{Q}.lora_B.weight": b}, str(foreign))
    code, out, _ = run_cli(["lora", "verify", str(foreign)], capsys)
    assert code == 0 and "OK: no provenance" in out
    code, out, _ = run_cli(["lora", "verify", str(known)], capsys)
    assert code == 0 and "tensor hash" in out


def test_bad_files_each_get_one_clear_error(known, tmp_path, capsys):
    save_file({"unet.down.lora_A.weight": torch.zeros(1, 1)}, str(tmp_path / "unknown.safetensors"))
    save_file({"transformer.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(4, 64),
               "lora_unet_layers_0_mlp_up_proj.lora_up.weight": torch.zeros(128, 4)},
              str(tmp_path / "mixed.safetensors"))
    (tmp_path / "truncated.safetensors").write_bytes(known.read_bytes()[: known.stat().st_size // 2])
    save_file({f"transformer.{Q}.lora_A.weight": torch.zeros(4, 64), f"transformer.{Q}.lora_B.weight":
               torch.zeros(64, 3)}, str(tmp_path / "ranks.safetensors"))
    save_file({f"transformer.{Q}.lora_A.weight": torch.zeros(4, 64)}, str(tmp_path / "half.safetensors"))
    save_file({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 64)},
              str(tmp_path / "te.safetensors"))
    save_file({"lora_unet_layers_0_self_attention_to_q.hada_w1_a": torch.zeros(64, 4),
               "lora_unet_layers_0_self_attention_to_q.hada_t1": torch.zeros(4, 4, 3, 3)},
              str(tmp_path / "cp.safetensors"))
    nan = torch.zeros(64, 4)
    nan[0, 0] = float("nan")
    save_file({f"transformer.{Q}.lora_A.weight": torch.zeros(4, 64), f"transformer.{Q}.lora_B.weight": nan},
              str(tmp_path / "nan.safetensors"))
    save_file({f"transformer.{Q}.lora_A.weight": torch.zeros(4, 64), f"transformer.{Q}.lora_B.weight":
               torch.zeros(64, 4)}, str(tmp_path / "badjson.safetensors"), metadata={"lora_adapter_metadata": "{oops"})
    expected = {"unknown": "unknown LoRA key 'unet.down.lora_A.weight'", "mixed": "mixed LoRA formats",
                "truncated": "truncated.safetensors", "ranks": "do not chain (the ranks of up and down differ)",
                "half": "has only one of its two matrices", "te": "adapts the text encoder",
                "cp": "CP-decomposed LoHa", "nan": "holds NaN or infinite values",
                "badjson": "lora_adapter_metadata is not JSON"}
    for name, message in expected.items():
        code, _, err = run_cli(["lora", "info", str(tmp_path / f"{name}.safetensors")], capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (name, err)


# -- merge, fuse, provenance -----------------------------------------------------------------------------


def test_merge_is_the_truncated_svd_of_the_weighted_sum(tmp_path):
    a = read_modules(make_lora(tmp_path / "a.safetensors", seed=1, rank=4, alpha=4.0))[0]
    b = read_modules(make_lora(tmp_path / "b.safetensors", seed=2, rank=4, alpha=8.0))[0]
    full, energy = merge_modules([a, b], [0.6, 0.4], rank=8)
    assert energy == pytest.approx(1.0)
    for name in a:
        torch.testing.assert_close(full[name].delta(), 0.6 * a[name].delta() + 0.4 * b[name].delta(),
                                   rtol=1e-5, atol=1e-6)
    low, kept = merge_modules([a, b], [0.6, 0.4], rank=3)
    sigma2_kept = sigma2_all = 0.0
    for name in a:
        s = torch.linalg.svdvals(0.6 * a[name].delta() + 0.4 * b[name].delta())
        sigma2_kept += float((s[:3] ** 2).sum())
        sigma2_all += float((s**2).sum())
        u, sv, vh = torch.linalg.svd(0.6 * a[name].delta() + 0.4 * b[name].delta())
        best = (u[:, :3] * sv[:3]) @ vh[:3]
        torch.testing.assert_close(low[name].delta(), best, rtol=1e-4, atol=1e-6)
    assert kept == pytest.approx(sigma2_kept / sigma2_all, rel=1e-6) and kept < 1


def test_merge_takes_foreign_kinds_and_writes_a_portable_file(tmp_path, capsys):
    tensors, header, expect = CASES["lycoris-loha"]
    save_file(tensors, str(tmp_path / "loha.safetensors"))
    other = make_lora(tmp_path / "other.safetensors", seed=9, targets=("to_out.0",))
    out = tmp_path / "merged.safetensors"
    code, text, err = run_cli(["lora", "merge", str(tmp_path / "loha.safetensors"), str(other), str(out),
                               "--weights", "0.5,0.5", "--rank", "64"], capsys)
    assert code == 0, err
    loha = read_modules(tmp_path / "loha.safetensors")[0][OUT].delta()
    lora = read_modules(other)[0]
    merged = read_modules(out)[0]
    for name, module in merged.items():
        want = 0.5 * lora[name].delta() + (0.5 * loha if name == OUT else 0)
        assert _rel(module.delta(), want) < 1e-5
    assert {m.alpha for m in merged.values()} == {float(m.rank) for m in merged.values()}


def test_merge_and_fuse_commands(known, tmp_path, capsys, tiny_folder):
    other = make_lora(tmp_path / "other.safetensors", seed=9)
    code, out, _ = run_cli(["lora", "merge", str(known), str(other), str(tmp_path / "m.safetensors"),
                            "--weights", "0.5,0.5", "--rank", "2"], capsys)
    assert code == 0 and "energy kept" in out
    assert read_modules(tmp_path / "m.safetensors")[0]["layers.0.self_attention.to_q"].rank == 2
    code, out, _ = run_cli(["lora", "fuse", str(known), "--model", str(tiny_folder), "--strength", "0.7",
                            "--out", str(tmp_path / "fused"), "--dtype", "fp32"], capsys)
    assert code == 0
    from diffusers import ErnieImageTransformer2DModel

    fused = ErnieImageTransformer2DModel.from_pretrained(tmp_path / "fused" / "transformer")
    adapted = build_tiny_pipeline(0)
    adapted.load_lora_weights(str(known), adapter_name="k")
    adapted.set_adapters(["k"], [0.7])
    x = torch.randn(1, 32, 4, 4, generator=torch.Generator().manual_seed(0))
    kwargs = dict(timestep=torch.tensor([500.0]), text_bth=torch.randn(1, 5, 32), text_lens=torch.tensor([5]),
                  return_dict=False)
    torch.testing.assert_close(fused(x, **kwargs)[0], adapted.transformer(x, **kwargs)[0], rtol=1e-4, atol=1e-5)
    with pytest.raises(UserError, match="no such layer"):
        fuse_into(fused, {"layers.9.mlp.up_proj": LoraModule(torch.zeros(1, 64), torch.zeros(128, 1), 1.0)})


def test_each_format_gives_the_same_image(known, tmp_path):
    modules = read_modules(known)[0]
    images = {}
    for target in FORMATS:
        out = tmp_path / target if target == "peft" else tmp_path / f"{target}.safetensors"
        path = write_modules(out, modules, target)
        [png] = generate(["a poster"], model="tiny", loras=[LoraSpec(path, 0.9)], out_dir=tmp_path / f"img-{target}",
                         **SMALL)
        images[target] = np.asarray(Image.open(png), dtype=int)
    for target in FORMATS:
        assert np.abs(images[target] - images["diffusers"]).max() <= 1, target  # float rounding of the folded scale
    [plain] = generate(["a poster"], model="tiny", out_dir=tmp_path / "plain", **SMALL)
    assert np.abs(np.asarray(Image.open(plain), dtype=int) - images["diffusers"]).max() > 5


def test_training_writes_provenance_that_info_shows_and_verify_checks(poster_dataset, tmp_path, capsys):
    from ernie_lora.recipes.lora import train

    cfg = tiny_config(poster_dataset, tmp_path / "cache",
                      provenance={"creator": "Studio K", "licence": "CC-BY-4.0", "consent": "own work"})
    train(cfg, tmp_path / "run", progress=False)
    path = tmp_path / "run" / "lora.safetensors"
    assert verify_lora(path)[0] == 0
    from ernie_lora.data import check_dataset
    from ernie_lora.data.dataset import dataset_provenance

    meta = read_modules(path)[2]
    assert meta["ernie_lora.dataset_hash"] == dataset_provenance(check_dataset(poster_dataset).items)["dataset_hash"]
    code, out, _ = run_cli(["lora", "info", str(path), "--model", "tiny"], capsys)
    assert code == 0
    for text in ("layout:    diffusers", "rank:      4", "alpha:     4", "trained:   rank 4, alpha 8.0",
                 "base:      tiny", "creator: Studio K", "licence: CC-BY-4.0", "consent: own work", "dataset_hash:",
                 "captions_hash:", "base_model_hash:", "fits tiny: yes"):
        assert text in out, text
    code, out, _ = run_cli(["lora", "info", str(path), "--model", "micro"], capsys)
    assert "fits micro: no:" in out and "!= the model's" in out
    # one flipped byte in a tensor: the stored hash no longer matches
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    code, out, _ = run_cli(["lora", "verify", str(path)], capsys)
    assert code == 1 and "FAILED: tensor hash mismatch" in out


def test_dataset_hash_depends_on_content_only(poster_dataset):
    """The dataset hash covers image bytes and captions: not the model, bucket or cache (it takes nothing else)."""
    from ernie_lora.data import check_dataset
    from ernie_lora.data.dataset import dataset_provenance

    before = dataset_provenance(check_dataset(poster_dataset).items)
    assert before == dataset_provenance(check_dataset(poster_dataset, min_side=8).items)
    (poster_dataset / "poster_00000.txt").write_text("another caption")
    after = dataset_provenance(check_dataset(poster_dataset).items)
    assert after["dataset_hash"] != before["dataset_hash"] and after["captions_hash"] != before["captions_hash"]
    image = poster_dataset / "poster_00001.png"
    image.write_bytes(image.read_bytes() + b"\0")  # the same pixels, other bytes: another image file
    assert dataset_provenance(check_dataset(poster_dataset).items)["dataset_hash"] != after["dataset_hash"]
