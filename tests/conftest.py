from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing downloads at test time
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="session")
def _quiet():
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    dlog.disable_progress_bar()


@pytest.fixture
def poster_dataset(tmp_path: Path) -> Path:
    from ernie_lora.data.synthetic import write_synthetic_dataset

    return write_synthetic_dataset(tmp_path / "data", count=6, kind="poster", seed=1, size=32)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    """The tiny pipeline saved as a local diffusers folder (exercises the real from_pretrained path)."""
    from ernie_lora.models import build_tiny_pipeline

    folder = tmp_path_factory.mktemp("tiny-model")
    build_tiny_pipeline(0).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_smolvlm(tmp_path_factory) -> Path:
    """A tiny random SmolVLM (Idefics3ForConditionalGeneration) with a byte tokenizer and a chat template, saved."""
    import torch
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessor, Idefics3Processor

    from ernie_lora.models.tiny import build_byte_tokenizer

    tokenizer = build_byte_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", "<fake_token_around_image>",
                                                                "<global-img>", "<end_of_utterance>"]})
    template = ("{% for m in messages %}{{ m['role'] | capitalize }}:{% for c in m['content'] %}"
                "{% if c['type'] == 'image' %}<image>{% else %} {{ c['text'] }}{% endif %}{% endfor %}"
                "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}")
    text = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=2048, bos_token_id=1,
                eos_token_id=2, pad_token_id=0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=56,
                  patch_size=14)
    config = Idefics3Config(text_config=text, vision_config=vision, scale_factor=2,
                            image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-smolvlm")
    Idefics3ForConditionalGeneration(config).save_pretrained(folder)
    images = Idefics3ImageProcessor(size={"longest_edge": 112}, max_image_size={"longest_edge": 56})
    Idefics3Processor(image_processor=images, tokenizer=tokenizer, image_seq_len=4,
                      chat_template=template).save_pretrained(folder)
    return folder


def tiny_config(dataset: Path, cache: Path, **overrides):
    """A tiny training config (fp32, seconds on a CPU) with section-level overrides."""
    from ernie_lora.config import TrainRunConfig

    data = {
        "model": {"name": "tiny", "dtype": "fp32"},
        "data": {"path": str(dataset), "resolution": 32, "cache_dir": str(cache), "caption_dropout": 0.1},
        "lora": {"rank": 4, "alpha": 8, "targets": "attn_mlp"},
        "train": {"steps": 6, "batch_size": 2, "lr": 1e-3, "mixed_precision": "no",
                  "gradient_checkpointing": False, "seed": 3},
        "checkpoint": {"every": 2, "keep": 2},
        "sample": {"every": 0, "prompts": []},
    }
    for section, values in overrides.items():
        data[section] = {**data.get(section, {}), **values}
    return TrainRunConfig.model_validate(data)


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """Run ``ernie-lora ARGS`` in-process; returns (exit code, stdout, stderr)."""
    from ernie_lora import cli

    old = sys.argv
    sys.argv = ["ernie-lora", *args]
    code = 0
    try:
        cli.main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = old
    out = capsys.readouterr()
    return code, out.out, out.err
