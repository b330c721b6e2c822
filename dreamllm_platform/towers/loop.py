"""The towers job's worker loop: every phase through one loop, on each Ray Train worker.

Owns: building the towers (seeded, identical on every rank), restoring the
last checkpoint (weights, step, the phase's optimizer state, and each rank's
random state and data position, so a resumed run trains on the images and
draws the noise an uninterrupted one would), the `Phase`
records (which part trains, on what, with which objective, and what it
reports at its end), the one phase loop (learning-rate schedule, gradient
clipping, metric window, checkpoints every `checkpoint.every_n_steps` steps
counted over all phases), and handing the trained parts to `towers.export`.

Phases, in order (steps count on across them; a phase with 0 steps is skipped):
1. vae: the flavor's AutoencoderKL reconstructs images (MSE + kl_weight x KL);
   then the scaling factor is 1 / std of posterior samples over
   `vae.scaling_images` images, as SD set its 0.18215.
2. unet: the UNet predicts the noise of the frozen VAE's scaled latents (SD
   2.1's training schedule, min-SNR weighting), conditioned on the last hidden
   state of a small CLIP text encoder trained with it; captions are dropped to
   "" with probability `caption_dropout` for classifier-free guidance.
3. vision: the CLIP vision tower learns CLIP's contrastive loss against a text
   tower of its own (discarded afterwards).
4. llm: the flavor's LLM learns next-token prediction on text (`streams.TextBatches`).
"""
from __future__ import annotations

import math
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from dreamllm.components import (build_llm, build_train_scheduler, build_unet, build_vae, build_vision,
                                 encode_latent_dist, sample_latents)
from dreamllm.config import get_flavor
from dreamllm.tokenizer import build_tokenizer, special_ids

from .. import storage
from ..tracking import RunLogger
from ..train.worker import (MetricWindow, WorkerContext, lr_factor, maybe_fail, record_step, report_checkpoint,
                            rng_checksum)
from .config import PhaseSpec, TowersConfig
from .objectives import (ContrastiveObjective, DiffusionObjective, LmObjective, VaeObjective, build_text_encoder,
                         clip_input, random_crop)
from .streams import ImageStream, TextBatches

STATE_FILE = "towers_state.pt"
"""The step, weights, optimizer and metrics (rank 0's; the same on every rank)."""
POSITION_FILE = "towers_position_rank{rank}.pt"
"""Each rank's data position and generators (beside its torch/numpy/python random state, `WorkerContext.save_rng`)."""
PARTS = ("vae", "unet", "text_encoder", "clip", "llm")
"""The trained modules a checkpoint holds (`clip` holds the vision tower and its text tower)."""


@dataclass
class Phase:
    """One phase: its spec, the parameters it trains, one training step, and what it reports at its end."""

    name: str
    spec: PhaseSpec
    params: list
    step: Callable[[], tuple[torch.Tensor, int, dict[str, float]]]
    """One step's (loss, examples, values to log besides the loss)."""
    modules: tuple
    """Put in train() for the phase, eval() and frozen after it."""
    finish: Callable[[dict[str, float]], dict[str, float]]
    """Final metrics from the means (over ranks) of the last 50 steps' logged values."""


def train_loop(config: dict) -> None:
    """Ray Train entry point; `config` = {"cfg": TowersConfig, "run_id": str, "config_hash": str, "threads": int,
    "fail_at_step": int | None}."""
    worker = _Worker(config)
    offset = 0
    for phase in worker.phases():
        worker.run(phase, offset)
        offset += phase.spec.steps
    if worker.ctx.is_main:
        from .export import export_towers

        export_towers(worker, config)


