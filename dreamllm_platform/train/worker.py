"""What every Ray Train worker loop of the platform shares: the stages' DeepSpeed loop (`train.loop`) and the
towers' phase loop (`towers.loop`).

Owns: a worker's place in the group (rank, world size, device), its random
state (identical initial weights on every rank, then noise, timesteps and
dropout of each rank's own; saved in a checkpoint and restored on resume so a
resumed run draws what an uninterrupted one would), the learning-rate schedule, sums and means over
ranks, the metric window behind each progress line, reporting a
checkpoint directory to Ray Train, the per-step record of what each rank
trained on (`record_ids`), and the fault injection the fault suite uses.
"""
from __future__ import annotations

import json
import math
import os
import random
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .. import storage

IDS_DIR = "example_ids"
"""Under a run's directory: the per-step records of `record_step`."""


@dataclass
class WorkerContext:
    """Where this worker is: its rank, the world size and its torch device."""

    rank: int
    world: int
    device: torch.device

    @classmethod
    def current(cls) -> "WorkerContext":
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        return cls(ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device())

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, values: dict[str, float], op: str = "sum") -> dict[str, float]:
        """Sums (op="sum") or means (op="mean") over ranks; the values themselves with one worker."""
        if self.world == 1 or not values:
            return dict(values)
        t = torch.tensor(list(values.values()), dtype=torch.float64)
        torch.distributed.all_reduce(t)
        if op == "mean":
            t /= self.world
        return dict(zip(values, t.tolist()))

    def gather(self, obj: Any) -> list:
        """Every rank's `obj` (picklable), in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def seed_rank(self, seed: int, step: int) -> int:
        """Seed torch's global generator for this rank's randomness from `step` on, and return that seed.

        Called after the model is built (with `seed`, the same on every rank): without it every rank
        would draw the same noise, timesteps and dropout, and data parallelism would average identical
        draws. Depending on the step makes a resumed run draw afresh rather than replay step 0's draws.
        """
        rank_seed = seed * 1_000_003 + step * 101 + self.rank + 1
        torch.manual_seed(rank_seed)
        return rank_seed

    def rng_file(self) -> str:
        """This rank's random-state file in a checkpoint directory."""
        return f"rng_rank{self.rank}.pt"

    def save_rng(self, d: Path) -> None:
        """Write this rank's torch (CPU and device), numpy and python random states into checkpoint dir `d`."""
        state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        torch.save(state, d / self.rng_file())

    def restore_rng(self, d: Path, seed: int, step: int) -> bool:
        """Restore this rank's random state from checkpoint dir `d`; True when it had one.

        Without one (a checkpoint of another world size, or an older one) the rank is seeded afresh for `step`
        (`seed_rank`): the run goes on, but its draws from here differ from an uninterrupted run's.
        """
        f = d / self.rng_file()
        if not f.is_file():
            self.seed_rank(seed, step)
            return False
        state = torch.load(f, weights_only=False)
        torch.set_rng_state(state["torch"])
        np.random.set_state(state["numpy"])
        random.setstate(state["python"])
        if "cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"], self.device)
        return True


def lr_factor(step: int, total: int, warmup: int, schedule: str = "cosine", min_ratio: float = 0.0) -> float:
    """The one learning-rate schedule: linear warm-up over `warmup` steps, then cosine decay from 1 to
    `min_ratio` at `total` (or constant 1 with schedule="constant"); `step` counts from 0."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class MetricWindow:
    """Since the last progress line: means of per-step values (over steps and ranks) and rates of counted
    things (images, tokens: summed over ranks, per second)."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.counts: dict[str, float] = {}
        self.n, self.t0 = 0, time.perf_counter()

    def add(self, counts: dict[str, float] | None = None, **values: float) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        for k, v in (counts or {}).items():
            self.counts[k] = self.counts.get(k, 0.0) + float(v)
        self.n += 1

    def pop(self, ctx: WorkerContext) -> dict[str, float]:
        """{value: mean, <count>_per_s: rate} of the window; then the window starts again."""
        dt = max(time.perf_counter() - self.t0, 1e-9)
        counts = {f"_count_{k}": v for k, v in self.counts.items()}
        totals = ctx.all_reduce({**self.sums, **counts, "_n": float(self.n)})
        n = max(1.0, totals.pop("_n"))
        out = {k: totals[k] / n for k in self.sums}
        out.update({f"{k}_per_s": totals[f"_count_{k}"] / dt for k in self.counts})
        self.__init__()
        return out


def report_checkpoint(step: int, metrics: dict, write: Callable[[Path], bool]) -> None:
    """Report a checkpoint of `step` to Ray Train: `write(dir)` puts this rank's files in `dir` and says
    whether it wrote any (DeepSpeed: every rank its shard; a single-copy state: rank 0 only). Ray merges
    the ranks' directories into `step_NNNNNNN` under the run's storage path."""
    import ray.train
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory() as d:
        has_files = write(Path(d))
        ray.train.report({**metrics, "step": step}, checkpoint=Checkpoint.from_directory(d) if has_files else None,
                         checkpoint_dir_name=f"step_{step:07d}")


def rng_checksum() -> int:
    """CRC of torch's CPU random state: what a step's noise, timesteps and dropout are drawn from."""
    return zlib.crc32(torch.get_rng_state().numpy().tobytes())


def record_step(ctx: WorkerContext, run_dir: str, st, step: int, mine: dict) -> None:
    """`record_ids`: rank 0 writes every rank's `mine` (example ids, loss, `rng_checksum`) of `step` to
    <run_dir>/example_ids/step_NNNNNNN.json (a step run again after a restart overwrites its file)."""
    ranks = ctx.gather(mine)
    if ctx.is_main:
        storage.write_bytes(storage.join(run_dir, IDS_DIR, f"step_{step:07d}.json"),
                            json.dumps({"step": step, "ranks": ranks}).encode(), st)


def maybe_fail(fail_at_step: int | None, step: int, ctx: WorkerContext, run_dir: str, st, label: str) -> None:
    """Fault injection for tests: the last rank dies once, at `fail_at_step` (DREAMLLM_FAIL_AT_STEP), marked
    by <run_dir>/.fault_injected so that the restarted group runs through."""
    if not fail_at_step or step != fail_at_step or ctx.rank != ctx.world - 1:
        return
    marker = storage.join(run_dir, ".fault_injected")
    if storage.exists(marker, st):
        return
    storage.write_bytes(marker, b"1", st)
    print(f"[{label}] fault injection: rank {ctx.rank} dies at step {step}", flush=True)
    # Ray Train's controller collects reported checkpoints every 2 s; a crash
    # right after a report can lose it. Die a little later, like a real fault.
    time.sleep(5)
    os._exit(1)
