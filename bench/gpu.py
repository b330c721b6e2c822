"""The GPU readiness benchmark (tracker #17): one call on one GPU measures what a GPU run of the platform needs.

Owns five sections, each guarded so that one that fails records its error and the others still run:
  1. stage2     stage II (I-GPT) DeepSpeed steps, ZeRO-2 and ZeRO-3, gradient checkpointing on and off:
                tokens/s, images/s, MFU (the FLOP count is written out in `step_flops`), peak memory
  2. latents    the same step with precomputed latents vs VAE encoding online in the step: the ratio
  3. vae        VAE encoding images/s through the latent actor's own batch path (`VaeEncoder.__call__`)
  4. serving    chat tokens/s and images/s at 1 and 16 requests through `dreamllm.generation`
  5. attention  which SDPA kernel the LLM's attention runs, each kernel's availability at the LLM's shapes,
                and one LLM layer under torch.compile vs eager

Shapes: the 7b flavor (Vicuna-7B width 4096, 32 heads, MLP 11008, context 2048, 64 dream queries, CLIP
ViT-L/14 at 224 px, the SD 2.1-base UNet and VAE at 512 px / 64x64 latents) with random weights, nothing
downloaded, and the LLM cut to `--llm-layers` of its 32 layers so that it trains on one GPU. `--tiny` runs
the same code on the debug flavor on the CPU (fp32, DeepSpeed's CPU accelerator) in well under a minute:
the test suite runs it so the script cannot rot.

    python bench/gpu.py [--out outputs/bench/gpu] [--llm-layers 8] [--sections stage2,vae,...]
    python bench/gpu.py --tiny [--device cpu|cuda]

Writes <out>/gpu.json (every figure, and each section's error or skip reason) and <out>/gpu.md (a table).
No pass/fail: figures and ratios only. Goals for the 7b shapes: stage II MFU >= 40%; precomputed latents
>= 1.3x faster per step than online encoding.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import random
import socket
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from dreamllm import components  # noqa: E402
from dreamllm.config import DreamLLMConfig, TokenizerConfig, get_flavor  # noqa: E402
from dreamllm.model import DreamLLM  # noqa: E402
from dreamllm.sequence import IGNORE, Example, Image, SequenceBuilder, Text, collate  # noqa: E402
from dreamllm.tokenizer import build_tokenizer, special_ids  # noqa: E402

SECTIONS = ("stage2", "latents", "vae", "serving", "attention")
VICUNA_VOCAB = 32000
"""Rows of Vicuna's embedding and LM head. The bundled BPE has fewer tokens; the tables keep the 7b size so
that the head's FLOPs and memory are the real model's (ids above the BPE's are simply never drawn)."""

# The published architecture of stabilityai/stable-diffusion-2-1-base (unet/ and vae/ config.json). The
# random-init builders in dreamllm.components make the small decoders of the CPU flavors (one layer per
# block), so the 7b shapes need these.
SD21_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), attention_head_dim=(5, 10, 20, 20),
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                 cross_attention_dim=1024, use_linear_projection=True, norm_num_groups=32)
SD21_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, sample_size=512)

# Dense bf16 tensor-core peaks from the datasheets (no sparsity), by a substring of the device name.
PEAK_TFLOPS = (("H200", 989.4), ("H100 PCIe", 756.0), ("H100", 989.4), ("A100", 312.0), ("L40S", 362.0),
               ("L4", 121.0))

WORDS = ("the a of on in with and then we see another small large red green blue image shows scene "
         "left right top background people city river tree house street light morning").split()


@dataclass
class Shapes:
    """What one run builds and how long each section measures."""

    model: DreamLLMConfig
    sd21: bool
    """The SD 2.1-base UNet and VAE (the 7b shapes) instead of the flavor's own random decoder."""
    rows: int
    """Packed rows of the context length per micro-batch."""
    images_per_row: int
    """Images of the document in each row; each is a dream slot and then an input block, as in MMC4."""
    warmup: int
    steps: int
    vae_images: int
    chat_tokens: int
    image_steps: int
    concurrency: tuple[int, ...] = (1, 16)


