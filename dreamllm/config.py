"""Typed configuration of a DreamLLM model and its named flavors.

Owns: one small dataclass per component (LLM, vision tower, diffusion decoder,
dream queries, special tokens, loss weights) and the flavors `debug`, `small`
and `7b`. Every field has a one-line docstring and values are checked in
`__post_init__`. Run-level settings (data, scaling, optimiser) live in the
platform's experiment config, not here.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

VICUNA_SYSTEM_PROMPT = ("A chat between a curious user and an artificial intelligence assistant. "
                        "The assistant gives helpful, detailed, and polite answers to the user's questions.")
"""Vicuna v1.1's system prompt, the chat template of the paper's model."""

STAGES = ("align", "igpt", "sft")
"""Training stages of the paper (Sec. 3.2): I alignment, II I-GPT pretraining, III SFT."""


def check(cond: bool, msg: str) -> None:
    """Raise ValueError(msg) unless `cond`: the validation of every config's __post_init__."""
    if not cond:
        raise ValueError(msg)


@dataclass
class LLMConfig:
    """The causal language model (Vicuna for 7b, a tiny Llama otherwise)."""

    name_or_path: str | None = None
    """HF id or local directory of a pretrained causal LM; None builds a random Llama from the sizes below."""
    hidden_size: int = 64
    """Model width (random init only; a pretrained model brings its own)."""
    num_layers: int = 2
    """Transformer blocks (random init only)."""
    num_heads: int = 4
    """Attention heads (random init only)."""
    intermediate_size: int = 128
    """MLP width (random init only)."""
    context_length: int = 256
    """Maximum sequence length in tokens; documents are cut at whole chunks to fit."""
    seed: int = 0
    """Seed of the random init, so that every process builds the same weights."""
    copy_into_checkpoints: bool = False
    """Write the LLM into every checkpoint even when a stage keeps it frozen and it comes from a local folder
    (the towers job's small LLM, in a node's cache). False keeps a frozen local LLM (a local Vicuna) a
    reference by path, as an HF id is."""

    def __post_init__(self) -> None:
        check(self.hidden_size % self.num_heads == 0, "llm.hidden_size must be divisible by llm.num_heads")
        check(self.context_length >= 16, "llm.context_length must be at least 16")


