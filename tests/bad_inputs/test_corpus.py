"""The bad-input corpus: files, configs and command-line arguments a hostile or careless user gives us.

Each case builds its inputs in a fresh folder and runs ``ernie-lora ARGS`` in-process. For every case:
the exit status (2 unless given), exactly one line on stderr, starting ``error:`` and naming the culprit
(the file, line or key: ``expect``), no traceback, and every file that existed before byte-identical after
(nothing written over, nothing deleted). HTTP requests to the annotation server are in test_http.py.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from conftest import run_cli, tiny_config


@dataclass
class Case:
    name: str
    build: Callable[[Path], list[str]]  # makes the inputs under the folder; returns the CLI arguments
    expect: list[str]  # substrings of the one error line ("{tmp}" is the case's folder)
    code: int = 2
    marks: list = field(default_factory=list)


# -- inputs ---------------------------------------------------------------------------------------------


def dataset(tmp: Path, count: int = 4) -> Path:
    from ernie_lora.data.synthetic import write_synthetic_dataset

    return write_synthetic_dataset(tmp / "data", count=count, kind="poster", seed=1, size=32)


def config(tmp: Path, data: Path | None = None, *, raw: str | None = None, **overrides) -> Path:
    path = tmp / "cfg.yaml"
    if raw is not None:
        path.write_text(raw) if isinstance(raw, str) else path.write_bytes(raw)
        return path
    cfg = tiny_config(data or tmp / "data", tmp / "cache", **overrides).model_dump(mode="json")
    path.write_text(yaml.safe_dump(cfg))
    return path


def lora(tmp: Path, name: str = "style.safetensors", **kw) -> Path:
    from ernie_lora.lora.files import save_lora

    tensors = kw.pop("tensors", None)
    if tensors is None:
        tensors = {}
        for i in range(2):
            for proj in ("to_q", "to_k"):
                base = f"transformer.layers.{i}.self_attention.{proj}"
                tensors[f"{base}.lora_A.weight"] = torch.randn(4, 64) * 0.1
                tensors[f"{base}.lora_B.weight"] = torch.randn(64, 4) * 0.1
    return save_lora(tmp / name, tensors, kw.pop("adapter", None), kw.pop("meta", None))


def raw_safetensors(path: Path, header: dict, payload: bytes = b"") -> Path:
    head = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + payload)
    return path


def png(path: Path, size=(32, 32), colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def truncated_png(path: Path) -> Path:
    png(path, (64, 64))
    path.write_bytes(path.read_bytes()[:80])
    return path


def bomb_png(path: Path) -> Path:
    """A PNG whose header claims 30000 x 30000 pixels (decoding it would need 2.7 GB)."""
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    data = zlib.compress(b"\x00" * 100)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


def folder_with(tmp: Path, files: dict[str, bytes | str | Callable[[Path], object]]) -> Path:
    root = tmp / "in"
    root.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if callable(content):
            content(path)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    return root


class Pickled:
    def __reduce__(self):
        return (print, ("unpickled!",))


GOOD_IMAGES = {"a.png": png, "a.txt": "a poster, blue theme", "b.png": png, "b.txt": "a poster, red theme"}
ALIAS_BOMB = "\n".join(["a: &a [x, x, x, x, x, x, x, x, x]"]
                       + [f"{c}: &{c} [{', '.join(['*' + p] * 9)}]"
                          for p, c in zip("abcdefgh", "bcdefghi", strict=True)])


def train(tmp: Path, *extra: str, **overrides) -> list[str]:
    return ["train", str(config(tmp, dataset(tmp), **overrides)), "-o", str(tmp / "run"), *extra]


def train_raw(raw) -> Callable[[Path], list[str]]:
    return lambda tmp: ["train", str(config(tmp, raw=raw)), "-o", str(tmp / "run")]


def train_set(*sets: str) -> Callable[[Path], list[str]]:
    def build(tmp: Path) -> list[str]:
        return train(tmp, *[a for s in sets for a in ("--set", s)])
    return build


def pairs_file(tmp: Path, rows: list | bytes) -> Path:
    png(tmp / "w.png")
    png(tmp / "l.png", colour=(0, 0, 0))
    path = tmp / "pairs.jsonl"
    if isinstance(rows, bytes):
        path.write_bytes(rows)
    else:
        path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def dpo_with_pairs(rows: list | bytes, **data) -> Callable[[Path], list[str]]:
    def build(tmp: Path) -> list[str]:
        pairs = pairs_file(tmp, rows)
        cfg = {"model": {"name": "tiny", "dtype": "fp32"}, "data": {"pairs": str(pairs), "resolution": 32,
                                                                   "cache_dir": str(tmp / "cache"), **data},
               "train": {"steps": 2, "batch_size": 1, "mixed_precision": "no", "gradient_checkpointing": False}}
        (tmp / "dpo.yaml").write_text(yaml.safe_dump(cfg))
        return ["dpo", str(tmp / "dpo.yaml"), "-o", str(tmp / "run")]
    return build


def cmd_on(files: dict, *args: str) -> Callable[[Path], list[str]]:
    """``ernie-lora ARGS`` with ``{in}`` standing for a folder holding ``files``."""
    def build(tmp: Path) -> list[str]:
        root = folder_with(tmp, files)
        return [a.replace("{in}", str(root)).replace("{tmp}", str(tmp)) for a in args]
    return build


def lora_cmd(make: Callable[[Path], Path], *args: str) -> Callable[[Path], list[str]]:
    def build(tmp: Path) -> list[str]:
        path = make(tmp)
        return [a.replace("{lora}", str(path)).replace("{tmp}", str(tmp)) for a in args]
    return build


def nan_lora(tmp: Path) -> Path:
    path = lora(tmp, "nan.safetensors")
    from ernie_lora.lora.files import read_lora, save_lora

    tensors, _ = read_lora(path)
    next(v for k, v in tensors.items() if "lora_B" in k)[0, 0] = float("nan")
    return save_lora(path, tensors)


def inf_lora(tmp: Path) -> Path:
    from ernie_lora.lora.files import read_lora, save_lora

    tensors, _ = read_lora(lora(tmp, "inf.safetensors"))
    next(v for k, v in tensors.items() if "lora_A" in k)[1, 1] = float("inf")
    return save_lora(tmp / "inf.safetensors", tensors)


def rank_mismatch_lora(tmp: Path) -> Path:
    from ernie_lora.lora.files import read_lora, save_lora

    tensors, _ = read_lora(lora(tmp, "rank.safetensors"))
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key] = torch.zeros(64, 3)
    return save_lora(tmp / "rank.safetensors", tensors)


def vector_alpha_lora(tmp: Path) -> Path:
    """A kohya file whose .alpha holds two numbers (an alpha is one)."""
    stem = "lora_unet_layers_0_self_attention_to_q"
    return lora(tmp, "alpha.safetensors", tensors={f"{stem}.lora_down.weight": torch.randn(4, 64),
                                                   f"{stem}.lora_up.weight": torch.randn(64, 4),
                                                   f"{stem}.alpha": torch.tensor([4.0, 8.0])})


def _foreign_tensors() -> dict[str, torch.Tensor]:
    """A LoRA for a deeper model: layer 40 is in no ERNIE-Image (the 8B has 36 layers, tiny 2)."""
    return {"transformer.layers.0.self_attention.to_q.lora_A.weight": torch.randn(4, 64),
            "transformer.layers.0.self_attention.to_q.lora_B.weight": torch.randn(64, 4),
            "transformer.layers.40.self_attention.to_q.lora_A.weight": torch.randn(4, 64),
            "transformer.layers.40.self_attention.to_q.lora_B.weight": torch.randn(64, 4)}


def foreign_modules_lora(tmp: Path) -> Path:
    return lora(tmp, "foreign.safetensors", tensors=_foreign_tensors())


def header_lora(adapter_metadata: str) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        from safetensors.torch import save_file

        path = tmp / "hdr.safetensors"
        save_file({"transformer.layers.0.self_attention.to_q.lora_A.weight": torch.zeros(4, 64),
                   "transformer.layers.0.self_attention.to_q.lora_B.weight": torch.zeros(64, 4)}, str(path),
                  metadata={"lora_adapter_metadata": adapter_metadata})
        return path
    return make


def bytes_file(name: str, content: bytes) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        (tmp / name).write_bytes(content)
        return tmp / name
    return make


def scorer_pickle(tmp: Path) -> Path:
    (tmp / "scorer.pt").write_bytes(pickle.dumps({"w": Pickled()}))
    return tmp / "scorer.pt"


GEN = ["generate", "a poster", "-m", "tiny", "--width", "32", "--height", "32", "--steps", "2", "-o", "{tmp}/out"]


def gen_with_lora(make: Callable[[Path], Path]) -> Callable[[Path], list[str]]:
    return lora_cmd(make, *GEN, "--lora", "{lora}")


CASES: list[Case] = [
    # -- configs ------------------------------------------------------------------------------------------
    Case("config missing", lambda t: ["train", str(t / "nope.yaml")], ["nope.yaml: no such file"]),
    Case("config not UTF-8", train_raw(b"model:\n  name: \xff\xfe\n"), ["cfg.yaml: not UTF-8"]),
    Case("config invalid YAML", train_raw("model:\n  name: [tiny\n"), ["cfg.yaml:", "invalid YAML"]),
    Case("config tab indentation", train_raw("model:\n\tname: tiny\n"), ["cfg.yaml:", "invalid YAML"]),
    Case("config a list", train_raw("- model\n- data\n"), ["cfg.yaml: the top level must be a mapping"]),
    Case("config a scalar", train_raw("42\n"), ["cfg.yaml: the top level must be a mapping"]),
    Case("config unknown section", train_raw("modle: {name: tiny}\n"), ["modle: unknown key"]),
    Case("config unknown key", train_raw("train: {learning_rate: 1.0e-4}\n"), ["train.learning_rate: unknown key"]),
    Case("config wrong type", train_raw("train: {lr: fast}\n"), ["train.lr:", "'fast'"]),
    Case("config section not a mapping", train_raw("train: 5\n"), ["train:"]),
    Case("config alias bomb", train_raw(ALIAS_BOMB), ["cfg.yaml: YAML aliases expand to more than"]),
    Case("config alias bomb in a value", train_raw("\n".join(ALIAS_BOMB.splitlines()[:4]) + "\ntrain: {lr: *d}\n"),
         ["train.lr:", "..."]),
    Case("config nested too deeply", train_raw("a: " + "[" * 20000 + "]" * 20000 + "\n"),
         ["cfg.yaml: nested too deeply"]),
    Case("--set value with YAML aliases", train_set("train.lr=" + "[" + ", ".join(["&a [x, x, x, x, x, x, x, x, x, x]"]
                                                                    + ["*a"] * 9) + "]"), ["train.lr"]),
    Case("config huge string", train_raw("train: {lr: " + "9" * 5 + "x" * 1_000_000 + "}\n"), ["train.lr:", "..."]),
    Case("config negative lr", train_set("train.lr=-1"), ["train.lr: Input should be greater than 0"]),
    Case("config rank 0", train_set("lora.rank=0"), ["lora.rank: Input should be greater than 0"]),
    Case("config steps 0", train_set("train.steps=0"), ["train.steps:"]),
    Case("config batch size string", train_set("train.batch_size=two"), ["train.batch_size:"]),
    Case("config unknown target preset", train_set("lora.targets=everything"), ["lora.targets"]),
    Case("config mixed precision", train_set("train.mixed_precision=fp8"), ["train.mixed_precision"]),
    Case("config bad lr scheduler", train_set("train.lr_scheduler=sawtooth"), ["train.lr_scheduler"]),
    Case("config validation share too big", train_set("data.validation=0.9"), ["data.validation"]),
    Case("config best without validation", train_set("checkpoint.best=val_loss"),
         ["checkpoint.best: val_loss is chosen on validation; set data.validation"]),
    Case("config empty stages", train_set("train.stages=[]"), ["train.stages"]),
    Case("config stage without steps", train_set("train.stages=[{resolution: 32}]"), ["train.stages.0.steps"]),
    Case("config validation sigma 1", train_set("validation.sigmas=[1.0]"), ["validation.sigmas"]),
    Case("config sample steps 0", train_set("sample.steps=0"), ["sample.steps"]),
    Case("config guidance below 1", train_set("sample.guidance=0.5"), ["sample.guidance"]),
    Case("config unknown tracker", train_set("logging.trackers=[mlflow]"), ["logging.trackers"]),
    Case("--set without =", train_set("train.lr"), ["--set 'train.lr': expected key.sub=value"]),
    Case("trigger word with a comma", train_set("data.trigger_word=ohwx, poster"), ["data.trigger_word"]),
    Case("sample prompt says [trigger] without a trigger word", train_set("sample.prompts=['a [trigger] poster']"),
         ["sample.prompts", "[trigger]", "data.trigger_word is not set"]),
    Case("caption says [trigger] without a trigger word",
         lambda t: (train(t), (t / "data" / "poster_00000.txt").write_text("a [trigger] poster\n"))[0],
         ["poster_00000.png", "[trigger]", "data.trigger_word is not set"]),
    Case("--set into a value", train_set("train.lr.x=1"), ["--set train.lr.x: lr is not a section"]),
    Case("--set unknown key", train_set("train.lrr=1"), ["train.lrr: unknown key"]),
    Case("--set bad YAML", train_set("train.lr=[1"), ["--set"]),
    Case("dpo config unknown key", lambda t: ["dpo", str(config(t, raw="dpo: {betta: 5}\n"))],
         ["dpo.betta: unknown key"]),
    Case("distill config unknown key", lambda t: ["distill", str(config(t, raw="distill: {steps: 5}\n"))],
         ["distill.steps: unknown key"]),
    Case("distill empty teachers", lambda t: ["distill", str(config(t, raw="teachers: []\n"))], ["teachers"]),
    Case("plan config unknown key", lambda t: ["plan", str(config(t, raw="plan: {}\n"))], ["plan: unknown key"]),
    Case("pretrain-micro config unknown key", lambda t: ["pretrain-micro", str(config(t, raw="vae: 1\n")), "-o",
                                                         str(t / "m")], ["vae: unknown key"]),
    # -- runs: output folders, resume -------------------------------------------------------------------
    Case("output is a file", lambda t: [*train(t)[:2], "-o", str(png(t / "out.png"))],
         ["out.png: exists and is not a folder"]),
    Case("resume without a run", lambda t: train(t, "--resume"), ["no checkpoint to resume from"]),
    Case("resume and overwrite", lambda t: train(t, "--resume", "--overwrite"), ["--resume and --overwrite exclude"]),
    Case("overwrite a folder we did not write",
         lambda t: [*train(t)[:2], "-o", str(folder_with(t, {"samples/mine.png": png, "report.md": "mine"})),
                    "--overwrite"], ["no .ernie-lora-output.json, so ernie-lora did not write it"]),
    Case("dataset missing", lambda t: ["train", str(config(t, t / "nowhere")), "-o", str(t / "run")],
         ["nowhere: not a folder"]),
    Case("dataset empty", lambda t: ["train", str(config(t, folder_with(t, {}))), "-o", str(t / "run")],
         ["no images found"]),
    Case("dataset caption not UTF-8",
         lambda t: ["train", str(config(t, folder_with(t, {**GOOD_IMAGES, "a.txt": b"\xff\xfe"}))), "-o", str(t / "r")],
         ["a.txt: caption is not UTF-8"]),
    Case("dataset zero-byte image",
         lambda t: ["train", str(config(t, folder_with(t, {**GOOD_IMAGES, "a.png": b""}))), "-o", str(t / "r")],
         ["a.png: zero-byte file"]),
    Case("dataset truncated image",
         lambda t: ["train", str(config(t, folder_with(t, {**GOOD_IMAGES, "a.png": truncated_png}))), "-o",
                    str(t / "r")], ["a.png"]),
    Case("dataset metadata not UTF-8",
         lambda t: ["train", str(config(t, folder_with(t, {"a.png": png, "b.png": png,
                                                            "metadata.jsonl": b"\xff\n"}))), "-o", str(t / "r")],
         ["metadata.jsonl: not UTF-8"]),
    Case("dataset metadata invalid JSON",
         lambda t: ["train", str(config(t, folder_with(t, {"a.png": png,
                                                            "metadata.jsonl": '{"file_name": "a.png"\n'}))),
                    "-o", str(t / "r")], ["metadata.jsonl:1: invalid JSON"]),
    Case("dataset metadata file_name a number",
         lambda t: ["train", str(config(t, folder_with(t, {"a.png": png, "metadata.jsonl":
                                                            '{"file_name": 123, "text": "x"}\n'}))),
                    "-o", str(t / "r")], ["metadata.jsonl:1: 'file_name' must be a file name, got int"]),
    Case("dataset metadata text a number",
         lambda t: ["train", str(config(t, folder_with(t, {"a.png": png, "metadata.jsonl":
                                                            '{"file_name": "a.png", "text": 5}\n'}))),
                    "-o", str(t / "r")], ["metadata.jsonl:1: 'text' must be a string, got int"]),
    Case("dataset image decompression bomb",
         lambda t: ["train", str(config(t, folder_with(t, {**GOOD_IMAGES, "a.png": bomb_png}))), "-o", str(t / "r")],
         ["a.png"]),
    Case("init_from missing", train_set("lora.init_from=/nowhere/x.safetensors"), ["x.safetensors"]),
    Case("init_from pickle", lambda t: train(t, "--set", f"lora.init_from={scorer_pickle(t)}"),
         ["scorer.pt", "only .safetensors"]),
    Case("assistant LoRA missing", train_set("model.assistant_lora=/nowhere/t.safetensors"), ["t.safetensors"]),
    Case("aesthetic sampling file missing", train_set("data.sampling.by=category",
                                                      "data.sampling.aesthetic=/nowhere/aes.jsonl"), ["aes.jsonl"]),
    Case("aesthetic file with uniform sampling", train_set("data.sampling.aesthetic=aes.jsonl"),
         ["data.sampling: aesthetic acts only with by: category"]),
    # -- DPO pairs ----------------------------------------------------------------------------------------
    Case("pairs invalid JSON", dpo_with_pairs(['{"prompt": "x"']), ["pairs.jsonl:1: invalid JSON"]),
    Case("pairs not UTF-8", dpo_with_pairs(b"\xff\xfe\n"), ["pairs.jsonl: not UTF-8"]),
    Case("pairs row a list", dpo_with_pairs(["[1, 2]"]), ["pairs.jsonl:1: expected an object"]),
    Case("pairs missing keys", dpo_with_pairs([{"prompt": "x"}]), ["pairs.jsonl:1: needs prompt/chosen/rejected"]),
    Case("pairs chosen a number", dpo_with_pairs([{"prompt": "x", "chosen": 123, "rejected": "l.png"}]),
         ["pairs.jsonl:1: chosen must be an image path, got 123"]),
    Case("pairs chosen missing", dpo_with_pairs([{"prompt": "x", "chosen": "nope.png", "rejected": "l.png"}]),
         ["pairs.jsonl:1: chosen image", "nope.png does not exist"]),
    Case("pairs bad label_0", dpo_with_pairs([{"caption": "x", "jpg_0": "w.png", "jpg_1": "l.png", "label_0": "yes"}]),
         ["pairs.jsonl:1: label_0 must be 1"]),
    Case("pairs label_0 out of range",
         dpo_with_pairs([{"caption": "x", "jpg_0": "w.png", "jpg_1": "l.png", "label_0": 7}]),
         ["pairs.jsonl:1: label_0 must be 1"]),
    Case("pairs empty prompt", dpo_with_pairs([{"prompt": " ", "chosen": "w.png", "rejected": "l.png"}]),
         ["pairs.jsonl:1: empty prompt"]),
    Case("pairs none", dpo_with_pairs(["", ""]), ["pairs.jsonl: no preference pairs"]),
    Case("pairs truncated image",
         lambda t: (dpo_with_pairs([{"prompt": "x", "chosen": "w.png", "rejected": "l.png"}])(t),
                    truncated_png(t / "w.png"))[0], ["w.png: not a readable image"]),
    Case("pairs prompt says [trigger] without a LoRA that has one",
         dpo_with_pairs([{"prompt": "a [trigger] poster", "chosen": "w.png", "rejected": "l.png"}]),
         ["pairs.jsonl", "[trigger]", "lora.init_from"]),
    Case("dpo bucket grid the model cannot take",
         dpo_with_pairs([{"prompt": "x", "chosen": "w.png", "rejected": "l.png"}], resolution=48, bucket_multiple=6),
         ["data.bucket_multiple: 6", "multiple of 4"]),
    # -- LoRA files -----------------------------------------------------------------------------------
    Case("lora info missing", lambda t: ["lora", "info", str(t / "no.safetensors")], ["no.safetensors: no such file"]),
    Case("lora info pickle", lora_cmd(scorer_pickle, "lora", "info", "{lora}"), ["scorer.pt", "only .safetensors"]),
    Case("lora info empty file", lora_cmd(bytes_file("e.safetensors", b""), "lora", "info", "{lora}"),
         ["e.safetensors: not a valid safetensors file"]),
    Case("lora info random bytes", lora_cmd(bytes_file("r.safetensors", b"\x07" * 300), "lora", "info", "{lora}"),
         ["r.safetensors: not a valid safetensors file"]),
    Case("lora info header past the end",
         lora_cmd(lambda t: raw_safetensors(t / "h.safetensors", {"a": {"dtype": "F32", "shape": [4],
                                                                         "data_offsets": [0, 16]}}),
                  "lora", "info", "{lora}"), ["h.safetensors"]),
    Case("lora info truncated", lora_cmd(lambda t: bytes_file("t.safetensors", lora(t).read_bytes()[:-100])(t),
                                         "lora", "info", "{lora}"), ["t.safetensors"]),
    Case("lora info metadata not JSON", lora_cmd(header_lora("{not json"), "lora", "info", "{lora}"),
         ["hdr.safetensors: header field lora_adapter_metadata is not JSON"]),
    Case("lora info metadata a list", lora_cmd(header_lora("[1, 2]"), "lora", "info", "{lora}"),
         ["hdr.safetensors: header field lora_adapter_metadata is not a JSON object"]),
    Case("lora info no LoRA keys",
         lora_cmd(lambda t: lora(t, "w.safetensors", tensors={"model.weight": torch.zeros(2)}), "lora", "info",
                  "{lora}"),
         ["w.safetensors"]),
    Case("lora info NaN", lora_cmd(nan_lora, "lora", "info", "{lora}"), ["nan.safetensors", "NaN or infinite"]),
    Case("lora info B rank != A rank", lora_cmd(rank_mismatch_lora, "lora", "info", "{lora}"), ["rank.safetensors"]),
    Case("lora info alpha of two values", lora_cmd(vector_alpha_lora, "lora", "info", "{lora}"),
         ["alpha.safetensors", "holds 2 values; an alpha is one number"]),
    Case("lora convert alpha of two values",
         lora_cmd(vector_alpha_lora, "lora", "convert", "{lora}", "{tmp}/c.safetensors"),
         ["alpha.safetensors", "holds 2 values; an alpha is one number"]),
    Case("generate with a NaN LoRA", gen_with_lora(nan_lora), ["nan.safetensors", "NaN or infinite"]),
    Case("generate with an Inf LoRA", gen_with_lora(inf_lora), ["inf.safetensors", "NaN or infinite"]),
    Case("generate with a rank-mismatched LoRA", gen_with_lora(rank_mismatch_lora), ["rank.safetensors"]),
    Case("generate with a pickle", gen_with_lora(scorer_pickle), ["scorer.pt", "only .safetensors"]),
    Case("generate with a LoRA for another model", gen_with_lora(foreign_modules_lora),
         ["foreign.safetensors does not match the model", "layers.40"]),
    Case("generate LoRA strength not a number", lora_cmd(lora, *GEN, "--lora", "{lora}:strong"), ["strong"]),
    Case("generate steps 0", lambda t: ["generate", "x", "-m", "tiny", "--steps", "0", "-o", str(t / "o")],
         ["--steps"]),
    Case("generate odd width", lambda t: ["generate", "x", "-m", "tiny", "--width", "33", "-o", str(t / "o")],
         ["33"]),
    Case("generate prompts file not UTF-8",
         lambda t: ["generate", "--prompts-file", str(bytes_file("p.txt", b"\xff\xfe")(t)), "-m", "tiny",
                    "-o", str(t / "o")], ["p.txt: not UTF-8"]),
    Case("generate no prompt", lambda t: ["generate", "-m", "tiny", "-o", str(t / "o")], ["prompt"]),
    Case("generate [trigger] without a LoRA that has one",
         lambda t: ["generate", "a [trigger] poster", "-m", "tiny", "-o", str(t / "o")],
         ["[trigger]", "no LoRA given records a trigger word"]),
    Case("generate unknown model", lambda t: ["generate", "x", "-m", str(t / "no-model"), "-o", str(t / "o")],
         ["no-model"]),
    Case("generate hub id not cached, hub offline", lambda t: ["generate", "x", "-m", "someone/not-cached", "-o",
                                                               str(t / "o")],
         ["someone/not-cached", "not in the Hugging Face cache and HF_HUB_OFFLINE is set", "hf download"]),
    Case("lora merge modules not in the model", lora_cmd(foreign_modules_lora, "lora", "merge", "{lora}", "{lora}",
                                                        "{tmp}/m.safetensors", "-m", "tiny"),
         ["foreign.safetensors does not match the model", "layers.40"]),
    Case("lora merge modules not in the recorded base",
         lora_cmd(lambda t: lora(t, "f.safetensors", tensors=_foreign_tensors(), meta={"base_model": "tiny"}),
                  "lora", "merge", "{lora}", "{lora}", "{tmp}/m.safetensors"), ["f.safetensors does not match"]),
    Case("lora merge weights not numbers", lora_cmd(lora, "lora", "merge", "{lora}", "{lora}", "{tmp}/m.safetensors",
                                                    "--weights", "a,b"), ["--weights"]),
    Case("lora merge weights count", lora_cmd(lora, "lora", "merge", "{lora}", "{lora}", "{tmp}/m.safetensors",
                                              "--weights", "1"), ["--weights"]),
    Case("lora merge one input", lora_cmd(lora, "lora", "merge", "{lora}", "{tmp}/m.safetensors"), ["at least two"]),
    Case("lora merge onto an existing file", lora_cmd(lora, "lora", "merge", "{lora}", "{lora}", "{lora}"),
         ["style.safetensors: exists; pass --overwrite"]),
    Case("lora convert unknown format",
         lora_cmd(lora, "lora", "convert", "{lora}", "{tmp}/c.safetensors", "-f", "onnx"), ["onnx"]),
    Case("lora convert onto itself", lora_cmd(lora, "lora", "convert", "{lora}", "{lora}"), ["style.safetensors"]),
    Case("lora convert NaN", lora_cmd(nan_lora, "lora", "convert", "{lora}", "{tmp}/c.safetensors"),
         ["nan.safetensors", "NaN or infinite"]),
    Case("lora fuse NaN", lora_cmd(nan_lora, "lora", "fuse", "{lora}", "-m", "tiny", "-o", "{tmp}/fused"),
         ["nan.safetensors", "NaN or infinite"]),
    Case("lora fuse onto an existing model",
         lora_cmd(lambda t: (folder_with(t, {"fused/transformer/config.json": "{}"}), lora(t))[1], "lora", "fuse",
                  "{lora}", "-m", "tiny", "-o", "{tmp}/in/fused"), ["fused/transformer: exists; pass --overwrite"]),
    Case("lora verify hash mismatch", lora_cmd(lambda t: _tampered(lora(t)), "lora", "verify", "{lora}"),
         ["style.safetensors"], code=1),
    # -- evaluation, captions, datasets ---------------------------------------------------------------
    Case("eval layout missing folder", lambda t: ["eval", "layout", str(t / "nope")], ["nope"]),
    Case("eval layout corrupt PNG", cmd_on({"a.png": truncated_png, "a.txt": "a poster, blue theme"},
                                           "eval", "layout", "{in}"), ["a.png"]),
    Case("eval layout decompression bomb", cmd_on({"a.png": bomb_png, "a.txt": "a poster, blue theme"},
                                                  "eval", "layout", "{in}"), ["a.png"]),
    Case("eval layout caption not UTF-8", cmd_on({"a.png": png, "a.txt": b"\xff\xfe"}, "eval", "layout", "{in}"),
         ["a.txt: not UTF-8"]),
    Case("eval layout metadata invalid", cmd_on({"a.png": png, "metadata.jsonl": "{oops\n"}, "eval", "layout", "{in}"),
         ["metadata.jsonl:1"]),
    Case("eval text corrupt PNG", cmd_on({"a.png": truncated_png, "a.txt": 'a poster with title "SALE"'},
                                         "eval", "text", "{in}"), ["a.png"]),
    Case("dataset stats metadata not UTF-8", cmd_on({"a.png": png, "metadata.jsonl": b"\xff\n"}, "dataset", "stats",
                                                    "{in}"), ["metadata.jsonl: not UTF-8"]),
    Case("dataset stats aesthetic file invalid",
         lambda t: ["dataset", "stats", str(folder_with(t, GOOD_IMAGES)), "--aesthetic",
                    str(bytes_file("aes.jsonl", b'{"file_name": "a.png"}\n')(t))], ["aes.jsonl:1"]),
    Case("dataset stats caption not UTF-8", cmd_on({**GOOD_IMAGES, "a.txt": b"\xff"}, "dataset", "stats", "{in}"),
         ["a.txt: not UTF-8"]),
    Case("dataset synth unknown kind", lambda t: ["dataset", "synth", "magazine", "--out", str(t / "s")], ["magazine"]),
    Case("dataset synth into a dataset", cmd_on(GOOD_IMAGES, "dataset", "synth", "poster", "-n", "2", "--out", "{in}"),
         ["already holds images"]),
    Case("dataset check missing", lambda t: ["dataset", "check", str(t / "nope")], ["nope"]),
    Case("dataset check resolution off the grid",
         cmd_on(GOOD_IMAGES, "dataset", "check", "{in}", "--resolution", "100"),
         ["--resolution 100", "multiple of 16"]),
    Case("dataset check config with a bucket grid the model cannot take",
         lambda t: ["dataset", "check", str(folder_with(t, GOOD_IMAGES)), "--config",
                    str(config(t, raw="model: {name: tiny}\ndata:\n  resolution: 48\n  bucket_multiple: 6\n"))],
         ["data.bucket_multiple: 6", "multiple of 4"]),
    Case("dataset check config with an unknown key",
         lambda t: ["dataset", "check", str(folder_with(t, GOOD_IMAGES)), "--config",
                    str(config(t, raw="data:\n  resoluton: 64\n"))], ["cfg.yaml", "data.resoluton"]),
    Case("dataset stats sheet inside the dataset", cmd_on(GOOD_IMAGES, "dataset", "stats", "{in}", "--sheet",
                                                          "{in}/sheet.png"), ["--sheet", "inside the dataset folder"]),
    Case("caption lint missing folder", lambda t: ["caption", "lint", str(t / "nope")], ["nope"]),
    Case("caption lint --images corrupt PNG", cmd_on({"a.png": truncated_png, "a.txt": 'a poster, title "SALE"'},
                                                     "caption", "lint", "{in}", "--images", "--no-ocr"), ["a.png"]),
    Case("caption auto unknown kind", cmd_on(GOOD_IMAGES, "caption", "auto", "{in}", "--kind", "magazine"),
         ["--kind 'magazine'", "auto"]),
    Case("caption auto corrupt PNG", cmd_on({"a.png": truncated_png}, "caption", "auto", "{in}"), ["a.png"]),
    Case("caption auto captioning model not there", cmd_on(GOOD_IMAGES, "caption", "auto", "{in}", "--model",
                                                            "{tmp}/no-model"), ["--model", "no-model"]),
    Case("aes train hf: encoder not cached, hub offline",
         cmd_on({**GOOD_IMAGES, "aes.jsonl": '{"file_name": "a.png", "score": 5, "level": 5}\n'
                                              '{"file_name": "b.png", "score": 3, "level": 3}\n'},
                "aes", "train", "{in}", "--labels", "{in}/aes.jsonl", "--encoder", "hf:someone/not-cached", "-o",
                "{tmp}/scorer.safetensors"),
         ["encoder hf:someone/not-cached", "not in the Hugging Face cache"]),
    Case("caption auto captioning model not cached, hub offline", cmd_on(GOOD_IMAGES, "caption", "auto", "{in}",
                                                                         "--model", "someone/not-cached"),
         ["--model someone/not-cached", "not in the Hugging Face cache"]),
    # -- annotation and the aesthetic scorer ------------------------------------------------------------
    Case("rank serve port out of range", cmd_on(GOOD_IMAGES, "rank", "serve", "{in}", "--port", "80000"), ["--port"]),
    Case("rank serve port not a number", cmd_on(GOOD_IMAGES, "rank", "serve", "{in}", "--port", "http"), ["--port"]),
    Case("rank serve public without token", cmd_on(GOOD_IMAGES, "rank", "serve", "{in}", "--host", "0.0.0.0"),
         ["--host 0.0.0.0", "--token"]),
    Case("rank serve db not SQLite", cmd_on({**GOOD_IMAGES, "votes.db": b"not a database" * 100}, "rank", "serve",
                                            "{in}", "--db", "{in}/votes.db"), ["votes.db"]),
    Case("rank serve caption not UTF-8", cmd_on({**GOOD_IMAGES, "a.txt": b"\xff"}, "rank", "serve", "{in}"),
         ["a.txt: not UTF-8"]),
    Case("rank serve one image", cmd_on({"a.png": png}, "rank", "serve", "{in}"), ["annotation needs at least two"]),
    Case("rank scores db not SQLite", cmd_on({"votes.db": b"SQLite format 2\x00" + b"x" * 200}, "rank", "scores",
                                             "{in}/votes.db"), ["votes.db"]),
    Case("rank scores db missing", lambda t: ["rank", "scores", str(t / "none.sqlite")], ["none.sqlite"]),
    Case("aes score model a pickle", lambda t: ["aes", "score", str(folder_with(t, GOOD_IMAGES)), "-m",
                                                str(scorer_pickle(t))], ["scorer.pt"]),
    Case("aes score model not a scorer", lambda t: ["aes", "score", str(folder_with(t, GOOD_IMAGES)), "-m",
                                                    str(lora(t))], ["style.safetensors"]),
    Case("aes train labels invalid", lambda t: ["aes", "train", str(folder_with(t, GOOD_IMAGES)), "--labels",
                                                str(bytes_file("l.jsonl", b"{bad\n")(t)), "-o", str(t / "a.st")],
         ["l.jsonl:1"]),
    # -- arguments --------------------------------------------------------------------------------------
    Case("unknown command", lambda t: ["trian", "x"], ["No such command 'trian'"]),
    Case("unknown option", lambda t: ["train", "x.yaml", "--resum"], ["--resum"]),
    Case("missing argument", lambda t: ["lora", "info"], ["Missing argument"]),
    Case("bad --progress", lambda t: train(t, "--progress", "fancy"), ["--progress", "fancy"]),
]


def _tampered(path: Path) -> Path:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # a tensor byte: the header's stored hash no longer matches
    path.write_bytes(bytes(data))
    return path


def _digest(folder: Path) -> dict:
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_corpus_is_large_and_names_are_unique():
    assert len(CASES) >= 100 and len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, tmp_path: Path, capsys):
    args = case.build(tmp_path)
    before = _digest(tmp_path)
    capsys.readouterr()
    code, out, err = run_cli(args, capsys)
    lines = [ln for ln in err.splitlines() if ln.strip() and "%|" not in ln]
    assert "Traceback" not in err, err[-3000:]
    assert code == case.code, (code, err[-2000:], out[-2000:])
    if case.code == 2:
        assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
        line = lines[0]
        assert len(line) <= 2000, len(line)
        for expected in case.expect:
            assert expected.replace("{tmp}", str(tmp_path)) in line, line[:2000]
    after = _digest(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before, "a file that existed was changed or deleted"
