"""The end-to-end pipeline: from synthetic shards to a served, promoted model in one command.

Owns: the table of steps (`STEPS`: one record per step with its title, the
settings its hash covers, what it runs and what it adds to the summary), each
step's config derived from one root folder (every output lives under `root`),
the state file that lets a resubmitted pipeline skip finished steps, progress
lines, and the summary of where every output is. Each step is the library
call behind its own job, so a step can also be run alone (`jobs/<step>.py`)
with the config this module derives:

  synthetic  -> jobs/make_synthetic_data.py   the coloured-shapes set in the real formats
  towers     -> jobs/pretrain_towers.py       SD-style VAE + UNet, CLIP vision and LLM text pretraining (the small flavors have none)
  latents    -> jobs/precompute_latents.py    the latent store, encoded with the trained VAE
  align, igpt, sft -> jobs/{align,igpt,sft}.py  the paper's three stages, each from the previous export
  register, evaluate, promote -> jobs/{register,evaluate,promote}.py  candidate -> champion through the gate
  serve      -> jobs/serve.py                 Ray Serve, then `serving.acceptance`'s chat and image requests
  learning   -> jobs/learning_check.py        comprehension and creation accuracy after every stage (the curve)

A step is skipped when the state file records it finished with the same
settings and the same upstream results (a chain of hashes), so a resubmission
after a crash resumes at the step that failed, and a changed setting reruns
that step and everything after it. Training steps are named after their hash:
a crashed stage resumes from its last Ray Train checkpoint, a changed one
starts a fresh run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from dreamllm.config import FLAVORS, check

from . import storage
from .config import deep_merge, load_config
from .data.config import PrecomputeConfig, SyntheticConfig
from .storage import StorageConfig
from .tracking import TrackingConfig, artifact_location, tracking_uri

STATE_FILE = "pipeline.json"


def _synthetic_for_learning() -> SyntheticConfig:
    # Enough scenes for the small model to learn colours, shapes and positions in minutes on 2 cores.
    return SyntheticConfig(mmc4_shards=4, docs_per_shard=48, webdataset_shards=4, pairs_per_shard=256,
                           parquet_shards=2, conversations=1024, instruct_docs=64)


def _stage_settings(stage: str) -> dict:
    """The stages' settings of the embedded run, on top of each stage's own defaults (configs/pipeline.yaml
    shows them). The towers job pretrained the LLM, so this is the paper's regime: stage I at the paper's
    2e-3, the LLM in II and III at the paper's fine-tuning rates (2e-5, 4e-5: 1/100 and 1/50 of stage I),
    DreamLLM's own parameters at 5x the LLM's. One departure, measured: stage I also trains the small LLM,
    at 2e-4 (frozen, it never learns to read the visual tokens: README, "Why comprehension needs the LLM")."""
    return {
        "align": {"model": {"train_llm": True}, "optim": {"lr": 2e-3, "llm_lr": 2e-4, "max_steps": 400},
                  "data": {"micro_batch_size": 16}},
        "igpt": {"optim": {"lr": 1e-4, "llm_lr": 2e-5, "max_steps": 250},
                 "data": {"micro_batch_size": 8, "mix": {"mmc4": 1.0, "laion": 3.0}}},
        "sft": {"optim": {"lr": 2e-4, "llm_lr": 4e-5, "max_steps": 300},
                "data": {"micro_batch_size": 16, "mix": {"llava": 3.0, "instruct": 1.0, "laion": 1.0},
                         "assembly": {"record_types": ["conversation", "pair"], "pair_tasks": ["creation"]}}},
    }[stage]


@dataclass
class PipelineConfig:
    """The whole pipeline; each step section holds overrides of that step's own config (same keys as its YAML)."""

    flavor: str = "small"
    """Model flavor: debug (seconds, tests) or small (the CPU demo); 7b runs its jobs one by one on a cluster."""
    root: str = "outputs/pipeline"
    """Folder (local or s3://) that holds every output: data, towers, store, checkpoints, files, state."""
    seed: int = 0
    """Seed of data, initialisation and sampling of every step."""
    ray_num_cpus: int | None = None
    """Logical CPUs of the local Ray the pipeline starts (default: all cores); ignored on a cluster."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """MLflow; default: sqlite at <root>/mlflow.db for a local root."""
    storage: StorageConfig = field(default_factory=StorageConfig)
    """Object-storage endpoint/region (default: the AWS environment)."""
    synthetic: SyntheticConfig = field(default_factory=_synthetic_for_learning)
    """Size of the synthetic training set written to <root>/synthetic."""
    towers: dict[str, Any] = field(default_factory=dict)
    """Overrides of jobs/pretrain_towers.py's config (configs/towers.yaml keys)."""
    latents: dict[str, Any] = field(default_factory=dict)
    """Overrides of jobs/precompute_latents.py's config."""
    align: dict[str, Any] = field(default_factory=lambda: _stage_settings("align"))
    """Overrides of stage I's config (configs/align.yaml keys)."""
    igpt: dict[str, Any] = field(default_factory=lambda: _stage_settings("igpt"))
    """Overrides of stage II's config."""
    sft: dict[str, Any] = field(default_factory=lambda: _stage_settings("sft"))
    """Overrides of stage III's config."""
    evaluate: dict[str, Any] = field(default_factory=dict)
    """Overrides of jobs/evaluate.py's config."""
    promote: dict[str, Any] = field(default_factory=dict)
    """Overrides of jobs/promote.py's config (e.g. gate.metrics)."""
    serve: dict[str, Any] = field(default_factory=dict)
    """Overrides of jobs/serve.py's config."""
    api_port: int = 8000
    """Port of the API on 127.0.0.1 (0 picks a free one)."""
    learning: dict[str, Any] = field(default_factory=dict)
    """Overrides of jobs/learning_check.py's config."""
    chat_scene: tuple[str, ...] = ("green", "circle", "upper left", "large", "white")
    """The picture of the chat request: colour, shape, position, size, background (synthetic vocabulary)."""
    chat_question: str = "What color is the circle?"
    """The question of the chat request about that picture."""
    image_prompt: str = "A large red circle in the center of the image."
    """The prompt of the image request."""
    keep_serving: bool = False
    """After the requests, keep the API up until Ctrl-C (the local Ray ends with the pipeline)."""
    force: bool = False
    """Rerun every step even when the state file says it is done."""

    def __post_init__(self) -> None:
        self.chat_scene = tuple(self.chat_scene)
        check(len(self.chat_scene) == 5, "chat_scene is [colour, shape, position, size, background]")
        check(0 <= self.api_port < 65536, f"api_port must be a TCP port or 0 (a free one), got {self.api_port}")
        check(self.flavor in FLAVORS and self.flavor != "7b",
              f"flavor must be debug or small (7b runs its jobs on a cluster), got {self.flavor!r}")


