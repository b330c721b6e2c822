"""The towers' output: sample images and their scores, the LLM's answers from context, and the folder.

Owns: rank 0's end of the towers job: images from the fixed prompts (logged
to MLflow and saved under samples/), the run's pictures (`pictures.log_run_pictures`: each phase's loss
curves and the grid of those images, under plots/), `samples.scored` random synthetic
prompts scored by the scene judge (the decoder's own ceiling: colour, shape
and position of what it draws from its own text encoder), the LLM's greedy
answers to held-out synthetic questions with the caption in context (its
ceiling as a reader of what comes before a question), and the output folder,
with decoder.json written last (without it the folder is not finished).

The folder, in the diffusers Stable Diffusion layout (so
`DiffusionConfig(name_or_path=<output>)` loads it through build_vae,
build_unet and build_train_scheduler, and `StableDiffusionPipeline` loads it
whole): model_index.json, vae/, unet/, scheduler/ (the training DDPM
schedule), text_encoder/, tokenizer/; vision/ (the CLIP vision tower) and
llm/ (the causal LM), which `dreamllm_platform.checkpoints.flavor_config`
puts in the model too; samples/*.png; decoder.json (a unique id of this
export, flavor, config hash, metrics, MLflow run).
"""
from __future__ import annotations

import dataclasses
import json
import random
import tempfile
import uuid
from pathlib import Path

import numpy as np
import torch

from dreamllm.components import build_sampler

from .. import storage
from ..checkpoints import DECODER_FILE
from ..data.synthetic import Scene
from ..mlflow_tags import TOWERS_URI_TAG
from ..pictures import log_run_pictures
from .objectives import sd_pipeline

QA_SEED = 4242
"""Seed of the held-out scenes whose questions the LLM answers from their caption (not the learning check's)."""


@torch.no_grad()
def export_towers(worker, config: dict) -> None:
    """Rank 0: samples and scores, the output folder, decoder.json last."""
    cfg = worker.cfg
    metrics, images = _samples_and_save(worker)
    worker.metrics.update(metrics)
    worker.log.metrics(worker.metrics, worker.step)
    worker.log.tags({TOWERS_URI_TAG: cfg.output})
    # The phases' curves (vae/, unet/, vision/, llm/ losses over the steps), not the one-point final figures.
    log_run_pictures(worker.log, images, list(cfg.samples.prompts), title=f"towers ({cfg.run_name})",
                     groups=tuple(cfg.phases()))
    worker.log.close()  # what an outage kept, and the towers tag the pipeline reads: sent before the finish mark
    info = {"id": uuid.uuid4().hex, "flavor": cfg.flavor, "config_hash": worker.config_hash,
            "metrics": worker.metrics, "mlflow_run_id": worker.run_id, "tracking_uri": cfg.tracking.tracking_uri,
            "ray_run_name": cfg.run_name, "config": dataclasses.asdict(cfg)}
    storage.write_bytes(storage.join(cfg.output, DECODER_FILE),  # last: marks the towers finished
                        json.dumps(info, indent=1, default=str).encode(), cfg.storage)
    print(f"[towers] wrote the towers to {cfg.output}; bad images skipped by this worker: "
          f"{worker.stream.skipped or 'none'}", flush=True)


def llm_qa_accuracy(llm, texts, n: int, seed: int) -> dict[str, float]:
    """Per attribute (colour, shape, position), the fraction of `n` held-out scenes' questions the LLM answers
    right, greedy, from the caption in the user turn (stage III's chat template, the caption where the
    image will be): `llm_qa_<attribute>_accuracy`."""
    from dreamllm.sequence import Text, Turn

    from ..evaluation.metrics import exact_match

    rng = random.Random(seed)
    hits = {"color": 0, "shape": 0, "position": 0}
    llm.eval()
    for _ in range(n):
        scene = Scene.random(rng)
        for attr, (question, answer) in zip(hits, scene.qa()):
            ex = texts.builder.conversation([Turn("user", (Text(scene.caption()), Text(question)))],
                                            add_generation_prompt=True)
            ids = torch.tensor([ex.input_ids], device=llm.device)
            out = llm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                               eos_token_id=texts.builder.ids.eos, pad_token_id=texts.builder.ids.eos)
            hits[attr] += exact_match(texts.builder.tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True),
                                      answer)
    return {f"llm_qa_{attr}_accuracy": h / max(1, n) for attr, h in hits.items()}


def _samples_and_save(worker) -> tuple[dict, list]:
    """(the sample-score metrics, the images of the fixed prompts); the folder is uploaded to the output."""
    from ..evaluation.scenes import describe

    cfg, s = worker.cfg, worker.cfg.samples
    parts = (worker.vae, worker.text_encoder, worker.tokenizer, worker.unet)
    pipe = sd_pipeline(*parts, build_sampler(worker.scheduler, s.scheduler)).to(worker.device)

    def create(prompts: list[str], seed: int):
        images = []
        for i in range(0, len(prompts), 16):
            gens = [torch.Generator().manual_seed(seed + i + j) for j in range(len(prompts[i:i + 16]))]
            images += pipe(prompts[i:i + 16], num_inference_steps=s.num_inference_steps,
                           guidance_scale=s.guidance_scale, generator=gens, output_type="pil").images
        return images

    metrics = {}
    with tempfile.TemporaryDirectory() as tmp:
        sample_dir = Path(tmp) / "samples"
        sample_dir.mkdir()
        fixed = create(list(s.prompts), cfg.seed)
        for i, image in enumerate(fixed):
            image.save(sample_dir / f"{i:02d}.png")
            worker.log.image(image, f"samples/{i:02d}.png")
        (sample_dir / "prompts.json").write_text(json.dumps(list(s.prompts), indent=1))
        if s.scored:
            rng = random.Random(cfg.seed + 12345)
            scenes = [Scene.random(rng) for _ in range(s.scored)]
            guesses = [describe(im) for im in create([sc.caption() for sc in scenes], cfg.seed + 1)]
            for attr in ("color", "shape", "position"):
                metrics[f"sample_{attr}_accuracy"] = float(np.mean([getattr(g, attr) == getattr(sc, attr)
                                                                    for g, sc in zip(guesses, scenes)]))
            metrics["sample_color_and_position_accuracy"] = float(np.mean(
                [g.color == sc.color and g.position == sc.position for g, sc in zip(guesses, scenes)]))
        if cfg.llm.steps and cfg.llm.scored:
            metrics.update(llm_qa_accuracy(worker.llm, worker.texts, cfg.llm.scored, QA_SEED))
        # The training DDPM schedule is what build_train_scheduler loads; samplers derive from it.
        sd_pipeline(*parts, worker.scheduler).save_pretrained(tmp)
        if cfg.vision.steps:
            worker.vision.save_pretrained(Path(tmp) / "vision")
        if cfg.llm.steps:
            worker.llm.save_pretrained(Path(tmp) / "llm")
        storage.upload_dir(tmp, cfg.output, cfg.storage)
    return metrics, fixed
