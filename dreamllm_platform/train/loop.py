"""The training loop that runs on every Ray Train worker, for all three stages.

Owns: building the model and its DeepSpeed engine (a plain torch AdamW passed
in, so nothing is compiled on CPU), drawing micro-batches from the mixed data
sources, the optimizer steps, metrics (aggregated over ranks, logged by rank
0), DeepSpeed checkpoints through `ray.train.report` and resuming from them
(the weights and optimizer, each rank's random state and the data position),
the example-id record of `data.record_ids`,
sample images, and the stage's export. The model maths is `dreamllm`'s.
"""
from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path

import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from dreamllm.generation import ImageSampling, text_to_image
from dreamllm.model import DreamLLM

from .. import storage
from ..checkpoints import export_checkpoint, flavor_config, load_model
from ..data.assembly import ExampleCollator
from ..mlflow_tags import CHECKPOINT_URI_TAG, STAGE_TAG
from ..pictures import log_run_pictures
from ..tracking import RunLogger
from .config import TrainConfig
from .worker import MetricWindow, WorkerContext, lr_factor, maybe_fail, record_step, report_checkpoint, rng_checksum

DS_TAG = "ds"
STATE_FILE = "train_state.json"
NO_DECAY = ("bias", "norm", "dream_queries", "new_token_embed", "new_token_head")


def build_model(cfg: TrainConfig) -> DreamLLM:
    """The stage's starting model (previous export or a fresh flavor) with the stage's freeze policy."""
    m = cfg.model
    model = load_model(m.init_from, tracking=cfg.tracking) if m.init_from else \
        DreamLLM.from_config(flavor_config(m.flavor, m.decoder, cfg.storage))
    if m.condition_dropout is not None:
        model.cfg.condition_dropout = m.condition_dropout
    if m.gradient_checkpointing is not None:
        model.set_gradient_checkpointing(m.gradient_checkpointing)
    return model.set_stage(cfg.stage, m.train_llm).train()


def param_groups(model: DreamLLM, weight_decay: float, lr: float, llm_lr: float | None = None) -> list[dict]:
    """AdamW groups: the LLM's parameters at `llm_lr` (None: `lr`), DreamLLM's own (projectors, dream
    queries, added-token rows) at `lr`; each split into decayed weights and undecayed biases/norms/rows."""
    groups = {(owner, decay): [] for owner in ("llm", "own") for decay in (True, False)}
    for name, p in model.named_parameters():
        if p.requires_grad:
            owner = "llm" if name.startswith("llm.") else "own"
            decay = not (any(k in name for k in NO_DECAY) or p.ndim < 2)
            groups[(owner, decay)].append(p)
    rates = {"llm": lr if llm_lr is None else llm_lr, "own": lr}
    return [{"params": ps, "weight_decay": weight_decay if decay else 0.0, "lr": rates[owner], "name": f"{owner}"}
            for (owner, decay), ps in groups.items() if ps]


def lr_lambda(cfg: TrainConfig):
    """The stage's schedule (`worker.lr_factor`), as a factor of each group's peak rate."""
    o = cfg.optim
    warm = max(1, int(o.warmup_ratio * o.max_steps))
    return lambda step: lr_factor(step, o.max_steps, warm, o.schedule, o.min_lr_ratio)


