"""The config of the towers job: typed sections loaded from YAML with `--set` overrides.

Owns: every knob of jobs/pretrain_towers.py (flavor, image-caption sources,
one section per phase: VAE, UNet + text encoder, CLIP vision tower, LLM on
text; samples, scaling, checkpoints, tracking) with a docstring per field and
checks in `__post_init__`, and the hash of the settings that change the
trained weights (a finished output with the same hash is not trained again).
Every phase section has the keys of `PhaseSpec` (steps, lr, warm-up, batch,
weight decay, gradient clipping) plus its own.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

from dreamllm.config import FLAVORS, check, get_flavor

from ..data.config import SourceConfig, SyntheticConfig, resolve_uri
from ..storage import StorageConfig
from ..tracking import TrackingConfig
from ..train.config import CheckpointSpec, ScalingSpec

PAIR_FORMATS = ("webdataset", "laion_parquet")
"""Source formats holding image-caption pairs (img2dataset tars, parquet with image bytes + caption)."""


@dataclass
class PhaseSpec:
    """What every phase has: its optimizer steps and their schedule (one loop runs every phase)."""

    steps: int = 100
    """Optimizer steps (0: the phase is skipped and its part keeps its initial weights)."""
    lr: float = 1e-3
    """Peak AdamW learning rate (linear warm-up, cosine decay to 0)."""
    warmup_steps: int = 20
    """Steps of linear learning-rate warm-up."""
    batch_size: int = 32
    """Examples per step per worker."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    gradient_clipping: float = 1.0
    """Global gradient-norm clip (0 disables), as the stages' `deepspeed.gradient_clipping`."""

    def __post_init__(self) -> None:
        name = type(self).__name__.removesuffix("Phase").lower()
        check(self.steps >= 0 and self.batch_size >= 1, f"{name}.steps must be >= 0 and {name}.batch_size >= 1")
        check(self.lr > 0 and self.weight_decay >= 0 and self.warmup_steps >= 0,
              f"{name}.lr must be > 0, {name}.weight_decay and {name}.warmup_steps >= 0")
        check(self.gradient_clipping >= 0, f"{name}.gradient_clipping must be >= 0")


