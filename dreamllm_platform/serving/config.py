"""Typed configuration of the serving application.

Owns: `ServeConfig` and its sections (model reference and replicas, dynamic
batching, request limits, authentication, HTTP address, sampling defaults),
loaded with the project's one config loader from `configs/serve.yaml` plus
`--set` overrides. The API key itself is never a config value: the config
only names the environment variable or secret file it is read from, so no key
ends up in git or in Serve's stored deployment arguments.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import urlparse

from dreamllm.config import check

from dreamllm_platform.sampling import DEFAULTS
from dreamllm_platform.tracking import TrackingConfig

URI_SCHEMES = ("", "file", "s3", "s3a", "models")
"""Model reference schemes (a local path has none; models:/ is resolved in the MLflow registry)."""


@dataclass
class ModelConfig:
    """Which checkpoint the model deployment loads, and how its replicas are placed and scaled."""

    uri: str = ""
    """The model: a checkpoint directory, file:///dir, s3://bucket/prefix, or models:/NAME@ALIAS in the registry."""
    name: str = "dreamllm"
    """Model id served in /v1/models and expected in requests' `model` field."""
    cache_dir: str = ""
    """Local directory where remote (s3://) checkpoints are downloaded once per node ('' = <tmp>/dreamllm-checkpoints)."""
    dtype: str = "auto"
    """Weights dtype: 'auto' (bfloat16/float16 on GPU, float32 on CPU), 'float32', 'float16' or 'bfloat16'."""
    use_gpu: bool | None = None
    """One GPU per replica; None (auto) uses a GPU when the cluster has one, else only `num_cpus`."""
    num_cpus: float = 0.5
    """CPUs reserved per model replica (a fraction suits small machines; CPU inference uses all cores anyway)."""
    min_replicas: int = 1
    """Autoscaling lower bound of model replicas."""
    max_replicas: int = 1
    """Autoscaling upper bound of model replicas."""
    target_ongoing_requests: float = 8.0
    """Autoscaling target of in-flight requests per model replica."""
    max_ongoing_requests: int = 64
    """Requests a model replica holds at once (decoding, waiting for a row, images); at least the largest batch."""
    max_queued_requests: int = 64
    """Requests queued for the model replicas beyond their `max_ongoing_requests`; beyond it the API answers 503
    with Retry-After (-1: unbounded)."""

    def __post_init__(self) -> None:
        scheme = urlparse(self.uri).scheme
        check(scheme in URI_SCHEMES, f"model.uri {self.uri!r}: unsupported scheme {scheme!r}; expected a local "
                                      "path, file:///dir, s3://bucket/prefix or models:/NAME@ALIAS")
        check(self.dtype in ("auto", "float32", "float16", "bfloat16"),
               f"model.dtype must be auto, float32, float16 or bfloat16, got {self.dtype!r}")
        check(self.use_gpu in (None, True, False), f"model.use_gpu must be true, false or null (auto), got {self.use_gpu!r}")
        check(self.num_cpus > 0, "model.num_cpus must be > 0")
        check(1 <= self.min_replicas <= self.max_replicas, "model replicas need 1 <= min_replicas <= max_replicas")
        check(self.target_ongoing_requests > 0, "model.target_ongoing_requests must be > 0")
        check(self.max_ongoing_requests >= 1, "model.max_ongoing_requests must be >= 1")
        check(self.max_queued_requests >= -1, "model.max_queued_requests must be >= 0 (or -1: unbounded)")


@dataclass
class IngressConfig:
    """The CPU deployment that speaks HTTP: validation, auth, encoding."""

    num_cpus: float = 0.25
    """CPUs reserved per ingress replica."""
    min_replicas: int = 1
    """Autoscaling lower bound of ingress replicas."""
    max_replicas: int = 2
    """Autoscaling upper bound of ingress replicas."""
    target_ongoing_requests: float = 32.0
    """Autoscaling target of in-flight requests per ingress replica."""
    max_ongoing_requests: int = 128
    """Requests an ingress replica holds at once (it mostly waits on the model)."""
    request_timeout_s: float = 300.0
    """How long the ingress waits for the model before answering 504."""

    def __post_init__(self) -> None:
        check(self.num_cpus > 0, "ingress.num_cpus must be > 0")
        check(1 <= self.min_replicas <= self.max_replicas, "ingress replicas need 1 <= min_replicas <= max_replicas")
        check(self.target_ongoing_requests > 0, "ingress.target_ongoing_requests must be > 0")
        check(self.max_ongoing_requests >= 1, "ingress.max_ongoing_requests must be >= 1")
        check(self.request_timeout_s > 0, "ingress.request_timeout_s must be > 0")


@dataclass
class BatchingConfig:
    """Batching inside each model replica: `@serve.batch` for images, continuous batching for chat."""

    image_max_batch_size: int = 8
    """Images created in one call (a request with n images counts n); 1 disables image batching."""
    image_batch_wait_s: float = 0.02
    """How long the first image request waits for others to join its batch."""
    text_max_rows: int = 16
    """Chat answers decoded together in one forward pass (requests join between steps); 1 decodes one at a time."""
    text_token_budget: int = 16384
    """Tokens the decoding rows may reserve together (each its prompt + max_tokens); a request waits while it
    would exceed it (one that exceeds it alone runs when nothing else does)."""
    text_max_waiting: int = 32
    """Chat requests a replica holds waiting for a row; beyond it a request gets 503 with Retry-After."""

    def __post_init__(self) -> None:
        check(self.image_max_batch_size >= 1 and self.text_max_rows >= 1, "batch sizes must be >= 1")
        check(self.image_batch_wait_s >= 0, "batching.image_batch_wait_s must be >= 0")
        check(self.text_token_budget >= 1, "batching.text_token_budget must be >= 1")
        check(self.text_max_waiting >= 0, "batching.text_max_waiting must be >= 0")