def make_shapes(args) -> Shapes:
    if args.tiny:
        cfg = get_flavor("debug")
        shapes = Shapes(cfg, sd21=False, rows=2, images_per_row=2, warmup=1, steps=2, vae_images=32,
                        chat_tokens=8, image_steps=2)
    else:
        cfg = get_flavor("7b")
        # Random weights at the paper's shapes: no component is downloaded.
        cfg.llm.name_or_path = cfg.vision.name_or_path = cfg.diffusion.name_or_path = None
        cfg.llm.num_layers = args.llm_layers
        cfg.tokenizer = TokenizerConfig(vocab_size=VICUNA_VOCAB)  # the bundled BPE, as the random flavors use
        shapes = Shapes(cfg, sd21=True, rows=args.rows, images_per_row=args.images_per_row, warmup=2,
                        steps=args.steps, vae_images=128, chat_tokens=64, image_steps=25)
    # Every step does the same work: the stage's condition dropout would add an LLM pass on the empty
    # prompt now and then.
    cfg.condition_dropout = 0.0
    return shapes


def build_model(shapes: Shapes, device: torch.device) -> DreamLLM:
    """A stage II DreamLLM at `shapes`, built directly on `device` (random init on a GPU takes seconds)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    cfg = shapes.model
    tok = build_tokenizer(cfg.tokenizer)
    vocab = special_ids(tok, cfg.tokenizer).base_vocab_size
    with torch.device(device):
        if shapes.sd21:
            llm = components.build_llm(cfg.llm, VICUNA_VOCAB)
            unet = UNet2DConditionModel(**SD21_UNET)
            vae = AutoencoderKL(**SD21_VAE).requires_grad_(False).eval()
        else:
            llm, unet, vae = (components.build_llm(cfg.llm, vocab), components.build_unet(cfg.diffusion),
                              components.build_vae(cfg.diffusion))
        model = DreamLLM(cfg, tok, llm, components.build_vision(cfg.vision), unet, vae,
                         components.build_train_scheduler(cfg.diffusion))
    return model.set_stage("igpt").train()


# ----------------------------------------------------------------- helpers

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, warmup: int, reps: int) -> list[float]:
    """Seconds of each of `reps` calls of `fn` after `warmup` untimed ones."""
    times = []
    for i in range(warmup + reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def error_record(e: Exception) -> dict:
    """What the JSON keeps of a failure: its first line, and the end of its traceback."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return {"error": f"{type(e).__name__}: {first}", "traceback": traceback.format_exc(limit=-4)}


def guarded(fn, *args) -> dict:
    """Run one section or case; an exception becomes its recorded error so that the others still run."""
    t0 = time.perf_counter()
    try:
        out = fn(*args)
    except Exception as e:  # a benchmark records any failure (OOM, a missing kernel) and moves on
        out = error_record(e)
    out.setdefault("seconds", round(time.perf_counter() - t0, 1))
    return out


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def peak_memory_gib(device: torch.device):
    if device.type != "cuda":
        return "skipped: no CUDA (torch.cuda.max_memory_allocated)"
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def datasheet_peak(device: torch.device, override: float | None) -> float | None:
    """The device's dense bf16 peak in FLOP/s (`--peak-tflops`, else the datasheet table), None if unknown."""
    if override:
        return override * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf * 1e12 for key, tf in PEAK_TFLOPS if key in name), None)