@dataclass
class VisionConfig:
    """The frozen CLIP vision tower that turns an input image into visual tokens."""

    name_or_path: str | None = None
    """HF id or local directory of a CLIP model; None builds a random CLIP vision tower."""
    image_size: int = 32
    """Input resolution in pixels (224 for ViT-L/14)."""
    patch_size: int = 8
    """Patch size in pixels (14 for ViT-L/14)."""
    hidden_size: int = 32
    """Tower width (random init only; 1024 for ViT-L/14)."""
    num_layers: int = 2
    """Encoder layers (random init only)."""
    num_heads: int = 4
    """Attention heads (random init only)."""
    select_layer: int = -2
    """Which hidden state feeds the projector: -2 is the paper's penultimate layer."""
    seed: int = 1
    """Seed of the random init."""

    def __post_init__(self) -> None:
        check(self.image_size % self.patch_size == 0, "vision.image_size must be a multiple of vision.patch_size")

    @property
    def num_tokens(self) -> int:
        """Visual tokens per image: one per patch, CLS dropped (256 for ViT-L/14 at 224 px)."""
        return (self.image_size // self.patch_size) ** 2


@dataclass
class DiffusionConfig:
    """The frozen Stable-Diffusion-style decoder: VAE, UNet and noise scheduler."""

    name_or_path: str | None = None
    """HF id or local directory in the diffusers layout (unet/, vae/, scheduler/); None builds random ones."""
    resolution: int = 32
    """Image side in pixels that the VAE encodes and decodes (512 for SD 2.1-base)."""
    cross_attention_dim: int = 32
    """UNet cross-attention width: the condition projector's output (1024 for SD 2.1)."""
    unet_channels: tuple[int, ...] = (32, 64)
    """UNet block widths (random init only)."""
    vae_channels: tuple[int, ...] = (8, 16)
    """VAE block widths (random init only); the latent side is resolution / 2**(len-1)."""
    latent_channels: int = 4
    """Channels of a VAE latent."""
    num_train_timesteps: int = 1000
    """Diffusion steps of the training scheduler; training timesteps are uniform over them."""
    prediction_type: str = "epsilon"
    """What the UNet predicts: 'epsilon' (SD 2.1-base) or 'v_prediction'."""
    timestep_power: float = 1.0
    """Training timesteps are T * u**(1 / timestep_power), u uniform: 1 is the paper's uniform draw; 2 makes
    their density grow with the noise level, where a small decoder's layout depends on the condition."""
    snr_gamma: float | None = None
    """Min-SNR-gamma weighting of the training diffusion loss (Hang et al. 2023); None: the paper's plain MSE."""
    seed: int = 2
    """Seed of the random init."""

    def __post_init__(self) -> None:
        self.unet_channels = tuple(self.unet_channels)
        self.vae_channels = tuple(self.vae_channels)
        check(self.prediction_type in ("epsilon", "v_prediction"),
               f"diffusion.prediction_type must be 'epsilon' or 'v_prediction', got {self.prediction_type!r}")
        check(self.timestep_power > 0, "diffusion.timestep_power must be > 0")
        check(self.snr_gamma is None or self.snr_gamma > 0, "diffusion.snr_gamma must be > 0 or None")
        check(self.resolution % 2 ** (len(self.vae_channels) - 1) == 0,
               "diffusion.resolution must be divisible by the VAE downsampling factor")

    @property
    def latent_size(self) -> int:
        """Side of a latent for random-init VAEs (resolution / 8 for SD)."""
        return self.resolution // 2 ** (len(self.vae_channels) - 1)


@dataclass
class TokenizerConfig:
    """Where the base tokenizer comes from and the special tokens DreamLLM adds to it."""

    name_or_path: str | None = None
    """HF id or local directory of the LLM's tokenizer; None trains a small BPE on bundled text."""
    vocab_size: int = 512
    """Vocabulary of the locally trained BPE (ignored for a pretrained tokenizer)."""
    im_start: str = "<im_start>"
    """Opens an image-input block."""
    im_patch: str = "<im_patch>"
    """Placeholder of one visual token or one dream query slot."""
    im_end: str = "<im_end>"
    """Closes an image-input block."""
    dream_start: str = "<dream_start>"
    """Emitted by the LM where an image belongs: opens a dream slot."""
    dream_end: str = "<dream_end>"
    """Closes a dream slot."""
    pad: str = "<pad>"
    """Padding (Vicuna has none)."""

    @property
    def added_tokens(self) -> list[str]:
        return [self.im_start, self.im_patch, self.im_end, self.dream_start, self.dream_end, self.pad]


@dataclass
class LossWeights:
    """Weights of the LM cross-entropy and the diffusion MSE in the total loss."""

    lm: float = 1.0
    """Weight of the next-token cross-entropy on text."""
    diffusion: float = 10.0
    """Weight of the diffusion (epsilon) MSE on dream slots."""

    def __post_init__(self) -> None:
        check(self.lm >= 0 and self.diffusion >= 0, "loss weights must be non-negative")


def _default_stage_losses() -> dict[str, LossWeights]:
    # Stage I mixes comprehension pairs (LM loss only: they have no dream slot)
    # and creation pairs (diffusion only: the sequence builder masks their
    # caption), so both weights are 1 and each pair carries one loss.
    return {"align": LossWeights(1.0, 1.0), "igpt": LossWeights(1.0, 10.0), "sft": LossWeights(1.0, 10.0)}


@dataclass
class DreamLLMConfig:
    """A whole DreamLLM: components, dream queries, losses and guidance."""

    flavor: str = "debug"
    """Name of the flavor this config came from (informational)."""
    llm: LLMConfig = field(default_factory=LLMConfig)
    """The causal LM."""
    vision: VisionConfig = field(default_factory=VisionConfig)
    """The frozen vision tower."""
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    """The frozen image decoder."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """Base tokenizer and DreamLLM's special tokens."""
    num_dream_queries: int = 4
    """Learned dream queries per created image (64 in the paper)."""
    query_init_std: float = 0.02
    """Std of the normal init of the dream queries."""
    stage_losses: dict[str, LossWeights] = field(default_factory=_default_stage_losses)
    """Loss weights per training stage."""
    condition_dropout: float = 0.1
    """Probability of replacing an image's condition by the unconditional one in training (for guidance)."""
    gradient_checkpointing: bool = False
    """Recompute LLM and UNet activations in backward to save memory."""
    system_prompt: str = VICUNA_SYSTEM_PROMPT
    """First line of every chat (Vicuna v1.1's template); the random-init flavors use a short one: a long
    fixed prefix in front of the image slows a from-scratch LLM learning to read it several-fold."""

    def __post_init__(self) -> None:
        check(self.num_dream_queries >= 1, "num_dream_queries must be >= 1")
        check(0.0 <= self.condition_dropout < 1.0, "condition_dropout must be in [0, 1)")
        unknown = sorted(set(self.stage_losses) - set(STAGES))
        check(not unknown, f"unknown stage(s) {unknown} in stage_losses; valid stages: {', '.join(STAGES)}")
        self.stage_losses = {**_default_stage_losses(), **self.stage_losses}
        min_len = 2 + self.num_dream_queries + 2 + self.vision.num_tokens + 4
        check(self.llm.context_length >= min_len,
               f"llm.context_length {self.llm.context_length} cannot hold one image (needs >= {min_len})")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DreamLLMConfig":
        """Inverse of `to_dict`; unknown keys raise ValueError naming the valid ones."""
        return from_dict(cls, d)


def from_dict(cls: type, d: Any, where: str = ""):
    """Build dataclass `cls` from a nested dict; unknown keys raise ValueError listing the valid ones.

    Nested dataclass fields and `dict[str, <dataclass>]` fields are built
    recursively; missing keys keep their defaults, and a field without a default
    must be given. Every other value is checked against its field's type
    (`check_type`), so a wrong one fails here naming the key, not deep inside a job.
    """
    if isinstance(d, cls):
        return d
    if not isinstance(d, dict):
        raise ValueError(f"{where.rstrip('.') or cls.__name__}: expected a mapping, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise ValueError(f"unknown config key(s) {', '.join(where + k for k in unknown)}; "
                         f"valid keys{' under ' + where.rstrip('.') if where else ''}: {', '.join(sorted(names))}")
    kwargs = {}
    for k, v in d.items():
        hint = hints[k]
        if dataclasses.is_dataclass(hint):
            kwargs[k] = from_dict(hint, v, f"{where}{k}.")
        elif typing.get_origin(hint) is dict and dataclasses.is_dataclass(typing.get_args(hint)[1]) and isinstance(v, dict):
            sub = typing.get_args(hint)[1]
            kwargs[k] = {name: from_dict(sub, w, f"{where}{k}.{name}.") for name, w in v.items()}
        else:
            check_type(v, hint, where + k)
            kwargs[k] = v
    missing = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in d
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"{', '.join(where + k for k in missing)}: required (no default); "
                         f"given keys{' under ' + where.rstrip('.') if where else ''}: {', '.join(sorted(d)) or 'none'}")
    try:
        return cls(**kwargs)
    except TypeError as e:  # e.g. a scalar where a section was expected
        raise ValueError(f"{where.rstrip('.') or cls.__name__}: {e}") from None


