"""The end-to-end pipeline: from synthetic shards to a served, promoted model in one command.

Owns: the order of the steps, each step's config derived from one root folder
(every output lives under `root`), the state file that lets a resubmitted
pipeline skip finished steps, progress lines, and the summary of where every
output is. Each step is the library call behind its own job, so a step can
also be run alone (`jobs/<step>.py`) with the config this module derives:

  synthetic  -> jobs/make_synthetic_data.py   the coloured-shapes set in the real formats
  decoder    -> jobs/pretrain_decoder.py      SD-style VAE + UNet and CLIP vision pretraining (the small flavors have none)
  latents    -> jobs/precompute_latents.py    the latent store, encoded with the trained VAE
  align, igpt, sft -> jobs/{align,igpt,sft}.py  the paper's three stages, each from the previous export
  register, evaluate, promote -> jobs/{register,evaluate,promote}.py  candidate -> champion through the gate
  serve      -> jobs/serve.py                 Ray Serve, then one chat and one image request via the openai client
  learning   -> jobs/learning_check.py        comprehension and creation accuracy vs the untrained model

A step is skipped when the state file records it finished with the same
settings and the same upstream results (a chain of hashes), so a resubmission
after a crash resumes at the step that failed, and a changed setting reruns
that step and everything after it. Training steps are named after their hash:
a crashed stage resumes from its last Ray Train checkpoint, a changed one
starts a fresh run.
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from dreamllm.config import FLAVORS, check

from . import storage
from .config import deep_merge, load_config
from .data.config import PrecomputeConfig, SyntheticConfig
from .storage import StorageConfig
from .tracking import TrackingConfig, tracking_uri

STEPS = ("synthetic", "decoder", "latents", "align", "igpt", "sft", "register", "evaluate", "promote", "serve",
         "learning")
STATE_FILE = "pipeline.json"


def _synthetic_for_learning() -> SyntheticConfig:
    # Enough scenes for the small model to learn colours, shapes and positions in minutes on 2 cores.
    return SyntheticConfig(mmc4_shards=4, docs_per_shard=48, webdataset_shards=4, pairs_per_shard=256,
                           parquet_shards=2, conversations=1024, instruct_docs=64)


@dataclass
class PipelineConfig:
    """The whole pipeline; each step section holds overrides of that step's own config (same keys as its YAML)."""

    flavor: str = "small"
    """Model flavor: debug (seconds, tests) or small (the CPU demo); 7b runs its jobs one by one on a cluster."""
    root: str = "outputs/pipeline"
    """Folder (local or s3://) that holds every output: data, decoder, store, checkpoints, files, state."""
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
    decoder: dict[str, Any] = field(default_factory=dict)
    """Overrides of jobs/pretrain_decoder.py's config (configs/decoder.yaml keys)."""
    latents: dict[str, Any] = field(default_factory=dict)
    """Overrides of jobs/precompute_latents.py's config."""
    align: dict[str, Any] = field(default_factory=dict)
    """Overrides of stage I's config (configs/align.yaml keys)."""
    igpt: dict[str, Any] = field(default_factory=dict)
    """Overrides of stage II's config."""
    sft: dict[str, Any] = field(default_factory=dict)
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


def resolved_tracking(cfg: PipelineConfig) -> TrackingConfig:
    """The pipeline's MLflow: the configured one, else sqlite inside a local root."""
    if cfg.tracking.tracking_uri or not _local(cfg.root):
        return cfg.tracking
    db = Path(cfg.root.removeprefix("file://")).resolve() / "mlflow.db"
    return dataclasses.replace(cfg.tracking, tracking_uri=f"sqlite:///{db}")


