"""The learning check: does a trained DreamLLM understand and draw the synthetic scenes better than it did untrained?

Owns: the held-out scenes (the synthetic generator's `Scene.random` under
their own seed), comprehension accuracy (each of `Scene.qa()`'s colour,
shape and position questions asked about the scene's image, greedy answer,
exact match after normalisation), creation accuracy (an image created from
each scene's caption, judged by `evaluation.scenes.describe`: colour, shape,
position, and colour-and-shape both right), the untrained baseline of a
trained model (`untrained_model`), the trained-vs-untrained table and its
metrics, logging them on an MLflow run (and writing the same files to a
folder), and `run_learning_check` behind jobs/learning_check.py. Also the
learning curve of a training run: the same figures, plus the held-out
diffusion loss of the dream queries' conditions and how far the guidance's
unconditional condition sits from the conditional ones, for each stage's
export (`learning_curve`, `curve_metrics`), and its plot (`curve_plot`).

Judging is split from running the model (`judge_answers`, `judge_images`),
so the judges are tested on known-correct answers and ground-truth renders.
"""
from __future__ import annotations

import dataclasses
import io
import json
import random
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from .. import model_registry, storage, tracking
from ..checkpoints import load_model, local_checkpoint
from ..data.synthetic import Scene, jpeg
from ..mlflow_tags import LEARNING_CHECK_MODEL_TAG, LEARNING_CHECK_SETTINGS_TAG, MODEL_TAG
from ..storage import StorageConfig
from ..tracking import TrackingConfig
from .config import LearningCheckConfig, LearningJobConfig
from .evaluate import answer_question, create_images
from .metrics import exact_match
from .scenes import describe

ATTRIBUTES = ("color", "shape", "position")
"""What `Scene.qa()` asks about, in its order."""
MODELS = ("trained", "untrained")


@dataclass
class LearningResult:
    """Figures of a trained model and of its untrained baseline on the same held-out scenes and seeds."""

    trained: dict[str, float]
    """`comprehension.{color,shape,position,overall}` and `creation.{color,shape,position,both}`, in [0, 1]."""
    untrained: dict[str, float]
    """The same figures of the untrained model."""
    questions: int
    """Questions asked of each model (three per question scene)."""
    prompts: int
    """Images created by each model."""
    seed: int
    """Seed of the held-out scenes."""
    details: dict[str, list[dict]] = field(default_factory=dict)
    """Per model: one row per question (reply) and per prompt (what the image was read as)."""
    images: dict[str, list[tuple[str, Image.Image]]] = field(default_factory=dict)
    """Per model: (caption, created image) of every prompt."""

    def metrics(self) -> dict[str, float]:
        """Flat MLflow metrics: `learning.<figure>` (trained) and `learning.untrained.<figure>`."""
        return {**{f"learning.{k}": v for k, v in self.trained.items()},
                **{f"learning.untrained.{k}": v for k, v in self.untrained.items()}}

    def table(self) -> str:
        """The figures side by side, one line each, under a line saying what was measured."""
        lines = [f"learning check: {self.questions} questions, {self.prompts} prompts "
                 f"(held-out scenes, seed {self.seed})", f"{'':<28}{'trained':>9}{'untrained':>11}"]
        for k in self.trained:
            kind, what = k.split(".")
            lines.append(f"{kind:<15}{what:<13}{self.trained[k]:>9.3f}{self.untrained[k]:>11.3f}")
        return "\n".join(lines)


# ------------------------------------------------------------------ scenes

def heldout_scenes(cfg: LearningCheckConfig) -> tuple[list[Scene], list[Scene]]:
    """(question scenes, prompt scenes), drawn by the synthetic generator's `Scene.random` from `cfg.seed`."""
    rng = random.Random(cfg.seed)
    scenes = [Scene.random(rng) for _ in range(cfg.question_scenes + cfg.prompts)]
    return scenes[:cfg.question_scenes], scenes[cfg.question_scenes:]


def question_image(scene: Scene, px: int) -> Image.Image:
    """The scene as the training set stores it: rendered at `px` and JPEG-encoded."""
    return Image.open(io.BytesIO(jpeg(scene.render(px)))).convert("RGB")


# ----------------------------------------------------------- comprehension