def matmul_flops(device: torch.device, dtype: torch.dtype, n: int) -> float:
    """FLOP/s of a square matmul in `dtype`: what this device delivers in practice (a second MFU baseline)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    t = statistics.median(timed(lambda: a @ b, device, warmup=3, reps=10))
    return 2 * n**3 / t


# ------------------------------------------------- 1 and 2: stage II steps

def stage2_batch(model: DreamLLM, shapes: Shapes, device: torch.device) -> tuple[dict, torch.Tensor]:
    """One micro-batch of full packed rows, and the dream images' VAE pixels (N_dr, 3, R, R) uint8.

    Each row holds an MMC4-like document (sentences, each image a dream slot then an input block), then a
    text-only document that fills the rest of the context, as packing does. Pixels and latents are random.
    """
    rng = random.Random(0)
    cfg, builder = model.cfg, SequenceBuilder(model.tokenizer, model.cfg)
    L, vocab = cfg.llm.context_length, model.ids.base_vocab_size

    def sentence() -> Text:
        return Text(" ".join(rng.choice(WORDS) for _ in range(rng.randint(12, 30))) + ".")

    rows = []
    for r in range(shapes.rows):
        items = [sentence()]
        for i in range(shapes.images_per_row):
            items += [Image(f"r{r}i{i}"), sentence()]
        doc = builder.document(items)
        room = L - len(doc)
        filler = [model.ids.bos] + [rng.randrange(3, vocab) for _ in range(room - 1)]
        rows.append([doc, Example(filler, [IGNORE] + filler[1:])] if room > 1 else [doc])
    keys = [k for row in rows for ex in row for k in ex.dream_keys]
    S, C = cfg.vision.image_size, cfg.diffusion.latent_channels
    R = model.vae.config.sample_size
    h = R // 2 ** (len(model.vae.config.block_out_channels) - 1)
    pixels = {k: torch.randn(3, S, S) for k in keys}
    latents = {k: torch.stack([torch.randn(C, h, h), torch.full((C, h, h), -4.0)]) for k in keys}
    batch = collate(rows, model.ids.pad, length=L, pixels=pixels, latents=latents)
    vae_u8 = torch.randint(0, 256, (len(keys), 3, R, R), dtype=torch.uint8)
    return {k: v.to(device) for k, v in batch.items()}, vae_u8.to(device)


def measured_flops(model: DreamLLM, device: torch.device) -> dict[str, float]:
    """FLOPs per image of the frozen towers, counted by torch's FlopCounterMode on one image.

    CLIP runs forward only. The UNet runs forward and a backward that computes input gradients only (its
    weights are frozen, but the loss reaches the dream queries through it): about 2x its forward.
    Checkpointing is off while counting, so recomputation is not counted (MFU, not hardware FLOPs).
    """
    from torch.utils.flop_counter import FlopCounterMode

    cfg, dtype = model.cfg, next(model.unet.parameters()).dtype
    was = cfg.gradient_checkpointing
    model.set_gradient_checkpointing(False)
    S = cfg.vision.image_size
    with torch.no_grad(), FlopCounterMode(display=False) as clip:
        model.vision(torch.randn(1, 3, S, S, device=device, dtype=dtype), output_hidden_states=True)
    h = model.unet.config.sample_size
    x = torch.randn(1, model.unet.config.in_channels, h, h, device=device, dtype=dtype)
    cond = torch.randn(1, cfg.num_dream_queries, cfg.diffusion.cross_attention_dim, device=device, dtype=dtype,
                       requires_grad=True)
    with FlopCounterMode(display=False) as unet:
        model.unet(x, torch.tensor([500], device=device), encoder_hidden_states=cond).sample.float().sum().backward()
    model.set_gradient_checkpointing(was)
    return {"clip_forward": clip.get_total_flops(), "unet_forward_backward": unet.get_total_flops()}


def step_flops(model: DreamLLM, batch: dict, per_image: dict[str, float]) -> dict[str, float]:
    """Model FLOPs of one training step on `batch`, written out term by term.

    LLM (all trained): 6 x (matmul parameters of the blocks) x tokens, plus attention, plus the LM head on
    the positions that carry a label (the model computes logits only there). Attention is 12 x layers x
    width x n^2 per packed example of n tokens (QK^T and AV, 4 n^2 H forward per layer, x3 with backward),
    without a causal discount, as PaLM and torchtitan count it. The projectors are trained: 6 x params x
    tokens through them. CLIP and the UNet are measured (`measured_flops`). Recomputation under gradient
    checkpointing is not counted.
    """
    c = model.llm.config
    H, I, nl = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    kv = c.num_key_value_heads * (H // c.num_attention_heads)
    block = 2 * H * H + 2 * H * kv + 3 * H * I  # q, o; k, v; SwiGLU gate, up, down
    ids, pos = batch["input_ids"], batch["position_ids"]
    tokens = ids.numel()
    starts = [torch.nonzero(row == 0).flatten().tolist() + [row.numel()] for row in pos.cpu()]
    sum_n2 = sum((b - a) ** 2 for s in starts for a, b in zip(s, s[1:]))
    labelled = int((batch["labels"][:, 1:] != IGNORE).sum())
    vocab = model.llm.get_output_embeddings().out_features + model.new_token_head.shape[0]
    query_mask, patch_mask = model.slot_masks(ids)
    n_img = int(patch_mask.sum()) // model.cfg.vision.num_tokens
    n_dream = int(query_mask.sum()) // model.cfg.num_dream_queries
    vp, cp = model.visual_projector, model.condition_projector
    f = {
        "llm_blocks": 6 * nl * block * tokens,
        "llm_attention": 12 * nl * H * sum_n2,
        "lm_head": 6 * H * vocab * labelled,
        "projectors": 6 * (vp.in_features * vp.out_features * int(patch_mask.sum())
                           + cp.in_features * cp.out_features * int(query_mask.sum())),
        "clip": per_image["clip_forward"] * n_img,
        "unet": per_image["unet_forward_backward"] * n_dream,
    }
    f["total"] = sum(f.values())
    return f


def single_rank_group(device: torch.device) -> None:
    """The one-process torch.distributed group DeepSpeed needs (Ray Train makes it in the stage loop)."""
    if torch.distributed.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # DeepSpeed insists on LOCAL_RANK, which a launcher would set.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")


def make_engine(model: DreamLLM, zero_stage: int, rows: int, device: torch.device):
    """The stage loop's DeepSpeed engine: its config builder, parameter groups, AdamW and schedule."""
    import deepspeed

    from dreamllm_platform.train.config import DataSpec, DeepSpeedSpec, TrainConfig
    from dreamllm_platform.train.loop import deepspeed_config, lr_lambda, param_groups

    cfg = TrainConfig(stage="igpt", deepspeed=DeepSpeedSpec(zero_stage=zero_stage),
                      data=DataSpec(micro_batch_size=rows))
    o = cfg.optim
    optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay, o.lr, o.llm_lr), lr=o.lr, betas=o.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg, device.type == "cuda"),
                                           dist_init_required=False)
    return engine


