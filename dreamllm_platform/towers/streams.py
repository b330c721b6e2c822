"""What a towers worker draws from its dataset shard, phase by phase.

Owns: `ImageStream` (endless batches of usable images and their captions,
epoch after epoch, the bad ones counted by reason) for the VAE, UNet and
vision phases, and `TextBatches` (the LLM phase's examples: captions,
synthetic conversations and corpus lines, in stage III's chat template,
tokenised by `dreamllm.sequence` as the stages tokenise theirs).
"""
from __future__ import annotations

import random
from importlib import resources

import numpy as np
import torch

from dreamllm.sequence import SequenceBuilder, Text, Turn, collate

from ..data.synthetic import Scene
from .config import LlmPhase

CACHE_IMAGES = 50_000
"""Images of a worker's shard kept in memory after the first pass (at most ~600 MB at 64 px)."""

class ImageStream:
    """Endless batches of usable images from this worker's dataset shard, epoch after epoch.

    Rows whose `skip` is set (bad images, see `towers.data`) are dropped and counted by reason during
    the first pass over the shard. The order is a function of `seed` alone (the job keeps Ray Data's
    order and the shuffles are seeded), so the position is one number, `taken`: a resumed stream that
    `skip`s that many images goes on with the images an uninterrupted one would have taken next.
    """

    def __init__(self, shard, shuffle_buffer: int, seed: int, first_pass_done: bool = False):
        self.shard, self.shuffle_buffer, self.seed = shard, shuffle_buffer, seed
        self.skipped: dict[str, int] = {}
        self.first_pass_done = first_pass_done
        self.taken = 0
        """Images handed out so far (`take` and `skip`): the stream's position."""
        self.drawn: list[str] = []
        """Ids of the images taken since the caller last cleared it (what a step trained on)."""
        self.pixels: list[np.ndarray] = []
        self.captions: list[str] = []
        self.ids: list[str] = []
        self._rows = self._epochs()

    def _epochs(self):
        # A shard that fits in CACHE_IMAGES is read once and replayed from memory in a new order each
        # epoch: every streamed epoch would start new read tasks (a fresh worker process each on a
        # small machine, importing torch), which on 2 cores costs more than the training steps.
        cache: list[tuple[np.ndarray, str, str]] | None = []
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
                        cache += zip(b["pixels"][ok], b["caption"][ok], b["id"][ok])
                        cache = cache if len(cache) <= CACHE_IMAGES else None
                    yield b["pixels"][ok], list(b["caption"][ok]), list(b["id"][ok])
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
                yield np.stack([p for p, _, _ in part]), [str(c) for _, c, _ in part], [str(i) for _, _, i in part]

    def _fill(self, n: int) -> None:
        while len(self.captions) < n:
            pixels, captions, ids = next(self._rows)
            self.pixels.extend(pixels)
            self.captions.extend(captions)
            self.ids.extend(ids)

    def take(self, n: int) -> tuple[torch.Tensor, list[str]]:
        """(pixels_B3HW float in [-1, 1], captions) of the next `n` usable images."""
        self._fill(n)
        u8 = np.stack(self.pixels[:n])
        caps = self.captions[:n]
        self.drawn += self.ids[:n]
        del self.pixels[:n], self.captions[:n], self.ids[:n]
        self.taken += n
        # The arithmetic of dreamllm.images.vae_pixels: x / 255 * 2 - 1.
        return torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 127.5 - 1.0, caps

    def skip(self, n: int) -> None:
        """Move on `n` images without decoding them into tensors (a resume's way back to its position):
        the same reads, in the same chunks, as the takes that went there."""
        while n:
            self._fill(1)
            k = min(n, len(self.captions))
            del self.pixels[:k], self.captions[:k], self.ids[:k]
            self.taken, n = self.taken + k, n - k


class TextBatches:
    """The LLM phase's batches: each example drawn by `llm.mix` weight from captions (of the image stream),
    conversations about synthetic scenes (the caption where stage III has the image, then each of
    `Scene.qa()`'s questions in random order, answered) and lines of the bundled corpus; one example per
    row, padded with </s> (the LLM has no embedding for DreamLLM's pad token; pads carry no loss)."""

    def __init__(self, spec: LlmPhase, stream: ImageStream, tokenizer, model_cfg, seed: int):
        self.spec, self.stream = spec, stream
        self.builder = SequenceBuilder(tokenizer, model_cfg)
        self.pad = tokenizer.eos_token_id
        self.rng = random.Random(seed)
        self.kinds = [k for k, w in spec.mix.items() if w > 0]
        self.weights = [spec.mix[k] for k in self.kinds]
        self.corpus = [line.strip() for line in
                       resources.files("dreamllm").joinpath("data/corpus.txt").read_text().splitlines() if line.strip()]

    def conversation(self, scene: Scene):
        qa = self.rng.sample(scene.qa(), 3)
        turns = [Turn("user", (Text(scene.caption()), Text(qa[0][0]))), Turn("assistant", (Text(qa[0][1]),))]
        for q, a in qa[1:]:
            turns += [Turn("user", (Text(q),)), Turn("assistant", (Text(a),))]
        return self.builder.conversation(turns)

    def example(self, kind: str):
        if kind == "captions":
            _, captions = self.stream.take(1)
            return self.builder.document([Text(captions[0])])
        if kind == "conversations":
            return self.conversation(Scene.random(self.rng))
        return self.builder.document([Text(self.rng.choice(self.corpus))])

    def take(self, n: int) -> dict[str, torch.Tensor]:
        """`input_ids`, `labels`, `position_ids` of `n` examples."""
        kinds = self.rng.choices(self.kinds, self.weights, k=n)
        return collate([[self.example(k)] for k in kinds], self.pad)
