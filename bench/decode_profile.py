"""What bounds time to first token under load: the decode loop's own costs, without Serve.

    python bench/decode_profile.py [--flavor small|debug] [--repeats 5] [--threads 1]

On a random-init flavor, on `--threads` CPU threads (1: what a Serve replica
with one CPU gets, as Ray sets OMP_NUM_THREADS from num_cpus), with
bench/serving.py's prompts in the chat template, times (median of --repeats) the prefill forward of k joining rows (k = 1, 4, 16; one
`BatchDecoder.step` that admits them) and one decode step of 16 rows with ~64
tokens of context each. In bench/serving.py's closed loop the 16 clients' rows
finish at the same step, so all 16 join together: the first token of the last of
them cannot come before a 16-row prefill, whatever the admission order, unless
the prefill of 16 costs little more than the prefill of one. The printed ratio
prefill(16) / prefill(1) is that floor of the TTFT ratio at 16 clients.

`--part images` (or `all`) times what bounds bench/serving.py's batched image
ratio: one image request's model work (the prompt's condition through the LLM,
`--steps` UNet calls under guidance, the VAE decode, as `images_from_conditions`
does) for 1 image and for 16 images in one call, and each part alone. The
ceiling of images/s batched vs one per call is 16 * t(1) / t(16), before any
serving overhead.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--flavor", default="small", choices=["debug", "small"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--part", default="text", choices=["text", "images", "all"])
    p.add_argument("--steps", type=int, default=10, help="--part images: denoising steps (bench/serving.py's)")
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)

    from bench.serving import PROMPTS
    from dreamllm.config import get_flavor
    from dreamllm.generation import BatchDecoder, TextSampling, conversation_inputs
    from dreamllm.model import DreamLLM
    from dreamllm.sequence import Text, Turn

    torch.manual_seed(0)
    model = DreamLLM.from_config(get_flavor(args.flavor)).eval()
    prompts = [conversation_inputs(model, [Turn("user", (Text(PROMPTS[i % len(PROMPTS)]),))])[0] for i in range(16)]
    greedy = TextSampling(max_new_tokens=10_000, temperature=0.0, max_images=0)
    eos = model.ids.eos

    def no_eos(_generated, logits):  # random weights may pick <eos> early; every row must run on
        logits[eos] = float("-inf")
        return logits

    def prefill(k: int) -> float:
        dec = BatchDecoder(model)
        for ids in prompts[:k]:
            dec.add(ids, sampling=greedy, logits_processor=no_eos)
        t = time.perf_counter()
        dec.step()  # the joiners' prefill and their first token
        return time.perf_counter() - t

    def decode_step(rows: int, context: int) -> float:
        dec = BatchDecoder(model)
        for ids in prompts[:rows]:
            dec.add(ids, sampling=greedy, logits_processor=no_eos)
        dec.step()
        while min(r.length for r in dec.rows) < context:
            dec.step()
        t = time.perf_counter()
        dec.step()
        return time.perf_counter() - t

    median = lambda f, *a: statistics.median(f(*a) for _ in range(args.repeats))  # noqa: E731
    if args.part in ("images", "all"):
        images(model, args, median)
    if args.part == "images":
        return
    prompt_len = statistics.mean(len(p) for p in prompts)
    print(f"{args.flavor} flavor, {torch.get_num_threads()} threads, prompts of {prompt_len:.0f} tokens on average")
    pre = {k: median(prefill, k) for k in (1, 4, 16)}
    for k, s in pre.items():
        print(f"prefill of {k:2d} joining rows: {s * 1e3:7.1f} ms  (x{s / pre[1]:.1f} of one row)")
    ctx = int(prompt_len) + 64
    d1, d16 = median(decode_step, 1, ctx), median(decode_step, 16, ctx)
    print(f"decode step, 1 row at {ctx} tokens:   {d1 * 1e3:7.1f} ms")
    print(f"decode step, 16 rows at {ctx} tokens: {d16 * 1e3:7.1f} ms  (x{d16 / d1:.1f})")
    print(f"floor of TTFT(16 joining together) / TTFT(1): x{pre[16] / pre[1]:.1f} (prefill alone); "
          f"x{(pre[16] + d16) / pre[1]:.1f} when the burst arrives during a 16-row step")


def images(model, args, median) -> None:
    """The model work of 1 vs 16 images per call, whole and by part (condition, UNet steps, VAE decode)."""
    import torch

    from dreamllm.generation import ImageSampling, images_from_conditions

    sampling = ImageSampling(num_inference_steps=args.steps, seed=0)
    res = model.cfg.diffusion.resolution
    down = 2 ** (len(model.cfg.diffusion.vae_channels) - 1)
    lat_C = model.vae.config.latent_channels

    def timed(f) -> float:
        t = time.perf_counter()
        f()
        return time.perf_counter() - t

    rows = {}
    for b in (1, 16):
        prompts = [f"a shape number {i}" for i in range(b)]
        with torch.no_grad():
            cond = model.prompt_condition(prompts)
            lat = torch.randn(2 * b, lat_C, res // down, res // down)  # guidance: conditional + null rows
            emb = torch.cat([cond, cond])
            t = torch.tensor(500)
            rows[b] = {
                "whole": median(lambda: timed(lambda: images_from_conditions(model, model.prompt_condition(prompts), sampling))),
                "condition": median(lambda: timed(lambda: model.prompt_condition(prompts))),
                "unet x steps": args.steps * median(lambda: timed(lambda: model.unet(lat, t, encoder_hidden_states=emb))),
                "vae decode": median(lambda: timed(lambda: model.vae.decode(lat[:b] / model.vae.config.scaling_factor))),
            }
    print(f"{args.flavor} flavor, {torch.get_num_threads()} threads, images at {res} px, {args.steps} steps")
    print(f"{'part':>14} | {'1 image ms':>10} | {'16 images ms':>12} | {'per image x':>11}")
    for part in rows[1]:
        one, many = rows[1][part] * 1e3, rows[16][part] * 1e3
        print(f"{part:>14} | {one:10.1f} | {many:12.1f} | {16 * one / many:11.2f}")
    print(f"ceiling of images/s, 16 per call vs one per call: x{16 * rows[1]['whole'] / rows[16]['whole']:.2f}")


if __name__ == "__main__":
    main()
