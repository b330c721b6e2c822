"""The interleaved sequence builder and packing.

Owns: turning documents, image-text pairs and conversations into token ids,
LM labels and the ordered image references of a training example; MMC4 and
LLaVA records mapped onto those; packing several examples into one row with
position ids that restart per example (transformers then keeps attention
inside each example); collating rows into tensors.

Layout (P visual tokens, Q dream queries):
  image input block = <im_start> <im_patch>*P <im_end>
  dream slot        = <dream_start> <im_patch>*Q <dream_end>
The placeholder <im_patch> means a visual token inside an input block and a
query slot inside a dream slot, so the model recovers both masks from the ids.
Labels learn text and <dream_start>; query slots, <dream_end> and input blocks
carry no LM loss (-100).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Literal, Mapping, Sequence

import torch

from .config import DreamLLMConfig
from .tokenizer import special_ids

IGNORE = -100


@dataclass(frozen=True)
class Text:
    """A run of text in a document or turn."""

    text: str


@dataclass(frozen=True)
class Image:
    """An image, by a key the caller resolves to pixels or latents (e.g. the image's sha256)."""

    key: str


Item = Text | Image


@dataclass(frozen=True)
class Turn:
    """One conversation turn; images in user turns are inputs, in assistant turns they are created."""

    role: Literal["user", "assistant"]
    items: tuple[Item, ...]


@dataclass
class Example:
    """One tokenised training example.

    `image_keys` lists the image-input blocks in order; `dream_keys` lists the
    dream slots in order (each needs the target image's latents).
    """

    input_ids: list[int]
    labels: list[int]
    image_keys: list[str] = field(default_factory=list)
    dream_keys: list[str] = field(default_factory=list)
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class _Chunk:
    ids: list[int]
    labels: list[int]
    image_keys: list[str] = field(default_factory=list)
    dream_keys: list[str] = field(default_factory=list)


class SequenceBuilder:
    """Builds `Example`s for one tokenizer and model config."""

    def __init__(self, tokenizer, cfg: DreamLLMConfig):
        self.tok = tokenizer
        self.ids = special_ids(tokenizer, cfg.tokenizer)
        self.max_len = cfg.llm.context_length
        self.num_patches = cfg.vision.num_tokens
        self.num_queries = cfg.num_dream_queries
        self.system_prompt = cfg.system_prompt

    # ------------------------------------------------------------------ chunks
    def _text(self, text: str, learn: bool) -> _Chunk:
        ids = self.tok(text, add_special_tokens=False).input_ids
        return _Chunk(ids, list(ids) if learn else [IGNORE] * len(ids))

    def _special(self, token_id: int, learn: bool) -> _Chunk:
        return _Chunk([token_id], [token_id if learn else IGNORE])

    def image_block_ids(self) -> list[int]:
        """Token ids of one image-input block."""
        s = self.ids
        return [s.im_start] + [s.im_patch] * self.num_patches + [s.im_end]

    def dream_slot_ids(self) -> list[int]:
        """Token ids of one dream slot."""
        s = self.ids
        return [s.dream_start] + [s.im_patch] * self.num_queries + [s.dream_end]

    def _image_input(self, key: str) -> _Chunk:
        ids = self.image_block_ids()
        return _Chunk(ids, [IGNORE] * len(ids), image_keys=[key])

    def _dream(self, key: str, learn_start: bool, then_input: bool) -> _Chunk:
        ids = self.dream_slot_ids()
        labels = [ids[0] if learn_start else IGNORE] + [IGNORE] * (len(ids) - 1)
        chunk = _Chunk(ids, labels, dream_keys=[key])
        if then_input:  # the created image is read back as input for the text that follows
            block = self._image_input(key)
            chunk = _Chunk(chunk.ids + block.ids, chunk.labels + block.labels, block.image_keys, [key])
        return chunk

    def _assemble(self, chunks: Iterable[_Chunk]) -> Example:
        """Concatenate chunks after <s>, stopping at the first whole chunk that does not fit.

        A first text chunk longer than the context is cut at the token level so
        that no document becomes empty.
        """
        ex = Example([self.ids.bos], [IGNORE])
        for chunk in chunks:
            room = self.max_len - len(ex)
            if len(chunk.ids) > room:
                only_text = not chunk.image_keys and not chunk.dream_keys
                if only_text and len(ex) == 1:
                    ex.input_ids += chunk.ids[:room]
                    ex.labels += chunk.labels[:room]
                ex.truncated = True
                break
            ex.input_ids += chunk.ids
            ex.labels += chunk.labels
            ex.image_keys += chunk.image_keys
            ex.dream_keys += chunk.dream_keys
        return ex

    # ---------------------------------------------------------------- examples
    def document(self, items: Sequence[Item], create_images: bool = True) -> Example:
        """An interleaved document: text learned; each image as dream slot then input block (DreamLLM's
        interleaved generative pretraining), or as an input block only with `create_images=False` (the
        comprehension-only ablation); </s> at the end."""
        chunks = [self._text(it.text, True) if isinstance(it, Text) else
                  self._dream(it.key, True, True) if create_images else self._image_input(it.key) for it in items]
        return self._assemble(chunks + [self._special(self.ids.eos, True)])

    def pair(self, caption: str, image_key: str, task: Literal["comprehension", "creation"],
             learn_text: bool = True) -> Example:
        """An image-text pair as image->caption (comprehension) or caption->dream slot (creation).

        `learn_text=False` masks the caption and <dream_start> of a creation pair
        (stage I: creation pairs carry only the diffusion loss).
        """
        if task == "comprehension":
            chunks = [self._image_input(image_key), self._text(caption, True), self._special(self.ids.eos, True)]
        elif task == "creation":
            chunks = [self._text(caption, learn_text), self._dream(image_key, learn_text, then_input=False)]
        else:
            raise ValueError(f"task must be 'comprehension' or 'creation', got {task!r}")
        return self._assemble(chunks)

    def conversation(self, turns: Sequence[Turn], system: str | None = None,
                     add_generation_prompt: bool = False) -> Example:
        """A Vicuna-v1.1 chat: loss on assistant turns (and their </s>) only.

        `system` defaults to the model config's `system_prompt`.

        `SYSTEM USER: ... ASSISTANT: ...</s>USER: ...`. With `add_generation_prompt`
        the example ends with an open `ASSISTANT:` for generation.
        """
        chunks = [self._text(self.system_prompt if system is None else system, False)]
        for turn in turns:
            if turn.role not in ("user", "assistant"):
                raise ValueError(f"turn role must be 'user' or 'assistant', got {turn.role!r}")
            learn = turn.role == "assistant"
            chunks.append(self._text("ASSISTANT:" if learn else "USER:", False))
            for it in turn.items:
                if isinstance(it, Text):
                    chunks.append(self._text(it.text, learn))
                elif learn:
                    chunks.append(self._dream(it.key, True, True))
                else:
                    chunks.append(self._image_input(it.key))
            if learn:
                chunks.append(self._special(self.ids.eos, True))
        if add_generation_prompt:
            chunks.append(self._text("ASSISTANT:", False))
        return self._assemble(chunks)


# ------------------------------------------------------------ record formats

def document_from_mmc4(doc: Mapping, image_key=lambda info: info["image_name"]) -> list[Item]:
    """An MMC4 v1.1 document (`text_list`, `image_info`) as items: each image after its matched sentence.

    `image_key(info)` maps an `image_info` entry to the key used to find its
    pixels/latents (default: `image_name`). Images whose `matched_text_index`
    is past the last sentence go after it.
    """
    texts = list(doc["text_list"])
    by_sentence: dict[int, list[Mapping]] = {}
    for info in doc.get("image_info", []):
        idx = min(max(int(info["matched_text_index"]), 0), max(len(texts) - 1, 0))
        by_sentence.setdefault(idx, []).append(info)
    items: list[Item] = []
    for i, sentence in enumerate(texts):
        items.append(Text(sentence))
        items.extend(Image(image_key(info)) for info in by_sentence.get(i, []))
    if not texts:
        items.extend(Image(image_key(info)) for infos in by_sentence.values() for info in infos)
    return items


def turns_from_llava(conversations: Sequence[Mapping], image_key: str | None) -> list[Turn]:
    """LLaVA-style turns (`from`: human/gpt, `value` with `<image>`) as `Turn`s."""
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
    turns = []
    for t in conversations:
        if t.get("from") not in roles:
            raise ValueError(f"conversation turn 'from' must be one of {sorted(roles)}, got {t.get('from')!r}")
        parts = str(t["value"]).split("<image>")
        items: list[Item] = []
        for j, part in enumerate(parts):
            if j > 0:
                if image_key is None:
                    raise ValueError("conversation has <image> but the record has no image")
                items.append(Image(image_key))
            if part.strip():
                items.append(Text(part.strip()))
        turns.append(Turn(roles[t["from"]], tuple(items)))
    return turns


# ------------------------------------------------------------------- packing

def pack(lengths: Sequence[int], max_len: int) -> list[list[int]]:
    """First-fit-decreasing bins of example indices whose lengths sum to at most `max_len`."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        if lengths[i] > max_len:
            raise ValueError(f"example {i} has {lengths[i]} tokens, more than the row length {max_len}")
        for b, r in enumerate(room):
            if lengths[i] <= r:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(max_len - lengths[i])
    return bins


def collate(rows: Sequence[Sequence[Example]], pad_id: int, length: int | None = None,
            pixels: Mapping[str, torch.Tensor] | None = None,
            latents: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Rows of examples (one example per row = no packing) to a batch.

    Returns `input_ids`, `labels`, `position_ids` (B, L), positions restarting
    at 0 for each example and for the padding, so attention stays inside each
    example. With `pixels` (key -> (3, S, S)) adds `pixel_values` (N_img, 3, S, S)
    in order of appearance; with `latents` (key -> (C, h, w) sample or
    (2, C, h, w) mean/logvar) adds `latents` or `latent_mean`/`latent_logvar`
    (N_dream, C, h, w).
    """
    L = length or max(sum(len(e) for e in row) for row in rows)
    B = len(rows)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    labels = torch.full((B, L), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((B, L), dtype=torch.long)
    image_keys: list[str] = []
    dream_keys: list[str] = []
    for b, row in enumerate(rows):
        at = 0
        for ex in row:
            n = len(ex)
            if at + n > L:
                raise ValueError(f"row {b} holds {at + n} tokens, more than the batch length {L}")
            input_ids[b, at:at + n] = torch.tensor(ex.input_ids)
            labels[b, at:at + n] = torch.tensor(ex.labels)
            position_ids[b, at:at + n] = torch.arange(n)
            image_keys += ex.image_keys
            dream_keys += ex.dream_keys
            at += n
        position_ids[b, at:] = torch.arange(L - at)
    batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
    if pixels is not None and image_keys:
        batch["pixel_values"] = torch.stack([pixels[k] for k in image_keys])
    if latents is not None and dream_keys:
        lat = torch.stack([latents[k] for k in dream_keys])
        if lat.ndim == 5:
            batch["latent_mean"], batch["latent_logvar"] = lat[:, 0], lat[:, 1]
        else:
            batch["latents"] = lat
    return batch