def train_step(engine, batch: dict) -> torch.Tensor:
    out = engine(**batch)
    engine.backward(out.loss)
    engine.step()
    return out.loss


def measure_steps(engine, batch: dict, flops: dict, shapes: Shapes, device: torch.device, peaks: dict) -> dict:
    """tokens/s, images/s, MFU and peak memory of the engine's steps on `batch`."""
    reset_peak_memory(device)
    losses = []
    times = timed(lambda: losses.append(train_step(engine, batch)), device, shapes.warmup, shapes.steps)
    step = statistics.median(times)
    achieved = flops["total"] / step
    n_dream = int(engine.module.slot_masks(batch["input_ids"])[0].sum()) // engine.module.cfg.num_dream_queries
    return {"step_s": round(step, 4), "tokens_per_s": round(batch["input_ids"].numel() / step, 1),
            "images_per_s": round(n_dream / step, 2), "achieved_tflops": round(achieved / 1e12, 2),
            "mfu": round(achieved / peaks["datasheet"], 4) if peaks["datasheet"] else
            "skipped: no datasheet peak for this device (pass --peak-tflops)",
            "mfu_vs_matmul": round(achieved / peaks["matmul"], 4),
            "peak_memory_gib": peak_memory_gib(device), "loss": round(float(losses[-1]), 4)}


def measure_latents(engine, batch: dict, vae_u8: torch.Tensor, shapes: Shapes, device: torch.device) -> dict:
    """Step time with the stored posterior vs encoding the dream images with the VAE inside the step.

    The online side starts from uint8 pixels already on the device: JPEG decoding is left out of both, since
    a data loader does it off the critical path either way (and the precomputed side needs CLIP pixels too).
    Rounds alternate so that drift hits both sides.
    """
    model: DreamLLM = engine.module

    def online():
        x = vae_u8.float() / 255.0 * 2.0 - 1.0  # the latent actor's arithmetic
        mean, logvar = components.encode_latent_dist(model.vae, x)
        train_step(engine, {**batch, "latent_mean": mean, "latent_logvar": logvar})

    pre, onl = [], []
    for _ in range(2):
        pre += timed(lambda: train_step(engine, batch), device, 1, shapes.steps)
        onl += timed(online, device, 1, shapes.steps)
    p, o = statistics.median(pre), statistics.median(onl)
    return {"precomputed_step_s": round(p, 4), "online_step_s": round(o, 4),
            "ratio_online_over_precomputed": round(o / p, 3), "dream_images_per_step": int(vae_u8.shape[0])}


