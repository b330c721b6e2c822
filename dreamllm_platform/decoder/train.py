"""Pretraining of the frozen towers on Ray Train: the driver (`run_decoder_pretraining`) and the loop every worker runs.

Owns: skipping work that is done (an output whose decoder.json has the same
config hash), writing the synthetic set when it is missing, the MLflow run
(created or resumed by run name, closed FINISHED or FAILED), the TorchTrainer
with checkpoints every `checkpoint_every` steps and restarts from the last
one (a run resumed after its last step only redoes the samples and the
output), the two training phases, the scaling factor, sample images and
their scores, and the output directory.

Phase 1 (steps 1..vae.steps): the flavor's AutoencoderKL, built as
`dreamllm.components.build_vae` builds it, learns to reconstruct random crops
(MSE of a posterior sample's decoding + kl_weight x KL). Afterwards the
scaling factor is 1 / std of posterior samples over `vae.scaling_images`
images, as SD set its 0.18215, so `latents * vae.config.scaling_factor` has
unit variance.
Phase 2 (the next unet.steps): the frozen VAE's scaled posterior samples are
noised by SD 2.1's training scheduler and the flavor's UNet (built as
`build_unet` builds it) predicts the noise, conditioned on the last hidden
state of a small CLIP text encoder trained with it; captions are dropped to
"" with probability `caption_dropout` for classifier-free guidance.
Phase 3 (the last vision.steps; none when 0): the flavor's CLIP vision tower,
built as `build_vision` builds it, learns CLIP's symmetric contrastive loss
against a text tower of its own (discarded afterwards; the UNet keeps its text
encoder), so that its patch tokens describe the picture as a pretrained CLIP's do.

The output, in the diffusers Stable Diffusion layout (so
`DiffusionConfig(name_or_path=<output>)` loads it through build_vae,
build_unet and build_train_scheduler, and `StableDiffusionPipeline` loads it
whole): model_index.json, vae/, unet/, scheduler/ (the training DDPM
schedule), text_encoder/, tokenizer/, vision/ (the CLIP vision tower, which
`dreamllm_platform.checkpoints.flavor_config` puts in the model too),
samples/*.png, and decoder.json
(a unique id of this export, flavor, config hash, metrics, MLflow run)
written last: without it the directory is not a finished decoder.

Shapes: pixels_B3HW in [-1, 1] at the flavor's resolution R; latents_BChw
with C = latent_channels and h = w = R / 2**(len(vae_channels) - 1);
ids_BL token ids padded to text_encoder.max_length; cond_BLD with D the
UNet's cross-attention width.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dreamllm.components import (build_sampler, build_train_scheduler, build_unet, build_vae, build_vision,
                                  denoising_loss, encode_latent_dist, sample_latents)
from dreamllm.config import DiffusionConfig, get_flavor
from dreamllm.images import CLIP_MEAN, CLIP_STD
from dreamllm.tokenizer import build_tokenizer

from .. import storage
from ..checkpoints import DECODER_FILE, read_decoder_info
from ..config import to_flat_dict
from ..data.synthetic import Scene, synthetic_exists, write_synthetic
from ..runtime import init_ray, sigterm_raises
from ..tracking import RunLogger, end_run, start_or_resume_run, tracking_uri
from ..train.trainer import scaling_config
from .config import DecoderConfig, TextEncoderSpec
from .data import image_caption_dataset

STATE_FILE = "decoder_state.pt"
DECODER_URI_TAG = "dreamllm.decoder_uri"


@dataclass
class DecoderResult:
    """What a decoder pretraining run left behind."""

    output: str
    """URI of the decoder directory (pass it as `decoder=` to the precompute and the stages)."""
    mlflow_run_id: str | None
    """The MLflow run that trained it."""
    tracking_uri: str
    """Where that run is."""
    metrics: dict
    """Final metrics: recon_mse, scaling_factor, diffusion_loss, skipped_images, sample accuracies."""
    skipped: bool
    """True when the output already held a finished decoder of the same config (nothing was trained)."""


# ------------------------------------------------------------------ models

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


# ------------------------------------------------------------------ data on a worker

CACHE_IMAGES = 50_000
"""Images of a worker's shard kept in memory after the first pass (at most ~600 MB at 64 px)."""