def judge_answers(scenes: list[Scene], replies: list[list[str]]) -> tuple[dict[str, float], list[dict]]:
    """Exact-match accuracy of `replies[i][j]`, the reply to question j of `scenes[i].qa()`.

    Returns ({color, shape, position, overall}: fraction correct, one row per question).
    """
    rows = []
    for scene, answers in zip(scenes, replies, strict=True):
        for attr, (question, answer), reply in zip(ATTRIBUTES, scene.qa(), answers, strict=True):
            rows.append({"attribute": attr, "question": question, "answer": answer, "reply": reply,
                         "correct": exact_match(reply, answer)})
    scores = {a: sum(r["correct"] for r in rows if r["attribute"] == a) / len(scenes) for a in ATTRIBUTES}
    scores["overall"] = sum(r["correct"] for r in rows) / len(rows)
    return scores, rows


def comprehension_accuracy(model, scenes: list[Scene], cfg: LearningCheckConfig) -> tuple[dict[str, float], list[dict]]:
    """Ask `model` each of `Scene.qa()`'s questions about each scene's image; `judge_answers` of the replies."""
    replies = []
    for scene in scenes:
        image = question_image(scene, cfg.image_size)
        replies.append([answer_question(model, image, q, cfg.answer_tokens) for q, _ in scene.qa()])
    return judge_answers(scenes, replies)


# ----------------------------------------------------------------- creation

def judge_images(images: list[Image.Image], scenes: list[Scene]) -> tuple[dict[str, float], list[dict]]:
    """How often `describe(images[i])` reads `scenes[i]`'s colour, shape and position.

    Returns ({color, shape, position, both (colour and shape)}: fraction correct, one row per image).
    """
    rows = []
    for image, scene in zip(images, scenes, strict=True):
        seen = describe(image)
        row = {"caption": scene.caption(), **{f"seen_{a}": getattr(seen, a) for a in ATTRIBUTES},
               **{a: getattr(seen, a) == getattr(scene, a) for a in ATTRIBUTES}}
        row["both"] = row["color"] and row["shape"]
        rows.append(row)
    return {k: sum(r[k] for r in rows) / len(rows) for k in (*ATTRIBUTES, "both")}, rows


def creation_accuracy(model, scenes: list[Scene], cfg: LearningCheckConfig
                      ) -> tuple[dict[str, float], list[dict], list[Image.Image]]:
    """Create an image from each scene's caption (prompt i seeded `cfg.image_seed + i`); `judge_images` of them,
    and the images."""
    images = create_images(model, [s.caption() for s in scenes], cfg.guidance_scale, cfg.image_steps,
                           cfg.image_seed, cfg.batch_size)
    scores, rows = judge_images(images, scenes)
    return scores, rows, images


# -------------------------------------------------------------- the check

def measure(model, cfg: LearningCheckConfig) -> tuple[dict[str, float], list[dict], list[tuple[str, Image.Image]]]:
    """(figures, detail rows, (caption, created image) pairs) of one model on the held-out scenes."""
    questions, prompts = heldout_scenes(cfg)
    model.eval()
    comp, comp_rows = comprehension_accuracy(model, questions, cfg)
    crea, crea_rows, images = creation_accuracy(model, prompts, cfg)
    figures = {**{f"comprehension.{k}": v for k, v in comp.items()}, **{f"creation.{k}": v for k, v in crea.items()}}
    return figures, comp_rows + crea_rows, [(s.caption(), im) for s, im in zip(prompts, images)]


@torch.no_grad()
def condition_figures(model, scenes: list[Scene], cfg: LearningCheckConfig) -> dict[str, float]:
    """How well the model's dream-query conditions serve its frozen decoder on held-out scenes.

    `creation.diffusion_loss`: the plain denoising MSE of each scene's image (rendered, encoded by the
    VAE) conditioned on the queries after its caption, at noise and timesteps seeded by `cfg.image_seed`
    (the same for every model, so models compare). `creation.null_gap`: the distance of the unconditional
    condition (of the empty prompt, what classifier-free guidance pushes away from) to the mean conditional
    one, in units of the conditional ones' own spread around that mean: large when the null condition has
    drifted away from where the prompts are, so guidance pushes every prompt the same way.
    """
    from dreamllm.components import denoising_loss
    from dreamllm.images import vae_pixels

    device, d = model.device, model.cfg.diffusion
    gen = torch.Generator(device=device).manual_seed(cfg.image_seed)
    conds, mses = [], []
    for i in range(0, len(scenes), cfg.batch_size):
        part = scenes[i:i + cfg.batch_size]
        cond = model.prompt_condition([s.caption() for s in part])
        pixels = torch.stack([vae_pixels(question_image(s, cfg.image_size), d.resolution) for s in part]).to(device)
        latents = model.vae.encode(pixels.to(next(model.vae.parameters()).dtype)).latent_dist.mean
        x0 = latents.float() * model.vae.config.scaling_factor
        _, mse = denoising_loss(model.unet, model.noise_scheduler, x0, cond, d.prediction_type, d.timestep_power,
                                None, gen)
        conds.append(cond.float())
        mses.append(mse.item() * len(part))
    conds_NQD = torch.cat(conds)
    mean = conds_NQD.mean(0)
    spread = (conds_NQD - mean).flatten(1).norm(dim=1).mean()
    gap = (model.prompt_condition([""])[0].float() - mean).norm()
    return {"creation.diffusion_loss": sum(mses) / len(scenes), "creation.null_gap": float(gap / spread.clamp(min=1e-9))}


