"""A randomly initialised ERNIE-Image pipeline built from diffusers' and transformers' own classes.

Same architecture as the 8B model (ErnieImageTransformer2DModel, AutoencoderKLFlux2, a Mistral3Model
text encoder, FlowMatchEulerDiscreteScheduler), a few tens of thousands of parameters, built in
milliseconds and deterministic by seed. Used by the tests and anywhere ``--model tiny`` is given.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKLFlux2,
    ErnieImagePipeline,
    ErnieImageTransformer2DModel,
    FlowMatchEulerDiscreteScheduler,
)
from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE
from transformers import Mistral3Config, Mistral3Model, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]

TINY_TEXT_CONFIG = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    vocab_size=len(SPECIAL_TOKENS) + 256,
    max_position_embeddings=1024,
)
# Mistral3Model always carries a vision tower; ERNIE-Image never calls it, so it is as small as allowed.
TINY_VISION_CONFIG = dict(
    hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
    patch_size=16, head_dim=8,
)
TINY_VAE_CONFIG = dict(
    block_out_channels=(16, 32),
    layers_per_block=1,
    latent_channels=8,
    norm_num_groups=8,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    mid_block_add_attention=False,
    sample_size=64,
)
TINY_TRANSFORMER_CONFIG = dict(
    hidden_size=64,
    num_attention_heads=2,
    num_layers=2,
    ffn_hidden_size=128,
    in_channels=4 * TINY_VAE_CONFIG["latent_channels"],  # after the pipeline's 2x2 patchify
    out_channels=4 * TINY_VAE_CONFIG["latent_channels"],
    text_in_dim=TINY_TEXT_CONFIG["hidden_size"],
    rope_axes_dim=(8, 12, 12),  # sums to head_dim = 64 / 2
)
# ERNIE-Image's scheduler is FlowMatchEulerDiscreteScheduler; a shift != 1 exercises the shift path.
TINY_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0)


def build_byte_tokenizer(model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (every UTF-8 byte is a token, BOS prepended) built without any download."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=model_max_length,
    )


def _wake_zero_init(transformer: ErnieImageTransformer2DModel, std: float = 0.02) -> None:
    # ERNIE zero-initialises adaLN_modulation and final_linear (right for pre-training from scratch).
    # A random model built that way outputs exactly zero and no LoRA gradient flows, so the tiny
    # model gives those layers small random weights instead.
    for layer in (transformer.adaLN_modulation[-1], transformer.final_linear):
        torch.nn.init.normal_(layer.weight, std=std)
        torch.nn.init.normal_(layer.bias, std=std)


def build_pipeline_from_configs(
    text_config: dict,
    vision_config: dict,
    vae_config: dict,
    transformer_config: dict,
    scheduler_config: dict,
    seed: int = 0,
    tokenizer: PreTrainedTokenizerFast | None = None,
) -> ErnieImagePipeline:
    """A randomly initialised ERNIE-Image pipeline of the given sizes, deterministic by seed.

    Leaves the global RNG as it found it.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = Mistral3Model(Mistral3Config(text_config=text_config, vision_config=vision_config)).eval()
        vae = AutoencoderKLFlux2(**vae_config).eval()
        transformer = ErnieImageTransformer2DModel(**transformer_config)
        _wake_zero_init(transformer)
        transformer.eval()
    return ErnieImagePipeline(
        transformer=transformer,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer or build_byte_tokenizer(),
        scheduler=FlowMatchEulerDiscreteScheduler(**scheduler_config),
    )


def build_tiny_pipeline(seed: int = 0) -> ErnieImagePipeline:
    """Build the tiny ERNIE-Image pipeline, deterministic for a given seed."""
    return build_pipeline_from_configs(
        TINY_TEXT_CONFIG, TINY_VISION_CONFIG, TINY_VAE_CONFIG, TINY_TRANSFORMER_CONFIG, TINY_SCHEDULER_CONFIG, seed
    )