class ImageStream:
    """Endless batches of usable images from this worker's dataset shard, epoch after epoch.

    Rows whose `skip` is set (bad images, see `decoder.data`) are dropped and counted by reason during
    the first pass over the shard.
    """

    def __init__(self, shard, shuffle_buffer: int, seed: int, first_pass_done: bool = False):
        self.shard, self.shuffle_buffer, self.seed = shard, shuffle_buffer, seed
        self.skipped: dict[str, int] = {}
        self.first_pass_done = first_pass_done
        self.pixels: list[np.ndarray] = []
        self.captions: list[str] = []
        self._rows = self._epochs()

    def _epochs(self):
        # A shard that fits in CACHE_IMAGES is read once and replayed from memory in a new order each
        # epoch: every streamed epoch would start new read tasks (a fresh worker process each on a
        # small machine, importing torch), which on 2 cores costs more than the training steps.
        cache: list[tuple[np.ndarray, str]] | None = []
        epoch = 0
        while True:
            epoch += 1
            usable = 0
            for b in self.shard.iter_batches(batch_size=64, batch_format="numpy",
                                             local_shuffle_buffer_size=self.shuffle_buffer or None,
                                             local_shuffle_seed=self.seed + epoch):
                ok = b["skip"] == ""
                if not self.first_pass_done:
                    for reason in b["skip"][~ok]:
                        self.skipped[reason] = self.skipped.get(reason, 0) + 1
                usable += int(ok.sum())
                if ok.any():
                    if cache is not None:
                        cache += zip(b["pixels"][ok], b["caption"][ok])
                        cache = cache if len(cache) <= CACHE_IMAGES else None
                    yield b["pixels"][ok], list(b["caption"][ok])
            self.first_pass_done = True
            if not usable:
                raise ValueError(f"no usable images in this worker's data (skipped: {self.skipped or 'none'})")
            if cache is not None:
                break
        rng = np.random.default_rng(self.seed)
        while True:
            order = rng.permutation(len(cache))
            for start in range(0, len(order), 64):
                part = [cache[i] for i in order[start:start + 64]]
                yield np.stack([p for p, _ in part]), [str(c) for _, c in part]

    def take(self, n: int) -> tuple[torch.Tensor, list[str]]:
        """(pixels_B3HW float in [-1, 1], captions) of the next `n` usable images."""
        while len(self.captions) < n:
            pixels, captions = next(self._rows)
            self.pixels.extend(pixels)
            self.captions.extend(captions)
        u8 = np.stack(self.pixels[:n])
        caps = self.captions[:n]
        del self.pixels[:n], self.captions[:n]
        # The arithmetic of dreamllm.images.vae_pixels: x / 255 * 2 - 1.
        return torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 127.5 - 1.0, caps


def random_crop(pixels_B3HW: torch.Tensor, size: int | None, gen: random.Random) -> torch.Tensor:
    """One random square crop of side `size` at the same place for the whole batch (None: no crop)."""
    H = pixels_B3HW.shape[-1]
    if size is None or size >= H:
        return pixels_B3HW
    i, j = gen.randrange(H - size + 1), gen.randrange(H - size + 1)
    return pixels_B3HW[:, :, i:i + size, j:j + size]


# ------------------------------------------------------------------ the loop

def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to 0 at `total` (step counts from 0)."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _all_reduce(values: list[float], world: int) -> list[float]:
    """Sums over ranks (the values themselves with one worker)."""
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return t.tolist()


