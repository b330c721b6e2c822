"""Sampling from DreamLLM: chat/VQA, text-to-image, and free-form interleaved documents.

Owns: the one decoding loop (`BatchDecoder`: a batched KV cache over
conversations of any lengths that join and leave between steps, per-row
temperature/top-p, seeds and token limits) that serves chat and interleaved
generation alike: when a row samples <dream_start>, the dream queries are run,
the image is created by the frozen UNet under classifier-free guidance (the
images of several rows together), and it is fed back as an image-input block
while the other rows go on. `generate` is that loop for one row. Text-to-image uses diffusers' Stable Diffusion
pipeline with DreamLLM's conditions in place of the text encoder's.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from diffusers import StableDiffusionPipeline
from PIL import Image as PILImage

from . import components
from .images import clip_pixels
from .model import DreamLLM
from .sequence import SequenceBuilder, Text, Turn

Part = str | PILImage.Image
LogitsProcessor = Callable[[list[int], torch.Tensor], torch.Tensor]


@dataclass
class ImageSampling:
    """How images are created."""

    guidance_scale: float = 7.5
    """Classifier-free guidance weight (1 disables guidance)."""
    num_inference_steps: int = 25
    """Denoising steps."""
    scheduler: str = "dpm++"
    """Sampler: 'ddim' or 'dpm++' (DPM-Solver++)."""
    negative_prompt: str = ""
    """Text whose condition is the unconditional branch of guidance ('' = the trained null condition)."""
    seed: int | None = None
    """Seed of the initial noise; None draws one."""


@dataclass
class TextSampling:
    """How text is decoded."""

    max_new_tokens: int = 128
    """Limit on generated tokens (image blocks fed back do not count)."""
    temperature: float = 0.0
    """0 decodes greedily; otherwise softmax temperature."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    max_images: int = 0
    """Images the model may create in its answer (0 forbids <dream_start>)."""
    seed: int | None = None
    """Seed of token sampling."""
    image: ImageSampling = field(default_factory=ImageSampling)
    """Settings of images created along the way."""