# ------------------------------------------------------------------ step configs

def _local(uri: str) -> bool:
    return not storage.is_remote(uri)


def resolved_tracking(cfg) -> TrackingConfig:
    """The pipeline's MLflow: the configured one, else sqlite inside a local root (`cfg`: the pipeline's
    config, or any with its `root` and `tracking`: the UI job's, which opens that store)."""
    if cfg.tracking.tracking_uri or not _local(cfg.root):
        return cfg.tracking
    db = storage.local_path(cfg.root) / "mlflow.db"
    return dataclasses.replace(cfg.tracking, tracking_uri=f"sqlite:///{db}")


class StepConfigs:
    """Each step's typed config, built from the pipeline config plus the step's overrides (validated up front)."""

    def __init__(self, cfg: PipelineConfig):
        from .towers import TowersConfig
        from .evaluation import EvalConfig, LearningJobConfig
        from .registry import RegistryConfig
        from .serving.config import ServeConfig
        from .train.config import STAGE_DEFAULTS, TrainConfig

        if _local(cfg.root):  # absolute: Ray workers run elsewhere, and the summary names real places
            cfg = dataclasses.replace(cfg, root=str(storage.local_path(cfg.root)))
        self.cfg = cfg
        r = cfg.root
        self.tracking = resolved_tracking(cfg)
        common = {"tracking": dataclasses.asdict(self.tracking), "storage": dataclasses.asdict(cfg.storage)}
        self.paths = {"synthetic": storage.join(r, "synthetic"), "towers": storage.join(r, "towers"),
                      "store": storage.join(r, "latent_store"), "runs": storage.join(r, "ray_results"),
                      "heldout": storage.join(r, "heldout"), "files": storage.join(r, "files")}
        p = self.paths

        def build(step: str, cls, derived: dict, overrides: dict, base: dict | None = None):
            try:
                return load_config(cls, None, (), base=deep_merge(deep_merge(base or {}, derived), overrides))
            except ValueError as e:
                raise ValueError(f"{step}: {e}") from None

        self.towers = build("towers", TowersConfig, {
            "flavor": cfg.flavor, "data_root": p["synthetic"], "output": p["towers"], "seed": cfg.seed,
            "checkpoint": {"storage_path": p["runs"]}, "ray_num_cpus": cfg.ray_num_cpus,
            "synthetic": dataclasses.asdict(cfg.synthetic), **common}, cfg.towers)
        self.latents = build("latents", PrecomputeConfig, {
            "flavor": cfg.flavor, "data_root": p["synthetic"], "output": p["store"], "decoder": p["towers"],
            "synthetic": dataclasses.asdict(cfg.synthetic), "storage": common["storage"],
            "ray_num_cpus": cfg.ray_num_cpus}, cfg.latents)
        self.stages = {}
        for stage in ("align", "igpt", "sft"):
            derived = {"seed": cfg.seed, "model": {"flavor": cfg.flavor, "decoder": p["towers"]},
                       "data": {"store": p["store"], "prepare": False},
                       "checkpoint": {"storage_path": p["runs"]}, **common}
            # A section a YAML file gives (sft: {optim: {max_steps: 7}}) replaces the field's default dict
            # (a --set merges into it): merge it over the embedded settings, as the full section merges unchanged.
            base = deep_merge(STAGE_DEFAULTS[stage], _stage_settings(stage))
            self.stages[stage] = build(stage, TrainConfig, derived, getattr(cfg, stage), base)
        self.registry = build("promote", RegistryConfig, common, cfg.promote)
        self.evaluate = build("evaluate", EvalConfig, {"heldout": {"root": p["heldout"]}, "seed": cfg.seed, **common},
                              cfg.evaluate)
        self.serve = build("serve", ServeConfig, {"model": {"uri": f"models:/{self.tracking.registered_model}@champion"},
                                                  "http": {"port": cfg.api_port or _free_port()},
                                                  "tracking": common["tracking"]}, cfg.serve)
        self.learning = build("learning", LearningJobConfig, {**common}, cfg.learning)


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