class _Worker:
    """One Ray Train worker's state: the parts, the step, the data streams, metrics, and the MLflow logger."""

    def __init__(self, config: dict):
        import ray.train

        self.cfg = cfg = config["cfg"]
        self.run_id, self.config_hash = config["run_id"], config["config_hash"]
        self.ctx = WorkerContext.current()
        self.device = self.ctx.device
        # More threads than cores (a local Ray may count more logical CPUs than there are) thrash.
        torch.set_num_threads(max(1, min(config.get("threads", 1), os.cpu_count() or 1)))
        self.flavor = flavor = get_flavor(cfg.flavor)
        self.d = flavor.diffusion
        self.total = sum(p.steps for p in cfg.phases().values())

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
        self.vision = build_vision(flavor.vision)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed + 5)
            self.clip = ContrastiveObjective(self.vision, build_text_encoder(
                cfg.text_encoder, self.d.cross_attention_dim, self.tokenizer), self.d.cross_attention_dim)
        # As DreamLLM.from_config builds it, so a stage that starts from it finds the same architecture.
        self.llm = build_llm(flavor.llm, special_ids(self.tokenizer, flavor.tokenizer).base_vocab_size)

        self.step = 0
        self.run_dir = storage.join(cfg.checkpoint.storage_path, cfg.run_name)
        self.fail_at_step = config.get("fail_at_step")
        self.tail: list[dict] = []  # the phase's last 50 steps' values (its final metrics are their means)
        self.state = self._restore()  # sets the step and, from this rank's position file, the random state
        self.metrics: dict = dict(self.state.get("metrics", {}))
        for name in PARTS:
            getattr(self, name).to(self.device)
        # Resilient, as the stages' logger: a tracking outage keeps the metrics back instead of killing the job.
        self.log = RunLogger(cfg.tracking, self.run_id, resilient=True) if self.ctx.is_main else None
        if self.ctx.is_main:
            if self.state:
                self.log.metrics({"resumed_from_step": self.step}, self.step)
            steps = " + ".join(f"{n} {p.steps}" for n, p in cfg.phases().items())
            print(f"[towers] flavor={cfg.flavor} workers={self.ctx.world} device={self.device.type} "
                  f"threads={torch.get_num_threads()} start_step={self.step} steps: {steps}", flush=True)

        position = self.state.get("position")
        # Noise, crops, data order and texts differ per rank. A resume goes on with the generators where
        # the checkpoint left them; without this rank's position (another world size) it draws afresh.
        seed = position["seed"] if position else self.ctx.seed_rank(cfg.seed, self.step)
        self.crops = random.Random(seed)
        # A resumed run reads its data from the start again, up to its position: bad images are counted
        # again unless the first pass had finished before the checkpoint (its total is then in the metrics).
        self.counted_before = self.state.get("first_pass_done", False)
        self.stream = ImageStream(ray.train.get_dataset_shard("train"), cfg.shuffle_buffer, seed,
                                  first_pass_done=self.counted_before)
        self.texts = TextBatches(cfg.llm, self.stream, self.tokenizer, flavor, seed)
        if position:
            self.crops.setstate(position["crops"])
            self.texts.rng.setstate(position["texts"])
            self.tail = position["tail"]
            self.stream.skip(position["taken"])
        if self.ctx.is_main and self.state:
            print(f"[towers] resumed at step {self.step}: " + (
                f"data position ({position['taken']} images) and random state restored" if position else
                "data read from its start, random state reseeded (the checkpoint has no position for this rank)"),
                flush=True)

    # ------------------------------------------------------------------ checkpoints
    def _restore(self) -> dict:
        """The last checkpoint's state (weights loaded, step set), or {} for a fresh start."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if not checkpoint:
            return {}
        # Each rank reads its own download (ranks sharing one `as_directory()` copy on a node can race).
        with tempfile.TemporaryDirectory() as own:
            d = Path(checkpoint.to_directory(own))
            state = torch.load(d / STATE_FILE, map_location="cpu", weights_only=False)
            position_file = d / POSITION_FILE.format(rank=self.ctx.rank)
            if state.get("config_hash") == self.config_hash and position_file.is_file():
                state["position"] = torch.load(position_file, weights_only=False)
                self.ctx.restore_rng(d, self.cfg.seed, state["step"])
        if state.get("config_hash") != self.config_hash:
            if self.ctx.is_main:
                print(f"[towers] the run's last checkpoint is of another config ({state.get('config_hash')}): "
                      f"starting afresh", flush=True)
            return {}
        self.step = state["step"]
        for name in PARTS:
            getattr(self, name).load_state_dict(state[name])
        if state["metrics"].get("scaling_factor"):
            self.vae.register_to_config(scaling_factor=state["metrics"]["scaling_factor"])
        return state

    def save(self, phase: str, optimizer) -> None:
        """A Ray Train checkpoint (rank 0 writes it; every rank reports)."""
        if not self.counted_before:
            self.metrics["skipped_images"] = self.ctx.all_reduce(
                {"n": float(sum(self.stream.skipped.values()))})["n"]

        def write(d: Path) -> bool:
            self.ctx.save_rng(d)
            torch.save({"seed": self.stream.seed, "taken": self.stream.taken, "crops": self.crops.getstate(),
                        "texts": self.texts.rng.getstate(), "tail": self.tail},
                       d / POSITION_FILE.format(rank=self.ctx.rank))
            if self.ctx.is_main:
                torch.save({"step": self.step, "config_hash": self.config_hash, "phase": phase,
                            **{name: getattr(self, name).state_dict() for name in PARTS},
                            "optimizer": optimizer.state_dict() if optimizer else None, "metrics": self.metrics,
                            "first_pass_done": self.stream.first_pass_done}, d / STATE_FILE)
            return True

        report_checkpoint(self.step, self.metrics, write)

    # ------------------------------------------------------------------ the one loop
    def run(self, phase: Phase, offset: int) -> None:
        """Steps offset+1 .. offset+steps of `phase` (those not done yet), then its part is frozen."""
        spec, end = phase.spec, offset + phase.spec.steps
        if self.step < end:
            for m in phase.modules:
                m.requires_grad_(True).train()
            optimizer = torch.optim.AdamW(phase.params, lr=spec.lr, weight_decay=spec.weight_decay)
            if self.state.get("optimizer") and self.state.get("phase") == phase.name:
                optimizer.load_state_dict(self.state["optimizer"])
            window = MetricWindow()
            if self.state.get("phase") != phase.name:
                self.tail = []  # a resume within the phase keeps the checkpoint's
            while self.step < end:
                lr = spec.lr * lr_factor(self.step - offset, spec.steps, spec.warmup_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                rng = rng_checksum()
                loss, n, values = phase.step()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if spec.gradient_clipping:
                    torch.nn.utils.clip_grad_norm_(phase.params, spec.gradient_clipping)
                optimizer.step()
                self.step += 1
                values = {"loss": loss.item(), **values}
                maybe_fail(self.fail_at_step, self.step, self.ctx, self.run_dir, self.cfg.storage, "towers")
                if self.cfg.record_ids:
                    record_step(self.ctx, self.run_dir, self.cfg.storage, self.step,
                                {"ids": self.stream.drawn, "loss": values["loss"], "rng": rng})
                self.stream.drawn = []
                window.add({"examples": n}, **values)
                self.tail = (self.tail + [values])[-50:]
                if self.step % self.cfg.log_every == 0 or self.step == end:
                    self.log_window(window, phase.name, lr)
                if self.step == end:
                    means = self.ctx.all_reduce({k: float(np.mean([t[k] for t in self.tail])) for k in self.tail[0]},
                                                "mean")
                    final = phase.finish(means)  # may all-reduce: every rank calls it
                    self.metrics.update(final)
                    if self.ctx.is_main:
                        print(f"[towers] {phase.name} done: " +
                              " ".join(f"{k} {v:.4f}" for k, v in final.items()), flush=True)
                        self.log.metrics(self.metrics, self.step)
                if self.step % self.cfg.checkpoint.every_n_steps == 0 or self.step == end:
                    self.save(phase.name, optimizer if self.step < end else None)
        for m in phase.modules:
            m.requires_grad_(False).eval()

    def log_window(self, window: MetricWindow, phase: str, lr: float) -> None:
        values = window.pop(self.ctx)
        if self.ctx.is_main:
            shown = " ".join(f"{k} {v:.4f}" for k, v in values.items() if not k.endswith("_per_s"))
            print(f"[towers] {phase} step {self.step}/{self.total} {shown} lr {lr:.2e} "
                  f"{values['examples_per_s']:.1f} ex/s", flush=True)
            self.log.metrics({**{f"{phase}/{k}": v for k, v in values.items()}, "lr": lr}, self.step)

    # ------------------------------------------------------------------ the phases
    def tokens(self, captions: list[str]) -> torch.Tensor:
        return self.tokenizer(captions, padding="max_length", max_length=self.cfg.text_encoder.max_length,
                              truncation=True, return_tensors="pt").input_ids.to(self.device)

    def phases(self) -> list[Phase]:
        import ray.train.torch

        cfg, dev = self.cfg, self.device

        def prepare(objective):
            # DDP when there are several workers. It refuses a module with nothing to train, and the builders
            # return frozen towers: unfreeze the phase's part here (`run` freezes it again after its phase).
            return ray.train.torch.prepare_model(objective.requires_grad_(True))

        vae_loss = prepare(VaeObjective(self.vae, cfg.vae.kl_weight))

        def vae_step():
            pixels, _ = self.stream.take(cfg.vae.batch_size)
            loss, mse, kl = vae_loss(random_crop(pixels, cfg.vae.crop, self.crops).to(dev))
            return loss, len(pixels), {"recon_mse": mse.item(), "kl": kl.item()}

        diffusion = prepare(DiffusionObjective(self.unet, self.text_encoder, self.scheduler, self.d.prediction_type,
                                               cfg.unet.snr_gamma, cfg.unet.timestep_power))
        empty_ids = self.tokens([""])

        def unet_step():
            pixels, captions = self.stream.take(cfg.unet.batch_size)
            with torch.no_grad():
                latents = sample_latents(*encode_latent_dist(self.vae, pixels.to(dev))) * self.vae.config.scaling_factor
            drop = torch.rand(len(captions), device=dev) < cfg.unet.caption_dropout
            ids = torch.where(drop[:, None], empty_ids, self.tokens(captions))  # "" for classifier-free guidance
            loss, mse = diffusion(latents, ids)
            return loss, len(pixels), {"mse": mse.item()}

        contrastive = prepare(self.clip)

        def vision_step():
            pixels, captions = self.stream.take(cfg.vision.batch_size)
            loss, acc = contrastive(clip_input(pixels.to(dev), self.flavor.vision.image_size), self.tokens(captions))
            return loss, len(pixels), {"retrieval_accuracy": acc.item()}

        lm = prepare(LmObjective(self.llm))

        def llm_step():
            batch = {k: v.to(dev) for k, v in self.texts.take(cfg.llm.batch_size).items()}
            return lm(**batch), cfg.llm.batch_size, {}

        def vae_finish(means):
            return _finish_vae(self.vae, self.stream, cfg, dev, self.ctx)

        return [
            Phase("vae", cfg.vae, list(self.vae.parameters()), vae_step, (self.vae,), vae_finish),
            Phase("unet", cfg.unet, list(self.unet.parameters()) + list(self.text_encoder.parameters()), unet_step,
                  (self.unet, self.text_encoder), lambda m: {"diffusion_loss": m["mse"]}),
            Phase("vision", cfg.vision, list(self.clip.parameters()), vision_step, (self.clip,),
                  lambda m: {"vision_contrastive_loss": m["loss"],
                             "vision_retrieval_accuracy": m["retrieval_accuracy"]}),
            Phase("llm", cfg.llm, list(self.llm.parameters()), llm_step, (self.llm,),
                  lambda m: {"llm_loss": m["loss"]}),
        ]


@torch.no_grad()
def _finish_vae(vae, stream: ImageStream, cfg: TowersConfig, device, ctx: WorkerContext) -> dict:
    """The scaling factor (1 / std of posterior samples, over every rank's images) and the recon MSE."""
    vae.eval()
    pixels, _ = stream.take(cfg.vae.scaling_images)
    s, s2, n, se = 0.0, 0.0, 0, 0.0
    for chunk in pixels.split(64):
        chunk = chunk.to(device)
        mean, logvar = encode_latent_dist(vae, chunk)
        z = sample_latents(mean, logvar).double()
        s, s2, n, se = s + z.sum().item(), s2 + (z * z).sum().item(), n + z.numel(), \
            se + F.mse_loss(vae.decode(mean).sample, chunk, reduction="sum").item()
    t = ctx.all_reduce({"s": s, "s2": s2, "n": float(n), "se": se})
    std = math.sqrt(max(t["s2"] / t["n"] - (t["s"] / t["n"]) ** 2, 1e-12))
    vae.register_to_config(scaling_factor=1.0 / std)
    return {"scaling_factor": 1.0 / std, "recon_mse": t["se"] / (len(pixels) * ctx.world * pixels[0].numel())}
