"""Builders of the pretrained or random-init parts: LLM, CLIP vision tower, VAE, UNet, schedulers.

Owns: loading each component from an HF id or local directory (`name_or_path`)
or building it from the flavor's sizes with seeded random weights (so every
process of a run, and the latent precompute job, builds the same frozen VAE),
and the latent-distribution encoding shared by training and precompute.

Object-storage URIs are resolved to local directories by the platform layer
before they reach here.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
                       UNet2DConditionModel)
from transformers import (AutoModelForCausalLM, CLIPVisionConfig, CLIPVisionModel, LlamaConfig,
                          LlamaForCausalLM, PreTrainedModel)

from .config import DiffusionConfig, LLMConfig, VisionConfig

# Stable Diffusion 2.1's noise schedule; random-init decoders use it too.
SD_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                   steps_offset=1)


@contextlib.contextmanager
def _seeded(seed: int):
    """Random init under a fixed seed without disturbing the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_llm(cfg: LLMConfig, vocab_size: int) -> PreTrainedModel:
    """Pretrained causal LM from `cfg.name_or_path`, or a random Llama of the configured sizes.

    `vocab_size` is the base tokenizer's size (DreamLLM's added tokens live outside the LLM).
    """
    if cfg.name_or_path:
        return AutoModelForCausalLM.from_pretrained(cfg.name_or_path, dtype=torch.float32)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                         num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
                         intermediate_size=cfg.intermediate_size, max_position_embeddings=cfg.context_length,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    with _seeded(cfg.seed):
        return LlamaForCausalLM(config)


def build_vision(cfg: VisionConfig) -> CLIPVisionModel:
    """Pretrained CLIP vision tower, or a random one of the configured sizes."""
    if cfg.name_or_path:
        return CLIPVisionModel.from_pretrained(cfg.name_or_path)
    config = CLIPVisionConfig(hidden_size=cfg.hidden_size, intermediate_size=cfg.hidden_size * 4,
                              num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                              image_size=cfg.image_size, patch_size=cfg.patch_size, projection_dim=cfg.hidden_size)
    with _seeded(cfg.seed):
        return CLIPVisionModel(config)


def build_vae(cfg: DiffusionConfig) -> AutoencoderKL:
    """Pretrained SD VAE (`<name_or_path>/vae`), or a random one; returned frozen and in eval mode."""
    if cfg.name_or_path:
        vae = AutoencoderKL.from_pretrained(cfg.name_or_path, subfolder="vae")
    else:
        n = len(cfg.vae_channels)
        with _seeded(cfg.seed):
            vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=cfg.latent_channels,
                                block_out_channels=cfg.vae_channels, layers_per_block=1,
                                down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                                norm_num_groups=min(8, cfg.vae_channels[0]), sample_size=cfg.resolution)
    return vae.requires_grad_(False).eval()


def build_unet(cfg: DiffusionConfig) -> UNet2DConditionModel:
    """Pretrained SD UNet (`<name_or_path>/unet`), or a random one conditioned on `cross_attention_dim`."""
    if cfg.name_or_path:
        unet = UNet2DConditionModel.from_pretrained(cfg.name_or_path, subfolder="unet")
        if unet.config.cross_attention_dim != cfg.cross_attention_dim:
            raise ValueError(f"diffusion.cross_attention_dim is {cfg.cross_attention_dim} but the UNet at "
                             f"{cfg.name_or_path} expects {unet.config.cross_attention_dim}")
        return unet
    n = len(cfg.unet_channels)
    with _seeded(cfg.seed + 1):
        return UNet2DConditionModel(
            sample_size=cfg.latent_size, in_channels=cfg.latent_channels, out_channels=cfg.latent_channels,
            block_out_channels=cfg.unet_channels, layers_per_block=1,
            down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
            up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
            cross_attention_dim=cfg.cross_attention_dim, attention_head_dim=8,
            norm_num_groups=min(32, cfg.unet_channels[0]))


