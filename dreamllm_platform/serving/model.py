"""The model deployment: one DreamLLM per replica, batched image creation and continuously batched chat.

Owns: resolving the model reference to a local checkpoint (registry references
and object storage go through `dreamllm_platform.checkpoints`), loading it once per replica on the
replica's device, and the entry points the ingress calls: `create_images`
(`@serve.batch`; requests with the same sampling settings run as one batched
`dreamllm.generation.text_to_image` call), `chat` and `chat_stream` (answers
with text and created images, streamed as decoded): every chat request joins
the replica's one decode loop (`dreamllm.generation.BatchDecoder`), which
admits requests between decode steps up to `batching.text_max_rows` rows and
`batching.text_token_budget` reserved tokens, drops a row whose caller went
away, and answers 503 when `batching.text_max_waiting` requests already wait. It also defines the plain job/result records that travel
between the ingress and this deployment.

Per-request failures come back as `Failure` values instead of exceptions: in a
batch, one raised exception would fail every request that shared the call.
`dreamllm` and torch are imported inside the replica only, so the CPU ingress
(which imports this module for the records) stays light.
"""
from __future__ import annotations

import asyncio
import logging
from collections import deque
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
    remote checkpoints downloaded once per node and content: the cache keys on a registered version's
    digest or the objects' ETags, never the path alone), through `dreamllm_platform.checkpoints`."""
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
        self.batching = batching
        self._waiting: deque[_Ticket] = deque()
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self._cancelled = self._refused = 0  # rows stopped because their caller went away; requests refused (503)
        self._reset_decoder()

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
    # Continuous batching: one decode loop per replica (`_decode_loop`) runs `BatchDecoder` steps on the
    # model thread; requests join between steps while rows and the token budget allow, and leave as soon
    # as they finish or their caller goes away (Serve cancels the request when the client disconnects or
    # the ingress times out: the `finally` below marks the row, the next step drops it).

    async def chat(self, job: ChatJob) -> ChatResult | Failure:
        """One chat answer (text and created images) decoded in the replica's shared batch."""
        ticket = self._submit(job, stream=False)
        if isinstance(ticket, Failure):
            return ticket
        try:
            return await ticket.events.get()
        finally:
            ticket.cancelled = True

    async def chat_stream(self, job: ChatJob):
        """Streamed chat: yields the answer as it is made (str text deltas and created images, see
        `_Streamer`), then the final `ChatResult` or `Failure`. Call through `handle.options(stream=True)`."""
        ticket = self._submit(job, stream=True)
        if isinstance(ticket, Failure):
            yield ticket
            return
        try:
            while not isinstance(item := await ticket.events.get(), (ChatResult, Failure)):
                # Text deltas that piled up while the caller was busy leave as one item: each item costs a
                # round trip through Serve, and under load that, not decoding, would bound the stream.
                queue = ticket.events
                while isinstance(item, str) and not queue.empty() and isinstance(queue._queue[0], str):
                    item += queue.get_nowait()
                yield item
            yield item
        finally:
            ticket.cancelled = True

    def stats(self) -> dict:
        """The decode loop's load: rows decoding, requests waiting for a row, tokens reserved."""
        return {"rows": len(self._running), "waiting": sum(not t.cancelled for t in self._waiting),
                "reserved_tokens": self._reserved, "cancelled": self._cancelled, "refused": self._refused}

    def _submit(self, job: ChatJob, stream: bool) -> "_Ticket | Failure":
        b = self.batching
        # Requests in the loop: the rows decoding and those waiting (some of which the next step admits).
        held = len(self._running) + sum(not t.cancelled for t in self._waiting)
        if held >= b.text_max_rows + b.text_max_waiting:
            self._refused += 1
            return Failure(f"The server is at capacity ({b.text_max_rows} answers decoding, "
                           f"{b.text_max_waiting} waiting); retry later.", 503)
        ticket = _Ticket(job, stream)
        self._waiting.append(ticket)
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._decode_loop())
        self._wake.set()
        return ticket

    async def _decode_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._running and not self._waiting:
                self._wake.clear()
                await self._wake.wait()
            try:
                events = await loop.run_in_executor(self._executor, self._tick)
            except Exception:  # a bug or a device error: fail the rows in flight, keep the replica serving
                logger.exception("chat decoding failed for %d row(s)", len(self._running))
                events = [(t, Failure("chat generation failed inside the model replica", 500)) for t in self._running]
                self._reset_decoder()
            for ticket, item in events:
                ticket.events.put_nowait(item)

    def _reset_decoder(self) -> None:
        from dreamllm.generation import BatchDecoder

        self._decoder, self._running, self._reserved = BatchDecoder(self.model), [], 0

    def _tick(self) -> list[tuple["_Ticket", str | Image | ChatResult | Failure]]:
        """On the model thread: admit waiting requests, run one decode step, collect each row's news."""
        b, out = self.batching, []
        while self._waiting and len(self._running) < b.text_max_rows:
            t = self._waiting[0]
            if t.cancelled:
                self._waiting.popleft()
                continue
            try:
                if t.inputs is None:
                    t.inputs = _conversation_inputs(self.model, t.job)
                # A request reserves its prompt and its whole answer; one that needs more than the budget
                # alone still runs when nothing else does, so nothing waits forever.
                cost = len(t.inputs[0]) + t.job.max_tokens
                if self._running and self._reserved + cost > b.text_token_budget:
                    break
                self._waiting.popleft()
                t.row = self._decoder.add(*t.inputs, _text_sampling(t.job))
            except ValueError as e:  # e.g. the conversation does not fit the context
                self._waiting.popleft()
                out.append((t, Failure(str(e), 400)))
                continue
            t.cost, self._reserved = cost, self._reserved + cost
            if t.stream:
                t.streamer = _Streamer()
            self._running.append(t)
        for t in self._running:
            if t.cancelled:
                t.row.cancel()
        if self._decoder.active:
            self._decoder.step()
        running = []
        for t in self._running:
            if t.streamer is not None:
                out += [(t, item) for item in t.streamer(t.row)]
            if not t.row.finished:
                running.append(t)
                continue
            self._reserved -= t.cost
            if t.row.finish_reason == "cancelled":  # the caller is gone: nothing to send
                self._cancelled += 1
            else:
                g = t.row.result()
                out.append((t, ChatResult(g.parts, g.prompt_tokens, g.completion_tokens, g.finish_reason)))
        self._running = running
        return out


