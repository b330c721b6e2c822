"""Image generation through the live API: dynamic batching vs none, at 1, 4 and 16 concurrent clients.

    python bench/serving.py [--flavor debug|small] [--steps 10] [--requests 48]

Deploys the same checkpoint (a random-init flavor, saved to a temp dir) twice on
a local Ray -- once with `@serve.batch` collecting up to 16 images per call,
once with a batch size of 1 -- and drives each with the official `openai`
client over HTTP on loopback. Prints throughput and p50/p99 latency side by
side with their ratios. No pass/fail: the numbers depend on the machine.
"""
import argparse
import os
import shutil
import socket
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LEVELS = (1, 4, 16)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def _drive(client, concurrency: int, requests: int, steps: int) -> dict:
    """`requests` image generations from `concurrency` clients in a closed loop."""
    def one(i: int) -> float:
        t = time.perf_counter()
        r = client.images.generate(prompt=f"a shape number {i}", n=1, extra_body={"steps": steps})
        assert len(r.data) == 1 and r.data[0].b64_json
        return time.perf_counter() - t

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        lat = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - t0
    return {"rps": requests / wall, "p50": _percentile(lat, 0.5) * 1e3, "p99": _percentile(lat, 0.99) * 1e3}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--flavor", default="debug", choices=["debug", "small"])
    p.add_argument("--steps", type=int, default=10, help="denoising steps per image")
    p.add_argument("--requests", type=int, default=48, help="requests per concurrency level")
    args = p.parse_args(argv)

    import openai
    from ray import serve

    from dreamllm.checkpoint import save_checkpoint
    from dreamllm.config import get_flavor
    from dreamllm.model import DreamLLM
    from dreamllm_platform.config import load_config
    from dreamllm_platform.runtime import init_ray
    from dreamllm_platform.serving.app import build_app
    from dreamllm_platform.serving.config import ServeConfig

    tmp = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    ckpt = save_checkpoint(DreamLLM.from_config(get_flavor(args.flavor)), tmp / "ckpt")
    port = _free_port()
    os.environ.pop("DREAMLLM_API_KEY", None)  # an open API on loopback for the benchmark
    init_ray()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600)
    modes = {  # the only difference between the two deployments is the image batch size
        "batched": ["batching.image_max_batch_size=16", "batching.image_batch_wait_s=0.02", "limits.max_n=4"],
        "unbatched": ["batching.image_max_batch_size=1", "batching.image_batch_wait_s=0", "limits.max_n=1"],
    }
    results: dict[tuple[str, int], dict] = {}
    try:
        for mode, sets in modes.items():
            cfg = load_config(ServeConfig, None, [f"model.uri={ckpt}", f"limits.max_steps={max(args.steps, 1)}",
                                                  "defaults.steps=1", "model.max_ongoing_requests=32", *sets])
            serve.run(build_app(cfg), name="bench", route_prefix="/")
            _drive(client, 4, 8, args.steps)  # warm-up: first calls pay for lazy initialisation
            for c in LEVELS:
                results[mode, c] = r = _drive(client, c, max(args.requests, c), args.steps)
                print(f"  {mode:9s} c={c:2d}: {r['rps']:6.2f} img/s  p50 {r['p50']:7.1f} ms  p99 {r['p99']:7.1f} ms",
                      flush=True)
    finally:
        serve.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\nimage generation, {args.flavor} flavor, {args.steps} steps, {args.requests} requests per level "
          f"(ratios: batched / unbatched)")
    print(f"{'clients':>7} | {'img/s batched':>13} {'unbatched':>9} {'ratio':>6} | {'p50 ms batched':>14} "
          f"{'unbatched':>9} {'ratio':>6} | {'p99 ms batched':>14} {'unbatched':>9} {'ratio':>6}")
    for c in LEVELS:
        b, u = results["batched", c], results["unbatched", c]
        print(f"{c:>7} | {b['rps']:13.2f} {u['rps']:9.2f} {b['rps'] / u['rps']:6.2f} | {b['p50']:14.1f} "
              f"{u['p50']:9.1f} {b['p50'] / u['p50']:6.2f} | {b['p99']:14.1f} {u['p99']:9.1f} {b['p99'] / u['p99']:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
