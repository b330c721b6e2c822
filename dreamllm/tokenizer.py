"""The tokenizer: a real HF tokenizer with DreamLLM's special tokens added.

Owns: building the base tokenizer (Vicuna's for 7b, a byte-level BPE trained
on the bundled corpus for debug/small so nothing is downloaded), adding the
special tokens, and the ids the model and sequence builder need.

The added tokens get ids >= the base vocabulary; the model keeps their
embeddings in their own small tables (see `model.NewTokenEmbedding`), so the
LLM's own matrices stay untouched and frozen in stage I.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from .config import TokenizerConfig


@dataclass(frozen=True)
class SpecialIds:
    """Ids of the tokens the model and builder treat specially."""

    bos: int
    eos: int
    pad: int
    im_start: int
    im_patch: int
    im_end: int
    dream_start: int
    dream_end: int
    base_vocab_size: int
    """Size of the LLM's own vocabulary; ids at or above it are DreamLLM's added tokens."""


@functools.lru_cache(maxsize=4)
def _train_bpe(vocab_size: int) -> str:
    """Train a byte-level BPE on the bundled corpus; returns its JSON (cached per process)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    text = resources.files("dreamllm").joinpath("data/corpus.txt").read_text().splitlines()
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(text, trainer=trainer)
    # Like Llama's tokenizer: a BOS in front when special tokens are requested.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return tok.to_str()


def build_tokenizer(cfg: TokenizerConfig) -> PreTrainedTokenizerBase:
    """The base tokenizer (pretrained, or BPE on bundled text) with DreamLLM's tokens added."""
    if cfg.name_or_path is None:
        from tokenizers import Tokenizer

        tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_train_bpe(cfg.vocab_size)),
                                      bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    else:
        tok = AutoTokenizer.from_pretrained(cfg.name_or_path)
    return add_special_tokens(tok, cfg)


def add_special_tokens(tok: PreTrainedTokenizerBase, cfg: TokenizerConfig) -> PreTrainedTokenizerBase:
    """Add the image/dream tokens (idempotent: a saved DreamLLM tokenizer already has them)."""
    missing = [t for t in cfg.added_tokens if t not in tok.get_vocab()]
    if missing:
        tok.add_special_tokens({"additional_special_tokens": missing})
    tok.pad_token = cfg.pad
    return tok


def special_ids(tok: PreTrainedTokenizerBase, cfg: TokenizerConfig) -> SpecialIds:
    """Resolve the ids of the special tokens; the added ones must sit after the base vocabulary."""
    ids = {name: tok.convert_tokens_to_ids(getattr(cfg, name))
           for name in ("im_start", "im_patch", "im_end", "dream_start", "dream_end", "pad")}
    base = min(ids.values())
    if max(ids.values()) - base != len(ids) - 1 or base != len(tok) - len(ids):
        raise ValueError("the DreamLLM special tokens must be the last ids of the tokenizer "
                         f"(got {ids} for a vocabulary of {len(tok)})")
    return SpecialIds(bos=tok.bos_token_id, eos=tok.eos_token_id, base_vocab_size=base, **ids)