def learning_curve(models: dict[str, Any], cfg: LearningCheckConfig) -> dict[str, dict[str, float]]:
    """`measure`'s figures plus `condition_figures` of each named model (e.g. untrained, align, igpt, sft),
    on the same held-out scenes and seeds. Models are loaded by the caller, one at a time if it likes
    (a value may be a callable that returns the model)."""
    curve = {}
    for name, model in models.items():
        model = model() if callable(model) and not isinstance(model, torch.nn.Module) else model
        figures, _, _ = measure(model, cfg)
        figures.update(condition_figures(model, heldout_scenes(cfg)[1], cfg))
        curve[name] = figures
    return curve


def curve_metrics(curve: dict[str, dict[str, float]]) -> dict[str, float]:
    """Flat MLflow metrics `learning.<model>.<figure>` (e.g. learning.align.creation.color)."""
    return {f"learning.{name}.{k}": v for name, figures in curve.items() for k, v in figures.items()}


def chance_levels() -> dict[str, float]:
    """Accuracy of a uniform guess per attribute (the synthetic vocabulary's sizes)."""
    from ..data.synthetic import COLORS, POSITIONS, SHAPES

    # A scene's colour is never its background's: one colour fewer to guess among.
    return {"color": 1 / (len(COLORS) - 1), "shape": 1 / len(SHAPES), "position": 1 / len(POSITIONS)}


def curve_table(curve: dict[str, dict[str, float]], ceiling: dict[str, float] | None = None) -> str:
    """One line per figure, one column per model (and the towers' ceiling and chance where they apply)."""
    names = list(curve)
    chance = chance_levels()
    ceiling = ceiling or {}
    lines = [f"{'':<30}" + "".join(f"{n:>11}" for n in names) + f"{'ceiling':>9}{'chance':>8}"]
    for k in next(iter(curve.values())):
        attr = k.split(".", 1)[1]
        lines.append(f"{k:<30}" + "".join(f"{curve[n][k]:>11.3f}" for n in names)
                     + (f"{ceiling[k]:>9.3f}" if k in ceiling else f"{'':>9}")
                     + (f"{chance[attr]:>8.3f}" if attr in chance else ""))
    return "\n".join(lines)


