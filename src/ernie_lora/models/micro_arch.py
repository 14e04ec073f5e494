"""Micro ERNIE: ERNIE-Image's exact classes at a few million parameters, pretrained on the synthetic
layout world by ``recipes/pretrain_micro.py``. Its weights ship in ``models/micro/`` and the model
name ``micro`` loads them wherever a model is accepted.

The text encoder is a randomly initialised ``Mistral3Model`` that stays frozen: its token embeddings
are a fixed code the DiT learns to read, the way ERNIE-Image's DiT reads a frozen Ministral-3. The
tokenizer is word-level over the layout language's vocabulary (held-out words included, so a LoRA
can teach them); other words map to ``<unk>``.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from ..data.synthetic import vocabulary
from .tiny import SPECIAL_TOKENS, TINY_VISION_CONFIG, build_pipeline_from_configs

MICRO_DIR = Path(__file__).parent / "micro"

MICRO_VAE_CONFIG = dict(
    block_out_channels=(16, 32, 32),  # 4x spatial downsampling; with the 2x2 patchify, 8 px per token
    layers_per_block=1,
    latent_channels=8,
    norm_num_groups=8,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    mid_block_add_attention=False,
    sample_size=64,
)
MICRO_TEXT_CONFIG = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, max_position_embeddings=256,
)  # vocab_size is set from the tokenizer
MICRO_VISION_CONFIG = TINY_VISION_CONFIG
MICRO_TRANSFORMER_CONFIG = dict(
    hidden_size=128,
    num_attention_heads=4,
    num_layers=4,
    ffn_hidden_size=384,
    in_channels=4 * MICRO_VAE_CONFIG["latent_channels"],
    out_channels=4 * MICRO_VAE_CONFIG["latent_channels"],
    text_in_dim=MICRO_TEXT_CONFIG["hidden_size"],
    rope_axes_dim=(8, 12, 12),  # head_dim 32
)
MICRO_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=1.0)  # 64 tokens: low resolution needs no shift


def build_word_tokenizer(words: list[str], model_max_length: int = 128) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over ``words`` (lowercased; quotes and commas are tokens; BOS prepended)."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in words:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        model_max_length=model_max_length,
    )


def build_untrained_micro(seed: int = 0):
    """The micro pipeline with random weights (what pretraining starts from)."""

    tokenizer = build_word_tokenizer(vocabulary())
    text_config = dict(MICRO_TEXT_CONFIG, vocab_size=len(tokenizer))
    return build_pipeline_from_configs(
        text_config, MICRO_VISION_CONFIG, MICRO_VAE_CONFIG, MICRO_TRANSFORMER_CONFIG, MICRO_SCHEDULER_CONFIG, seed,
        tokenizer=tokenizer,
    )
