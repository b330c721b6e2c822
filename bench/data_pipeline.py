"""Data-pipeline benchmarks, measured side by side on the same synthetic shards in one run.

1. Latent precompute: the Ray Data pipeline (CPU read tasks + VAE actor pool)
   vs a naive single-process loop (read, decode, crop, encode, shard after
   shard) over the same shards with the same batch size: images/s and ratio.
   The pipeline's time includes its actor start-up; Ray's own start is excluded.
2. Training step: DreamLLM forward+backward+step with precomputed latents
   (a fresh sample drawn from the stored mean/logvar) vs encoding every dream
   image with the VAE online each step (decode JPEG, crop, encode), as the
   original DreamLLM code does: seconds/step and ratio.
3. (--bench modes or all) Training steps/s of a stage in the two data modes on the same pair shards,
   side by side: store mode (precompute the latent store, then train from it: the precompute's
   seconds are printed beside) and streaming mode (`data.mode=streaming`: the VAE encoder pool feeds
   the training workers, no store). Steps/s is timed between the first and the last logged step
   (MLflow timestamps), so start-up is left out of both.

    python bench/data_pipeline.py [--flavor small] [--mmc4-shards 4] [--pair-shards 4] [--steps 6]
    python bench/data_pipeline.py --bench modes --flavor debug --mmc4-shards 1 --pair-shards 1 --train-steps 8

No pass/fail: it prints figures. On a 2-core CPU machine Ray's start-up costs
dominate small sets; the pipeline pays off with more shards, cores and GPUs.
"""
import argparse
import io
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from dreamllm.components import build_vae, encode_latent_dist  # noqa: E402
from dreamllm.config import get_flavor  # noqa: E402
from dreamllm.images import vae_pixels  # noqa: E402
from dreamllm_platform.data.assembly import ExampleCollator, training_dataset  # noqa: E402
from dreamllm_platform.data.config import EncoderConfig, PrecomputeConfig, SyntheticConfig  # noqa: E402
from dreamllm_platform.data.latents import plan_shards, resolved_sources, run_precompute  # noqa: E402
from dreamllm_platform.data.shards import ShardReader  # noqa: E402
from dreamllm_platform.data.store import LatentStore  # noqa: E402
from dreamllm_platform.data.synthetic import jpeg, write_synthetic  # noqa: E402
from dreamllm_platform.runtime import init_ray  # noqa: E402


def naive_loop(cfg: PrecomputeConfig, store: LatentStore | None = None) -> tuple[int, float]:
    """Single process: each shard read, filtered, cropped and encoded in turn.

    With `store`, each shard is also committed there as the job commits it (latents, CLIP crops,
    records, manifest): the whole job's work, for a baseline that ends with the same output.
    """
    model = get_flavor(cfg.flavor)
    vae = build_vae(model.diffusion)
    R, B = model.diffusion.resolution, cfg.encoder.batch_size
    n, t0 = 0, time.perf_counter()
    for task in plan_shards(cfg):
        reader = ShardReader(resolved_sources(cfg)[task.source], task.uri, cfg.filters, R,
                             model.vision.image_size, cfg.storage)
        imgs = list(reader.images())
        crops = [np.frombuffer(i["vae_u8"], np.uint8).reshape(R, R, 3) for i in imgs]
        rows = []
        for s in range(0, len(crops), B):
            x = torch.from_numpy(np.stack(crops[s:s + B]).astype(np.float32) / 255.0).permute(0, 3, 1, 2) * 2 - 1
            mean, logvar = encode_latent_dist(vae, x)
            if store is not None:  # without a store, the loop measured before (the README's figures)
                rows += [{"sha256": i["sha256"], "mean": m.numpy().astype(np.float16).tobytes(),
                          "logvar": v.numpy().astype(np.float16).tobytes(), "clip_u8": i["clip_u8"]}
                         for i, m, v in zip(imgs[s:s + B], mean, logvar)]
        if store is not None:
            store.commit(task.shard_id, source_uri=task.uri, fmt=cfg.sources[task.source].format,
                         config_hash=task.config_hash, records=reader.records, latents=rows,
                         report=reader.report.to_dict(), meta={"flavor": cfg.flavor})
        n += len(crops)
    return n, time.perf_counter() - t0


