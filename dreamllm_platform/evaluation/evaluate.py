"""Evaluating a DreamLLM on the held-out set, and recording the results on its registry version.

Owns: the validation losses (LM cross-entropy on image->caption pairs,
diffusion MSE on caption->image pairs, with the same seeded noise and
timesteps for every model), question-answering exact-match accuracy
(greedy answers to single questions about an image), text-to-image FID and
CLIP score (images generated from held-out captions with a fixed seed per
caption, FID against the held-out images), and `run_evaluation`, which
loads the model a config names, evaluates it and logs the metrics on its
version (through `dreamllm_platform.model_registry`), with the evaluation's
figures on its run (`pictures.evaluation_pictures`: plots/metrics.png, and
plots/samples_grid.png of the images it created for FID and CLIP score).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass

import torch

from .. import model_registry
from ..checkpoints import load_model
from ..config import to_flat_dict
from ..mlflow_tags import EVAL_SET_TAG, EVAL_TAG_PREFIX
from ..pictures import evaluation_pictures
from .config import EvalConfig
from .heldout import HeldOut, load_heldout
from .metrics import ClipScorer, InceptionFeatures, exact_match, frechet_distance


@dataclass
class EvalResult:
    """Metrics of one evaluation and where they were recorded (`version`/`run_id` None: not logged)."""

    metrics: dict[str, float]
    skipped: dict[str, str]
    """Metric -> why it was not computed."""
    dataset_digest: str
    model: str
    version: str | None
    run_id: str | None
    seconds: float
    pictures: dict[str, str] = dataclasses.field(default_factory=dict)
    """Figure file (plots/metrics.png, plots/samples_grid.png) -> its URI on the evaluation run."""


@torch.no_grad()
def validation_losses(model, pairs, batch_size: int, seed: int) -> dict[str, float]:
    """`val_loss_lm` (token-weighted CE of captions given their image) and `val_loss_diffusion`
    (mean MSE of the UNet on each image's latents, conditioned on its caption)."""
    from dreamllm.components import encode_latent_dist
    from dreamllm.images import clip_pixels, vae_pixels
    from dreamllm.sequence import SequenceBuilder, collate

    builder = SequenceBuilder(model.tokenizer, model.cfg)
    S, R = model.cfg.vision.image_size, model.cfg.diffusion.resolution
    dev = model.device
    torch.manual_seed(seed)  # the diffusion loss draws noise and timesteps: the same draws for every model
    lm_sum = lm_tokens = diff_sum = diff_n = 0.0
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        keys = [str(j) for j in range(len(chunk))]
        pixels = {k: clip_pixels(img, S).to(dev) for k, (_, img) in zip(keys, chunk)}
        mean, _ = encode_latent_dist(model.vae, torch.stack([vae_pixels(img, R) for _, img in chunk]).to(dev))
        latents = dict(zip(keys, mean))  # the posterior mean: no sampling noise in the target
        comp = [[builder.pair(c, k, "comprehension")] for k, (c, _) in zip(keys, chunk)]
        crea = [[builder.pair(c, k, "creation", learn_text=False)] for k, (c, _) in zip(keys, chunk)]
        out = model(**{k: v.to(dev) for k, v in collate(comp, model.ids.pad, pixels=pixels).items()})
        lm_sum, lm_tokens = lm_sum + float(out.loss_lm) * out.num_text_tokens, lm_tokens + out.num_text_tokens
        out = model(**{k: v.to(dev) for k, v in collate(crea, model.ids.pad, latents=latents).items()})
        diff_sum += float(out.loss_diffusion) * out.num_images_created
        diff_n += out.num_images_created
    return {"val_loss_lm": lm_sum / max(lm_tokens, 1), "val_loss_diffusion": diff_sum / max(diff_n, 1)}


def answer_question(model, image, question: str, answer_tokens: int) -> str:
    """The model's greedy answer (its text parts joined) to one question about one image."""
    from dreamllm.generation import TextSampling, chat
    from dreamllm.sequence import Image, Text, Turn

    sampling = TextSampling(max_new_tokens=answer_tokens, temperature=0.0)
    parts = chat(model, [Turn("user", (Image("q"), Text(question)))], {"q": image}, sampling)
    return " ".join(p for p in parts if isinstance(p, str))


def qa_exact_match(model, qa, answer_tokens: int) -> float:
    """Fraction of questions whose greedy answer equals the reference after normalisation."""
    hits = sum(exact_match(answer_question(model, image, question, answer_tokens), answer)
               for image, question, answer in qa)
    return hits / len(qa)


def create_images(model, captions: list[str], guidance_scale: float, steps: int, seed: int,
                  batch_size: int) -> list:
    """One image per caption (PIL, the decoder's resolution), `batch_size` captions per call. Caption i
    always gets seed + i, whatever the batch size (text_to_image seeds image j of a call with seed + j)."""
    from dreamllm.generation import ImageSampling, text_to_image

    made = []
    for i in range(0, len(captions), batch_size):
        made += text_to_image(model, captions[i:i + batch_size],
                              ImageSampling(guidance_scale=guidance_scale, num_inference_steps=steps, seed=seed + i))
    return made


def text_to_image_metrics(model, pairs, cfg: EvalConfig) -> tuple[dict[str, float], dict[str, str], list]:
    """FID (generated vs held-out images) and CLIP score (generated images vs their captions); also returns
    the (caption, created image) pairs (none when neither metric is computed)."""
    f, skipped = cfg.features, {}
    if not f.inception:
        skipped["fid"] = "features.inception is not set"
    if not f.clip:
        skipped["clip_score"] = "features.clip is not set"
    n = min(cfg.text_to_image, len(pairs))
    if n < 2:
        return {}, {"fid": "fewer than 2 held-out pairs", "clip_score": "fewer than 2 held-out pairs"}, []
    if len(skipped) == 2:
        return {}, skipped, []
    captions, reals = [c for c, _ in pairs[:n]], [im for _, im in pairs[:n]]
    made = create_images(model, captions, cfg.guidance_scale, cfg.image_steps, cfg.seed, cfg.batch_size)
    out = {}
    if f.inception:
        net = InceptionFeatures(f.inception, f.inception_size, cfg.storage)
        out["fid"] = frechet_distance(net(made), net(reals))
    if f.clip:
        out["clip_score"] = ClipScorer(f.clip, cfg.storage)(made, captions)
    return out, skipped, list(zip(captions, made))


def evaluate_model(model, heldout: HeldOut, cfg: EvalConfig) -> tuple[dict[str, float], dict[str, str], list]:
    """(metrics, skipped, the (caption, image) pairs it created) of a loaded model on a loaded held-out set."""
    metrics, skipped, created = {}, {}, []
    model.eval()
    if heldout.pairs:
        metrics.update(validation_losses(model, heldout.pairs, cfg.batch_size, cfg.seed))
        m, s, created = text_to_image_metrics(model, heldout.pairs, cfg) if cfg.text_to_image else \
            ({}, {"fid": "text_to_image is 0", "clip_score": "text_to_image is 0"}, [])
        metrics.update(m)
        skipped.update(s)
    else:
        skipped.update({k: "no held-out pairs" for k in ("val_loss_lm", "val_loss_diffusion", "fid", "clip_score")})
    if heldout.qa:
        metrics["qa_exact_match"] = qa_exact_match(model, heldout.qa, cfg.answer_tokens)
    else:
        skipped["qa_exact_match"] = "no held-out questions"
    return metrics, skipped, created


def settings_digest(heldout: HeldOut, cfg: EvalConfig) -> str:
    """What makes two evaluations comparable: the examples read and every setting that changes a metric."""
    settings = {"data": heldout.digest, "text_to_image": cfg.text_to_image, "image_steps": cfg.image_steps,
                "guidance_scale": cfg.guidance_scale, "answer_tokens": cfg.answer_tokens, "seed": cfg.seed,
                "features": dataclasses.asdict(cfg.features)}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def run_evaluation(cfg: EvalConfig) -> EvalResult:
    """Evaluate the model `cfg.model` names; a registry reference gets the results logged on its version."""
    start = time.time()
    version, track = None, cfg.tracking
    ref = cfg.model
    if model_registry.is_model_ref(ref):
        mv = model_registry.get_version(cfg.tracking, ref)  # pin the number: an alias may move while we evaluate
        version, track = mv.version, dataclasses.replace(cfg.tracking, registered_model=mv.name)
        ref = model_registry.version_ref(mv.name, mv.version)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(ref, device=device, tracking=track)
    heldout = load_heldout(cfg.heldout, cfg.storage)
    metrics, skipped, created = evaluate_model(model, heldout, cfg)
    digest = settings_digest(heldout, cfg)
    run_id, pictures = None, {}
    if version is not None:
        params = {k: v for k, v in to_flat_dict(cfg).items() if not k.startswith(("tracking.", "storage."))}
        # Artifacts only: the gate reads the version's dreamllm.eval.* tags, which the figures add nothing to.
        figures = evaluation_pictures(metrics, [im for _, im in created], [c for c, _ in created],
                                      title=f"{track.registered_model} v{version}")
        run_id, pictures = model_registry.log_version_evaluation(track, version, metrics, params,
                                                                 {EVAL_SET_TAG: digest}, EVAL_TAG_PREFIX, figures)
    return EvalResult(metrics, skipped, digest, cfg.model, version, run_id, time.time() - start, pictures)
