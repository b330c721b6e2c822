"""The model deployment: one DreamLLM per replica, with dynamically batched image and chat generation.

Owns: resolving the model reference to a local checkpoint (registry references
and object storage go through `dreamllm_platform.checkpoints`), loading it once per replica on the
replica's device, and the entry points the ingress calls: `create_images`
(`@serve.batch`; requests with the same sampling settings run as one batched
`dreamllm.generation.text_to_image` call), `chat` (`@serve.batch`; answers with
text and created images) and `chat_stream` (one request, text deltas as they
are decoded). It also defines the plain job/result records that travel
between the ingress and this deployment.

Per-request failures come back as `Failure` values instead of exceptions: in a
batch, one raised exception would fail every request that shared the call.
`dreamllm` and torch are imported inside the replica only, so the CPU ingress
(which imports this module for the records) stays light.
"""
from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL.Image import Image
from ray import serve

from dreamllm_platform.sampling import DEFAULTS, image_sampling, text_sampling
from dreamllm_platform.tracking import TrackingConfig

from .config import BatchingConfig, ModelConfig

logger = logging.getLogger("ray.serve")


# ------------------------------------------------------------------- records

@dataclass
class ImageJob:
    """One image-generation request: `n` images of `prompt`."""

    prompt: str
    n: int
    steps: int
    guidance_scale: float
    scheduler: str
    negative_prompt: str = ""
    seed: int | None = None


@dataclass
class ChatJob:
    """One chat request. `turns` are (role, [("text", str) | ("image", key)]); `images` maps keys to pictures."""

    turns: list[tuple[str, list[tuple[str, str]]]]
    images: dict[str, Image] = field(default_factory=dict)
    max_tokens: int = DEFAULTS.max_tokens
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    max_images: int = 0
    image_steps: int = DEFAULTS.steps
    image_guidance_scale: float = DEFAULTS.guidance_scale
    scheduler: str = DEFAULTS.scheduler


@dataclass
class ChatResult:
    """The answer in order (text runs and created images) and token counts."""

    parts: list[str | Image]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


@dataclass
class Failure:
    """A request the model could not serve: `status` 400 for the caller's input, 500 for ours."""

    message: str
    status: int


def _images_in(jobs: list[ImageJob]) -> int:
    # Batch size counts images, not requests: n=4 costs as much as four n=1 requests.
    return sum(j.n for j in jobs)


def resolve_checkpoint(cfg: ModelConfig, tracking: TrackingConfig) -> Path:
    """A local directory holding the checkpoint `cfg.uri` names (registry references are looked up,
    remote checkpoints downloaded once per node), through `dreamllm_platform.checkpoints`."""
    from dreamllm_platform.checkpoints import local_checkpoint

    # Replicas on one node share the download cache; storage.download_dir makes that safe.
    return local_checkpoint(cfg.uri, tracking, cfg.cache_dir)


# ---------------------------------------------------------------- deployment