def train_steps(model, batches, online: dict | None) -> list[float]:
    """Seconds of each step; `online` maps key -> JPEG bytes to decode, crop and encode in the step."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    R = model.cfg.diffusion.resolution
    times = []
    for b, keys in batches:
        t0 = time.perf_counter()
        b = dict(b)
        if online is not None and keys:
            pixels = torch.stack([vae_pixels(Image.open(io.BytesIO(online[k])), R) for k in keys])
            b["latent_mean"], b["latent_logvar"] = encode_latent_dist(model.vae, pixels)
        out = model(**b)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return times


def sd_vae_encode_seconds(resolution: int = 512, reps: int = 2) -> float:
    """Seconds to encode one image with a VAE of Stable Diffusion 2.1's architecture (random weights)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        sample_size=resolution).eval()
    x = torch.rand(1, 3, resolution, resolution) * 2 - 1
    encode_latent_dist(vae, x)  # warm-up
    t0 = time.perf_counter()
    for _ in range(reps):
        encode_latent_dist(vae, x)
    return (time.perf_counter() - t0) / reps


def train_modes(args, work: Path, syn: SyntheticConfig) -> None:
    """Section 3: the same stage-I run on the same shards, store mode vs streaming mode."""
    import dataclasses
    import json

    import yaml

    from dreamllm_platform.config import load_config
    from dreamllm_platform.data.config import default_sources
    from dreamllm_platform.tracking import client
    from dreamllm_platform.train.config import STAGE_DEFAULTS, TrainConfig
    from dreamllm_platform.train.trainer import run_stage

    d = (work / "modes").resolve()
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    pre = PrecomputeConfig(flavor=args.flavor, data_root=str((work / "data").resolve()), output=str(d / "store"),
                           sources={"laion": default_sources()["laion"]}, synthetic=syn,
                           encoder=EncoderConfig(batch_size=16))
    pre_yaml = d / "precompute.yaml"
    pre_yaml.write_text(yaml.safe_dump(json.loads(json.dumps(dataclasses.asdict(pre)))))

    def stage(mode: str):
        sets = [f"model.flavor={args.flavor}", f"scaling.num_workers={args.workers}", "log_every=1",
                f"optim.max_steps={args.train_steps}", f"checkpoint.every_n_steps={args.train_steps}",
                f"data.micro_batch_size={args.batch}", "tracking.sample_images=0", f"data.mode={mode}",
                f"data.store={d / 'store'}", f"data.precompute_config={pre_yaml}", "data.prepare=false",
                f"checkpoint.storage_path={d / 'ray'}", f"tracking.tracking_uri=sqlite:///{d / 'mlflow.db'}",
                f"run_name=bench-{mode}"]
        cfg = load_config(TrainConfig, None, sets, STAGE_DEFAULTS["align"])
        t0 = time.perf_counter()
        r = run_stage(cfg)
        wall = time.perf_counter() - t0
        ts = sorted(m.timestamp for m in client(cfg.tracking).get_metric_history(r.mlflow_run_id, "loss"))
        return (len(ts) - 1) / max((ts[-1] - ts[0]) / 1000, 1e-9), wall

    print(f"\n== stage I training, store mode vs streaming mode, flavor {args.flavor}, {args.workers} worker(s), "
          f"{args.train_steps} steps of micro-batch {args.batch} ==")
    init_ray()
    pre_s = run_precompute(pre).seconds
    store_sps, store_wall = stage("store")
    stream_sps, stream_wall = stage("streaming")
    print(f"store mode:     {store_sps:.2f} steps/s (precompute {pre_s:.1f} s before; fit {store_wall:.1f} s "
          f"incl. start-up)")
    print(f"streaming mode: {stream_sps:.2f} steps/s (no precompute; fit {stream_wall:.1f} s incl. start-up and "
          f"the encoder pool)")
    print(f"ratio streaming / store steps/s: {stream_sps / store_sps:.2f}x; "
          f"end to end (precompute + fit) store {pre_s + store_wall:.1f} s vs streaming {stream_wall:.1f} s")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flavor", default="small")
    ap.add_argument("--mmc4-shards", type=int, default=4)
    ap.add_argument("--pair-shards", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--sd-vae", action=argparse.BooleanOptionalAction, default=True,
                    help="also time an SD-2.1-shaped VAE encoder at 512 px (the 7b flavor's online cost)")
    ap.add_argument("--workdir", default=".tmp/bench_data_pipeline")
    ap.add_argument("--bench", choices=("precompute", "modes", "all"), default="precompute",
                    help="precompute: sections 1-2; modes: section 3 (store vs streaming training); all: both")
    ap.add_argument("--train-steps", type=int, default=20, help="section 3: optimizer steps of each run")
    ap.add_argument("--workers", type=int, default=1, help="section 3: Ray Train workers")
    args = ap.parse_args()

    work = Path(args.workdir)
    syn = SyntheticConfig(mmc4_shards=args.mmc4_shards, docs_per_shard=16, webdataset_shards=args.pair_shards,
                          parquet_shards=1, pairs_per_shard=64, conversations=32, instruct_docs=4)
    cfg = PrecomputeConfig(flavor=args.flavor, data_root=str(work / "data"), output=str(work / "store"),
                           synthetic=syn, encoder=EncoderConfig(batch_size=16))
    if not (work / "data/_SUCCESS").exists():
        write_synthetic(cfg.data_root, syn)
    shutil.rmtree(cfg.output, ignore_errors=True)
    if args.bench == "modes":
        return train_modes(args, work, syn)

    print(f"== latent precompute, flavor {args.flavor}, {len(plan_shards(cfg))} shards ==")
    n_naive, s_naive = naive_loop(cfg)
    init_ray()
    summary = run_precompute(cfg)
    n_ray, s_ray = summary.images_encoded, summary.seconds
    assert n_ray == n_naive, (n_ray, n_naive)
    print(f"naive single-process loop: {n_naive} images in {s_naive:.1f} s = {n_naive / s_naive:.1f} images/s")
    print(f"Ray Data pipeline:         {n_ray} images in {s_ray:.1f} s = {n_ray / s_ray:.1f} images/s "
          f"(incl. actor start-up)")
    print(f"ratio pipeline / naive: {s_naive / s_ray:.2f}x")

    print(f"\n== training step, precomputed latents vs online VAE encoding, batch {args.batch} ==")
    from dreamllm.model import DreamLLM

    model_cfg = get_flavor(args.flavor)
    collate = ExampleCollator(model_cfg)
    rows = [r for r in training_dataset(cfg.output, model_cfg).take(400) if r["dream_keys"]]
    rows = rows[: args.batch * (args.steps + 1)]
    S = model_cfg.vision.image_size
    # The online path starts from JPEG bytes of each dream image (the store keeps its CLIP crop;
    # at the small flavor the CLIP and VAE sizes are both 32 px, so this is the same image).
    store = LatentStore(cfg.output)
    online = {k: jpeg(Image.fromarray(np.frombuffer(b, np.uint8).reshape(S, S, 3)))
              for sid in store.manifest() for k, b in zip(*store.read_latents(sid).select(["sha256", "clip_u8"])
                                                          .to_pydict().values())}
    batches = []
    for s in range(0, len(rows) - args.batch + 1, args.batch):
        chunk = rows[s:s + args.batch]
        np_batch = {k: np.array([r[k] for r in chunk] + [None], dtype=object)[:-1] for k in chunk[0]}
        batches.append((collate(np_batch), [k for r in chunk for k in r["dream_keys"]]))
    torch.manual_seed(0)
    model = DreamLLM.from_config(model_cfg).train()
    train_steps(model, batches[:1], None)  # warm-up
    pre, onl = [], []
    for _ in range(2):  # alternate so that drift on a shared machine hits both sides
        pre += train_steps(model, batches[1:], None)
        onl += train_steps(model, batches[1:], online)
    pre, onl = float(np.median(pre)), float(np.median(onl))
    n_dream = sum(len(k) for _, k in batches[1:]) / (len(batches) - 1)
    print(f"precomputed latents: {pre * 1000:.0f} ms/step; online VAE encoding: {onl * 1000:.0f} ms/step "
          f"(median; {n_dream:.1f} dream images/step)")
    print(f"ratio online / precomputed: {onl / pre:.2f}x")
    if args.sd_vae:
        sd = sd_vae_encode_seconds()
        print(f"\n== 7b shapes: an SD-2.1-architecture VAE encoder at 512 px on this machine's CPU ==\n"
              f"{sd:.2f} s per image: online encoding would add about {sd * n_dream:.1f} s to each step above")
    if args.bench == "all":
        train_modes(args, work, syn)

if __name__ == "__main__":
    main()