def curve_plot(curve: dict[str, dict[str, float]], ceiling: dict[str, float] | None = None) -> bytes:
    """PNG: accuracy per attribute (colour, shape, position) after each stage, comprehension and creation side
    by side, with chance (dotted) and the towers' ceiling (dashed) marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, chance, ceiling = list(curve), chance_levels(), ceiling or {}
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for ax, kind in zip(axes, ("comprehension", "creation")):
        for attr, colour in zip(ATTRIBUTES, ("tab:red", "tab:blue", "tab:green")):
            ax.plot(names, [curve[n][f"{kind}.{attr}"] for n in names], marker="o", color=colour, label=attr)
            ax.axhline(chance[attr], color=colour, linestyle=":", linewidth=1)
            if f"{kind}.{attr}" in ceiling:
                ax.axhline(ceiling[f"{kind}.{attr}"], color=colour, linestyle="--", linewidth=1)
        ax.set_title(kind)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy on held-out scenes")
    axes[1].legend(loc="upper left", fontsize=8, title="dashed: towers' ceiling, dotted: chance",
                   title_fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def learning_check(model, baseline, cfg: LearningCheckConfig) -> LearningResult:
    """The figures of `model` and of `baseline` (its untrained self, see `untrained_model`), same scenes and seeds."""
    trained, untrained = measure(model, cfg), measure(baseline, cfg)
    return LearningResult(trained[0], untrained[0], 3 * cfg.question_scenes, cfg.prompts, cfg.seed,
                          details={"trained": trained[1], "untrained": untrained[1]},
                          images={"trained": trained[2], "untrained": untrained[2]})


def untrained_model(model):
    """The starting point of `model`'s training: what the learning check compares it against.

    The same config and tokenizer; the frozen vision tower and decoder are
    shared with `model` (not copied; the extra memory is one LLM); the LLM as its flavor
    starts it (the pretrained LLM, e.g. Vicuna for 7b, or the seeded random
    init of the debug/small flavors, without the towers job's text
    pretraining); DreamLLM's own parameters (projectors, dream queries,
    added-token rows) at their seeded init. The pipeline's learning curve
    measures the exact start of stage I instead (`learning_curve`).
    """
    from dreamllm.components import build_llm
    from dreamllm.config import DreamLLMConfig, get_flavor
    from dreamllm.model import DreamLLM

    cfg = DreamLLMConfig.from_dict(model.cfg.to_dict())
    cfg.llm.name_or_path = get_flavor(cfg.flavor).llm.name_or_path
    llm = build_llm(cfg.llm, model.ids.base_vocab_size)
    base = DreamLLM(cfg, model.tokenizer, llm, model.vision, model.unet, model.vae, model.noise_scheduler)
    return base.to(device=model.device, dtype=next(model.llm.parameters()).dtype).eval()


# ----------------------------------------------------------------- logging

def learning_files(result: LearningResult, images: int = 8) -> dict[str, str | Image.Image]:
    """The check's files by relative path: `table.txt`, `details.json` (per model, one row per question and
    per prompt) and the first `images` created images of each model as `<trained|untrained>/NN_<caption>.png`."""
    files: dict[str, str | Image.Image] = {"table.txt": result.table() + "\n",
                                           "details.json": json.dumps(result.details, indent=1)}
    for name in MODELS:
        for i, (caption, image) in enumerate(result.images.get(name, [])[:images]):
            files[f"{name}/{i:02d}_{'-'.join(caption.lower().rstrip('.').split()[:8])}.png"] = image
    return files


def log_learning_check(cfg: TrackingConfig, run_id: str, result: LearningResult, images: int = 8,
                       step: int = 0, tags: dict[str, str] | None = None) -> None:
    """Put the result on run `run_id`: `result.metrics()` at `step`, `learning_files` under the artifact
    folder `learning_check/`, and `tags`."""
    log = tracking.RunLogger(cfg, run_id)
    log.metrics(result.metrics(), step)
    for name, content in learning_files(result, images).items():
        if isinstance(content, str):
            log.text(content, f"learning_check/{name}")
        else:
            log.image(content, f"learning_check/{name}")
    if tags:
        log.tags(tags)


def save_learning_check(result: LearningResult, uri: str, images: int = 8, st: StorageConfig | None = None) -> str:
    """Write `learning_files` under `uri` (local dir or s3://); returns `uri`."""
    for name, content in learning_files(result, images).items():
        if isinstance(content, str):
            data = content.encode()
        else:
            buf = io.BytesIO()
            content.save(buf, format="PNG")
            data = buf.getvalue()
        storage.write_bytes(storage.join(uri, name), data, st)
    return uri


@dataclass
class LearningJobResult:
    """What jobs/learning_check.py reports."""

    result: LearningResult
    model: str
    run_id: str
    new_run: bool
    """True when no training run was found and the figures went to a new run."""
    output: str | None
    """Where the files were also written (None: the run only)."""
    seconds: float


def run_learning_check(cfg: LearningJobConfig, device: str | None = None) -> LearningJobResult:
    """Load the model `cfg.model` names, build its untrained baseline, check both and log on the training run."""
    import torch

    from dreamllm.checkpoint import read_checkpoint_info

    start = time.time()
    track, ref, version_run = cfg.tracking, cfg.model, None
    if model_registry.is_model_ref(ref):
        mv = model_registry.get_version(track, ref)  # pin the number: an alias may move while we check
        track = dataclasses.replace(track, registered_model=mv.name)
        ref, version_run = model_registry.version_ref(mv.name, mv.version), mv.run_id
    path = local_checkpoint(ref, track)
    info = read_checkpoint_info(path)
    meta = info.get("metadata", {})
    if cfg.run_id and not tracking.run_exists(cfg.tracking, cfg.run_id):
        raise ValueError(f"run_id {cfg.run_id} is not a run of {tracking.tracking_uri(cfg.tracking)}")
    run_id = next((r for r in (cfg.run_id, version_run, meta.get("mlflow_run_id"))
                   if tracking.run_exists(cfg.tracking, r)), None)
    model = load_model(str(path), device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
    result = learning_check(model, untrained_model(model), cfg.check)
    if cfg.output:  # files first: a tracking failure below loses nothing already measured
        save_learning_check(result, cfg.output, cfg.logged_images, cfg.storage)
    new_run = run_id is None
    if new_run:
        run_id, _ = tracking.start_or_resume_run(cfg.tracking, f"learning-check-{info['config'].get('flavor', '')}-"
                                                 f"{int(time.time())}", tags={MODEL_TAG: cfg.model})
    tags = {LEARNING_CHECK_MODEL_TAG: cfg.model,
            LEARNING_CHECK_SETTINGS_TAG: json.dumps(dataclasses.asdict(cfg.check), sort_keys=True)}
    try:
        log_learning_check(cfg.tracking, run_id, result, cfg.logged_images, int(meta.get("step", 0)), tags)
    except BaseException:
        if new_run:
            tracking.end_run(cfg.tracking, run_id, "FAILED")
        raise
    if new_run:
        tracking.end_run(cfg.tracking, run_id, "FINISHED")
    return LearningJobResult(result, cfg.model, run_id, new_run, cfg.output, time.time() - start)


# ------------------------------------------------------------ the curve of a run

CURVE_FILES = ("curve.txt", "curve.json", "curve.png")


def towers_ceiling(metrics: dict[str, float]) -> dict[str, float]:
    """The towers job's own figures as the curve's ceilings: the decoder drawing from its own text encoder
    (`sample_<attr>_accuracy` -> creation.<attr>) and the LLM answering from the caption in context
    (`llm_qa_<attr>_accuracy` -> comprehension.<attr>)."""
    out = {}
    for attr in ATTRIBUTES:
        if f"sample_{attr}_accuracy" in metrics:
            out[f"creation.{attr}"] = metrics[f"sample_{attr}_accuracy"]
        if f"llm_qa_{attr}_accuracy" in metrics:
            out[f"comprehension.{attr}"] = metrics[f"llm_qa_{attr}_accuracy"]
    return out


def run_learning_curve(cfg: LearningJobConfig, models: dict[str, Any], run_id: str,
                       ceiling: dict[str, float] | None = None, output: str | None = None) -> dict:
    """`learning_curve` of `models` (name -> model or a callable loading it; the last one is the trained
    model, the first its untrained start), written under `output` (curve.txt, curve.json, curve.png) and
    logged on run `run_id`: `curve_metrics`, plus `learning.<figure>` / `learning.untrained.<figure>` of
    the last and first model (what jobs/learning_check.py logs), and the files under `learning_check/`."""
    start = time.time()
    curve = learning_curve(models, cfg.check)
    names = list(curve)
    table, png = curve_table(curve, ceiling), curve_plot(curve, ceiling)
    doc = json.dumps({"curve": curve, "ceiling": ceiling or {}, "chance": chance_levels(),
                      "settings": dataclasses.asdict(cfg.check)}, indent=1)
    if output:  # files first: a tracking failure below loses nothing already measured
        for name, data in zip(CURVE_FILES, (table.encode(), doc.encode(), png)):
            storage.write_bytes(storage.join(output, name), data, cfg.storage)
    log = tracking.RunLogger(cfg.tracking, run_id)
    metrics = {**curve_metrics(curve), **{f"learning.{k}": v for k, v in curve[names[-1]].items()},
               **{f"learning.untrained.{k}": v for k, v in curve[names[0]].items()}}
    log.metrics(metrics, 0)
    log.text(table + "\n", "learning_check/curve.txt")
    log.text(doc, "learning_check/curve.json")
    with tempfile.TemporaryDirectory() as d:
        path = f"{d}/curve.png"
        with open(path, "wb") as f:
            f.write(png)
        log.client.log_artifact(run_id, path, "learning_check")
    return {"curve": curve, "table": table, "metrics": metrics, "files": output,
            "plot": storage.join(output, "curve.png") if output else None, "seconds": time.time() - start}