# Stage settings that let the small model learn the synthetic task in minutes on a CPU. The
# small flavor's LLM starts from random weights, so stages II and III use learning rates for
# training from scratch rather than the paper's (2e-5 / 4e-5 fine-tune a pretrained Vicuna).
STAGE_SETTINGS: dict[str, dict] = {
    "align": {"optim": {"lr": 2e-3, "max_steps": 200}, "data": {"micro_batch_size": 16}},
    # Pairs-heavy, at a high rate: the from-scratch LLM predicts captions from the words alone for a couple
    # of hundred steps before it starts reading the picture before them.
    "igpt": {"optim": {"lr": 1e-3, "max_steps": 250, "schedule": "constant"},
             "data": {"micro_batch_size": 8, "mix": {"mmc4": 1.0, "laion": 3.0}}},
    # A gentler rate (1e-3 here made it forget how captions become images), with stage II's creation pairs
    # replayed alongside the instruction documents, whose sentences are not captions.
    "sft": {"optim": {"lr": 4e-4, "max_steps": 400},
            "data": {"micro_batch_size": 16, "mix": {"llava": 3.0, "instruct": 1.0, "laion": 1.0},
                     "assembly": {"record_types": ["conversation", "pair"], "pair_tasks": ["creation"]}}},
}


class StepConfigs:
    """Each step's typed config, built from the pipeline config plus the step's overrides (validated up front)."""

    def __init__(self, cfg: PipelineConfig):
        from .decoder import DecoderConfig
        from .evaluation import EvalConfig, LearningJobConfig
        from .registry import RegistryConfig
        from .serving.config import ServeConfig
        from .train.config import STAGE_DEFAULTS, TrainConfig

        if _local(cfg.root):  # absolute: Ray workers run elsewhere, and the summary names real places
            cfg = dataclasses.replace(cfg, root=str(Path(cfg.root.removeprefix("file://")).resolve()))
        self.cfg = cfg
        r = cfg.root
        self.tracking = resolved_tracking(cfg)
        common = {"tracking": dataclasses.asdict(self.tracking), "storage": dataclasses.asdict(cfg.storage)}
        self.paths = {"synthetic": storage.join(r, "synthetic"), "decoder": storage.join(r, "decoder"),
                      "store": storage.join(r, "latent_store"), "runs": storage.join(r, "ray_results"),
                      "heldout": storage.join(r, "heldout"), "files": storage.join(r, "files")}
        p = self.paths

        def build(step: str, cls, derived: dict, overrides: dict, base: dict | None = None):
            try:
                return load_config(cls, None, (), base=deep_merge(deep_merge(base or {}, derived), overrides))
            except ValueError as e:
                raise ValueError(f"{step}: {e}") from None

        self.decoder = build("decoder", DecoderConfig, {
            "flavor": cfg.flavor, "data_root": p["synthetic"], "output": p["decoder"], "seed": cfg.seed,
            "storage_path": p["runs"], "ray_num_cpus": cfg.ray_num_cpus,
            "synthetic": dataclasses.asdict(cfg.synthetic), **common}, cfg.decoder)
        self.latents = build("latents", PrecomputeConfig, {
            "flavor": cfg.flavor, "data_root": p["synthetic"], "output": p["store"], "decoder": p["decoder"],
            "synthetic": dataclasses.asdict(cfg.synthetic), "storage": common["storage"],
            "ray_num_cpus": cfg.ray_num_cpus}, cfg.latents)
        self.stages = {}
        for stage in ("align", "igpt", "sft"):
            derived = {"seed": cfg.seed, "model": {"flavor": cfg.flavor, "decoder": p["decoder"]},
                       "data": {"store": p["store"], "prepare": False},
                       "checkpoint": {"storage_path": p["runs"]}, **common}
            base = deep_merge(STAGE_DEFAULTS[stage], STAGE_SETTINGS[stage])
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

    def __init__(self, root: str, st: StorageConfig):
        self.uri, self.st = storage.join(root, STATE_FILE), st
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


def _step_decoder(c: StepConfigs, results: dict) -> dict:
    from .decoder import run_decoder_pretraining

    cfg = dataclasses.replace(c.decoder, run_name=f"dreamllm-decoder-{c.cfg.flavor}-{results['_key'][:8]}")
    r = run_decoder_pretraining(cfg)
    return {"decoder": r.output, "mlflow_run_id": r.mlflow_run_id, "metrics": _floats(r.metrics)}


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
                "mlflow_run_id": r.mlflow_run_id, "metrics": _floats(r.metrics)}
    return run


def _step_register(c: StepConfigs, results: dict) -> dict:
    from .registry import register

    mv, _ = register(c.registry, results["sft"]["export"], results["sft"]["mlflow_run_id"])
    return {"model": mv.name, "version": mv.version, "ref": f"models:/{mv.name}/{mv.version}"}