def flop_accounting(model: DreamLLM, batch: dict, device: torch.device) -> dict:
    return {"flops_per_step": step_flops(model, batch, measured_flops(model, device)),
            "flops_note": "LLM, head and projectors analytic (6 x params x tokens + attention); CLIP and UNet "
                          "measured by FlopCounterMode; no recompute counted",
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def zero_stage_cases(zero: int, shapes: Shapes, device: torch.device, peaks: dict, stage2: dict,
                     latents: dict) -> dict:
    """A fresh model and engine at ZeRO `zero` (ZeRO-3 partitions the model in place, so none is reused);
    fills stage2's cases for it, checkpointing on and off, and on ZeRO-2 the latents case."""
    model = build_model(shapes, device)
    batch, vae_u8 = stage2_batch(model, shapes, device)
    if "flops_per_step" not in stage2:
        stage2.update(flop_accounting(model, batch, device))
    free_memory()
    engine = make_engine(model, zero, shapes.rows, device)
    for ckpt in (True, False):
        engine.module.set_gradient_checkpointing(ckpt)
        stage2["cases"][f"zero{zero}, checkpointing {'on' if ckpt else 'off'}"] = guarded(
            measure_steps, engine, batch, stage2["flops_per_step"], shapes, device, peaks)
        free_memory()
    if zero == 2:  # the same engine, as the 7b flavor trains (checkpointing on)
        engine.module.set_gradient_checkpointing(True)
        latents["cases"]["checkpointing on"] = guarded(measure_latents, engine, batch, vae_u8, shapes, device)
    engine.destroy()
    return {}


def train_sections(shapes: Shapes, device: torch.device, peaks: dict) -> dict[str, dict]:
    """Sections 1 (stage2) and 2 (latents), which share their engines."""
    stage2: dict = {"cases": {}}
    latents: dict = {"cases": {}}
    single_rank_group(device)
    for zero in (2, 3):
        got = guarded(zero_stage_cases, zero, shapes, device, peaks, stage2, latents)
        if "error" in got:  # building the model or engine failed: the cases it did not reach say why
            for ckpt in ("on", "off"):
                stage2["cases"].setdefault(f"zero{zero}, checkpointing {ckpt}", got)
            if zero == 2:
                latents["cases"].setdefault("checkpointing on", got)
        free_memory()
    return {"stage2": stage2, "latents": latents}


# ---------------------------------------------------------------- 3: VAE

def vae_section(shapes: Shapes, device: torch.device) -> dict:
    """Images/s of `VaeEncoder.__call__`, the per-batch path of the precompute job's actor pool, without Ray.

    The actor builds its flavor's VAE in its constructor; for the 7b shapes that names the HF weights, so
    it is built for the debug flavor and handed the random SD 2.1-base VAE. Everything per batch (uint8
    decode, zero-padding to the batch size, autocast, fp16 bytes out) is the actor's own.
    """
    from dreamllm_platform.data.config import EncoderConfig
    from dreamllm_platform.data.latents import VaeEncoder
    from dreamllm_platform.storage import StorageConfig

    enc_cfg = EncoderConfig()
    enc = VaeEncoder("debug", None, StorageConfig(), enc_cfg.batch_size, enc_cfg.autocast, torch.get_num_threads())
    if enc.device != device.type:  # --device cpu on a GPU machine: the actor would pick the GPU
        enc.device, enc.dtype, enc.vae = device.type, None, enc.vae.to(device)
    if shapes.sd21:
        from diffusers import AutoencoderKL

        with torch.device(device):
            enc.vae = AutoencoderKL(**SD21_VAE).requires_grad_(False).eval()
        enc.res = SD21_VAE["sample_size"]
    R, n = enc.res, shapes.vae_images
    img = torch.randint(0, 256, (R, R, 3), dtype=torch.uint8).numpy().tobytes()
    batch = {"kind": ["image"] * n, "vae_u8": [img] * n, "sha256": [f"{i:064x}" for i in range(n)]}
    enc(batch)  # warm-up: kernels, autotuning, allocator
    reset_peak_memory(device)
    t = statistics.median(timed(lambda: enc(batch), device, 0, 2))
    return {"cases": {f"{R} px, batch {enc.batch_size}, autocast {enc.dtype or 'off'}": {
        "images_per_s": round(n / t, 2), "images": n, "peak_memory_gib": peak_memory_gib(device)}}}


# ------------------------------------------------------------ 4: serving

def inference_model(shapes: Shapes, device: torch.device) -> DreamLLM:
    """The model as a serving replica holds it: bf16 on a GPU (fp32 on a CPU), eval mode."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return build_model(shapes, device).to(dtype).eval()


def serving_section(shapes: Shapes, device: torch.device) -> dict:
    """Chat and text-to-image through `dreamllm.generation`, at 1 and 16 requests.

    Chat: 16 requests one after another (one-at-a-time decoding) and as one `generate_batch` (the
    batched decode loop the Serve replica runs). Images: 16 prompts are one batched `text_to_image`
    call, as the replica's `@serve.batch` makes them. EOS is masked so every answer has the same length.
    """
    from dreamllm.generation import ImageSampling, Request, TextSampling, conversation_inputs, generate_batch, \
        text_to_image
    from dreamllm.sequence import Turn

    model = inference_model(shapes, device)
    eos, decoded = model.ids.eos, [0]

    def no_eos(generated, logits):
        decoded[0] += 1
        logits[eos] = float("-inf")
        return logits

    def request(i: int) -> Request:
        turn = Turn("user", (Text(f"Describe picture number {i} of a red circle on a blue background."),))
        ids, _ = conversation_inputs(model, [turn])
        return Request(ids, None, TextSampling(max_new_tokens=shapes.chat_tokens), no_eos)

    sampling = ImageSampling(num_inference_steps=shapes.image_steps, seed=0)
    generate_batch(model, [request(0)])
    text_to_image(model, ["warm-up"], sampling)
    cases = {}
    for c in shapes.concurrency:
        runs = {"one after another": lambda: [generate_batch(model, [request(i)]) for i in range(c)],
                "in one batch": lambda: generate_batch(model, [request(i) for i in range(c)])}
        for how, run in runs.items() if c > 1 else [("", runs["in one batch"])]:
            decoded[0] = 0
            reset_peak_memory(device)
            t = timed(run, device, 0, 1)[0]
            cases[f"chat, {c} request{'s ' + how if c > 1 else ''}"] = {
                "tokens_per_s": round(decoded[0] / t, 1), "tokens": decoded[0], "seconds_per_request": round(t / c, 3),
                "peak_memory_gib": peak_memory_gib(device)}
        reset_peak_memory(device)
        t = timed(lambda: text_to_image(model, [f"a shape number {i}" for i in range(c)], sampling), device, 0, 1)[0]
        cases[f"images, {c} prompt{'s in one batched call' if c > 1 else ''}"] = {
            "images_per_s": round(c / t, 3), "steps": shapes.image_steps, "peak_memory_gib": peak_memory_gib(device)}
    return {"cases": cases}


# ---------------------------------------------------------- 5: attention

SDPA_OPS = {  # aten op in a profile -> the kernel it names
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash (CPU)",
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_efficient_attention": "mem-efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_attention_math": "math",
}


def packed_positions(rows: int, L: int, device: torch.device) -> torch.Tensor:
    """Position ids of rows packed with two examples each (5/8 and 3/8 of the context), like stage II's."""
    a = L * 5 // 8
    return torch.cat([torch.arange(a), torch.arange(L - a)]).repeat(rows, 1).to(device)


def sdpa_in_use(llm, ids: torch.Tensor, pos: torch.Tensor) -> dict:
    """Which SDPA kernel the LLM's forward runs, read from the profiler's aten ops, and the mask it got."""
    from torch.profiler import ProfilerActivity, profile

    masks = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, *a, is_causal=False, **kw):
        masks.append("is_causal" if attn_mask is None and is_causal else
                     "none" if attn_mask is None else f"{attn_mask.dtype} mask {tuple(attn_mask.shape)}")
        return sdpa(q, k, v, attn_mask, *a, is_causal=is_causal, **kw)

    torch.nn.functional.scaled_dot_product_attention = recording  # transformers looks it up at each call
    try:
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
            llm.model(input_ids=ids, position_ids=pos, use_cache=False)
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
    ran = sorted({SDPA_OPS[e.key] for e in prof.key_averages() if e.key in SDPA_OPS})
    return {"kernel": ", ".join(ran) or "none found", "mask": masks[0] if masks else "no SDPA call"}


