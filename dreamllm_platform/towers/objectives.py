"""The towers' models and losses: what each phase of the towers job minimises.

Owns: the small CLIP text encoder built for the UNet, the VAE's
reconstruction + KL loss, the UNet's denoising loss on the text encoder's
condition, CLIP's contrastive loss for the vision tower, the LLM's next-token
loss on text, the pixel arithmetic between them (crops, CLIP input) and the
diffusers pipeline of the trained decoder parts. The maths of the diffusion
loss is `dreamllm.components`'.

Shapes: pixels_B3HW in [-1, 1] at the flavor's resolution R; latents_BChw
with C = latent_channels and h = w = R / 2**(len(vae_channels) - 1);
ids_BL token ids padded to text_encoder.max_length; cond_BLD with D the
UNet's cross-attention width.
"""
from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F
from torch import nn

from dreamllm.components import denoising_loss
from dreamllm.images import CLIP_MEAN, CLIP_STD

from .config import TextEncoderSpec


def build_text_encoder(spec: TextEncoderSpec, width: int, tokenizer):
    """A random-init CLIPTextModel of width `width` (the UNet's cross-attention dim) over `tokenizer`."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=4 * width,
                            num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
                            max_position_embeddings=spec.max_length, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return CLIPTextModel(config)


class VaeObjective(nn.Module):
    """Phase 1's loss: MSE of a posterior sample's reconstruction + kl_weight x KL (both per pixel).

    The KL is summed over the latent and divided by the image's pixel count, so `kl_weight` means what it
    meant in SD's VAE (KL against the reconstruction loss summed over the image).
    """

    def __init__(self, vae, kl_weight: float):
        super().__init__()
        self.vae, self.kl_weight = vae, kl_weight

    def forward(self, pixels_B3HW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(pixels_B3HW).latent_dist
        recon = self.vae.decode(posterior.sample()).sample
        mse = F.mse_loss(recon, pixels_B3HW)
        kl = posterior.kl().mean() / pixels_B3HW[0].numel()
        return mse + self.kl_weight * kl, mse.detach(), kl.detach()


class DiffusionObjective(nn.Module):
    """Phase 2's loss: `dreamllm.components.denoising_loss` of the UNet conditioned on the text encoder's last
    hidden state (min-SNR weighted, timesteps drawn with density growing as t**(timestep_power - 1))."""

    def __init__(self, unet, text_encoder, scheduler, prediction_type: str, snr_gamma: float | None,
                 timestep_power: float = 1.0):
        super().__init__()
        self.unet, self.text_encoder, self.scheduler = unet, text_encoder, scheduler
        self.prediction_type, self.snr_gamma, self.timestep_power = prediction_type, snr_gamma, timestep_power

    def forward(self, latents_BChw: torch.Tensor, ids_BL: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss to minimise, plain MSE for logging) of scaled latents and caption token ids."""
        cond_BLD = self.text_encoder(ids_BL).last_hidden_state
        return denoising_loss(self.unet, self.scheduler, latents_BChw, cond_BLD, self.prediction_type,
                              self.timestep_power, self.snr_gamma)


class ContrastiveObjective(nn.Module):
    """Phase 3's loss: CLIP's symmetric InfoNCE between the vision tower's pooled output (projected to the text
    width) and the text tower's, at a learned temperature; also returns in-batch image->caption accuracy."""

    def __init__(self, vision, text_tower, width: int):
        super().__init__()
        self.vision, self.text_tower = vision, text_tower
        self.projection = nn.Linear(vision.config.hidden_size, width, bias=False)
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))  # CLIP starts at 1 / 0.07; smaller is steadier here

    def forward(self, pixels_B3SS: torch.Tensor, ids_BL: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        img = F.normalize(self.projection(self.vision(pixels_B3SS).pooler_output), dim=-1)
        txt = F.normalize(self.text_tower(ids_BL).pooler_output, dim=-1)
        logits = img @ txt.t() * self.log_scale.exp().clamp(max=100.0)
        labels = torch.arange(len(logits), device=logits.device)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
        return loss, (logits.argmax(1) == labels).float().mean().detach()


def clip_input(pixels_B3HW: torch.Tensor, size: int) -> torch.Tensor:
    """VAE-range pixels in [-1, 1] as CLIP input at `size` (the arithmetic of dreamllm.images.clip_pixels)."""
    x = (pixels_B3HW + 1) / 2
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean.to(x.device)) / std.to(x.device)


def sd_pipeline(vae, text_encoder, tokenizer, unet, scheduler):
    """A diffusers StableDiffusionPipeline of the trained parts (no safety checker)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class LmObjective(nn.Module):
    """Phase 4's loss: the causal LM's mean next-token cross-entropy over the labelled tokens of a batch
    from `dreamllm.sequence.collate` (position ids restart per packed example)."""

    def __init__(self, llm):
        super().__init__()
        self.llm = llm

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.llm(input_ids=input_ids, position_ids=position_ids, labels=labels, use_cache=False).loss


def random_crop(pixels_B3HW: torch.Tensor, size: int | None, gen: random.Random) -> torch.Tensor:
    """One random square crop of side `size` at the same place for the whole batch (None: no crop)."""
    H = pixels_B3HW.shape[-1]
    if size is None or size >= H:
        return pixels_B3HW
    i, j = gen.randrange(H - size + 1), gen.randrange(H - size + 1)
    return pixels_B3HW[:, :, i:i + size, j:j + size]