def build_train_scheduler(cfg: DiffusionConfig) -> DDPMScheduler:
    """The noise schedule used for training (SD's scaled-linear betas over `num_train_timesteps`)."""
    if cfg.name_or_path:
        sched = DDPMScheduler.from_pretrained(cfg.name_or_path, subfolder="scheduler")
    else:
        sched = DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, **SD_SCHEDULE)
    if sched.config.prediction_type != cfg.prediction_type:
        sched = DDPMScheduler.from_config(sched.config, prediction_type=cfg.prediction_type)
    return sched


SAMPLERS = {
    "ddim": lambda conf: DDIMScheduler.from_config(conf, set_alpha_to_one=False),
    "dpm++": lambda conf: DPMSolverMultistepScheduler.from_config(conf, algorithm_type="dpmsolver++"),
}


def build_sampler(train_scheduler: DDPMScheduler, name: str):
    """A sampling scheduler ('ddim' or 'dpm++') sharing the training noise schedule."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown scheduler {name!r}; valid: {', '.join(SAMPLERS)}")
    # A scheduler loaded from disk marks some keys as "defaults", which from_config
    # then drops in favour of the *sampler's* defaults (e.g. timestep_spacing):
    # pass every value explicitly so a reloaded model samples exactly as before.
    conf = {k: v for k, v in train_scheduler.config.items() if k != "_use_default_values"}
    return SAMPLERS[name](conf)


@torch.no_grad()
def encode_latent_dist(vae: AutoencoderKL, pixels_B3HW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE posterior of images in [-1, 1]: (mean, logvar), each (B, C, h, w), unscaled.

    The latent store keeps these (not a sample) so that training draws a fresh
    sample each epoch, as online encoding would.
    """
    dist = vae.encode(pixels_B3HW.to(vae.dtype)).latent_dist
    return dist.mean, dist.logvar


def denoising_loss(unet, scheduler, x0_BChw: torch.Tensor, cond_BLD: torch.Tensor, prediction_type: str,
                   timestep_power: float = 1.0, snr_gamma: float | None = None,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to minimise, plain MSE) of the UNet's noise (or v) prediction on scaled latents `x0_BChw`
    noised by `scheduler` at random timesteps, conditioned on `cond_BLD`.

    Timesteps are uniform over the scheduler's steps (SD's and the paper's draw) when `timestep_power` is 1,
    else T * u**(1 / timestep_power) with u uniform, whose density grows with the noise level: on small
    latents the layout (colour, place) only depends on the condition at the noisiest steps. `snr_gamma`
    applies min-SNR-gamma weighting (Hang et al. 2023; diffusers' --snr_gamma); None: plain MSE.
    """
    B, T = x0_BChw.shape[0], scheduler.config.num_train_timesteps
    noise = torch.randn(x0_BChw.shape, generator=generator, device=x0_BChw.device)
    if timestep_power == 1.0:
        t = torch.randint(0, T, (B,), generator=generator, device="cpu")
    else:
        u = torch.rand(B, generator=generator, device="cpu")
        t = (T * u ** (1.0 / timestep_power)).long().clamp(max=T - 1)
    t = t.to(x0_BChw.device)
    noisy = scheduler.add_noise(x0_BChw, noise, t)
    target = noise if prediction_type == "epsilon" else scheduler.get_velocity(x0_BChw, noise, t)
    dtype = next(unet.parameters()).dtype
    pred = unet(noisy.to(dtype), t, encoder_hidden_states=cond_BLD.to(dtype)).sample
    mse_B = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma is None:
        return mse_B.mean(), mse_B.mean().detach()
    alpha_bar = scheduler.alphas_cumprod.to(x0_BChw.device)[t]
    snr = alpha_bar / (1 - alpha_bar)
    weight = torch.clamp(snr, max=snr_gamma) / (snr if prediction_type == "epsilon" else snr + 1)
    return (mse_B * weight).mean(), mse_B.mean().detach()


def sample_latents(mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw from N(mean, exp(logvar)), the same as diffusers' DiagonalGaussianDistribution.sample."""
    logvar = logvar.float().clamp(-30.0, 20.0)
    noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=torch.float32)
    return mean.float() + torch.exp(0.5 * logvar) * noise