def _step_evaluate(c: StepConfigs, results: dict) -> dict:
    from .evaluation import run_evaluation

    r = run_evaluation(dataclasses.replace(c.evaluate, model=results["register"]["ref"]))
    return {"metrics": _floats(r.metrics), "skipped": r.skipped, "heldout": c.paths["heldout"]}


def _step_promote(c: StepConfigs, results: dict) -> dict:
    from . import tracking
    from .registry import CHAMPION, promote

    version = results["register"]["version"]
    if tracking.alias_version(c.tracking, CHAMPION) == version:
        return {"champion": version, "promoted": True, "failures": []}
    r = promote(c.registry, version)
    champion = tracking.alias_version(c.tracking, CHAMPION)
    if not r.promoted:
        print(f"[pipeline] the gate refused v{version}: " + "; ".join(r.failures))
        if champion is None:
            raise ValueError(f"the gate refused v{version} and there is no champion to serve")
    return {"champion": champion, "promoted": r.promoted, "failures": r.failures}


def _step_serve(c: StepConfigs, results: dict) -> dict:
    """Deploy the champion, send one chat request about a picture and one image request, save both."""
    import openai
    from ray import serve

    from .serving.app import build_app

    cfg = c.serve
    files = c.paths["files"]
    serve.start(http_options={"host": cfg.http.host, "port": cfg.http.port})
    serve.run(build_app(cfg), name=cfg.app_name, route_prefix="/")
    api = f"http://{cfg.http.host}:{cfg.http.port}/v1"
    client = openai.OpenAI(base_url=api, api_key="unused-on-an-open-api", max_retries=2, timeout=300)

    from .data.synthetic import Scene

    picture = Scene(*c.cfg.chat_scene).render(64)
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    storage.write_bytes(storage.join(files, "chat_input.png"), buf.getvalue(), c.cfg.storage)
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    chat = client.chat.completions.create(
        model=cfg.model.name, max_tokens=16, seed=c.cfg.seed, extra_body={"max_images": 0},
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                               {"type": "text", "text": c.cfg.chat_question}]}])
    answer = chat.choices[0].message.content
    storage.write_bytes(storage.join(files, "chat.json"), json.dumps(
        {"question": c.cfg.chat_question, "image": "chat_input.png", "answer": answer}, indent=2).encode(),
        c.cfg.storage)
    img = client.images.generate(model=cfg.model.name, prompt=c.cfg.image_prompt, n=1, response_format="b64_json",
                                 extra_body={"seed": c.cfg.seed})
    storage.write_bytes(storage.join(files, "created_image.png"), base64.b64decode(img.data[0].b64_json),
                        c.cfg.storage)
    return {"api": api, "app": cfg.app_name, "chat_answer": answer, "chat": storage.join(files, "chat.json"),
            "chat_input": storage.join(files, "chat_input.png"),
            "created_image": storage.join(files, "created_image.png"), "prompt": c.cfg.image_prompt}


def _step_learning(c: StepConfigs, results: dict) -> dict:
    from .evaluation import run_learning_check

    ref = results["register"]["ref"]
    lc = dataclasses.replace(c.learning, model=ref, run_id=results["sft"]["mlflow_run_id"],
                             output=storage.join(c.paths["files"], "learning_check"))
    r = run_learning_check(lc)
    return {"metrics": _floats(r.result.metrics()), "table": r.result.table(), "files": r.output,
            "mlflow_run_id": r.run_id}