# ------------------------------------------------------------------ state

class State:
    """`<root>/pipeline.json`: per step, the hash it ran with and what it produced."""

    def __init__(self, root: str, st: StorageConfig, name: str = STATE_FILE):
        self.uri, self.st = storage.join(root, name), st
        self.steps: dict[str, dict] = {}
        if storage.exists(self.uri, st):
            try:
                self.steps = json.loads(storage.read_bytes(self.uri, st)).get("steps", {})
            except ValueError:
                print(f"[pipeline] {self.uri} is not valid JSON: every step reruns")

    def done(self, step: str, key: str) -> dict | None:
        s = self.steps.get(step)
        return s["result"] if s and s.get("key") == key else None

    def record(self, step: str, key: str, result: dict, seconds: float) -> None:
        self.steps[step] = {"key": key, "result": result, "seconds": round(seconds, 1)}
        storage.write_bytes(self.uri, json.dumps({"steps": self.steps}, indent=2).encode(), self.st)


# ------------------------------------------------------------------ the steps

@dataclass
class PipelineResult:
    """Every step's result (paths, ids, figures) and how long it took."""

    results: dict[str, dict]
    seconds: dict[str, float]
    skipped: list[str]
    api: str | None = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _step_synthetic(c: StepConfigs, _: dict) -> dict:
    from .data.synthetic import synthetic_exists, write_synthetic

    root = c.paths["synthetic"]
    if not synthetic_exists(root, c.cfg.storage):
        write_synthetic(root, c.cfg.synthetic, c.cfg.storage)
    return {"data_root": root, "images": json.loads(storage.read_bytes(storage.join(root, "_SUCCESS"),
                                                                       c.cfg.storage))["images"]}


