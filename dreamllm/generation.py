"""Sampling from DreamLLM: chat/VQA, text-to-image, and free-form interleaved documents.

Owns: the one decoding loop (KV cache, temperature/top-p, token limits) that
serves chat and interleaved generation alike: when the model samples
<dream_start>, the dream queries are run, the image is created by the frozen
UNet under classifier-free guidance, and it is fed back as an image-input
block before decoding goes on. Text-to-image uses diffusers' Stable Diffusion
pipeline with DreamLLM's conditions in place of the text encoder's.
"""
from __future__ import annotations

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
def images_from_conditions(model: DreamLLM, cond_BQD: torch.Tensor, sampling: ImageSampling) -> list[PILImage.Image]:
    """Create one image per condition with guidance against `sampling.negative_prompt`."""
    B = cond_BQD.shape[0]
    neg = model.prompt_condition([sampling.negative_prompt]).expand(B, -1, -1)
    seed = sampling.seed if sampling.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
    generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(B)]
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


@torch.no_grad()
def generate(model: DreamLLM, input_ids: Sequence[int], pixel_values: torch.Tensor | None = None,
             sampling: TextSampling | None = None, logits_processor: LogitsProcessor | None = None) -> list[Part]:
    """Continue `input_ids` (with its image blocks' `pixel_values`): the ordered text and created images.

    `logits_processor(generated_ids, logits_V) -> logits_V` may edit each step's logits.
    """
    s = sampling or TextSampling()
    was_training = model.training
    model.eval()
    ids = model.ids
    Q, P = model.cfg.num_dream_queries, model.cfg.vision.num_tokens
    image_cost = Q + 2 + P + 2
    max_len = model.cfg.llm.context_length
    decoder = model.llm.get_decoder()
    gen = torch.Generator("cpu").manual_seed(s.seed if s.seed is not None else int(torch.seed() % 2**31))
    never = torch.tensor([ids.im_start, ids.im_patch, ids.im_end, ids.dream_end, ids.pad])

    prompt = torch.tensor([list(input_ids)], device=model.device)
    if prompt.shape[1] >= max_len:
        raise ValueError(f"the prompt has {prompt.shape[1]} tokens; the context holds {max_len}")
    out = decoder(inputs_embeds=model.embed(prompt, pixel_values), use_cache=True)
    cache, hidden, length = out.past_key_values, out.last_hidden_state[:, -1], prompt.shape[1]

    def feed(embeds_1TH: torch.Tensor):
        nonlocal cache, hidden, length
        o = decoder(inputs_embeds=embeds_1TH, past_key_values=cache, use_cache=True)
        cache, hidden, length = o.past_key_values, o.last_hidden_state[:, -1], length + embeds_1TH.shape[1]
        return o.last_hidden_state

    def tok_embeds(token_ids: list[int]) -> torch.Tensor:
        return model.embed_tokens(torch.tensor([token_ids], device=model.device))

    parts: list[Part] = []
    text_ids: list[int] = []
    generated: list[int] = []
    images_made = 0
    try:
        while len(generated) < s.max_new_tokens and length < max_len:
            logits = model.logits(hidden)[0].float()
            logits[never] = float("-inf")
            if images_made >= s.max_images or length + image_cost >= max_len:
                logits[ids.dream_start] = float("-inf")
            if logits_processor is not None:
                logits = logits_processor(generated, logits)
            tok = _sample(logits, s, gen)
            generated.append(tok)
            if tok == ids.eos:
                break
            if tok != ids.dream_start:
                text_ids.append(tok)
                feed(tok_embeds([tok]))
                continue
            # <dream_start>: the queries read the context; their states condition the UNet.
            if text_ids:
                parts.append(model.tokenizer.decode(text_ids, skip_special_tokens=True))
                text_ids = []
            h = feed(torch.cat([tok_embeds([ids.dream_start]), model.dream_queries.to(hidden.dtype)], 1))
            cond = model.condition_projector(h[:, -Q:])
            image_s = s.image if s.image.seed is not None else ImageSampling(**{**s.image.__dict__,
                                                                             "seed": int(torch.randint(0, 2**31 - 1, (), generator=gen))})
            image = images_from_conditions(model, cond, image_s)[0]
            parts.append(image)
            images_made += 1
            # The created image is read back, as in training: <dream_end> <im_start> visual tokens <im_end>.
            visual = model.encode_images(clip_pixels(image, model.cfg.vision.image_size)[None].to(model.device))
            feed(torch.cat([tok_embeds([ids.dream_end, ids.im_start]), visual.to(hidden.dtype),
                            tok_embeds([ids.im_end])], 1))
        if text_ids:
            parts.append(model.tokenizer.decode(text_ids, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return [p.strip() if isinstance(p, str) else p for p in parts if not (isinstance(p, str) and not p.strip())]


def chat(model: DreamLLM, turns: Sequence[Turn], images: Mapping[str, PILImage.Image] | None = None,
         sampling: TextSampling | None = None, logits_processor: LogitsProcessor | None = None) -> list[Part]:
    """Answer the last user turn (Vicuna template); `images` maps each turn image's key to its picture."""
    ex = SequenceBuilder(model.tokenizer, model.cfg).conversation(turns, add_generation_prompt=True)
    if ex.truncated:
        raise ValueError(f"the conversation does not fit the context of {model.cfg.llm.context_length} tokens")
    pixels = None
    if ex.image_keys:
        missing = [k for k in ex.image_keys if not images or k not in images]
        if missing:
            raise ValueError(f"no image given for {missing}")
        pixels = torch.stack([clip_pixels(images[k], model.cfg.vision.image_size) for k in ex.image_keys])
    return generate(model, ex.input_ids, pixels, sampling, logits_processor)


def generate_document(model: DreamLLM, prompt: str, sampling: TextSampling | None = None,
                      logits_processor: LogitsProcessor | None = None) -> list[Part]:
    """Free-form interleaved generation continuing `prompt` as a document (text and created images)."""
    s = sampling or TextSampling(max_images=2)
    ex = SequenceBuilder(model.tokenizer, model.cfg).document([Text(prompt)])
    ids = ex.input_ids[:-1] if ex.input_ids[-1] == model.ids.eos else ex.input_ids  # leave the document open
    return generate(model, ids, None, s, logits_processor)