def check_type(value: Any, hint: Any, key: str) -> None:
    """Raise ValueError naming `key`, the type expected and the value given unless `value` fits `hint`.

    As YAML writes values: a list (or tuple) where a tuple or list belongs, an int where a float belongs;
    a bool is no int and an int no bool (`true` is no CPU count, `1` no switch). Types it does not know
    (Any, classes, Literal) pass.
    """
    if not _fits(value, hint):
        raise ValueError(f"{key}: expected {_type_name(hint)}, got {value!r} ({type(value).__name__})"
                         + (" (quote it to give a string)" if hint is str and isinstance(value, (int, float)) else ""))


def _fits(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint is typing.Any:
        return True
    if hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (tuple, list) or hint in (tuple, list):
        if not isinstance(value, (tuple, list)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:  # a fixed-length tuple: (float, float)
            return len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args))
        return not args or all(_fits(v, args[0]) for v in value)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            return False
        return not args or all(_fits(k, args[0]) and _fits(v, args[1]) for k, v in value.items())
    if dataclasses.is_dataclass(hint):
        return isinstance(value, (hint, dict))
    return True


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        names = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if origin in (tuple, list):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} ({', '.join(_type_name(a) for a in args)})"
        return f"a list of {_plural(args[0])}" if args else "a list"
    if origin is dict:
        return f"a mapping of {_plural(args[0])} to {_plural(args[1])}" if args else "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        hint, getattr(hint, "__name__", str(hint)))