@dataclass
class VaePhase(PhaseSpec):
    """Phase 1: the VAE (AutoencoderKL of the flavor's sizes) as an autoencoder, SD-style."""

    steps: int = 1200
    lr: float = 2e-3
    batch_size: int = 32
    crop: int | None = None
    """Side of the random square crop trained on (None: whole images). The VAE is convolutional, so it
    can learn from crops and encode whole images, as SD trained its VAE on 256-px crops for 512-px use;
    at 32 px a 16-px crop rarely holds a whole shape, and the shapes come back blurred."""
    kl_weight: float = 1e-6
    """Weight of the KL term against the reconstruction MSE summed over the image, as in SD's VAE."""
    init_logvar: float | None = -6.0
    """Initial bias of the posterior log-variance. With SD's tiny KL weight the encoder otherwise spends
    hundreds of steps learning to rise above unit noise on its latents; None keeps the default init (0)."""
    scaling_images: int = 256
    """Images whose latents set the scaling factor (1 / std, as SD computed its 0.18215)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.steps >= 1, "vae.steps must be >= 1: the UNet learns on its latents")
        check(self.kl_weight >= 0, "vae.kl_weight must be >= 0")
        check(self.crop is None or self.crop >= 8, "vae.crop must be >= 8 pixels (or null for whole images)")
        check(self.scaling_images >= 2, "vae.scaling_images must be >= 2")


@dataclass
class UnetPhase(PhaseSpec):
    """Phase 2: the UNet and the text encoder, jointly, on the frozen VAE's latents (DDPM noise prediction)."""

    steps: int = 1000
    lr: float = 1e-3
    """Half the VAE's: at 2e-3 with 20 warm-up steps whether the caption's colour was learned at all
    depended on the seed (held-out colour 0.43 / 0.10 on seeds 0 / 1); 1e-3 with 200 gave 0.60 on both."""
    warmup_steps: int = 200
    weight_decay: float = 0.01
    caption_dropout: float = 0.1
    """Probability of training on the empty caption instead, so that classifier-free guidance works."""
    timestep_power: float = 2.0
    """Timesteps are drawn as T * u**(1 / timestep_power), u uniform: 1 is SD's uniform draw; 2 makes their
    density grow linearly with the noise level. On small latents the image's layout (colour, place) only
    depends on the caption at the noisiest timesteps, so weighting them learns the caption much sooner."""
    snr_gamma: float | None = 5.0
    """Min-SNR-gamma loss weighting (Hang et al. 2023; diffusers' --snr_gamma): learns several times
    faster than the plain MSE by not letting the easy low-noise timesteps dominate; None: plain MSE."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.steps >= 1, "unet.steps must be >= 1")
        check(0.0 <= self.caption_dropout < 1.0, "unet.caption_dropout must be in [0, 1)")
        check(self.snr_gamma is None or self.snr_gamma > 0, "unet.snr_gamma must be > 0 or null")
        check(self.timestep_power > 0, "unet.timestep_power must be > 0")


@dataclass
class VisionPhase(PhaseSpec):
    """Phase 3: the flavor's CLIP vision tower, trained with CLIP's contrastive objective against a text tower
    of its own (discarded afterwards), for flavors without a pretrained CLIP offline. DreamLLM keeps it frozen,
    as the paper keeps CLIP ViT-L frozen: a random tower's patch tokens hold the picture only locally, and a
    from-scratch LLM spends hundreds of steps learning to find the shape among them."""

    steps: int = 400
    lr: float = 1e-3
    batch_size: int = 128
    """Image-caption pairs per step per worker: the contrastive negatives are the batch's other captions."""
    weight_decay: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.batch_size >= 2, "vision.batch_size must be >= 2 (the other pairs are the negatives)")


@dataclass
class LlmPhase(PhaseSpec):
    """Phase 4: the flavor's LLM (a random Llama of its sizes) as a causal LM on text, so that the stages
    start from a language model as the paper's start from Vicuna. The text is the job's captions, the
    bundled corpus the tokenizer was trained on, and, for the synthetic set, conversations about scenes in
    the chat template of stage III with the scene's caption where the image will be (USER: <caption> What
    color is the circle? ASSISTANT: green), so the LLM learns to answer from what is before the question."""

    steps: int = 600
    lr: float = 1e-3
    batch_size: int = 32
    weight_decay: float = 0.01
    mix: dict[str, float] = field(default_factory=lambda: {"captions": 1.0, "conversations": 2.0, "corpus": 0.5})
    """Text kind -> sampling weight per example: captions (of the job's image-caption sources),
    conversations (synthetic scenes, chat template) and corpus (the bundled text, one line per example)."""
    scored: int = 40
    """Held-out synthetic scenes whose 3 questions the LLM answers at the end from the caption in context,
    for the `llm_qa_<attribute>_accuracy` metrics (0: none)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        known = ("captions", "conversations", "corpus")
        bad = sorted(set(self.mix) - set(known))
        check(not bad, f"llm.mix has unknown text kind(s) {bad}; valid: {', '.join(known)}")
        check(any(w > 0 for w in self.mix.values()) and all(w >= 0 for w in self.mix.values()),
              "llm.mix needs weights >= 0, at least one > 0")


@dataclass
class TextEncoderSpec:
    """The small text encoder trained with the UNet: a random-init CLIPTextModel over the flavor's tokenizer.

    Its width is the flavor's `diffusion.cross_attention_dim`, so its last hidden state conditions the UNet
    as SD's CLIP text encoder does.
    """

    num_layers: int = 2
    """Transformer layers."""
    num_heads: int = 4
    """Attention heads (must divide the width)."""
    max_length: int = 32
    """Tokens per caption (padded or cut): the tokenizer's model_max_length in the saved pipeline."""

    def __post_init__(self) -> None:
        check(1 <= self.num_layers <= 12, "text_encoder.num_layers must be in [1, 12]")
        check(self.num_heads >= 1, "text_encoder.num_heads must be >= 1")
        check(self.max_length >= 8, "text_encoder.max_length must be >= 8")