class _Window:
    """Means of metrics since the last log line."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.n, self.images, self.t0 = 0, 0, time.perf_counter()

    def add(self, images: int, **values: float) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.n += 1
        self.images += images

    def pop(self, world: int) -> dict[str, float]:
        keys = sorted(self.sums)
        totals = _all_reduce([self.sums[k] for k in keys] + [float(self.images)], world)
        out = {k: v / max(1, self.n * world) for k, v in zip(keys, totals)}
        out["images_per_s"] = totals[-1] / max(time.perf_counter() - self.t0, 1e-9)
        self.__init__()
        return out


def train_loop(config: dict) -> None:
    """Ray Train entry point; `config` = {"cfg": DecoderConfig, "run_id": str, "config_hash": str, "threads": int}."""
    run = _Worker(config)
    run.train_vae()
    run.train_unet()
    run.train_vision()
    run.finish()


class _Worker:
    """One Ray Train worker's state: the parts, the step, the data stream, metrics, and the MLflow logger."""

    def __init__(self, config: dict):
        import ray.train

        self.cfg = cfg = config["cfg"]
        self.run_id, self.config_hash = config["run_id"], config["config_hash"]
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        # More threads than cores (a local Ray may count more logical CPUs than there are) thrash.
        torch.set_num_threads(max(1, min(config.get("threads", 1), os.cpu_count() or 1)))
        flavor = get_flavor(cfg.flavor)
        self.d: DiffusionConfig = flavor.diffusion
        self.V, self.U, self.C = cfg.vae.steps, cfg.unet.steps, cfg.vision.steps
        self.total = self.V + self.U + self.C

        # Every rank builds the same initial weights (the builders are seeded).
        self.tokenizer = build_tokenizer(flavor.tokenizer)
        self.tokenizer.model_max_length = cfg.text_encoder.max_length  # the pipeline pads prompts to this
        self.vae = build_vae(self.d)
        if cfg.vae.init_logvar is not None:
            with torch.no_grad():  # quant_conv's output is (mean, logvar) along channels
                self.vae.quant_conv.bias[self.d.latent_channels:] = cfg.vae.init_logvar
        self.unet = build_unet(self.d)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed + 3)
            self.text_encoder = build_text_encoder(cfg.text_encoder, self.d.cross_attention_dim, self.tokenizer)
        self.scheduler = build_train_scheduler(self.d)
        self.vision_cfg = flavor.vision
        self.vision = build_vision(flavor.vision)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed + 5)
            self.clip = ContrastiveObjective(self.vision, build_text_encoder(
                cfg.text_encoder, self.d.cross_attention_dim, self.tokenizer), self.d.cross_attention_dim)

        self.step = 0
        self.state = self._restore()  # sets the step
        self.metrics: dict = dict(self.state.get("metrics", {}))
        for part in (self.vae, self.unet, self.text_encoder, self.clip):
            part.to(self.device)
        self.log = RunLogger(cfg.tracking, self.run_id) if self.rank == 0 else None
        if self.rank == 0:
            if self.state:
                self.log.metrics({"resumed_from_step": self.step}, self.step)
            print(f"[decoder] flavor={cfg.flavor} workers={self.world} device={self.device.type} "
                  f"threads={torch.get_num_threads()} start_step={self.step} steps: vae {self.V} + unet {self.U} "
                  f"+ vision {self.C}",
                  flush=True)

        seed = cfg.seed * 1000 + self.step * 10 + self.rank  # noise and crops differ per rank and after a resume
        torch.manual_seed(seed)
        self.crops = random.Random(seed)
        # A resumed run reads the data from its start again: bad images are counted again unless the first
        # pass had finished before the checkpoint (its total is then in the checkpoint's metrics).
        self.counted_before = self.state.get("first_pass_done", False)
        self.stream = ImageStream(ray.train.get_dataset_shard("train"), cfg.shuffle_buffer, seed,
                                  first_pass_done=self.counted_before)

    def _restore(self) -> dict:
        """The last checkpoint's state (weights loaded, step set), or {} for a fresh start."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if not checkpoint:
            return {}
        with checkpoint.as_directory() as ckpt_dir:
            state = torch.load(Path(ckpt_dir) / STATE_FILE, map_location="cpu", weights_only=False)
        if state.get("config_hash") != self.config_hash:
            if self.rank == 0:
                print(f"[decoder] the run's last checkpoint is of another config ({state.get('config_hash')}): "
                      f"starting afresh", flush=True)
            return {}
        self.step = state["step"]
        self.vae.load_state_dict(state["vae"])
        self.unet.load_state_dict(state["unet"])
        self.text_encoder.load_state_dict(state["text_encoder"])
        if "clip" in state:
            self.clip.load_state_dict(state["clip"])
        if state["metrics"].get("scaling_factor"):
            self.vae.register_to_config(scaling_factor=state["metrics"]["scaling_factor"])
        return state

    def _optimizer(self, params: list, lr: float, weight_decay: float, other_phase: bool) -> torch.optim.AdamW:
        """AdamW, with its state from the checkpoint unless that was taken in the other phase."""
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        if self.state.get("optimizer") and not other_phase:
            optimizer.load_state_dict(self.state["optimizer"])
        return optimizer

    def save(self, optimizer) -> None:
        """A Ray Train checkpoint (rank 0 writes it; every rank reports)."""
        import ray.train
        from ray.train import Checkpoint

        if not self.counted_before:
            self.metrics["skipped_images"] = _all_reduce([float(sum(self.stream.skipped.values()))], self.world)[0]
        with tempfile.TemporaryDirectory() as ckpt_dir:
            checkpoint = None
            if self.rank == 0:
                torch.save({"step": self.step, "config_hash": self.config_hash, "vae": self.vae.state_dict(),
                            "unet": self.unet.state_dict(), "text_encoder": self.text_encoder.state_dict(),
                            "clip": self.clip.state_dict(),
                            "optimizer": optimizer.state_dict() if optimizer else None, "metrics": self.metrics,
                            "first_pass_done": self.stream.first_pass_done}, Path(ckpt_dir) / STATE_FILE)
                checkpoint = Checkpoint.from_directory(ckpt_dir)
            ray.train.report({**self.metrics, "step": self.step}, checkpoint=checkpoint,
                             checkpoint_dir_name=f"step_{self.step:07d}")

    def log_window(self, window: _Window, phase: str, lr: float) -> None:
        values = window.pop(self.world)
        if self.rank == 0:
            shown = " ".join(f"{k} {v:.4f}" for k, v in values.items() if k != "images_per_s")
            print(f"[decoder] {phase} step {self.step}/{self.total} {shown} lr {lr:.2e} "
                  f"{values['images_per_s']:.1f} img/s", flush=True)
            self.log.metrics({**{f"{phase}/{k}": v for k, v in values.items()}, "lr": lr}, self.step)

    def train_vae(self) -> None:
        """Phase 1: steps 1..V; then the scaling factor and the reconstruction MSE."""
        import ray.train

        cfg, V = self.cfg, self.V
        if self.step < V:
            self.vae.requires_grad_(True).train()
            objective = ray.train.torch.prepare_model(VaeObjective(self.vae, cfg.vae.kl_weight))
            optimizer = self._optimizer(list(self.vae.parameters()), cfg.vae.lr, 0.0, self.state.get("step", 0) >= V)
            window = _Window()
            while self.step < V:
                lr = cfg.vae.lr * lr_factor(self.step, V, cfg.vae.warmup_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                pixels, _ = self.stream.take(cfg.vae.batch_size)
                loss, mse, kl = objective(random_crop(pixels, cfg.vae.crop, self.crops).to(self.device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.vae.parameters(), 1.0)
                optimizer.step()
                self.step += 1
                window.add(len(pixels), loss=loss.item(), recon_mse=mse.item(), kl=kl.item())
                if self.step % cfg.log_every == 0 or self.step == V:
                    self.log_window(window, "vae", lr)
                if self.step == V:
                    self.metrics.update(_finish_vae(self.vae, self.stream, cfg, self.device, self.world))
                    if self.rank == 0:
                        print(f"[decoder] VAE done: recon_mse {self.metrics['recon_mse']:.4f} "
                              f"scaling_factor {self.metrics['scaling_factor']:.4f}", flush=True)
                        self.log.metrics(self.metrics, self.step)
                if self.step % cfg.checkpoint_every == 0 or self.step == V:
                    self.save(optimizer if self.step < V else None)
        self.vae.requires_grad_(False).eval()

    def train_unet(self) -> None:
        """Phase 2: steps V+1..V+U, on the frozen VAE's scaled posterior samples."""
        import ray.train

        cfg, V, U = self.cfg, self.V, self.U
        if self.step >= V + U:
            return

        def tok(captions: list[str]) -> torch.Tensor:
            return self.tokenizer(captions, padding="max_length", max_length=cfg.text_encoder.max_length,
                                  truncation=True, return_tensors="pt").input_ids.to(self.device)

        empty_ids = tok([""])
        self.unet.train()
        self.text_encoder.train()
        objective = ray.train.torch.prepare_model(DiffusionObjective(
            self.unet, self.text_encoder, self.scheduler, self.d.prediction_type, cfg.unet.snr_gamma,
            cfg.unet.timestep_power))
        params = list(self.unet.parameters()) + list(self.text_encoder.parameters())
        optimizer = self._optimizer(params, cfg.unet.lr, cfg.unet.weight_decay, self.state.get("step", 0) < V)
        sf = self.vae.config.scaling_factor
        window, mse_tail = _Window(), []
        while self.step < V + U:
            lr = cfg.unet.lr * lr_factor(self.step - V, U, cfg.unet.warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            pixels, captions = self.stream.take(cfg.unet.batch_size)
            with torch.no_grad():
                latents = sample_latents(*encode_latent_dist(self.vae, pixels.to(self.device))) * sf
            drop = torch.rand(len(captions), device=self.device) < cfg.unet.caption_dropout
            ids = torch.where(drop[:, None], empty_ids, tok(captions))  # "" for classifier-free guidance
            loss, mse = objective(latents, ids)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            self.step += 1
            window.add(len(pixels), loss=loss.item(), mse=mse.item())
            mse_tail = (mse_tail + [mse.item()])[-50:]
            if self.step % cfg.log_every == 0 or self.step == V + U:
                self.log_window(window, "unet", lr)
            if self.step == V + U:
                self.metrics["diffusion_loss"] = _all_reduce([float(np.mean(mse_tail))], self.world)[0] / self.world
            if self.step % cfg.checkpoint_every == 0 or self.step == V + U:
                self.save(optimizer if self.step < V + U else None)

    def train_vision(self) -> None:
        """Phase 3: steps V+U+1..V+U+C, CLIP's contrastive objective on the vision tower and its text tower."""
        import ray.train

        cfg, start, C = self.cfg, self.V + self.U, self.C
        if C == 0 or self.step >= start + C:
            return

        def tok(captions: list[str]) -> torch.Tensor:
            return self.tokenizer(captions, padding="max_length", max_length=cfg.text_encoder.max_length,
                                  truncation=True, return_tensors="pt").input_ids.to(self.device)

        self.clip.train()
        objective = ray.train.torch.prepare_model(self.clip)
        params = list(self.clip.parameters())
        optimizer = self._optimizer(params, cfg.vision.lr, cfg.vision.weight_decay,
                                    self.state.get("step", 0) <= start)
        window, tail = _Window(), []
        while self.step < start + C:
            lr = cfg.vision.lr * lr_factor(self.step - start, C, cfg.vision.warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            pixels, captions = self.stream.take(cfg.vision.batch_size)
            loss, acc = objective(clip_input(pixels.to(self.device), self.vision_cfg.image_size), tok(captions))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            self.step += 1
            window.add(len(pixels), loss=loss.item(), retrieval_accuracy=acc.item())
            tail = (tail + [(loss.item(), acc.item())])[-50:]
            if self.step % cfg.log_every == 0 or self.step == start + C:
                self.log_window(window, "vision", lr)
            if self.step == start + C:
                loss_sum, acc_sum = _all_reduce([sum(t[0] for t in tail) / len(tail),
                                                 sum(t[1] for t in tail) / len(tail)], self.world)
                self.metrics.update({"vision_contrastive_loss": loss_sum / self.world,
                                     "vision_retrieval_accuracy": acc_sum / self.world})
            if self.step % cfg.checkpoint_every == 0 or self.step == start + C:
                self.save(optimizer if self.step < start + C else None)

    def finish(self) -> None:
        """Rank 0: samples and their scores, the output directory, and decoder.json last."""
        self.unet.eval()
        self.text_encoder.eval()
        if self.rank != 0:
            return
        cfg = self.cfg
        parts = (self.vae, self.text_encoder, self.tokenizer, self.unet)
        vision = self.vision.eval() if self.C else None
        self.metrics.update(_samples_and_export(parts, self.scheduler, cfg, self.log, self.device, vision))
        self.log.metrics(self.metrics, self.step)
        self.log.tags({DECODER_URI_TAG: cfg.output})
        info = {"id": uuid.uuid4().hex, "flavor": cfg.flavor, "config_hash": self.config_hash,
                "metrics": self.metrics, "mlflow_run_id": self.run_id, "tracking_uri": cfg.tracking.tracking_uri,
                "ray_run_name": cfg.run_name, "config": dataclasses.asdict(cfg)}
        storage.write_bytes(storage.join(cfg.output, DECODER_FILE),  # last: marks the decoder finished
                            json.dumps(info, indent=1, default=str).encode(), cfg.storage)
        print(f"[decoder] wrote the decoder to {cfg.output}; bad images skipped by this worker: "
              f"{self.stream.skipped or 'none'}", flush=True)


@torch.no_grad()
def _finish_vae(vae, stream: ImageStream, cfg: DecoderConfig, device, world: int) -> dict:
    """The scaling factor (1 / std of posterior samples, over every rank's images) and the recon MSE."""
    vae.eval()
    pixels, _ = stream.take(cfg.vae.scaling_images)
    s, s2, n, se = 0.0, 0.0, 0, 0.0
    for chunk in pixels.split(64):
        chunk = chunk.to(device)
        mean, logvar = encode_latent_dist(vae, chunk)
        z = sample_latents(mean, logvar).double()
        s, s2, n = s + z.sum().item(), s2 + (z * z).sum().item(), n + z.numel()
        se += F.mse_loss(vae.decode(mean).sample, chunk, reduction="sum").item()
    s, s2, n, se = _all_reduce([s, s2, float(n), se], world)
    std = math.sqrt(max(s2 / n - (s / n) ** 2, 1e-12))
    vae.register_to_config(scaling_factor=1.0 / std)
    recon_mse = se / (len(pixels) * world * pixels[0].numel())
    return {"scaling_factor": 1.0 / std, "recon_mse": recon_mse}


@torch.no_grad()
def _samples_and_export(parts, scheduler, cfg: DecoderConfig, log: RunLogger, device, vision=None) -> dict:
    """Rank 0: sample images (logged, and saved under samples/), their scores, and the decoder's files (with
    `vision/` when a vision tower was trained)."""
    from ..evaluation.scenes import describe

    vae, text_encoder, tokenizer, unet = parts
    s = cfg.samples
    pipe = sd_pipeline(vae, text_encoder, tokenizer, unet, build_sampler(scheduler, s.scheduler)).to(device)

    def create(prompts: list[str], seed: int):
        images = []
        for i in range(0, len(prompts), 16):
            gens = [torch.Generator().manual_seed(seed + i + j) for j in range(len(prompts[i:i + 16]))]
            images += pipe(prompts[i:i + 16], num_inference_steps=s.num_inference_steps,
                           guidance_scale=s.guidance_scale, generator=gens, output_type="pil").images
        return images

    metrics = {}
    with tempfile.TemporaryDirectory() as tmp:
        sample_dir = Path(tmp) / "samples"
        sample_dir.mkdir()
        for i, (prompt, image) in enumerate(zip(s.prompts, create(list(s.prompts), cfg.seed))):
            image.save(sample_dir / f"{i:02d}.png")
            log.image(image, f"samples/{i:02d}.png")
        (sample_dir / "prompts.json").write_text(json.dumps(list(s.prompts), indent=1))
        if s.scored:
            rng = random.Random(cfg.seed + 12345)
            scenes = [Scene.random(rng) for _ in range(s.scored)]
            guesses = [describe(im) for im in create([sc.caption() for sc in scenes], cfg.seed + 1)]
            hits = [(g.color == sc.color, g.position == sc.position) for g, sc in zip(guesses, scenes)]
            metrics = {"sample_color_accuracy": float(np.mean([c for c, _ in hits])),
                       "sample_position_accuracy": float(np.mean([p for _, p in hits])),
                       "sample_color_and_position_accuracy": float(np.mean([c and p for c, p in hits]))}
        # The training DDPM schedule is what build_train_scheduler loads; samplers derive from it.
        sd_pipeline(vae, text_encoder, tokenizer, unet, scheduler).save_pretrained(tmp)
        if vision is not None:
            vision.save_pretrained(Path(tmp) / "vision")
        storage.upload_dir(tmp, cfg.output, cfg.storage)
    return metrics


# ------------------------------------------------------------------ the driver

def run_decoder_pretraining(cfg: DecoderConfig) -> DecoderResult:
    """Train the decoder of `cfg.flavor` on `cfg.sources` and write it to `cfg.output`.

    Returns at once (skipped=True) when the output already holds a finished decoder of the same config;
    a run of the same name resumes from its last Ray Train checkpoint.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    config_hash = cfg.config_hash()
    done = read_decoder_info(cfg.output, cfg.storage)
    if done and done.get("config_hash") == config_hash:
        print(f"[decoder] {cfg.output} already holds a finished decoder of this config ({config_hash}): nothing to do")
        return DecoderResult(cfg.output, done.get("mlflow_run_id"),
                             done.get("tracking_uri") or tracking_uri(cfg.tracking), done.get("metrics", {}),
                             skipped=True)
    if cfg.synthetic.enabled and not synthetic_exists(cfg.data_root, cfg.storage):
        print(f"[decoder] writing the synthetic data set to {cfg.data_root}")
        write_synthetic(cfg.data_root, cfg.synthetic, cfg.storage)

    init_ray(cfg.ray_num_cpus)
    # Workers run elsewhere (another cwd, maybe another node): make local paths absolute.
    cfg = dataclasses.replace(cfg, data_root=storage.absolute(cfg.data_root), output=storage.absolute(cfg.output),
                              storage_path=storage.absolute(cfg.storage_path),
                              tracking=dataclasses.replace(cfg.tracking, tracking_uri=tracking_uri(cfg.tracking)))
    dataset = image_caption_dataset(cfg, get_flavor(cfg.flavor).diffusion.resolution)
    if cfg.cache:
        dataset = dataset.materialize()
    if done:  # a decoder of another config is about to be overwritten: it must not look finished meanwhile
        storage.remove(storage.join(cfg.output, DECODER_FILE), cfg.storage)

    run_id, resumed = start_or_resume_run(cfg.tracking, cfg.run_name, params=to_flat_dict(cfg),
                                          tags={"dreamllm.job": "decoder", "dreamllm.flavor": cfg.flavor,
                                                "dreamllm.decoder_config_hash": config_hash})
    print(f"[decoder] MLflow run {run_id} ({'resumed' if resumed else 'new'}) at {cfg.tracking.tracking_uri}")
    scaling = scaling_config(cfg.scaling, cfg.data_cpus)
    # Ray sets OMP_NUM_THREADS to the whole CPUs a worker holds (1 of 1.5): use the share it was given.
    threads = max(1, math.ceil(scaling.resources_per_worker.get("CPU", 1)))
    trainer = TorchTrainer(
        train_loop, train_loop_config={"cfg": cfg, "run_id": run_id, "config_hash": config_hash, "threads": threads},
        scaling_config=scaling,
        run_config=ray.train.RunConfig(
            name=cfg.run_name, storage_path=cfg.storage_path,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
        datasets={"train": dataset})
    try:
        with sigterm_raises():  # `ray job stop` still closes the run
            trainer.fit()
        info = read_decoder_info(cfg.output, cfg.storage)
        if info is None or info.get("config_hash") != config_hash:
            raise RuntimeError(f"training finished but {storage.join(cfg.output, DECODER_FILE)} was not written")
    except BaseException:
        end_run(cfg.tracking, run_id, "FAILED")
        raise
    end_run(cfg.tracking, run_id, "FINISHED")
    return DecoderResult(cfg.output, run_id, cfg.tracking.tracking_uri, info["metrics"], skipped=False)