def _floats(d: dict) -> dict:
    return {k: float(v) for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


STEP_FUNCS: dict[str, Callable[[StepConfigs, dict], dict]] = {
    "synthetic": _step_synthetic, "decoder": _step_decoder, "latents": _step_latents,
    "align": _stage("align", None), "igpt": _stage("igpt", "align"), "sft": _stage("sft", "igpt"),
    "register": _step_register, "evaluate": _step_evaluate, "promote": _step_promote, "serve": _step_serve,
    "learning": _step_learning}
STEP_TITLES = {
    "synthetic": "write the synthetic shards", "decoder": "pretrain the frozen towers (VAE, UNet, CLIP vision)",
    "latents": "precompute VAE latents", "align": "stage I: alignment", "igpt": "stage II: I-GPT pretraining",
    "sft": "stage III: SFT", "register": "register the candidate", "evaluate": "evaluate the candidate",
    "promote": "promote through the gate", "serve": "serve and call the API",
    "learning": "learning check vs the untrained model"}
# Steps whose result is not work to keep: they run on every submission.
ALWAYS_RUN = ("serve",)


def _step_settings(c: StepConfigs, step: str) -> Any:
    settings = {"synthetic": c.cfg.synthetic, "decoder": c.decoder, "latents": c.latents, "register": None,
                "evaluate": c.evaluate, "promote": c.registry.gate, "serve": None, "learning": c.learning}
    s = c.stages.get(step, settings.get(step))
    return dataclasses.asdict(s) if dataclasses.is_dataclass(s) else s


def run_pipeline(cfg: PipelineConfig, steps: StepConfigs | None = None,
                 log: Callable[[str], None] = print) -> PipelineResult:
    """Run (or resume) every step in order; returns what each produced."""
    from .runtime import init_ray

    steps = steps or StepConfigs(cfg)
    cfg = steps.cfg
    state = State(cfg.root, cfg.storage)
    init_ray(num_cpus=cfg.ray_num_cpus)
    results: dict[str, dict] = {}
    seconds: dict[str, float] = {}
    skipped: list[str] = []
    key = _digest(cfg.flavor, cfg.seed)
    start = time.time()
    try:
        for i, step in enumerate(STEPS, 1):
            key = _digest(key, step, _step_settings(steps, step))
            head = f"[{i:>2}/{len(STEPS)}] {STEP_TITLES[step]}"
            done = None if cfg.force or step in ALWAYS_RUN else state.done(step, key)
            if done is not None:
                results[step] = done
                skipped.append(step)
                log(f"{head}: done in an earlier run, skipped")
                continue
            log(f"{head} ... (pipeline at {time.time() - start:.0f} s)")
            t0 = time.time()
            results[step] = STEP_FUNCS[step](steps, {**results, "_key": key})
            seconds[step] = time.time() - t0
            state.record(step, key, results[step], seconds[step])
            log(f"{head}: finished in {seconds[step]:.0f} s")
    finally:
        if "serve" in results and not cfg.keep_serving:
            from ray import serve

            serve.shutdown()
    return PipelineResult(results, seconds, skipped, results.get("serve", {}).get("api"))


def summary(cfg: PipelineConfig, r: PipelineResult) -> list[tuple[str, str]]:
    """(what, where) of every output, for the final printout."""
    res, t = r.results, resolved_tracking(cfg)
    rows = [("root folder", cfg.root), ("state (resubmission skips done steps)", storage.join(cfg.root, STATE_FILE)),
            ("synthetic data", res["synthetic"]["data_root"]), ("trained decoder", res["decoder"]["decoder"]),
            ("latent store", res["latents"]["store"])]
    for stage in ("align", "igpt", "sft"):
        rows.append((f"{stage} export (checkpoint)", res[stage]["export"]))
    rows += [("MLflow tracking URI", tracking_uri(t)),
             ("MLflow runs (decoder, align, igpt, sft)", ", ".join(
                 res[s]["mlflow_run_id"] for s in ("decoder", "align", "igpt", "sft"))),
             ("registered model version", f"{res['register']['ref']} (champion: v{res['promote']['champion']})"),
             ("evaluation", ", ".join(f"{k}={v:.4g}" for k, v in sorted(res["evaluate"]["metrics"].items())))]
    if "serve" in res:
        s = res["serve"]
        rows += [("API (OpenAI-compatible)", s["api"] + ("" if cfg.keep_serving else "  (stopped with the pipeline)")),
                 ("chat request: picture", s["chat_input"]), ("chat request: answer", f"{s['chat']}  {s['chat_answer']!r}"),
                 ("image request", f"{s['created_image']}  ({s['prompt']!r})")]
    if "learning" in res:
        rows.append(("learning check (also on the sft MLflow run)", res["learning"]["files"]))
    return rows