def deepspeed_config(cfg: TrainConfig, on_gpu: bool) -> dict:
    d = cfg.deepspeed
    bf16 = d.precision == "bf16" or (d.precision == "auto" and on_gpu)
    zero: dict = {"stage": d.zero_stage, "overlap_comm": on_gpu, "contiguous_gradients": True}
    if d.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    return {
        "train_micro_batch_size_per_gpu": cfg.data.micro_batch_size,
        "gradient_accumulation_steps": d.gradient_accumulation_steps,
        "gradient_clipping": d.gradient_clipping,
        "bf16": {"enabled": bf16},
        "zero_optimization": zero,
        # A torch optimizer instead of DeepSpeed's fused ones: nothing to compile on CPU.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class MixedBatches:
    """Endless micro-batches: each draw picks a source by its weight, then that source's next batch.

    Each source is this worker's shard of a Ray Dataset; when one is used up
    it starts its next epoch. A micro-batch comes from one source, so batches
    are modality-homogeneous (documents, pairs or conversations: the purpose of
    modality-length grouping), and packing into rows of the context length
    takes the place of grouping by length. The draw must be the same on every rank: Ray
    Data's streaming split feeds all ranks of a dataset in lockstep, so a rank
    reading another source than its peers would stall them.

    Its position (`state`: the draw generator, each source's epoch and, in the
    current epoch, its shuffle seed and batches taken) goes into every
    checkpoint; `restore` replays it: a resumed run reads the examples an
    uninterrupted one would. That holds because each epoch of a shard yields
    the same rows in the same order (`train.run.fit` makes Ray Data keep the
    order, and the local shuffle is seeded).
    """

    def __init__(self, shards: dict, weights: dict[str, float], collate, batch_size: int, shuffle: int, seed: int):
        self.shards, self.collate, self.batch_size, self.shuffle = shards, collate, batch_size, shuffle
        self.names = list(weights)
        self.weights = [weights[n] for n in self.names]
        self.rng = random.Random(seed)
        self.iters: dict = {}
        self.open: dict[str, dict] = {}  # source -> {"seed": its epoch's shuffle seed, "taken": batches drawn}
        self.epoch = {n: 0 for n in self.names}

    def _iter(self, name: str, shuffle_seed: int):
        return iter(self.shards[name].iter_torch_batches(
            batch_size=self.batch_size, collate_fn=self.collate, drop_last=False,
            local_shuffle_buffer_size=self.shuffle or None, local_shuffle_seed=shuffle_seed))

    def __next__(self) -> dict:
        name = self.rng.choices(self.names, self.weights)[0]
        for attempt in range(2):
            if name not in self.iters:
                self.epoch[name] += 1
                seed = self.rng.randrange(2**31)
                self.iters[name], self.open[name] = self._iter(name, seed), {"seed": seed, "taken": 0}
            try:
                batch = next(self.iters[name])
            except StopIteration:
                del self.iters[name], self.open[name]
                continue
            self.open[name]["taken"] += 1
            return batch
        raise ValueError(f"data source {name!r} gave this worker no examples (too few shards for the workers?)")

    def state(self) -> dict:
        """The position, as JSON: where `restore` picks up."""
        return {"rng": self.rng.getstate(), "epoch": dict(self.epoch), "open": {n: dict(p) for n, p in self.open.items()}}

    def restore(self, state: dict) -> int:
        """Go to the position `state` (of `state()`): the open epochs are read again up to where they were
        (every rank alike, as the streaming split needs); returns the batches skipped."""
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.epoch.update(state["epoch"])
        skipped = 0
        for name, pos in state["open"].items():
            it = self._iter(name, pos["seed"])
            for _ in range(pos["taken"]):
                next(it)  # the same epoch had these batches before: no StopIteration
            self.iters[name], self.open[name] = it, dict(pos)
            skipped += pos["taken"]
        return skipped


class WithExampleIds(NumpyBatchCollateFn):
    """The stage's collator, plus `example_ids` ("shard_id/record_id" of each example, in batch order): what the
    step saw, for `data.record_ids`. A list is not a tensor: Ray leaves it alone and the loop pops it."""

    def __init__(self, collate: ExampleCollator):
        self.collate = collate

    def __call__(self, batch: dict) -> dict:
        out = self.collate(batch)
        out["example_ids"] = [f"{s}/{r}" for s, r in zip(batch["shard_id"], batch["record_id"])]
        return out


def train_loop(config: dict) -> None:
    """Ray Train entry point; `config` = {"cfg": TrainConfig, "run_id": str, "fail_at_step": int | None}."""
    import deepspeed
    import ray.train

    cfg: TrainConfig = config["cfg"]
    ctx = WorkerContext.current()
    rank, world, device = ctx.rank, ctx.world, ctx.device
    on_gpu = device.type == "cuda"
    torch.manual_seed(cfg.seed)  # identical init everywhere

    model = build_model(cfg).to(device)
    o = cfg.optim
    optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay, o.lr, o.llm_lr), lr=o.lr, betas=o.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg, on_gpu), dist_init_required=False)

    step, seen, state, rng_restored = 0, {"samples": 0.0, "tokens": 0.0, "images": 0.0}, {}, False
    resumed_from = ray.train.get_checkpoint()
    if resumed_from:
        # Each rank reads its own download: ranks sharing one `as_directory()` copy on a node raced (one
        # read a checkpoint file another was still writing or already removing).
        with tempfile.TemporaryDirectory() as own:
            d = resumed_from.to_directory(own)
            engine.load_checkpoint(d, tag=DS_TAG)
            state = json.loads((Path(d) / STATE_FILE).read_text())
            step, seen = state["step"], state["seen"]
            # each rank its own noise, timesteps and condition dropout, where the checkpointed run left them
            rng_restored = ctx.restore_rng(Path(d), cfg.seed, step)
    else:
        ctx.seed_rank(cfg.seed, step)  # each rank its own noise, timesteps and condition dropout
    # A tracking outage must not stop training: the logger keeps what fails and says so in the run.
    log = RunLogger(cfg.tracking, config["run_id"], resilient=True) if rank == 0 else None
    if rank == 0 and resumed_from:
        log.metrics({"resumed_from_step": step}, step)  # shows restarts in the run's history
    if rank == 0:
        print(f"[train] stage={cfg.stage} workers={world} device={device.type} start_step={step} "
              f"max_steps={cfg.optim.max_steps} trainable={sum(p.numel() for p in model.parameters() if p.requires_grad):,}",
              flush=True)

    batches = MixedBatches({n: ray.train.get_dataset_shard(n) for n in cfg.data.mix}, cfg.data.mix,
                           WithExampleIds(_collator(cfg, model)), cfg.data.micro_batch_size, cfg.data.shuffle_buffer,
                           seed=cfg.seed * 1000)  # same on every rank (see MixedBatches)
    if "batches" in state:
        skipped = batches.restore(state["batches"])
        if rank == 0:
            print(f"[train] resumed at step {step}: data position restored ({skipped} batches of the open epochs "
                  f"skipped), random state {'restored' if rng_restored else 'reseeded (the checkpoint has none for this rank)'}",
                  flush=True)
    ga = cfg.deepspeed.gradient_accumulation_steps
    window = MetricWindow()
    while step < cfg.optim.max_steps:
        sums = {"loss": 0.0, "loss_lm": 0.0, "loss_diffusion": 0.0}
        counts = {"samples": 0.0, "tokens": 0.0, "images": 0.0}
        ids, rng_crc = [], rng_checksum()
        for _ in range(ga):
            batch = next(batches)
            ids += batch.pop("example_ids")
            batch = {k: v.to(device) for k, v in batch.items()}
            out = engine(**batch)
            engine.backward(out.loss)
            engine.step()
            sums["loss"] += out.loss.item() / ga
            sums["loss_lm"] += out.loss_lm.item() / ga
            sums["loss_diffusion"] += out.loss_diffusion.item() / ga
            real = batch["input_ids"] != model.ids.pad
            counts["samples"] += int(((batch["position_ids"] == 0) & real).sum())  # each example starts at 0
            counts["tokens"] += int(real.sum())
            counts["images"] += out.num_images_created
        step += 1
        maybe_fail(config.get("fail_at_step"), step, ctx, _run_dir(cfg), cfg.storage, "train")
        if cfg.data.record_ids:
            record_step(ctx, _run_dir(cfg), cfg.storage, step, {"ids": ids, "loss": sums["loss"], "rng": rng_crc})

        window.add({"tokens": counts["tokens"], "images": counts["images"]}, **sums)
        counts = ctx.all_reduce(counts)
        for k in seen:
            seen[k] += counts[k]
        last = step == cfg.optim.max_steps
        if step % cfg.log_every == 0 or last:
            grad_norm = engine.get_global_grad_norm()
            means = window.pop(ctx)
            sums = {k: means[k] for k in sums}
            rates = scheduler.get_last_lr()  # one per parameter group: the LLM's first when it trains
            metrics = {**sums, "lr": rates[-1], "tokens_per_s": means["tokens_per_s"],
                       "images_per_s": means["images_per_s"], "samples_seen": seen["samples"],
                       "tokens_seen": seen["tokens"]}
            if model.llm_trainable:
                metrics["llm_lr"] = rates[0]
            if grad_norm is not None:
                metrics["grad_norm"] = float(grad_norm)
            if rank == 0:
                print(f"[train] step {step}/{cfg.optim.max_steps} loss {sums['loss']:.4f} "
                      f"(lm {sums['loss_lm']:.4f}, diffusion {sums['loss_diffusion']:.4f}) "
                      f"lr {metrics['lr']:.2e} {metrics['tokens_per_s']:.0f} tok/s "
                      f"{metrics['images_per_s']:.2f} img/s", flush=True)
                log.metrics(metrics, step)
        if cfg.sample_every and step % cfg.sample_every == 0 and not last:
            _log_samples(engine, cfg, log, step, rank)
        if step % cfg.checkpoint.every_n_steps == 0 or last:
            _save_and_report(engine, ctx, {"step": step, "seen": seen, "batches": batches.state()}, sums)

    final_samples = _log_samples(engine, cfg, log, step, rank)
    export_uri = cfg.checkpoint.export_uri or storage.join(_run_dir(cfg), "export")
    _export(engine, cfg, export_uri, config["run_id"], step, rank)
    if rank == 0:
        log.tags({CHECKPOINT_URI_TAG: export_uri, STAGE_TAG: cfg.stage})
        log.close()  # what an outage kept, and the export's tag, which the registry reads
        # After close: the curves read the run's whole metric history back from MLflow.
        log_run_pictures(log, *final_samples, title=f"{cfg.stage} ({cfg.run_name})")
        print(f"[train] exported the {cfg.stage} checkpoint to {export_uri}", flush=True)