@dataclass
class SampleSpec:
    """Images created from fixed prompts at the end, logged to MLflow and saved under <output>/samples."""

    prompts: tuple[str, ...] = (
        "A large red circle in the upper left of the image.",
        "A large blue square in the lower right of the image.",
        "A large yellow triangle in the center of the image.",
        "A large green diamond in the upper right of the image.",
        "A large white star in the lower left of the image.",
        "A large magenta cross in the top of the image.",
        "A large orange ring in the bottom of the image.",
        "A large cyan circle in the left of the image.")
    """Prompts of the logged and saved images."""
    guidance_scale: float = 5.0
    """Classifier-free guidance weight."""
    num_inference_steps: int = 25
    """Denoising steps."""
    scheduler: str = "dpm++"
    """Sampler: ddim or dpm++."""
    scored: int = 32
    """Further random synthetic-set prompts created and scored for the final `sample_*_accuracy` metrics
    (0: none; for decoders trained on other data they mean nothing)."""

    def __post_init__(self) -> None:
        self.prompts = tuple(self.prompts)
        check(self.scheduler in ("ddim", "dpm++"), "samples.scheduler must be ddim or dpm++")
        check(self.num_inference_steps >= 1 and self.scored >= 0,
               "samples.num_inference_steps must be >= 1 and samples.scored >= 0")


def _default_sources() -> dict[str, SourceConfig]:
    return {"laion": SourceConfig("webdataset", "laion"),
            "laion_parquet": SourceConfig("laion_parquet", "laion_parquet")}


