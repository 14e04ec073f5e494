"""ERNIE-Image as a model family: everything ERNIE-specific, in one object that the rest asks.

``family_for(name)`` gives the family of a model name (``ERNIE_IMAGE``, or ``ERNIE_IMAGE_TURBO``, the
8-step distilled variant with its own defaults). The family knows:

- how to load each component from a hub id, a local diffusers folder, ``micro`` or ``tiny[:SEED]``
  (``models/loading.py`` does the loading), and the full-size 8B DiT config the planner and the GPU
  bench build without a download;
- the DiT's module names: presets of LoRA targets, the blocks, which layers stay unquantised, and the
  kohya spelling of module paths (dots as underscores) that LoRA files use;
- the numerics exactly as ``ErnieImagePipeline`` computes them, written here rather than borrowed
  from its private helpers: text-embedding padding, the 2x2 latent patchify, the batch-norm latent
  normalisation, the scheduler's shift and ``timestep = sigma * 1000``, and how the DiT is called;
- sizes: the pixels per token and the image tokens of a bucket.

The DiT (``ErnieImageTransformer2DModel``; ComfyUI's ``comfy/ldm/ernie`` uses the same names):
``x_embedder.proj`` (a patch-size convolution, 1x1 in ERNIE-Image: the linear it equals), ``text_proj``,
``time_embedding.linear_1/2``, ``adaLN_modulation.1``, ``final_norm.linear``, ``final_linear``, and the
blocks ``layers.N`` with ``self_attention.to_q/to_k/to_v/to_out.0``, ``mlp.gate_proj/up_proj/linear_fc2``
and the RMSNorms ``adaLN_sa_ln``, ``adaLN_mlp_ln``, ``self_attention.norm_q/norm_k``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from ..errors import UserError
from . import loading
from .names import flat_module_name, is_module_path, module_from_flat

# LoRA target presets: suffixes of module names (peft's target_modules match a name's last parts)
TARGET_PRESETS: dict[str, list[str]] = {
    "attn": ["to_q", "to_k", "to_v", "to_out.0"],
    "attn_mlp": ["to_q", "to_k", "to_v", "to_out.0", "gate_proj", "up_proj", "linear_fc2"],
}
# the patch embedding and the output projection are tiny and precision-sensitive: never quantised
KEEP_FULL_PRECISION = ("x_embedder", "final_linear")
# transformer/config.json of baidu/ERNIE-Image (Turbo shares it)
FULL_TRANSFORMER_CONFIG = dict(
    hidden_size=4096, num_attention_heads=32, num_layers=36, ffn_hidden_size=12288, in_channels=128,
    out_channels=128, patch_size=1, text_in_dim=3072, rope_theta=256, rope_axes_dim=(32, 48, 48), eps=1e-6,
    qk_layernorm=True,
)
PIPELINE_BN_EPS = 1e-5  # ErnieImagePipeline un-normalises latents with this, not config.batch_norm_eps
LATENT_PATCH = 2  # the pipeline packs 2x2 latent pixels into one token's channels (32 -> 128 for the 8B)


@dataclass(frozen=True)
class ErnieImageFamily:
    name: str = "ERNIE-Image"
    hub_id: str = "baidu/ERNIE-Image"
    default_steps: int = 50  # what the pipeline samples with unless told
    default_guidance: float = 4.0
    text_tokens: int = 256  # the prompt length to plan memory for (Ministral-3 embeddings, one per token)
    target_presets: dict = field(default_factory=lambda: dict(TARGET_PRESETS))

    # -- loading -----------------------------------------------------------------------------------------
    def load_pipeline(self, name: str | None = None, **kwargs):
        """``ErnieImagePipeline`` (``components`` limits what is loaded; see ``loading.load_pipeline``)."""
        return loading.load_pipeline(name or self.hub_id, **kwargs)

    def load_tokenizer(self, name: str, revision: str | None = None):
        """The model's own tokenizer (what the pipeline counts with), loaded alone, without a progress bar."""
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()  # a bar for one tokenizer file is noise
        try:
            return self.load_pipeline(name, dtype="fp32", components=("tokenizer",), revision=revision).tokenizer
        finally:
            diffusers_logging.enable_progress_bar()

    def load_transformer(self, name: str | None = None, **kwargs):
        return loading.load_transformer(name or self.hub_id, **kwargs)

    def component_config(self, name: str, component: str, revision: str | None = None) -> dict:
        return loading.load_component_config(name, component, revision)

    def fingerprint(self, name: str, component: str, revision: str | None = None) -> str:
        """A short identity of a component's weights without loading them (cache keys, provenance)."""
        return loading.component_fingerprint(name, component, revision)

    def transformer_config(self, name: str, revision: str | None = None) -> dict:
        """The DiT's config: from the model's files, or the full-size one for the hub ids (no download)."""
        try:
            return self.component_config(name, "transformer", revision)
        except UserError:
            if name in (ERNIE_IMAGE.hub_id, ERNIE_IMAGE_TURBO.hub_id):
                return dict(FULL_TRANSFORMER_CONFIG)
            raise

    def block_parameters(self, name: str, revision: str | None = None) -> int:
        """The weights of the DiT's repeated blocks (attention and MLP linears), from its config alone."""
        cfg = self.transformer_config(name, revision)
        hidden, ffn = cfg["hidden_size"], cfg["ffn_hidden_size"]
        return cfg["num_layers"] * (4 * hidden * hidden + 3 * hidden * ffn)

    def pixel_multiple(self, name: str, revision: str | None = None) -> int:
        """Pixels per token side: VAE downsampling x the 2x2 patchify x the DiT's patch (16 for ERNIE-Image)."""
        try:
            vae = self.component_config(name, "vae", revision)
        except UserError:
            if name not in (ERNIE_IMAGE.hub_id, ERNIE_IMAGE_TURBO.hub_id):
                raise
            vae = {}  # FLUX.2's VAE: four blocks, the default below
        blocks = len(vae.get("block_out_channels", (128, 256, 512, 512)))
        # the pipeline's vae_scale_factor (2 ** blocks) already counts the 2x2 patchify
        return 2 ** blocks * int(self.transformer_config(name, revision).get("patch_size", 1))

    def bucket_step(self, name: str, requested: int | None = None, revision: str | None = None) -> int:
        """The bucket grid's step in pixels: ``requested`` (a config's data.bucket_multiple) or the model's pixel
        multiple; a step the model cannot take (not a multiple of its own) is a config error."""
        multiple = self.pixel_multiple(name, revision)
        if requested and requested % multiple:
            raise UserError(f"data.bucket_multiple: {requested} must be a multiple of {multiple} (what the model "
                            "needs)")
        return requested or multiple

    def text_token_limit(self, tokenizer, name: str, revision: str | None = None) -> int | None:
        """Tokens of a prompt the text encoder reads: the pipeline tokenises with ``truncation=True``, so the
        tokenizer's declared ``model_max_length`` cuts; when it declares none (transformers' huge sentinel),
        the text encoder's ``max_position_embeddings``; None when neither is known."""
        declared = int(min(tokenizer.model_max_length, 1 << 62))
        if declared <= 100_000:
            return declared
        try:
            cfg = self.component_config(name, "text_encoder", revision)
        except UserError:
            return None
        positions = cfg.get("text_config", cfg).get("max_position_embeddings")
        return int(positions) if positions else None

    def scheduler_shift(self, name: str, setting: str | float = "official", revision: str | None = None) -> float:
        """A ``timesteps.shift`` setting as a number: "official" is the model scheduler's own, "none" is 1."""
        if setting == "official":
            return float(self.component_config(name, "scheduler", revision).get("shift", 1.0))
        return 1.0 if setting == "none" else float(setting)

    def euler_sigmas(self, name: str, steps: int, revision: str | None = None) -> torch.Tensor:
        """The K+1 sigmas the pipeline's Euler sampler steps through for K steps (shift applied), ending at 0."""
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.component_config(name, "scheduler", revision))
        scheduler.set_timesteps(sigmas=torch.linspace(1.0, 0.0, steps + 1)[:-1].numpy())
        return scheduler.sigmas.float()

    def num_train_timesteps(self, name: str, revision: str | None = None) -> int:
        return int(self.component_config(name, "scheduler", revision).get("num_train_timesteps", 1000))

    # -- module names ------------------------------------------------------------------------------------
    @staticmethod
    def blocks(transformer) -> torch.nn.ModuleList:
        """The repeated blocks (what block swap moves, FSDP shards and regional compile compiles)."""
        return transformer.layers

    contiguous_attention_input = staticmethod(loading.contiguous_attention_input)

    @staticmethod
    def quantizable(module: torch.nn.Module, name: str) -> bool:
        """torchao's filter (module, qualified name): linears, but the precision-sensitive ends."""
        return isinstance(module, torch.nn.Linear) and not any(part in name for part in KEEP_FULL_PRECISION)

    flat_module_name = staticmethod(flat_module_name)
    module_from_flat = staticmethod(module_from_flat)
    is_module_path = staticmethod(is_module_path)

    # -- numerics, as ErnieImagePipeline computes them -----------------------------------------------------
    @staticmethod
    def pad_text(embeddings: list[torch.Tensor], device, dtype: torch.dtype, text_in_dim: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt embeddings of any lengths -> zero-padded [B, T, D] and their lengths."""
        rows = [(e.squeeze(1) if e.dim() == 3 else e).to(device=device, dtype=dtype) for e in embeddings]
        lengths = torch.tensor([r.shape[0] for r in rows], device=device, dtype=torch.long)
        padded = torch.zeros((len(rows), int(lengths.max()) if rows else 0, text_in_dim), device=device, dtype=dtype)
        for i, r in enumerate(rows):
            padded[i, : r.shape[0]] = r
        return padded, lengths

    @staticmethod
    def patchify(latents: torch.Tensor) -> torch.Tensor:
        """2x2 patchify of VAE latents: [B, C, H, W] -> [B, 4C, H/2, W/2] (channel-major, then the 2x2)."""
        b, c, h, w = latents.shape
        p = LATENT_PATCH
        return latents.view(b, c, h // p, p, w // p, p).permute(0, 1, 3, 5, 2, 4).reshape(b, c * p * p, h // p, w // p)

    @staticmethod
    def unpatchify(latents: torch.Tensor) -> torch.Tensor:
        b, c, h, w = latents.shape
        p = LATENT_PATCH
        return latents.reshape(b, c // (p * p), p, p, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // (p * p),
                                                                                            h * p, w * p)

    @staticmethod
    def latent_statistics(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean and std the pipeline normalises patchified latents with (the VAE's batch norm)."""
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(device=like.device, dtype=like.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + PIPELINE_BN_EPS).to(device=like.device,
                                                                                    dtype=like.dtype)
        return mean, std

    @torch.no_grad()
    def encode_images(self, vae, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1], [B, 3, H, W] -> normalised, patchified latents (what the DiT denoises)."""
        pixels = pixels.to(device=vae.device, dtype=vae.dtype)
        latents = self.patchify(vae.encode(pixels).latent_dist.mode())  # the mean: a cached latent is deterministic
        mean, std = self.latent_statistics(vae, latents)
        return (latents - mean) / std

    @torch.no_grad()
    def decode_latents(self, vae, latents: torch.Tensor) -> torch.Tensor:
        """The inverse, as the pipeline decodes: pixels in [-1, 1]."""
        latents = latents.to(device=vae.device, dtype=vae.dtype)
        mean, std = self.latent_statistics(vae, latents)
        return vae.decode(self.unpatchify(latents * std + mean), return_dict=False)[0]

    @staticmethod
    def model_timesteps(sigmas: torch.Tensor, num_train_timesteps: int = 1000) -> torch.Tensor:
        """What the DiT is called with: the scheduler's timesteps are ``sigma * num_train_timesteps``."""
        return sigmas * num_train_timesteps

    def predict_velocity(self, transformer, x_t: torch.Tensor, sigmas: torch.Tensor, texts: list[torch.Tensor],
                         num_train_timesteps: int = 1000) -> torch.Tensor:
        """Call the DiT as ``ErnieImagePipeline`` does: padded text with lengths, ``timestep = sigma * 1000``."""
        dtype = transformer.dtype
        text_bth, text_lens = self.pad_text(texts, x_t.device, dtype, transformer.config.text_in_dim)
        return transformer(hidden_states=x_t.to(dtype), text_bth=text_bth, text_lens=text_lens,
                           timestep=self.model_timesteps(sigmas, num_train_timesteps).to(dtype), return_dict=False)[0]

    @staticmethod
    def image_tokens(width: int, height: int, multiple: int) -> int:
        """Tokens of an image (one per ``multiple``-pixel square)."""
        return (width // multiple) * (height // multiple)


ERNIE_IMAGE = ErnieImageFamily()
ERNIE_IMAGE_TURBO = ErnieImageFamily(name="ERNIE-Image-Turbo", hub_id="baidu/ERNIE-Image-Turbo", default_steps=8,
                                     default_guidance=1.0)


def family_for(model: str | None) -> ErnieImageFamily:
    """The family of a model name: the Turbo variant for its hub id, ERNIE-Image for every other name."""
    return ERNIE_IMAGE_TURBO if model == ERNIE_IMAGE_TURBO.hub_id else ERNIE_IMAGE