def _step_towers(c: StepConfigs, results: dict) -> dict:
    from .towers import run_towers_pretraining

    cfg = dataclasses.replace(c.towers, run_name=f"dreamllm-towers-{c.cfg.flavor}-{results['_key'][:8]}")
    r = run_towers_pretraining(cfg)
    return {"towers": r.output, "mlflow_run_id": r.mlflow_run_id, "metrics": _floats(r.metrics),
            "pictures": _pictures(cfg.tracking, r.mlflow_run_id)}


def _step_latents(c: StepConfigs, _: dict) -> dict:
    from .data.latents import run_precompute

    s = run_precompute(c.latents)
    return {"store": c.paths["store"], "summary": s.format()}


def _stage(stage: str, previous: str | None):
    def run(c: StepConfigs, results: dict) -> dict:
        from .train.trainer import run_stage

        cfg = c.stages[stage]
        if previous:
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model,
                                                                     init_from=results[previous]["export"]))
        # Named after its settings: a crashed stage resumes its own run, a changed one starts afresh.
        cfg = dataclasses.replace(cfg, run_name=f"{cfg.run_name}-{results['_key'][:8]}")
        r = run_stage(cfg)
        return {"export": r.export_uri, "checkpoint": r.checkpoint, "run_name": r.run_name,
                "mlflow_run_id": r.mlflow_run_id, "metrics": _floats(r.metrics),
                "pictures": _pictures(cfg.tracking, r.mlflow_run_id)}
    return run


def _pictures(track: TrackingConfig, run_id: str | None) -> str:
    """The plots/ folder of a run's artifacts (`pictures`), or "-" when the run is unknown (towers that an
    older version finished without naming their run)."""
    return artifact_location(track, run_id, "plots") if run_id else "-"


def _step_register(c: StepConfigs, results: dict) -> dict:
    from .registry import register

    mv, _ = register(c.registry, results["sft"]["export"], results["sft"]["mlflow_run_id"])
    return {"model": mv.name, "version": mv.version, "ref": f"models:/{mv.name}/{mv.version}"}


def _step_evaluate(c: StepConfigs, results: dict) -> dict:
    from .evaluation import run_evaluation

    r = run_evaluation(dataclasses.replace(c.evaluate, model=results["register"]["ref"]))
    return {"metrics": _floats(r.metrics), "skipped": r.skipped, "heldout": c.paths["heldout"],
            "mlflow_run_id": r.run_id, "pictures": r.pictures}


def _step_promote(c: StepConfigs, results: dict) -> dict:
    from . import model_registry
    from .registry import CHAMPION, promote

    version = results["register"]["version"]
    if model_registry.alias_version(c.tracking, CHAMPION) == version:
        return {"champion": version, "promoted": True, "failures": []}
    r = promote(c.registry, version)
    champion = model_registry.alias_version(c.tracking, CHAMPION)
    if not r.promoted:
        print(f"[pipeline] the gate refused v{version}: " + "; ".join(r.failures))
        if champion is None:
            raise ValueError(f"the gate refused v{version} and there is no champion to serve")
    return {"champion": champion, "promoted": r.promoted, "failures": r.failures}