@dataclass
class TowersConfig:
    """Pretrain the towers of a flavor that has no pretrained ones: the image decoder (VAE, then UNet + text
    encoder), the CLIP vision tower and the LLM."""

    flavor: str = "small"
    """Flavor whose towers are trained: small or debug (7b uses Vicuna, CLIP ViT-L and Stable Diffusion 2.1)."""
    data_root: str = "outputs/synthetic"
    """Base URI of relative source URIs (s3://bucket/prefix or a local dir)."""
    sources: dict[str, SourceConfig] = field(default_factory=_default_sources)
    """Named image-caption sets: format webdataset (img2dataset tars) or laion_parquet."""
    output: str | None = None
    """Where the towers go (local dir or s3://): the decoder in the diffusers Stable Diffusion layout, plus
    vision/ and llm/; default: outputs/towers/<flavor>."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    """The synthetic set written into data_root first when it is not there (enabled: true)."""
    vae: VaePhase = field(default_factory=VaePhase)
    """Phase 1: the VAE."""
    unet: UnetPhase = field(default_factory=UnetPhase)
    """Phase 2: the UNet and text encoder."""
    vision: VisionPhase = field(default_factory=VisionPhase)
    """Phase 3: the CLIP vision tower (contrastive)."""
    llm: LlmPhase = field(default_factory=LlmPhase)
    """Phase 4: the LLM on text."""
    text_encoder: TextEncoderSpec = field(default_factory=TextEncoderSpec)
    """Sizes of the text encoder."""
    samples: SampleSpec = field(default_factory=SampleSpec)
    """Sample images and their scores at the end."""
    scaling: ScalingSpec = field(default_factory=lambda: ScalingSpec(num_workers=1))
    """Ray Train workers (data-parallel ranks; each takes `batch_size` images per step)."""
    data_cpus: float = 0.5
    """CPUs per Ray Data read/decode task; the workers leave at least this much free."""
    shuffle_buffer: int = 256
    """Images in each worker's local shuffle buffer (0 disables)."""
    cache: bool = True
    """Decode the images once into Ray's object store before training, so later epochs only read them back;
    false streams (reads and decodes) every epoch, for sets larger than the object store."""
    checkpoint: CheckpointSpec = field(default_factory=lambda: CheckpointSpec(every_n_steps=100))
    """Ray Train checkpoints: storage path, steps between them (counted over all phases), restarts."""
    run_name: str | None = None
    """Ray and MLflow run name; the same name resumes. Default: towers-<flavor>-<config hash>."""
    seed: int = 0
    """Seed of init, data order, noise and samples."""
    log_every: int = 25
    """Steps between progress lines and logged metrics."""
    record_ids: bool = False
    """Write the ids of every step's images (each rank's, with its loss and random-state checksum) to
    <checkpoint.storage_path>/<run_name>/example_ids/, as the stages' `data.record_ids`: e.g. to check that
    a resume neither skipped nor repeated images."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """MLflow."""
    storage: StorageConfig = field(default_factory=StorageConfig)
    """Object-storage endpoint/region (default: the AWS environment)."""
    ray_num_cpus: int | None = None
    """Logical CPUs of a local Ray started by the job (default: all cores); ignored on a cluster."""

    def __post_init__(self) -> None:
        check(self.flavor in FLAVORS, f"flavor must be one of {', '.join(FLAVORS)}, got {self.flavor!r}")
        check(self.flavor != "7b", "flavor 7b uses Stable Diffusion 2.1's pretrained decoder "
                                   "(stabilityai/stable-diffusion-2-1-base): there is nothing to pretrain")
        enabled = {n: s for n, s in self.sources.items() if s.enabled}
        check(bool(enabled), "at least one enabled source is needed")
        bad = sorted(n for n, s in enabled.items() if s.format not in PAIR_FORMATS)
        check(not bad, f"source(s) {bad} have a format without image-caption pairs; valid: {', '.join(PAIR_FORMATS)}")
        check(self.log_every >= 1, "log_every must be >= 1")
        check(self.data_cpus > 0, "data_cpus must be > 0")
        width = get_flavor(self.flavor).diffusion.cross_attention_dim
        check(width % self.text_encoder.num_heads == 0,
               f"text_encoder.num_heads {self.text_encoder.num_heads} must divide the text encoder's width {width} "
               f"(the flavor's cross-attention dim)")
        if self.output is None:
            self.output = f"outputs/towers/{self.flavor}"
        if self.run_name is None:
            self.run_name = f"towers-{self.flavor}-{self.config_hash()}"

    def phases(self) -> dict[str, PhaseSpec]:
        """The phases in the order they run."""
        return {"vae": self.vae, "unet": self.unet, "vision": self.vision, "llm": self.llm}

    def source_uris(self) -> dict[str, SourceConfig]:
        """Enabled sources with URIs resolved against data_root."""
        return {n: dataclasses.replace(s, uri=resolve_uri(self.data_root, s.uri))
                for n, s in self.sources.items() if s.enabled}

    def config_hash(self) -> str:
        """Hash of everything that changes the trained weights (not where outputs go, nor logging).

        Sources count as written (data_root + their URIs), so a relative data_root hashes the same
        from any working directory; the shards' contents are assumed not to change under a URI.
        """
        sources = {n: dataclasses.asdict(s) for n, s in self.sources.items() if s.enabled}
        relevant = {"flavor": self.flavor, "data_root": self.data_root, "sources": sources,
                    "vae": dataclasses.asdict(self.vae), "unet": dataclasses.asdict(self.unet),
                    "vision": dataclasses.asdict(self.vision), "llm": dataclasses.asdict(self.llm),
                    "text_encoder": dataclasses.asdict(self.text_encoder), "seed": self.seed,
                    "num_workers": self.scaling.num_workers}
        return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:12]