class _Ticket:
    """A chat request in the decode loop: its job, its prompt, its row once admitted, and its events
    (str deltas, then the ChatResult or Failure) for the awaiting caller."""

    def __init__(self, job: ChatJob, stream: bool):
        self.job, self.stream = job, stream
        self.events: asyncio.Queue = asyncio.Queue()
        self.inputs = None
        self.row = None
        self.cost = 0
        self.cancelled = False
        self.streamer: _Streamer | None = None


def _conversation_inputs(model, job: ChatJob):
    from dreamllm.generation import conversation_inputs
    from dreamllm.sequence import Image as ImageItem, Text, Turn

    turns = [Turn(role, tuple(Text(v) if kind == "text" else ImageItem(v) for kind, v in items))
             for role, items in job.turns]
    return conversation_inputs(model, turns, job.images)


def _text_sampling(job: ChatJob):
    return text_sampling(job.max_tokens, job.temperature, job.top_p, job.max_images, job.seed,
                         image_sampling(job.image_steps, job.image_guidance_scale, job.scheduler))


class _Streamer:
    """What a row adds to its answer after each decode step, in the order of the final answer: str deltas
    of the content text (the ingress joins pieces with blank lines, as `ChatResult` parts are joined) and
    each created image when it is made, so text decoded after an image streams live too.

    Text is stripped like the final parts are, and a trailing partial UTF-8 character is held back, so
    what is streamed (images rendered as the ingress renders them) is always a prefix of the answer. A
    decode that rewrites already-sent text stops live streaming; the ingress sends the rest from the
    final result.
    """

    SEPARATOR = "\n\n"  # between content pieces (text runs, images): app._content_pieces' join

    def __init__(self):
        self.parts_seen = 0  # row.parts already streamed
        self.pieces = 0      # content pieces started
        self.run = ""        # the open text run's text sent so far
        self.live = True

    def __call__(self, row) -> list:
        out: list = []
        while self.live and self.parts_seen < len(row.parts):
            part = row.parts[self.parts_seen]
            self.parts_seen += 1
            if isinstance(part, str):
                self._text(part.strip(), out)
            else:
                out += [self.SEPARATOR, part] if self.pieces else [part]
                self.pieces += 1
            self.run = ""  # a finished part closes the run
        if self.live and not row.dreaming:
            text = row.text().strip()
            if not text.endswith("\ufffd"):
                self._text(text, out)
        return out

    def _text(self, text: str, out: list) -> None:
        if not text:
            return
        if not text.startswith(self.run):
            self.live = False
            return
        delta = text[len(self.run):]
        if delta and not self.run:  # a new piece
            delta = (self.SEPARATOR if self.pieces else "") + delta
            self.pieces += 1
        if delta:
            out.append(delta)
        self.run = text