def _plural(hint: Any) -> str:
    return {bool: "booleans", int: "integers", float: "numbers", str: "strings"}.get(hint) or _type_name(hint)


# ----------------------------------------------------------------------------- flavors

SHORT_SYSTEM_PROMPT = "A chat about pictures."
"""The system prompt of the random-init flavors (debug, small)."""


def _debug() -> DreamLLMConfig:
    """Unit tests: 2-layer width-64 LLM, 32 px CLIP and SD, 4 dream queries; seconds on a CPU."""
    return DreamLLMConfig(flavor="debug", system_prompt=SHORT_SYSTEM_PROMPT)


def _small() -> DreamLLMConfig:
    """The CPU demo: large enough to learn the bundled coloured-shapes task in minutes on 2 cores.

    Images are 32 px (the synthetic shapes stay legible: `evaluation.scenes.describe` reads 95-100% of them
    right at 32 px); the VAE downsamples 4x to 8x8 latents (each shape covers 2-4 latent pixels), so the UNet,
    the cost of every creation step, stays small. The decoder has no pretrained weights offline: the
    pipeline trains it first (jobs/pretrain_towers.py); its loss favours the noisy timesteps, where the
    created image's colour and place are decided, as the decoder's own pretraining does.
    """
    return DreamLLMConfig(
        flavor="small",
        llm=LLMConfig(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=688, context_length=512),
        vision=VisionConfig(image_size=32, patch_size=8, hidden_size=128, num_layers=3, num_heads=4),
        diffusion=DiffusionConfig(resolution=32, cross_attention_dim=128, unet_channels=(64, 128),
                                  vae_channels=(32, 64, 64), timestep_power=2.0, snr_gamma=5.0),
        tokenizer=TokenizerConfig(vocab_size=1024),
        num_dream_queries=8,
        system_prompt=SHORT_SYSTEM_PROMPT,
    )


def _7b() -> DreamLLMConfig:
    """The paper's model: Vicuna-7B v1.1, CLIP ViT-L/14 at 224 px, SD 2.1-base, 64 queries."""
    return DreamLLMConfig(
        flavor="7b",
        llm=LLMConfig(name_or_path="lmsys/vicuna-7b-v1.1", hidden_size=4096, num_layers=32, num_heads=32,
                      intermediate_size=11008, context_length=2048),
        vision=VisionConfig(name_or_path="openai/clip-vit-large-patch14", image_size=224, patch_size=14,
                            hidden_size=1024, num_layers=24, num_heads=16, select_layer=-2),
        diffusion=DiffusionConfig(name_or_path="stabilityai/stable-diffusion-2-1-base", resolution=512,
                                  cross_attention_dim=1024, vae_channels=(128, 256, 512, 512)),
        tokenizer=TokenizerConfig(name_or_path="lmsys/vicuna-7b-v1.1"),
        num_dream_queries=64,
        gradient_checkpointing=True,
    )


FLAVORS = {"debug": _debug, "small": _small, "7b": _7b}


def get_flavor(name: str) -> DreamLLMConfig:
    """A fresh config of the named flavor ('debug', 'small' or '7b')."""
    if name not in FLAVORS:
        raise ValueError(f"unknown flavor {name!r}; valid flavors: {', '.join(FLAVORS)}")
    return FLAVORS[name]()