def sdpa_probes(llm, rows: int, L: int, device: torch.device, dtype: torch.dtype) -> dict:
    """Each CUDA SDPA kernel forced in turn at the LLM's attention shapes: its ms, or why it cannot run."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    c = llm.config
    heads, d = c.num_attention_heads, c.hidden_size // c.num_attention_heads
    q, k, v = (torch.randn(rows, heads, L, d, device=device, dtype=dtype) for _ in range(3))
    pos = packed_positions(rows, L, device)
    same_doc = (pos == 0).cumsum(-1)  # example index of each position
    block = (same_doc[:, :, None] == same_doc[:, None, :]) & torch.ones(L, L, dtype=torch.bool, device=device).tril()
    out = {}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                    SDPBackend.MATH):
        for layout, kw in (("causal", {"is_causal": True}), ("block mask", {"attn_mask": block[:, None]})):
            key = f"{backend.name.lower()}, {layout}"
            try:
                with sdpa_kernel(backend):
                    ms = 1e3 * statistics.median(timed(lambda: torch.nn.functional.scaled_dot_product_attention(
                        q, k, v, **kw), device, 2, 5))
                out[key] = round(ms, 3)
            except RuntimeError as e:
                out[key] = f"unavailable: {str(e).strip().splitlines()[0][:120]}"
    return out


def compile_layer(llm, rows: int, L: int, device: torch.device, dtype: torch.dtype, backend: str) -> dict:
    """One LLM decoder layer's forward, eager vs torch.compile (the first compiled call is the compile)."""
    layer = llm.model.layers[0]
    h = torch.randn(rows, L, llm.config.hidden_size, device=device, dtype=dtype)
    pos = torch.arange(L, device=device).repeat(rows, 1)
    pe = llm.model.rotary_emb(h, pos)
    compiled = torch.compile(layer, backend=backend)
    with torch.no_grad():
        eager = statistics.median(timed(lambda: layer(h, position_embeddings=pe), device, 2, 5))
        t0 = time.perf_counter()
        ref, got = layer(h, position_embeddings=pe), compiled(h, position_embeddings=pe)
        sync(device)
        first = time.perf_counter() - t0
        fast = statistics.median(timed(lambda: compiled(h, position_embeddings=pe), device, 2, 5))
    return {"backend": backend, "compile_s": round(first, 1), "eager_ms": round(eager * 1e3, 3),
            "compiled_ms": round(fast * 1e3, 3), "speedup": round(eager / fast, 3),
            "max_abs_diff": float((ref.float() - got.float()).abs().max())}


