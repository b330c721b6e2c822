"""Overhead of Ray Train + DeepSpeed vs a bare PyTorch loop, and 1 vs 2 workers, on the same examples.

All three read the same latent store of the synthetic set with the same
collator and model flavor:
  bare     one process, torch AdamW, batches collated in-process (no Ray, no DeepSpeed)
  ray x1   jobs' training loop: TorchTrainer + DeepSpeed ZeRO-2, 1 worker, Ray Data streaming
  ray x2   the same with 2 workers (data parallel)
Throughput is real (non-pad) tokens/s over the steps after warm-up; the Ray
figures are the loop's own `tokens_per_s` metric of the second logging window.

    python bench/train_throughput.py [--flavor small] [--steps 30]
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from dreamllm_platform.config import load_config  # noqa: E402
from dreamllm_platform.data.assembly import ExampleCollator, training_dataset  # noqa: E402
from dreamllm_platform.data.config import AssemblyConfig, PrecomputeConfig  # noqa: E402
from dreamllm_platform.data.latents import run_precompute  # noqa: E402
from dreamllm_platform.runtime import init_ray  # noqa: E402
from dreamllm_platform.tracking import client  # noqa: E402
from dreamllm_platform.train.config import STAGE_DEFAULTS, TrainConfig  # noqa: E402
from dreamllm_platform.train.loop import build_model, param_groups  # noqa: E402
from dreamllm_platform.train.trainer import run_stage  # noqa: E402


def bare_tokens_per_s(cfg: TrainConfig, steps: int) -> float:
    """The same model, examples and collator in one process with a plain torch loop."""
    model = build_model(cfg)
    rows = []
    for src in cfg.data.mix:
        ds = training_dataset(cfg.data.store, model.cfg, AssemblyConfig(record_types=cfg.data.assembly.record_types,
                                                                        sources=(src,)))
        rows += ds.take_all()
    collate = ExampleCollator(model.cfg)
    opt = torch.optim.AdamW(param_groups(model, 0.0), lr=cfg.optim.lr)
    B = cfg.data.micro_batch_size
    batches = [collate({k: [r[k] for r in rows[i:i + B]] for k in rows[0]}) for i in range(0, len(rows) - B + 1, B)]
    tokens, warm = 0, max(1, steps // 3)
    for step in range(steps):
        if step == warm:
            t0, tokens = time.perf_counter(), 0
        b = batches[step % len(batches)]
        out = model(**b)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        tokens += int((b["input_ids"] != model.ids.pad).sum())
    return tokens / (time.perf_counter() - t0)


def ray_tokens_per_s(cfg: TrainConfig) -> float:
    r = run_stage(cfg)
    hist = client(cfg.tracking).get_metric_history(r.mlflow_run_id, "tokens_per_s")
    return sorted(hist, key=lambda m: m.step)[-1].value


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--flavor", default="small")
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-train-", dir="outputs" if Path("outputs").is_dir() else None))
    init_ray(num_cpus=4)  # logical CPUs: trainer workers and Ray Data tasks both get scheduled on 2 cores
    run_precompute(PrecomputeConfig(flavor=args.flavor, data_root=str(work / "data"), output=str(work / "store")))

    def cfg(name, workers):
        return load_config(TrainConfig, None, [
            f"model.flavor={args.flavor}", f"scaling.num_workers={workers}", f"optim.max_steps={args.steps}",
            f"log_every={args.steps // 2}", f"checkpoint.every_n_steps={args.steps}", "tracking.sample_images=0",
            f"data.store={work / 'store'}", f"checkpoint.storage_path={work / 'ray'}", "data.pack=false",
            f"tracking.tracking_uri=sqlite:///{work / 'mlflow.db'}", f"run_name={name}"], STAGE_DEFAULTS["igpt"])

    results = {"bare (1 process)": bare_tokens_per_s(cfg("bare", 1), args.steps),
               "ray x1 + deepspeed": ray_tokens_per_s(cfg("ray1", 1)),
               "ray x2 + deepspeed": ray_tokens_per_s(cfg("ray2", 2))}
    base = results["bare (1 process)"]
    print(f"\nflavor={args.flavor} steps={args.steps} micro_batch=8 torch threads={torch.get_num_threads()}")
    print(f"{'loop':<22}{'tokens/s':>10}{'vs bare':>9}")
    for name, v in results.items():
        print(f"{name:<22}{v:>10.0f}{v / base:>9.2f}")
    print(f"2 workers / 1 worker: x{results['ray x2 + deepspeed'] / results['ray x1 + deepspeed']:.2f}")


if __name__ == "__main__":
    main()