def _pipeline(model: DreamLLM, scheduler: str) -> StableDiffusionPipeline:
    # The text encoder is replaced by DreamLLM's conditions (prompt_embeds).
    # A fresh (cheap) pipeline per call: schedulers carry per-run state.
    pipe = StableDiffusionPipeline(
        vae=model.vae, text_encoder=None, tokenizer=None, unet=model.unet,
        scheduler=components.build_sampler(model.noise_scheduler, scheduler), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def images_from_conditions(model: DreamLLM, cond_BQD: torch.Tensor, sampling: ImageSampling,
                           seeds: Sequence[int] | None = None) -> list[PILImage.Image]:
    """Create one image per condition with guidance against `sampling.negative_prompt`.

    Image i's noise is seeded with `seeds[i]`, or with `sampling.seed + i` (a drawn seed when None).
    """
    B = cond_BQD.shape[0]
    neg = model.prompt_condition([sampling.negative_prompt]).expand(B, -1, -1)
    if seeds is None:
        seed = sampling.seed if sampling.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
        seeds = [seed + i for i in range(B)]
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    res = model.cfg.diffusion.resolution
    dtype = next(model.unet.parameters()).dtype
    out = _pipeline(model, sampling.scheduler)(
        prompt_embeds=cond_BQD.to(dtype), negative_prompt_embeds=neg.to(dtype), height=res, width=res,
        num_inference_steps=sampling.num_inference_steps, guidance_scale=sampling.guidance_scale,
        generator=generators, output_type="pil")
    return out.images


@torch.no_grad()
def text_to_image(model: DreamLLM, prompts: Sequence[str], sampling: ImageSampling | None = None) -> list[PILImage.Image]:
    """One image per prompt: the LLM reads `<s> prompt <dream_start>` + queries; the UNet draws from that."""
    sampling = sampling or ImageSampling()
    if not prompts:
        return []
    return images_from_conditions(model, model.prompt_condition(list(prompts)), sampling)


def _sample(logits_V: torch.Tensor, s: TextSampling, gen: torch.Generator) -> int:
    if s.temperature <= 0:
        return int(logits_V.argmax())
    probs = torch.softmax(logits_V.float() / s.temperature, -1)
    if s.top_p < 1.0:
        sorted_p, idx = probs.sort(descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < s.top_p
        probs = torch.zeros_like(probs).scatter(0, idx[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))


@dataclass
class Generation:
    """One row's answer: the ordered text and created images, and its token counts (for `usage`)."""

    parts: list[Part]
    prompt_tokens: int
    """Tokens of the prompt, image blocks included."""
    completion_tokens: int
    """Sampled tokens (<dream_start> and the final <eos> included; image blocks fed back excluded)."""
    finish_reason: str
    """'stop' (end of sequence), 'length' (max_new_tokens or the context) or 'cancelled'."""


class Row:
    """One conversation in a `BatchDecoder`: its settings, its progress and (when finished) its result."""

    def __init__(self, embeds_TH: torch.Tensor, prompt_tokens: int, sampling: TextSampling,
                 logits_processor: LogitsProcessor | None, gen: torch.Generator, tokenizer):
        self._tokenizer = tokenizer
        self.sampling, self.logits_processor, self.gen = sampling, logits_processor, gen
        self.prompt_tokens = prompt_tokens
        self.pending = embeds_TH          # embeddings to feed at the next step
        self.dreaming = False             # `pending` is <dream_start> + queries: an image follows, no token
        self.length = 0                   # positions fed so far (this row's next position id)
        self.generated: list[int] = []    # every sampled token
        self.text_ids: list[int] = []     # text tokens since the last image
        self.parts: list[Part] = []
        self.images_made = 0
        self.finish_reason: str | None = None
        self.hidden: torch.Tensor | None = None  # (T, H) states of the last fed chunk

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        """Stop this row; it leaves the batch at the next step (safe to call from another thread)."""
        if self.finish_reason is None:
            self.finish_reason = "cancelled"

    def text(self) -> str:
        """The text decoded since the last created image (what a streamer shows live)."""
        return self._tokenizer.decode(self.text_ids, skip_special_tokens=True)

    def result(self) -> Generation:
        parts = self.parts + ([self._tokenizer.decode(self.text_ids, skip_special_tokens=True)] if self.text_ids else [])
        parts = [p.strip() if isinstance(p, str) else p for p in parts if not (isinstance(p, str) and not p.strip())]
        return Generation(parts, self.prompt_tokens, len(self.generated), self.finish_reason or "length")


def _pad_keys(t: torch.Tensor, left: int) -> torch.Tensor:
    # (B, heads, S, d): `left` masked (zero) positions in front.
    return torch.nn.functional.pad(t, (0, 0, left, 0)) if left else t


class BatchDecoder:
    """One decoding loop over many conversations: rows join (`add`) and leave between steps.

    All rows share one KV cache (B, heads, S, d) with a validity mask (B, S). A
    row's positions are its own (position ids count only its tokens), so the
    cache may hold holes: a row that feeds a block (dream queries, a created
    image) while the others feed one token leaves the others masked columns.
    New rows are prefilled together in a forward of their own and merged in
    (the shorter cache is padded on the left), so a join never makes the other
    rows recompute. Columns no row uses are dropped as rows leave. Greedy rows
    produce what decoding them alone produces (a test checks it, image inputs
    and created images included).
    """

    def __init__(self, model: DreamLLM):
        self.model = model
        self.decoder = model.llm.get_decoder()
        self.rows: list[Row] = []       # cache row order
        self._joining: list[Row] = []
        self.cache = None
        self.mask: torch.Tensor | None = None  # (B, S) bool
        ids = model.ids
        self._never = torch.tensor([ids.im_start, ids.im_patch, ids.im_end, ids.dream_end, ids.pad])
        self._image_cost = model.cfg.num_dream_queries + 2 + model.cfg.vision.num_tokens + 2

    @property
    def active(self) -> int:
        """Rows in the batch or waiting to join."""
        return len(self.rows) + len(self._joining)

    @torch.no_grad()
    def add(self, input_ids: Sequence[int], pixel_values: torch.Tensor | None = None,
            sampling: TextSampling | None = None, logits_processor: LogitsProcessor | None = None) -> Row:
        """Queue a conversation (with its image blocks' `pixel_values`); it is prefilled at the next `step`.

        Raises ValueError for a prompt that does not fit the context or whose images do not match.
        """
        s = sampling or TextSampling()
        max_len = self.model.cfg.llm.context_length
        if len(input_ids) >= max_len:
            raise ValueError(f"the prompt has {len(input_ids)} tokens; the context holds {max_len}")
        with _eval(self.model):
            embeds = self.model.embed(torch.tensor([list(input_ids)], device=self.model.device), pixel_values)[0]
        gen = torch.Generator("cpu").manual_seed(s.seed if s.seed is not None else int(torch.seed() % 2**31))
        row = Row(embeds, len(input_ids), s, logits_processor, gen, self.model.tokenizer)
        self._joining.append(row)
        return row

    @torch.no_grad()
    def step(self) -> list[Row]:
        """One forward pass for every row (new rows: their prefill); returns the rows that finished."""
        with _eval(self.model):
            self._drop([r for r in self.rows + self._joining if r.finished])
            if self.rows:
                self.cache, self.mask = self._forward(self.rows, self.cache, self.mask)
            if self._joining:
                joining, self._joining = self._joining, []
                cache, mask = self._forward(joining, None, None)
                self._merge(joining, cache, mask)
            self._advance(self.rows)
            done = [r for r in self.rows if r.finished]
            self._drop(done)
        return done

    def _forward(self, rows: list[Row], cache, mask):
        """Feed each row's pending embeddings (right-padded to the longest); keep each row's states."""
        T = max(r.pending.shape[0] for r in rows)
        H = rows[0].pending.shape[1]
        emb = rows[0].pending.new_zeros(len(rows), T, H)
        pos = torch.zeros(len(rows), T, dtype=torch.long, device=emb.device)
        new = torch.zeros(len(rows), T, dtype=torch.bool, device=emb.device)
        for i, r in enumerate(rows):
            n = r.pending.shape[0]
            emb[i, :n] = r.pending
            pos[i] = torch.arange(r.length, r.length + T)
            new[i, :n] = True
        full = new if mask is None else torch.cat([mask, new], 1)
        out = self.decoder(inputs_embeds=emb, attention_mask=full.long(), position_ids=pos,
                           past_key_values=cache, use_cache=True)
        for i, r in enumerate(rows):
            n = r.pending.shape[0]
            r.hidden, r.length = out.last_hidden_state[i, :n], r.length + n
        return out.past_key_values, full

    def _merge(self, rows: list[Row], cache, mask: torch.Tensor) -> None:
        if self.cache is None:
            self.rows, self.cache, self.mask = rows, cache, mask
            return
        S, Sn = self.mask.shape[1], mask.shape[1]
        S_max = max(S, Sn)
        for old, add in zip(self.cache.layers, cache.layers):
            old.keys = torch.cat([_pad_keys(old.keys, S_max - S), _pad_keys(add.keys, S_max - Sn)], 0)
            old.values = torch.cat([_pad_keys(old.values, S_max - S), _pad_keys(add.values, S_max - Sn)], 0)
        pad = lambda m, n: torch.cat([m.new_zeros(m.shape[0], n), m], 1)  # noqa: E731
        self.mask = torch.cat([pad(self.mask, S_max - S), pad(mask, S_max - Sn)], 0)
        self.rows = self.rows + rows

    def _drop(self, leaving: list[Row]) -> None:
        """Remove finished rows from the batch and the cache; drop cache columns no row uses any more."""
        self._joining = [r for r in self._joining if r not in leaving]
        if not any(r in leaving for r in self.rows):
            return
        keep = [i for i, r in enumerate(self.rows) if r not in leaving]
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache = self.mask = None
            return
        idx = torch.tensor(keep, device=self.mask.device)
        self.mask = self.mask[idx]
        cols = self.mask.any(0).nonzero().squeeze(1)
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[idx][:, :, cols], layer.values[idx][:, :, cols]
        self.mask = self.mask[:, cols]

    def _advance(self, rows: list[Row]) -> None:
        """After a forward: dreaming rows get their image (created together), the others their next token."""
        model, ids = self.model, self.model.ids
        dreaming = [r for r in rows if r.dreaming and not r.finished]
        if dreaming:
            self._create_images(dreaming)
        for r in rows:
            if r.finished or r in dreaming:
                continue
            s = r.sampling
            logits = model.logits(r.hidden[-1:])[0].float()
            logits[self._never] = float("-inf")
            if r.images_made >= s.max_images or r.length + self._image_cost >= model.cfg.llm.context_length:
                logits[ids.dream_start] = float("-inf")
            if r.logits_processor is not None:
                logits = r.logits_processor(r.generated, logits)
            tok = _sample(logits, s, r.gen)
            r.generated.append(tok)
            if tok == ids.eos:
                r.finish_reason = "stop"
                continue
            if tok == ids.dream_start:
                # The queries read the context; their states condition the UNet (next step, `_create_images`).
                if r.text_ids:
                    r.parts.append(r.text())
                    r.text_ids = []
                r.pending = torch.cat([self._tokens([ids.dream_start]), model.dream_queries[0].to(r.hidden.dtype)])
                r.dreaming = True
            else:
                r.text_ids.append(tok)
                r.pending = self._tokens([tok])
            if len(r.generated) >= s.max_new_tokens or r.length + 1 >= model.cfg.llm.context_length:
                r.finish_reason = "length"

    def _create_images(self, rows: list[Row]) -> None:
        # Rows with the same image settings share one UNet call; each image keeps its row's seed.
        model, ids, Q = self.model, self.model.ids, self.model.cfg.num_dream_queries
        groups: dict[tuple, list[tuple[Row, int]]] = {}
        for r in rows:
            im = r.sampling.image
            seed = im.seed if im.seed is not None else int(torch.randint(0, 2**31 - 1, (), generator=r.gen))
            key = (im.guidance_scale, im.num_inference_steps, im.scheduler, im.negative_prompt)
            groups.setdefault(key, []).append((r, seed))
        for members in groups.values():
            cond = model.condition_projector(torch.stack([r.hidden[-Q:] for r, _ in members]))
            images = images_from_conditions(model, cond, members[0][0].sampling.image, [s for _, s in members])
            pixels = torch.stack([clip_pixels(im, model.cfg.vision.image_size) for im in images]).to(model.device)
            visual = model.encode_images(pixels)
            for (r, _), image, vis in zip(members, images, visual):
                r.parts.append(image)
                r.images_made += 1
                r.dreaming = False
                # The created image is read back, as in training: <dream_end> <im_start> visual tokens <im_end>.
                r.pending = torch.cat([self._tokens([ids.dream_end, ids.im_start]), vis.to(r.hidden.dtype),
                                       self._tokens([ids.im_end])])

    def _tokens(self, token_ids: list[int]) -> torch.Tensor:
        return self.model.embed_tokens(torch.tensor(token_ids, device=self.model.device))


@contextmanager
def _eval(model: DreamLLM):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@dataclass
class Request:
    """One conversation for `generate_batch`."""

    input_ids: Sequence[int]
    pixel_values: torch.Tensor | None = None
    sampling: TextSampling | None = None
    logits_processor: LogitsProcessor | None = None


def generate_batch(model: DreamLLM, requests: Sequence[Request]) -> list[Generation]:
    """Decode every request in one batch (rows leave as they finish); results in request order."""
    dec = BatchDecoder(model)
    rows = [dec.add(r.input_ids, r.pixel_values, r.sampling, r.logits_processor) for r in requests]
    while dec.active:
        dec.step()
    return [r.result() for r in rows]


def generate(model: DreamLLM, input_ids: Sequence[int], pixel_values: torch.Tensor | None = None,
             sampling: TextSampling | None = None, logits_processor: LogitsProcessor | None = None) -> list[Part]:
    """Continue `input_ids` (with its image blocks' `pixel_values`): the ordered text and created images.

    `logits_processor(generated_ids, logits_V) -> logits_V` may edit each step's logits.
    """
    return generate_batch(model, [Request(input_ids, pixel_values, sampling, logits_processor)])[0].parts


def conversation_inputs(model: DreamLLM, turns: Sequence[Turn], images: Mapping[str, PILImage.Image] | None = None
                        ) -> tuple[list[int], torch.Tensor | None]:
    """(input_ids, pixel_values) of a conversation that asks for the last user turn's answer (Vicuna template)."""
    ex = SequenceBuilder(model.tokenizer, model.cfg).conversation(turns, add_generation_prompt=True)
    if ex.truncated:
        raise ValueError(f"the conversation does not fit the context of {model.cfg.llm.context_length} tokens")
    pixels = None
    if ex.image_keys:
        missing = [k for k in ex.image_keys if not images or k not in images]
        if missing:
            raise ValueError(f"no image given for {missing}")
        pixels = torch.stack([clip_pixels(images[k], model.cfg.vision.image_size) for k in ex.image_keys])
    return ex.input_ids, pixels


def chat(model: DreamLLM, turns: Sequence[Turn], images: Mapping[str, PILImage.Image] | None = None,
         sampling: TextSampling | None = None, logits_processor: LogitsProcessor | None = None) -> list[Part]:
    """Answer the last user turn (Vicuna template); `images` maps each turn image's key to its picture."""
    ids, pixels = conversation_inputs(model, turns, images)
    return generate(model, ids, pixels, sampling, logits_processor)


def generate_document(model: DreamLLM, prompt: str, sampling: TextSampling | None = None,
                      logits_processor: LogitsProcessor | None = None) -> list[Part]:
    """Free-form interleaved generation continuing `prompt` as a document (text and created images)."""
    s = sampling or TextSampling(max_images=2)
    ex = SequenceBuilder(model.tokenizer, model.cfg).document([Text(prompt)])
    ids = ex.input_ids[:-1] if ex.input_ids[-1] == model.ids.eos else ex.input_ids  # leave the document open
    return generate(model, ids, None, s, logits_processor)