@dataclass
class LimitsConfig:
    """Caps that keep one request from exhausting a replica; breaking one is a 4xx error."""

    max_request_bytes: int = 8 * 1024 * 1024
    """Largest request body accepted (413 beyond)."""
    max_image_pixels: int = 2048 * 2048
    """Largest input image, width x height, checked before it is decoded."""
    max_images_per_request: int = 4
    """Input images in one chat request."""
    max_prompt_chars: int = 4000
    """Longest image-generation prompt (and negative prompt)."""
    max_chat_chars: int = 32000
    """Text characters of one chat request, all messages (system included) together."""
    max_n: int = 4
    """Images per image-generation request."""
    max_steps: int = 50
    """Denoising steps per image."""
    max_tokens: int = 512
    """Generated tokens per chat answer."""
    max_created_images: int = 2
    """Images the model may create inside one chat answer."""
    max_output_side: int = 1024
    """Largest `size` side of generated images (outputs are resized from the model's native size)."""
    allowed_image_hosts: list[str] = field(default_factory=list)
    """Hosts from which http(s) image_url parts may be fetched; empty refuses all remote images."""
    remote_image_timeout_s: float = 5.0
    """Timeout of one remote image download."""

    def __post_init__(self) -> None:
        for name in ("max_request_bytes", "max_image_pixels", "max_images_per_request", "max_prompt_chars", "max_chat_chars", "max_n",
                     "max_steps", "max_tokens", "max_output_side"):
            check(getattr(self, name) >= 1, f"limits.{name} must be >= 1")
        check(self.max_created_images >= 0, "limits.max_created_images must be >= 0")
        check(self.remote_image_timeout_s > 0, "limits.remote_image_timeout_s must be > 0")
        check(all(isinstance(h, str) and h and "/" not in h for h in self.allowed_image_hosts),
               "limits.allowed_image_hosts must be bare host names, e.g. images.example.com")


@dataclass
class AuthConfig:
    """Where the Bearer API key comes from (the key is never written in a config file)."""

    api_key_env: str = "DREAMLLM_API_KEY"
    """Environment variable holding the API key in the ingress replicas ('' to ignore)."""
    api_key_file: str = ""
    """File holding the API key, e.g. a mounted Kubernetes secret ('' to ignore); wins over the variable."""
    require_api_key: bool = False
    """Refuse to start when no key is found (set in production so a missing secret cannot open the API)."""
    allow_open: bool = False
    """Serve without an API key on an address other than loopback (http.host 0.0.0.0): refused unless true."""


@dataclass
class HTTPConfig:
    """Where Serve's HTTP proxy listens (used by jobs/serve.py; `serve deploy` takes it from its own file)."""

    host: str = "127.0.0.1"
    """Bind address; 0.0.0.0 exposes the API on every interface."""
    port: int = 8000
    """TCP port."""

    def __post_init__(self) -> None:
        check(0 < self.port < 65536, f"http.port must be a TCP port, got {self.port}")


@dataclass
class DefaultsConfig:
    """Sampling values used when a request leaves them out."""

    max_tokens: int = DEFAULTS.max_tokens
    """Generated tokens of a chat answer."""
    steps: int = DEFAULTS.steps
    """Denoising steps of an image."""
    guidance_scale: float = DEFAULTS.guidance_scale
    """Classifier-free guidance weight."""
    scheduler: str = DEFAULTS.scheduler
    """Diffusion sampler: 'ddim' or 'dpm++'."""
    created_images: int = 1
    """Images the model may create inside a chat answer."""

    def __post_init__(self) -> None:
        check(self.max_tokens >= 1 and self.steps >= 1, "defaults.max_tokens and defaults.steps must be >= 1")
        check(self.scheduler in ("ddim", "dpm++"), f"defaults.scheduler must be ddim or dpm++, got {self.scheduler!r}")
        check(self.created_images >= 0, "defaults.created_images must be >= 0")


@dataclass
class ServeConfig:
    """The whole serving application."""

    app_name: str = "dreamllm"
    """Serve application name."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model deployment."""
    ingress: IngressConfig = field(default_factory=IngressConfig)
    """The HTTP ingress deployment."""
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    """Batching in the model deployment: images per call, chat rows decoded together."""
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    """Request caps."""
    auth: AuthConfig = field(default_factory=AuthConfig)
    """API-key source."""
    http: HTTPConfig = field(default_factory=HTTPConfig)
    """Proxy address for local runs."""
    defaults: DefaultsConfig = field(default_factory=DefaultsConfig)
    """Sampling defaults."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """The MLflow registry that models:/ references are resolved in (by the model replicas, at load)."""

    def __post_init__(self) -> None:
        # serve.batch rejects a single item larger than its batch; keep every valid `n` schedulable.
        check(self.limits.max_n <= self.batching.image_max_batch_size,
               f"limits.max_n ({self.limits.max_n}) must not exceed batching.image_max_batch_size "
               f"({self.batching.image_max_batch_size})")
        check(self.defaults.max_tokens <= self.limits.max_tokens, "defaults.max_tokens exceeds limits.max_tokens")
        check(self.defaults.steps <= self.limits.max_steps, "defaults.steps exceeds limits.max_steps")
        check(self.defaults.created_images <= self.limits.max_created_images,
               "defaults.created_images exceeds limits.max_created_images")
        need = max(self.batching.image_max_batch_size, self.batching.text_max_rows)
        check(self.model.max_ongoing_requests >= need,
               f"model.max_ongoing_requests ({self.model.max_ongoing_requests}) must be >= the largest batch ({need})")