def _step_serve(c: StepConfigs, results: dict) -> dict:
    """Deploy the champion and run the acceptance check against it."""
    from ray import serve

    from .serving.acceptance import AcceptanceRequests, check_api
    from .serving.app import build_app

    cfg = c.serve
    serve.start(http_options={"host": cfg.http.host, "port": cfg.http.port})
    serve.run(build_app(cfg), name=cfg.app_name, route_prefix="/")
    api = f"http://{cfg.http.host}:{cfg.http.port}/v1"
    req = AcceptanceRequests(c.cfg.chat_scene, c.cfg.chat_question, c.cfg.image_prompt, c.cfg.seed)
    return {"app": cfg.app_name, **check_api(api, cfg.model.name, req, c.paths["files"], c.cfg.storage, cfg.auth)}


def _step_learning(c: StepConfigs, results: dict) -> dict:
    """The learning curve: the check on stage I's start (the towers, own parameters at init) and on each
    stage's export, logged on the SFT run, its files and plot under files/learning_check."""
    from dreamllm.model import DreamLLM

    from .checkpoints import flavor_config, load_model
    from .evaluation.learning import run_learning_curve, towers_ceiling

    models = {"untrained": lambda: DreamLLM.from_config(flavor_config(c.cfg.flavor, results["towers"]["towers"],
                                                                      c.cfg.storage)).eval()}
    for stage in ("align", "igpt", "sft"):
        models[stage] = (lambda uri: lambda: load_model(uri, tracking=c.tracking))(results[stage]["export"])
    r = run_learning_curve(c.learning, models, results["sft"]["mlflow_run_id"],
                           towers_ceiling(results["towers"]["metrics"]),
                           output=storage.join(c.paths["files"], "learning_check"))
    return {"metrics": _floats(r["metrics"]), "curve": r["curve"], "table": r["table"], "files": r["files"],
            "plot": r["plot"], "mlflow_run_id": results["sft"]["mlflow_run_id"]}


