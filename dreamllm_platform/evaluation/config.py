"""Configs of evaluation: the evaluation job (which model, which held-out set, which metrics and how they are
computed) and the learning check (which held-out scenes, which sampling settings)."""
from __future__ import annotations

from dataclasses import dataclass, field

from dreamllm.config import check

from ..data.config import SyntheticConfig
from ..storage import StorageConfig
from ..tracking import TrackingConfig


def _heldout_synthetic() -> SyntheticConfig:
    # The training set's generator with another seed: new scenes, the same formats and vocabulary.
    # Only the parts evaluation reads: image-caption pairs (parquet) and LLaVA Q/A conversations.
    return SyntheticConfig(seed=1000, mmc4_shards=0, webdataset_shards=0, parquet_shards=1, pairs_per_shard=32,
                           conversations=32, instruct_docs=0)


@dataclass
class HeldOutSpec:
    """The held-out set: LAION-style parquet pairs (`laion_parquet/`) and LLaVA conversations (`llava/`)."""

    root: str = "outputs/heldout"
    """URI of the set (local dir or s3://); written from `synthetic` first when missing and `synthetic.enabled`."""
    synthetic: SyntheticConfig = field(default_factory=_heldout_synthetic)
    """The generator settings of the held-out set (a seed different from training's)."""
    max_pairs: int = 32
    """Image-caption pairs used for the validation losses (each as comprehension and as creation)."""
    max_questions: int = 32
    """Question/answer pairs for exact-match accuracy."""


@dataclass
class FeatureSpec:
    """The feature networks of FID and CLIP score (either empty: that metric is skipped)."""

    inception: str | None = None
    """TorchScript Inception feature network (local path or s3://), called as net(x, return_features=True)
    on float (N, 3, S, S) pixels in [0, 255], e.g. NVIDIA's inception-2015-12-05.pt as clean-fid uses."""
    inception_size: int = 299
    """Side the images are resized to (bicubic, as clean-fid) before the Inception network."""
    clip: str | None = None
    """Directory of a transformers CLIPModel + its tokenizer (local or s3://), e.g. a save of
    openai/clip-vit-large-patch14."""


@dataclass
class EvalConfig:
    """One evaluation of one model version."""

    model: str = "models:/dreamllm@candidate"
    """The model: a registry reference (results are logged on that version) or a checkpoint URI (printed only)."""
    heldout: HeldOutSpec = field(default_factory=HeldOutSpec)
    """The held-out set."""
    features: FeatureSpec = field(default_factory=FeatureSpec)
    """FID and CLIP-score feature networks."""
    text_to_image: int = 16
    """Captions of the held-out pairs turned into images for FID and CLIP score (0 skips both)."""
    image_steps: int = 25
    """Denoising steps of the generated images."""
    guidance_scale: float = 7.5
    """Classifier-free guidance of the generated images."""
    answer_tokens: int = 16
    """Tokens the model may answer each question with."""
    batch_size: int = 8
    """Examples per forward pass (losses) and images per text-to-image call."""
    seed: int = 0
    """Seed of the diffusion-loss noise and timesteps and of image sampling: every model sees the same draws."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """MLflow."""
    storage: StorageConfig = field(default_factory=StorageConfig)
    """Object-storage endpoint/region (default: the AWS environment)."""

    def __post_init__(self) -> None:
        h = self.heldout
        check(h.max_pairs >= 0 and h.max_questions >= 0 and self.text_to_image >= 0,
               "heldout.max_pairs, heldout.max_questions and text_to_image must be >= 0")
        check(self.text_to_image != 1, "text_to_image must be 0 or >= 2 (FID needs a covariance)")
        check(self.batch_size >= 1 and self.image_steps >= 1 and self.answer_tokens >= 1,
               "batch_size, image_steps and answer_tokens must be >= 1")


@dataclass
class LearningCheckConfig:
    """The learning check: held-out synthetic scenes asked about and drawn, by a trained and an untrained model."""

    seed: int = 2024
    """Seed of the held-out scenes (training's synthetic set uses 0, the evaluation set 1000)."""
    question_scenes: int = 60
    """Scenes whose image is asked about: one colour, one shape and one position question each."""
    prompts: int = 60
    """Scenes whose caption is turned into an image and judged by `evaluation.scenes.describe`."""
    image_size: int = 64
    """Side of the question images in pixels (the training set's synthetic.image_size)."""
    guidance_scale: float = 7.5
    """Classifier-free guidance of the created images."""
    image_steps: int = 25
    """Denoising steps of the created images."""
    image_seed: int = 0
    """Seed of the created images' noise: prompt i gets image_seed + i, for every model alike."""
    answer_tokens: int = 8
    """Tokens the model may answer each question with (greedy)."""
    batch_size: int = 8
    """Prompts per text-to-image call."""

    def __post_init__(self) -> None:
        check(self.question_scenes >= 1 and self.prompts >= 1, "question_scenes and prompts must be >= 1")
        check(self.image_size >= 16, "image_size must be >= 16")
        check(self.image_steps >= 1 and self.answer_tokens >= 1 and self.batch_size >= 1,
              "image_steps, answer_tokens and batch_size must be >= 1")


@dataclass
class LearningJobConfig:
    """jobs/learning_check.py: which model, where the figures are logged, and the check itself."""

    model: str = "models:/dreamllm@champion"
    """The trained model: a registry reference or a checkpoint URI."""
    run_id: str | None = None
    """MLflow run to log on; default: the run that trained the model (the registry version's run, else the
    checkpoint's metadata.mlflow_run_id), or a new run `learning-check-<flavor>` when neither is in this store."""
    check: LearningCheckConfig = field(default_factory=LearningCheckConfig)
    """Scenes, prompts and sampling settings."""
    logged_images: int = 8
    """Created images kept per model (trained and untrained), as run artifacts and under `output`."""
    output: str | None = None
    """Also write the table, details and images under this URI (local dir or s3://); None: the run only."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """MLflow."""
    storage: StorageConfig = field(default_factory=StorageConfig)
    """Object-storage endpoint/region of `output` (default: the AWS environment)."""

    def __post_init__(self) -> None:
        check(self.logged_images >= 0, "logged_images must be >= 0")
