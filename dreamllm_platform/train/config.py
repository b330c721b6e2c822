"""The experiment config of a training stage: typed sections loaded from YAML with `--set` overrides.

Owns: every knob of a training run (stage, model source, data mix, scaling,
DeepSpeed, optimiser and schedule, checkpoints, tracking) with a docstring per
field and checks in `__post_init__`, plus each stage's embedded defaults (the
paper's learning rates and data). The typed object itself is passed to the
Ray Train workers.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from dreamllm.config import FLAVORS, STAGES, check

from ..data.config import AssemblyConfig
from ..storage import StorageConfig
from ..tracking import TrackingConfig


@dataclass
class ModelSpec:
    """Which model the stage trains."""

    flavor: str = "small"
    """Flavor built when `init_from` is empty: debug, small or 7b."""
    init_from: str | None = None
    """The previous stage's export: a checkpoint URI (local, file://, s3://) or models:/NAME@ALIAS."""
    decoder: str | None = None
    """URI of the towers trained by jobs/pretrain_towers.py for the fresh flavor (decoder, and the vision
    tower and LLM when it trained them); None: the flavor's own. Ignored with `init_from`: a checkpoint
    carries its towers."""
    gradient_checkpointing: bool | None = None
    """Override the flavor's gradient checkpointing switch (None keeps it)."""
    condition_dropout: float | None = None
    """Override the condition dropout for guidance (None keeps the model's)."""
    train_llm: bool | None = None
    """Train the LLM in this stage (at `optim.llm_lr`); None: the paper's policy, frozen in stage I and
    trained in II and III. The small flavor's embedded run trains it in stage I too: its text-pretrained
    LLM is too small to learn to read visual tokens frozen (README, "Why comprehension needs the LLM")."""

    def __post_init__(self) -> None:
        check(self.flavor in FLAVORS, f"model.flavor must be one of {', '.join(FLAVORS)}, got {self.flavor!r}")


@dataclass
class DataSpec:
    """Where examples come from and how they are batched."""

    mode: str = "store"
    """Where the latents come from: "store" (precomputed once by jobs/precompute_latents.py, read every epoch)
    or "streaming" (the precompute's read -> VAE encoder pipeline fed straight into the training workers each
    epoch, no store written: for clusters whose GPUs cost less than storage passes; what it gives up is in
    the README, "Streaming mode"). Both read the sources of `precompute_config`."""
    store: str = "outputs/latent_store"
    """URI of the latent store written by jobs/precompute_latents.py (store mode)."""
    mix: dict[str, float] = field(default_factory=lambda: {"mmc4": 1.0, "laion": 1.0})
    """Source name -> sampling weight of the source's examples in each micro-batch draw; 0 leaves the source
    out (so a section merged over defaults can remove one)."""
    assembly: AssemblyConfig = field(default_factory=AssemblyConfig)
    """Which record types and pair tasks become examples."""
    micro_batch_size: int = 8
    """Examples per micro-batch per worker (packed into rows of the context length)."""
    pack: bool = True
    """Pack several examples into each row (attention stays inside each example)."""
    shuffle_buffer: int = 64
    """Examples in each worker's local shuffle buffer (0 disables)."""
    prepare: bool = True
    """Run the latent precompute first when the store is missing (embedded defaults); streaming: write the
    synthetic set first when the precompute config asks for it and it is missing."""
    precompute_config: str | None = None
    """YAML of the precompute job (sources, filters, encoder pool) used when `prepare` runs it, and by the
    streaming mode (default: its embedded defaults)."""
    data_cpus: float = 0.5
    """CPUs per Ray Data assembly task; the trainer leaves at least this much free."""
    record_ids: bool = False
    """Write the ids of every step's examples (each rank's, with its loss) to <run dir>/example_ids/: what the
    run saw, e.g. to check that a resume neither skipped nor repeated examples."""

    def __post_init__(self) -> None:
        check(all(w >= 0 for w in self.mix.values()), "data.mix weights must be >= 0")
        self.mix = {k: w for k, w in self.mix.items() if w > 0}
        check(bool(self.mix), "data.mix needs at least one source with a positive weight")
        check(self.micro_batch_size >= 1, "data.micro_batch_size must be >= 1")
        check(self.mode in ("store", "streaming"), f"data.mode must be store or streaming, got {self.mode!r}")


@dataclass
class ScalingSpec:
    """How many workers and what each gets."""

    num_workers: int = 2
    """Ray Train workers (data-parallel ranks)."""
    use_gpu: bool | None = None
    """One GPU per worker; None: use GPUs when the cluster has them."""
    cpus_per_worker: float | None = None
    """CPUs per worker; None: on a CPU cluster, share what Ray Data's tasks leave free."""

    def __post_init__(self) -> None:
        check(self.num_workers >= 1, "scaling.num_workers must be >= 1")