def _collator(cfg: TrainConfig, model: DreamLLM) -> ExampleCollator:
    return ExampleCollator(model.cfg, pack=cfg.data.pack)


def _run_dir(cfg: TrainConfig) -> str:
    return storage.join(cfg.checkpoint.storage_path, cfg.run_name)


def _save_and_report(engine, ctx: WorkerContext, state: dict, metrics) -> None:
    """Every rank writes its DeepSpeed shard and its random state, rank 0 the step, the counts and the data
    position (the same on every rank); Ray merges them into one checkpoint in storage."""
    def write(d: Path) -> bool:
        engine.save_checkpoint(str(d), tag=DS_TAG)
        ctx.save_rng(d)
        if ctx.is_main:
            (d / STATE_FILE).write_text(json.dumps(state))
        return True

    report_checkpoint(state["step"], metrics, write)


def _export(engine, cfg: TrainConfig, uri: str, run_id: str, step: int, rank: int) -> None:
    """The consolidated inference checkpoint (what evaluation, the registry and serving load)."""
    import deepspeed

    model: DreamLLM = engine.module
    params = list(model.parameters()) if cfg.deepspeed.zero_stage == 3 else []
    # ZeRO-3 shards parameters: gather them (every rank takes part) before rank 0 writes.
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=bool(params)):
        if rank == 0:
            meta = {"mlflow_run_id": run_id, "ray_run_name": cfg.run_name, "stage": cfg.stage, "step": step,
                    "init_from": cfg.model.init_from}
            export_checkpoint(model, uri, metadata=meta)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _log_samples(engine, cfg: TrainConfig, log, step: int, rank: int) -> tuple[list, list[str]]:
    """A few images from fixed prompts and the stage's seed (the same in every stage, so stages compare),
    logged as run artifacts; returns (images, prompts) (ZeRO-3 shards weights: none)."""
    if rank != 0 or cfg.deepspeed.zero_stage == 3 or not cfg.tracking.sample_images:
        return [], []
    model: DreamLLM = engine.module
    prompts = list(cfg.sample_prompts)[:cfg.tracking.sample_images]
    images = text_to_image(model, prompts, ImageSampling(num_inference_steps=10, seed=cfg.seed))
    model.train()
    for i, img in enumerate(images):
        log.image(img, f"samples/step_{step:07d}_{i}.png")
    return images, prompts