def _floats(d: dict) -> dict:
    return {k: float(v) for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


@dataclass(frozen=True)
class Step:
    """One step of the pipeline: everything about it in one record."""

    name: str
    title: str
    settings: Callable[[StepConfigs], Any]
    """What the step's hash covers besides the upstream steps' (a change reruns it and what follows)."""
    run: Callable[[StepConfigs, dict], dict]
    """(step configs, earlier results + "_key") -> this step's result, kept in the state file."""
    summary: Callable[[dict], list[tuple[str, str]]] = lambda result: []
    """(what, where) rows of its result for the final printout."""
    always: bool = False
    """Runs on every submission (its result is not work to keep: a live API)."""


def _stage_step(stage: str, previous: str | None, title: str) -> Step:
    return Step(stage, title, lambda c: c.stages[stage], _stage(stage, previous),
                lambda r: [(f"{stage} export (checkpoint)", r["export"]), (f"{stage} MLflow run", r["mlflow_run_id"]),
                           (f"{stage} pictures (plots/loss.png, plots/samples_grid.png)", r.get("pictures", "-"))])


def _serve_summary(r: dict) -> list[tuple[str, str]]:
    return [("API (OpenAI-compatible)", r["api"]), ("chat request: picture", r["chat_input"]),
            ("chat request: answer", f"{r['chat']}  {r['chat_answer']!r}"),
            ("image request", f"{r['created_image']}  ({r['prompt']!r})")]


STEPS: tuple[Step, ...] = (
    Step("synthetic", "write the synthetic shards", lambda c: c.cfg.synthetic, _step_synthetic,
         lambda r: [("synthetic data", r["data_root"])]),
    Step("towers", "pretrain the towers (VAE, UNet, CLIP vision, LLM)", lambda c: c.towers, _step_towers,
         lambda r: [("trained towers", r["towers"]), ("towers MLflow run", r["mlflow_run_id"]),
                    ("towers pictures (plots/loss.png, plots/samples_grid.png)", r.get("pictures", "-"))]),
    Step("latents", "precompute VAE latents", lambda c: c.latents, _step_latents,
         lambda r: [("latent store", r["store"])]),
    _stage_step("align", None, "stage I: alignment"),
    _stage_step("igpt", "align", "stage II: I-GPT pretraining"),
    _stage_step("sft", "igpt", "stage III: SFT"),
    Step("register", "register the candidate", lambda c: None, _step_register,
         lambda r: [("registered model version", r["ref"])]),
    Step("evaluate", "evaluate the candidate", lambda c: c.evaluate, _step_evaluate,
         lambda r: [("evaluation", ", ".join(f"{k}={v:.4g}" for k, v in sorted(r["metrics"].items()))),
                    *[(f"evaluation figure ({f})", uri) for f, uri in sorted(r.get("pictures", {}).items())]]),
    Step("promote", "promote through the gate", lambda c: c.registry.gate, _step_promote,
         lambda r: [("champion version", f"v{r['champion']}")]),
    Step("serve", "serve and call the API", lambda c: None, _step_serve, _serve_summary, always=True),
    Step("learning", "learning check after every stage", lambda c: c.learning, _step_learning,
         lambda r: [("learning curve (also on the sft MLflow run)", r["files"]), ("learning curve plot", r["plot"])]),
)
STEP_NAMES = tuple(s.name for s in STEPS)


def _settings(step: Step, c: StepConfigs) -> Any:
    s = step.settings(c)
    return dataclasses.asdict(s) if dataclasses.is_dataclass(s) else s


def run_pipeline(cfg: PipelineConfig, steps: StepConfigs | None = None, log: Callable[[str], None] = print,
                 until: str | None = None, state_file: str = STATE_FILE) -> PipelineResult:
    """Run (or resume) every step in order, or those up to `until`; returns what each produced.

    `state_file` (under `root`) records what finished; runs that share a root but not their steps (the
    ablation's arms) keep their own.
    """
    from .runtime import init_ray

    steps = steps or StepConfigs(cfg)
    cfg = steps.cfg
    state = State(cfg.root, cfg.storage, state_file)
    init_ray(num_cpus=cfg.ray_num_cpus)
    results: dict[str, dict] = {}
    seconds: dict[str, float] = {}
    skipped: list[str] = []
    todo = STEPS[:STEP_NAMES.index(until) + 1] if until else STEPS
    key = _digest(cfg.flavor, cfg.seed)
    start = time.time()
    try:
        for i, step in enumerate(todo, 1):
            key = _digest(key, step.name, _settings(step, steps))
            head = f"[{i:>2}/{len(todo)}] {step.title}"
            done = None if cfg.force or step.always else state.done(step.name, key)
            if done is not None:
                results[step.name] = done
                skipped.append(step.name)
                log(f"{head}: done in an earlier run, skipped")
                continue
            log(f"{head} ... (pipeline at {time.time() - start:.0f} s)")
            t0 = time.time()
            results[step.name] = step.run(steps, {**results, "_key": key})
            seconds[step.name] = time.time() - t0
            state.record(step.name, key, results[step.name], seconds[step.name])
            log(f"{head}: finished in {seconds[step.name]:.0f} s")
    finally:
        if "serve" in results and not cfg.keep_serving:
            from ray import serve

            serve.shutdown()
    return PipelineResult(results, seconds, skipped, results.get("serve", {}).get("api"))


def summary(cfg: PipelineConfig, r: PipelineResult) -> list[tuple[str, str]]:
    """(what, where) of every output, for the final printout."""
    rows = [("root folder", cfg.root), ("state (resubmission skips done steps)", storage.join(cfg.root, STATE_FILE)),
            ("MLflow tracking URI", tracking_uri(resolved_tracking(cfg)))]
    for step in STEPS:
        if step.name in r.results:
            rows += step.summary(r.results[step.name])
    if "serve" in r.results and not cfg.keep_serving:
        rows.append(("", "(the API stopped with the pipeline; --set keep_serving=true keeps it up)"))
    return rows