def attention_section(shapes: Shapes, device: torch.device, compile_backend: str) -> dict:
    """The LLM alone (attention is all in it), in the serving dtype, at the stage II row shapes."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = shapes.model
    with torch.device(device):
        llm = components.build_llm(cfg.llm, VICUNA_VOCAB if shapes.sd21 else cfg.tokenizer.vocab_size)
    llm = llm.to(dtype).eval()
    rows, L = shapes.rows, cfg.llm.context_length
    ids = torch.randint(3, 500, (rows, L), device=device)
    one_doc = torch.arange(L, device=device).repeat(rows, 1)
    cases = {
        "one document per row": guarded(sdpa_in_use, llm, ids, one_doc),
        "packed rows (positions restart per example)": guarded(sdpa_in_use, llm, ids,
                                                               packed_positions(rows, L, device)),
        "kernels forced one by one (ms)": guarded(sdpa_probes, llm, rows, L, device, dtype) if device.type == "cuda"
        else {"skipped": "skipped: no CUDA (the flash, mem-efficient and cudnn kernels are CUDA's)"},
        "torch.compile of one LLM layer": guarded(compile_layer, llm, rows, L, device, dtype, compile_backend),
    }
    return {"cases": cases, "dtype": str(dtype).replace("torch.", "")}


# ------------------------------------------------------------------ main

def to_markdown(results: dict) -> str:
    m = results["meta"]
    lines = [f"# bench/gpu.py on {m['device_name']}", "",
             f"{m['shapes']}; {m['dtype']}; torch {m['torch']}, deepspeed {m['deepspeed']}; "
             f"matmul {m['matmul_tflops']} TFLOP/s, datasheet peak {m['datasheet_tflops'] or 'unknown'} TFLOP/s; "
             f"{m['seconds']} s in all", "",
             "| section | case | figure | value |", "|---|---|---|---|"]
    for name, sec in results["sections"].items():
        if "error" in sec:
            lines.append(f"| {name} | | error | {sec['error']} |")
        for case, figs in sec.get("cases", {}).items():
            for fig, val in figs.items():
                if fig not in ("traceback", "seconds"):
                    lines.append(f"| {name} | {case} | {fig} | {str(val).replace('|', '/')} |")
    if "flops_per_step" in results["sections"].get("stage2", {}):
        f = results["sections"]["stage2"]["flops_per_step"]
        lines += ["", "Stage II FLOPs per step: " + ", ".join(f"{k} {v / 1e12:.3g} T" for k, v in f.items()),
                  results["sections"]["stage2"]["flops_note"] + "."]
    return "\n".join(lines) + "\n"


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="Writes <out>/gpu.json and <out>/gpu.md.")
    ap.add_argument("--out", default="outputs/bench/gpu", help="folder of gpu.json and gpu.md")
    ap.add_argument("--tiny", action="store_true", help="debug-flavor shapes, few steps: the CPU smoke run")
    ap.add_argument("--device", choices=("cuda", "cpu"), help="default: cpu with --tiny, else cuda")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--llm-layers", type=int, default=8, help="LLM layers kept of the 7b's 32 (one GPU)")
    ap.add_argument("--rows", type=int, default=2, help="packed rows of 2048 tokens per micro-batch")
    ap.add_argument("--images-per-row", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5, help="timed training steps per case")
    ap.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, for MFU (default: a table)")
    ap.add_argument("--compile-backend", help="torch.compile backend (default: inductor on CUDA; aot_eager on CPU, "
                                               "where inductor's C++ build would take most of the run)")
    args = ap.parse_args(argv)
    args.sections = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        ap.error(f"unknown section(s) {', '.join(unknown)}; valid: {', '.join(SECTIONS)}")
    args.device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    if args.device.type == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA device here: run `python bench/gpu.py --tiny` for the CPU smoke run")
    args.compile_backend = args.compile_backend or ("inductor" if args.device.type == "cuda" else "aot_eager")
    return args


def describe(args, shapes: Shapes, dtype: torch.dtype, peaks: dict) -> dict:
    c, dev = shapes.model, args.device
    return {
        "device": dev.type, "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "dtype": str(dtype).replace("torch.", ""), "torch": torch.__version__, "deepspeed": version("deepspeed"),
        "shapes": (f"{'tiny (debug flavor)' if args.tiny else '7b'}: LLM {c.llm.num_layers} layers x "
                   f"{c.llm.hidden_size}, context {c.llm.context_length}, {c.num_dream_queries} queries, CLIP "
                   f"{c.vision.image_size} px, {'SD 2.1-base' if shapes.sd21 else 'debug'} decoder at "
                   f"{c.diffusion.resolution} px, {shapes.rows} rows x {shapes.images_per_row} images"),
        "datasheet_tflops": peaks["datasheet"] / 1e12 if peaks["datasheet"] else None,
        "matmul_tflops": round(peaks["matmul"] / 1e12, 3)}


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "gpu.md").write_text(to_markdown(results))


def main(argv=None) -> int:
    args = parse_args(argv)
    device, out, t0 = args.device, Path(args.out), time.perf_counter()
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed would pick a GPU if the machine has one
    torch.manual_seed(0)
    shapes = make_shapes(args)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peaks = {"datasheet": datasheet_peak(device, args.peak_tflops),
             "matmul": matmul_flops(device, dtype, 8192 if device.type == "cuda" else 256)}
    results: dict = {"meta": describe(args, shapes, dtype, peaks), "sections": {}}
    print(f"[gpu] {results['meta']['device_name']}: {', '.join(args.sections)}", flush=True)

    # (sections a run fills, the run): stage2 and latents share their engines.
    runs = [(("stage2", "latents"), lambda: train_sections(shapes, device, peaks)),
            (("vae",), lambda: {"vae": vae_section(shapes, device)}),
            (("serving",), lambda: {"serving": serving_section(shapes, device)}),
            (("attention",), lambda: {"attention": attention_section(shapes, device, args.compile_backend)})]
    for names, run in runs:
        wanted = [n for n in names if n in args.sections]
        if not wanted:
            continue
        print(f"[gpu] {', '.join(wanted)}", flush=True)
        got = guarded(run)  # {name: section, "seconds": s}, or {"error": ...} for all of them
        for n in wanted:
            results["sections"][n] = {**got.get(n, got), "seconds": got["seconds"]}
        free_memory()
        results["meta"]["seconds"] = round(time.perf_counter() - t0, 1)
        write(results, out)  # after every section: a run cut short still leaves what it measured

    failed = [n for n, s in results["sections"].items() if "error" in s or any(
        isinstance(v, dict) and "error" in v for v in s.get("cases", {}).values())]
    print(to_markdown(results))
    print(f"[gpu] wrote {out / 'gpu.json'} and {out / 'gpu.md'}"
          + (f"; errors in {', '.join(failed)} (see the JSON)" if failed else ""), flush=True)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