@serve.deployment(name="DreamLLMModel")
class DreamLLMModel:
    """Holds the model; the ingress reaches it through a DeploymentHandle."""

    def __init__(self, cfg: ModelConfig, batching: BatchingConfig, tracking: TrackingConfig):
        import torch
        from dreamllm.checkpoint import load_checkpoint

        self.cfg = cfg
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(cfg.dtype)
        if dtype is None:  # auto
            dtype = torch.float32 if device == "cpu" else (
                torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
        path = resolve_checkpoint(cfg, tracking)
        self.model = load_checkpoint(path, device=device, dtype=dtype)
        self.device = device
        logger.info("loaded DreamLLM %s from %s on %s (%s)", self.model.cfg.flavor, cfg.uri, device, dtype)
        # One model call at a time: chat and image batches would otherwise share the device (and, on CPU,
        # the cores) and each take longer; the event loop stays free to queue the next batch meanwhile.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dreamllm")
        self.create_images.set_max_batch_size(batching.image_max_batch_size)
        self.create_images.set_batch_wait_timeout_s(batching.image_batch_wait_s)
        self.chat.set_max_batch_size(batching.text_max_batch_size)
        self.chat.set_batch_wait_timeout_s(batching.text_batch_wait_s)

    def info(self) -> dict:
        """What the ingress needs to validate requests and describe the model."""
        c = self.model.cfg
        return {"name": self.cfg.name, "flavor": c.flavor, "resolution": c.diffusion.resolution,
                "context_length": c.llm.context_length, "stage": self.model.stage, "device": self.device}

    def check_health(self) -> None:
        """Called by Serve periodically; raising restarts the replica."""
        if self.model is None:
            raise RuntimeError("model not loaded")

    async def _run(self, fn, jobs):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, jobs)

    # -------------------------------------------------------------- images
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02, batch_size_fn=_images_in)
    async def create_images(self, jobs: list[ImageJob]) -> list[list[Image] | Failure]:
        return await self._run(self._create_images, jobs)

    def _create_images(self, jobs: list[ImageJob]) -> list[list[Image] | Failure]:
        from dreamllm.generation import text_to_image

        # One text_to_image call per group of requests that share sampling settings. A seeded request
        # is a group of its own: text_to_image seeds image i with seed + i, so sharing a call would
        # change its images and break reproducibility.
        groups: dict[tuple, list[int]] = {}
        for i, j in enumerate(jobs):
            key = (j.steps, j.guidance_scale, j.scheduler, j.negative_prompt, j.seed, i if j.seed is not None else -1)
            groups.setdefault(key, []).append(i)
        results: list[list[Image] | Failure] = [Failure("not run", 500)] * len(jobs)
        for (steps, guidance, scheduler, negative, seed, _), idx in groups.items():
            prompts = [jobs[i].prompt for i in idx for _ in range(jobs[i].n)]
            sampling = image_sampling(steps, guidance, scheduler, negative, seed)
            try:
                images = text_to_image(self.model, prompts, sampling)
            except ValueError as e:  # the model's own checks on user input
                for i in idx:
                    results[i] = Failure(str(e), 400)
                continue
            except Exception:
                logger.exception("image generation failed for %d request(s)", len(idx))
                for i in idx:
                    results[i] = Failure("image generation failed inside the model replica", 500)
                continue
            at = 0
            for i in idx:
                results[i] = images[at:at + jobs[i].n]
                at += jobs[i].n
        return results

    # ---------------------------------------------------------------- chat
    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.01)
    async def chat(self, jobs: list[ChatJob]) -> list[ChatResult | Failure]:
        return await self._run(self._chat, jobs)

    def _chat(self, jobs: list[ChatJob], emit=None) -> list[ChatResult | Failure]:
        # dreamllm.generation decodes one sequence at a time, so a text batch is answered request by
        # request inside one executor call; batched decoding needs a batched `generate` in dreamllm.
        out: list[ChatResult | Failure] = []
        for job in jobs:
            try:
                out.append(self._chat_one(job, emit))
            except ValueError as e:  # e.g. the conversation does not fit the context
                out.append(Failure(str(e), 400))
            except Exception:
                logger.exception("chat generation failed")
                out.append(Failure("chat generation failed inside the model replica", 500))
        return out

    async def chat_stream(self, job: ChatJob):
        """Streamed chat (not batched): yields text deltas (str) as tokens are decoded, then the final
        `ChatResult` or `Failure`. Call through `handle.options(stream=True)`."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        def emit(delta: str) -> None:  # called on the executor thread
            loop.call_soon_threadsafe(queue.put_nowait, delta)

        work = loop.run_in_executor(self._executor, lambda: self._chat([job], emit)[0])
        # Deltas and completion both arrive through call_soon_threadsafe, so `done` comes after every delta.
        work.add_done_callback(lambda _: queue.put_nowait(done))
        while (item := await queue.get()) is not done:
            yield item
        yield work.result()

    def _chat_one(self, job: ChatJob, emit=None) -> ChatResult:
        from dreamllm.generation import chat
        from dreamllm.sequence import Image as ImageItem, SequenceBuilder, Text, Turn

        turns = [Turn(role, tuple(Text(v) if kind == "text" else ImageItem(v) for kind, v in items))
                 for role, items in job.turns]
        sampling = text_sampling(job.max_tokens, job.temperature, job.top_p, job.max_images, job.seed,
                                 image_sampling(job.image_steps, job.image_guidance_scale, job.scheduler))
        steps = [0]
        streamer = _TextStreamer(self.model.tokenizer, self.model.ids.dream_start, emit) if emit else None

        def observe(generated: list[int], logits):
            # The logits hook runs before each sampled token: after the last call, len(generated) + 1
            # tokens were sampled; `generated` also feeds the text streamer.
            steps[0] = len(generated) + 1
            if streamer is not None:
                streamer(generated)
            return logits

        parts = chat(self.model, turns, job.images, sampling, logits_processor=observe)
        prompt = SequenceBuilder(self.model.tokenizer, self.model.cfg).conversation(turns, add_generation_prompt=True)
        finish = "length" if steps[0] >= job.max_tokens else "stop"
        return ChatResult(parts, len(prompt), steps[0], finish)


class _TextStreamer:
    """Text deltas of the answer's first text run, read from the token ids the logits hook sees.

    `dreamllm.generation.chat` hands back created images only at the end, so live streaming stops at
    the first `<dream_start>` (and at any decode that rewrites already-sent text); the ingress sends the
    rest of the answer from the final result. Deltas are stripped like the final parts are, and a
    trailing partial UTF-8 character is held back, so the streamed text is a prefix of the answer.
    """

    def __init__(self, tokenizer, dream_start: int, emit):
        self.tok, self.dream_start, self.emit = tokenizer, dream_start, emit
        self.ids: list[int] = []
        self.seen = 0
        self.sent = ""
        self.live = True

    def __call__(self, generated: list[int]) -> None:
        if not self.live:
            return
        for t in generated[self.seen:]:
            if t == self.dream_start:
                self.live = False
                return
            self.ids.append(t)
        self.seen = len(generated)
        text = self.tok.decode(self.ids, skip_special_tokens=True).strip()
        if text.endswith("\ufffd"):
            return
        if not text.startswith(self.sent):
            self.live = False
            return
        if len(text) > len(self.sent):
            self.emit(text[len(self.sent):])
            self.sent = text
