"""Serving through the live API: continuous batching vs one-at-a-time decoding, batched vs unbatched images.

    python bench/serving.py [--flavor small|debug] [--tokens 64] [--steps 10] [--levels 1,4,16,32]

Deploys the same checkpoint (a random-init flavor, saved to a temp dir) twice on
a local Ray -- once with the replica's decode loop taking up to 32 rows and
`@serve.batch` collecting up to 16 images per call, once with one row and one
image at a time -- and drives each with the official `openai` client over HTTP
on loopback, in a closed loop of N concurrent clients. Chat: streamed
completions of a fixed prompt set, `--tokens` new tokens at most (greedy, so
both modes decode the same tokens): tokens/s (from `usage`), requests/s,
p50/p99 latency and time to first token. Images: images/s and p50/p99 latency.
Prints both modes side by side with their ratios. No pass/fail: the numbers
depend on the machine.
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

PROMPTS = ["What is in the picture?", "Describe a red circle on a blue background in a few words.",
           "Write a short story about shapes.", "Which colour is the square?", "Tell me about stars.",
           "Is the triangle at the top or at the bottom of the picture?", "Hello!", "Name three colours."]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def _closed_loop(concurrency: int, requests: int, one) -> tuple[float, list]:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        out = list(pool.map(one, range(requests)))
    return time.perf_counter() - t0, out


def _drive_chat(client, concurrency: int, requests: int, tokens: int) -> dict:
    def one(i: int):
        t = time.perf_counter()
        first, usage = None, None
        stream = client.chat.completions.create(
            model="dreamllm", messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], max_tokens=tokens,
            stream=True, stream_options={"include_usage": True}, extra_body={"max_images": 0})
        for chunk in stream:
            if first is None:  # the role chunk leaves with the first decoded text
                first = time.perf_counter() - t
            usage = chunk.usage or usage
        return time.perf_counter() - t, first, usage.completion_tokens

    wall, out = _closed_loop(concurrency, requests, one)
    lat, ttft = [o[0] for o in out], [o[1] for o in out]
    return {"tok_s": sum(o[2] for o in out) / wall, "rps": requests / wall, "p50": _percentile(lat, 0.5) * 1e3,
            "p99": _percentile(lat, 0.99) * 1e3, "ttft": _percentile(ttft, 0.5) * 1e3,
            "tokens": sum(o[2] for o in out)}


def _drive_images(client, concurrency: int, requests: int, steps: int) -> dict:
    def one(i: int) -> float:
        t = time.perf_counter()
        r = client.images.generate(prompt=f"a shape number {i}", n=1, extra_body={"steps": steps})
        assert len(r.data) == 1 and r.data[0].b64_json
        return time.perf_counter() - t

    wall, lat = _closed_loop(concurrency, requests, one)
    return {"img_s": requests / wall, "p50": _percentile(lat, 0.5) * 1e3, "p99": _percentile(lat, 0.99) * 1e3}


def _table(title: str, cols: list[tuple[str, str, str]], levels, results) -> None:
    """`cols`: (key, header, format); one row per level, each column batched / one-at-a-time / ratio."""
    print(f"\n{title} (ratio: batched / one at a time)")
    print(f"{'clients':>7} | " + " | ".join(f"{h + ' batched':>18} {'alone':>8} {'ratio':>6}" for _, h, _ in cols))
    for c in levels:
        b, u = results["batched", c], results["one", c]
        print(f"{c:>7} | " + " | ".join(f"{b[k]:>18{f}} {u[k]:>8{f}} {b[k] / u[k]:>6.2f}" for k, _, f in cols))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--flavor", default="small", choices=["debug", "small"])
    p.add_argument("--tokens", type=int, default=64, help="new tokens per chat completion (at most)")
    p.add_argument("--steps", type=int, default=10, help="denoising steps per image")
    p.add_argument("--levels", default="1,4,16,32", help="concurrent clients, comma-separated")
    p.add_argument("--rounds", type=int, default=2, help="requests per level = max(8, rounds x clients)")
    args = p.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]
    top = max(levels)

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
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=900)
    modes = {  # the only differences between the two deployments: rows decoded together, images per call
        "batched": [f"batching.text_max_rows={top}", "batching.image_max_batch_size=16", "limits.max_n=4"],
        "one": ["batching.text_max_rows=1", "batching.image_max_batch_size=1", "batching.image_batch_wait_s=0",
                "limits.max_n=1"],
    }
    chat: dict[tuple[str, int], dict] = {}
    images: dict[tuple[str, int], dict] = {}
    try:
        for mode, sets in modes.items():
            cfg = load_config(ServeConfig, None, [
                f"model.uri={ckpt}", f"limits.max_steps={max(args.steps, 1)}", f"limits.max_tokens={max(args.tokens, 128)}",
                "defaults.steps=1", f"batching.text_max_waiting={2 * top}", f"model.max_ongoing_requests={4 * top}",
                f"ingress.max_ongoing_requests={8 * top}", *sets])
            serve.run(build_app(cfg), name="bench", route_prefix="/")
            _drive_chat(client, 2, 4, 8)  # warm-up: first calls pay for lazy initialisation
            _drive_images(client, 2, 2, 1)
            for c in levels:
                n = max(8, args.rounds * c)
                chat[mode, c] = r = _drive_chat(client, c, n, args.tokens)
                print(f"  {mode:7s} chat   c={c:2d}: {r['tok_s']:7.1f} tok/s {r['rps']:6.2f} req/s p50 {r['p50']:7.0f} ms "
                      f"p99 {r['p99']:7.0f} ms ttft {r['ttft']:6.0f} ms ({r['tokens']} tokens)", flush=True)
                images[mode, c] = r = _drive_images(client, c, n, args.steps)
                print(f"  {mode:7s} images c={c:2d}: {r['img_s']:6.2f} img/s p50 {r['p50']:7.0f} ms "
                      f"p99 {r['p99']:7.0f} ms", flush=True)
    finally:
        serve.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)

    _table(f"chat, {args.flavor} flavor, {args.tokens} new tokens at most, streamed",
           [("tok_s", "tok/s", ".1f"), ("rps", "req/s", ".2f"), ("p50", "p50 ms", ".0f"), ("p99", "p99 ms", ".0f"),
            ("ttft", "ttft ms", ".0f")], levels, chat)
    _table(f"image generation, {args.flavor} flavor, {args.steps} steps",
           [("img_s", "img/s", ".2f"), ("p50", "p50 ms", ".0f"), ("p99", "p99 ms", ".0f")], levels, images)
    return 0


if __name__ == "__main__":
    sys.exit(main())