@dataclass
class DeepSpeedSpec:
    """The DeepSpeed engine."""

    zero_stage: int = 2
    """ZeRO stage: 2 (optimizer state + gradients sharded, default) or 3 (parameters too)."""
    precision: str = "auto"
    """'auto' (bf16 on GPU, fp32 on CPU), 'bf16' or 'fp32'."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step."""
    gradient_clipping: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    offload_optimizer: bool = False
    """ZeRO-Offload of optimizer states to CPU memory."""

    def __post_init__(self) -> None:
        check(self.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage must be 0, 1, 2 or 3")
        check(self.precision in ("auto", "bf16", "fp32"), "deepspeed.precision must be auto, bf16 or fp32")
        check(self.gradient_accumulation_steps >= 1, "deepspeed.gradient_accumulation_steps must be >= 1")


@dataclass
class OptimSpec:
    """AdamW and its schedule."""

    lr: float = 2e-5
    """Peak learning rate of DreamLLM's own parameters (visual and condition projectors, dream queries,
    added-token rows), and of the LLM unless `llm_lr` is set (the paper: stage I 2e-3, II 2e-5, SFT 4e-5)."""
    llm_lr: float | None = None
    """Peak learning rate of the LLM's parameters in the stages that train it (II, III, and I with
    `model.train_llm`); None: `lr`. The
    paper uses one rate; a separate one lets the small own parameters move faster than a pretrained LLM."""
    weight_decay: float = 0.0
    """Decoupled weight decay (not applied to biases, norms, queries and added-token rows)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    warmup_ratio: float = 0.03
    """Fraction of the steps with linear warm-up."""
    schedule: str = "cosine"
    """'cosine' decay to `min_lr_ratio` * lr, or 'constant' after warm-up."""
    min_lr_ratio: float = 0.0
    """Floor of the cosine schedule relative to `lr`."""
    max_steps: int = 200
    """Optimizer steps of the stage."""

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        check(self.lr > 0, "optim.lr must be > 0")
        check(self.llm_lr is None or self.llm_lr > 0, "optim.llm_lr must be > 0 or null")
        check(0 <= self.warmup_ratio < 1, "optim.warmup_ratio must be in [0, 1)")
        check(self.schedule in ("cosine", "constant"), "optim.schedule must be cosine or constant")
        check(self.max_steps >= 1, "optim.max_steps must be >= 1")


@dataclass
class CheckpointSpec:
    """Checkpoints for fault tolerance (the `checkpoint:` section of every training job)."""

    storage_path: str = "outputs/ray_results"
    """RunConfig.storage_path: a local dir or s3:// (multi-node runs need shared storage)."""
    every_n_steps: int = 50
    """Steps between checkpoints (and one at the end)."""
    num_to_keep: int = 2
    """Checkpoints kept in storage."""
    max_failures: int = 2
    """Worker-group restarts from the last checkpoint before the run fails."""

    def __post_init__(self) -> None:
        check(self.every_n_steps >= 1, "checkpoint.every_n_steps must be >= 1")
        check(self.num_to_keep >= 1, "checkpoint.num_to_keep must be >= 1")
        check(self.max_failures >= 0, "checkpoint.max_failures must be >= 0")


@dataclass
class StageCheckpointSpec(CheckpointSpec):
    """A stage's checkpoints, and where its inference checkpoint goes."""

    export_uri: str | None = None
    """Where the stage's inference checkpoint goes; default <storage_path>/<run_name>/export."""


@dataclass
class TrainConfig:
    """One training stage."""

    stage: str = "igpt"
    """align (I), igpt (II) or sft (III)."""
    run_name: str | None = None
    """Ray run name; submitting the same name again resumes it. Default: dreamllm-<stage>-<flavor>."""
    seed: int = 0
    """Seed of model init, data order and sampling."""
    model: ModelSpec = field(default_factory=ModelSpec)
    """The model."""
    data: DataSpec = field(default_factory=DataSpec)
    """The data."""
    scaling: ScalingSpec = field(default_factory=ScalingSpec)
    """Workers."""
    deepspeed: DeepSpeedSpec = field(default_factory=DeepSpeedSpec)
    """The DeepSpeed engine."""
    optim: OptimSpec = field(default_factory=OptimSpec)
    """Optimiser and schedule."""
    checkpoint: StageCheckpointSpec = field(default_factory=StageCheckpointSpec)
    """Checkpoints."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """MLflow."""
    storage: StorageConfig = field(default_factory=StorageConfig)
    """Object-storage endpoint/region (default: the AWS environment)."""
    log_every: int = 10
    """Steps between progress lines and logged metrics."""
    sample_every: int = 0
    """Steps between logged sample images (0: only at the end)."""
    sample_prompts: tuple[str, ...] = ("A red circle on a blue background.", "A yellow star on a green background.")
    """Prompts of the logged sample images."""

    def __post_init__(self) -> None:
        check(self.stage in STAGES, f"stage must be one of {', '.join(STAGES)}, got {self.stage!r}")
        self.sample_prompts = tuple(self.sample_prompts)
        if self.run_name is None:
            self.run_name = f"dreamllm-{self.stage}-{self.model.flavor}"
        check(self.log_every >= 1, "log_every must be >= 1")


RESUME_MAY_CHANGE = ("optim.max_steps", "log_every", "sample_every", "sample_prompts", "checkpoint.", "tracking.",
                     "storage.", "data.prepare", "data.precompute_config", "data.data_cpus", "data.record_ids",
                     "scaling.cpus_per_worker")
"""The keys (and "section." prefixes) a resubmitted run may change: how long it trains, what it logs and
where it writes. Any other change (seed, model, data, mix, batch, workers, DeepSpeed, optimiser) would
make the resumed run compute something else than the run it continues, and is refused (`train.run.fit`)."""


# Each stage's embedded defaults (the paper, Sec. 3.2); YAML and --set go on top.
STAGE_DEFAULTS: dict[str, dict] = {
    "align": {"stage": "align", "optim": {"lr": 2e-3},
              "data": {"mix": {"laion": 1.0},
                       "assembly": {"record_types": ["pair"], "learn_creation_text": False}}},
    "igpt": {"stage": "igpt", "optim": {"lr": 2e-5}, "model": {"init_from": None},
             "data": {"mix": {"mmc4": 1.0, "laion": 1.0}, "assembly": {"record_types": ["document", "pair"]}}},
    "sft": {"stage": "sft", "optim": {"lr": 4e-5},
            "data": {"mix": {"llava": 1.0, "instruct": 1.0}, "assembly": {"record_types": ["conversation"]}}},
}
