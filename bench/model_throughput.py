"""Training throughput of the `small` flavor and the value of packing, measured side by side.

Builds a realistic mix of interleaved documents (heavy-tailed text lengths,
0-3 images each, as in MMC4), then on the same documents compares
  packed rows (first-fit into the context, positions restarting per document)
  vs pad-to-longest batches of the same number of documents,
printing packing efficiency (non-pad tokens / all tokens) and forward+backward
throughput (real tokens/s, images/s) of each, and their ratio.

    python bench/model_throughput.py [--flavor small] [--docs 96] [--batch 8]
"""
import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from dreamllm.config import get_flavor  # noqa: E402
from dreamllm.model import DreamLLM  # noqa: E402
from dreamllm.sequence import Image, SequenceBuilder, Text, collate, pack  # noqa: E402

WORDS = ("red green blue yellow purple circle square triangle star background top left right scene "
         "image shows the a of on in with next then we see another small large").split()


def make_documents(builder, n, rng):
    docs = []
    for i in range(n):
        items = []
        n_sent = max(1, int(rng.lognormvariate(1.3, 0.8)))  # heavy tail: most docs short, a few long
        n_img = min(3, int(rng.expovariate(1.0)))
        img_at = set(rng.sample(range(n_sent), min(n_img, n_sent)))
        for s in range(n_sent):
            items.append(Text(" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 20))) + "."))
            if s in img_at:
                items.append(Image(f"img{i}_{s}"))
        docs.append(builder.document(items))
    return docs


def train_seconds(model, batches):
    """Seconds of forward+backward+step over batches[1:] (batch 0 warms up)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    for i, b in enumerate(batches):
        if i == 1:
            t0 = time.perf_counter()
        out = model(**b)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--flavor", default="small")
    ap.add_argument("--docs", type=int, default=96)
    ap.add_argument("--batch", type=int, default=8, help="documents per pad-to-longest batch")
    args = ap.parse_args()
    torch.manual_seed(0)
    rng = random.Random(0)
    cfg = get_flavor(args.flavor)
    cfg.condition_dropout = 0.0
    model = DreamLLM.from_config(cfg).set_stage("igpt").train()
    builder = SequenceBuilder(model.tokenizer, cfg)
    docs = make_documents(builder, args.docs, rng)
    S, R = cfg.vision.image_size, cfg.diffusion.latent_size
    keys = {k for d in docs for k in d.image_keys}
    pixels = {k: torch.randn(3, S, S) for k in keys}
    latents = {k: torch.stack([torch.randn(4, R, R), torch.full((4, R, R), -4.0)]) for k in keys}
    pad = model.ids.pad
    L = cfg.llm.context_length

    # pad-to-longest: batches of `batch` documents in arrival order
    padded = [collate([[d] for d in docs[i:i + args.batch]], pad, pixels=pixels, latents=latents)
              for i in range(0, len(docs), args.batch)]
    # packed: rows of up to L tokens, grouped into batches with the same number of rows as tokens allow
    bins = pack([len(d) for d in docs], L)
    rows_per_batch = max(1, round(sum(b["input_ids"].numel() for b in padded) / len(padded) / L))
    packed = [collate([[docs[i] for i in b] for b in bins[j:j + rows_per_batch]], pad, length=L,
                      pixels=pixels, latents=latents) for j in range(0, len(bins), rows_per_batch)]

    n_real = sum(len(d) for d in docs)
    n_img = sum(len(d.dream_keys) for d in docs)
    results = {}
    for name, batches in (("pad-to-longest", padded), ("packed", packed)):
        dt = train_seconds(model, batches)
        timed = batches[1:]
        tok = sum(int((b["input_ids"] != pad).sum()) for b in timed)
        imgs = sum(int(b["latent_mean"].shape[0]) if "latent_mean" in b else 0 for b in timed)
        results[name] = dict(eff=n_real / sum(b["input_ids"].numel() for b in batches), tok_s=tok / dt, img_s=imgs / dt, batches=len(batches),
                             slots=sum(b["input_ids"].numel() for b in batches))

    print(f"\nflavor={args.flavor}  documents={len(docs)}  real tokens={n_real}  images={n_img}  "
          f"context={L}  threads={torch.get_num_threads()}")
    print(f"{'layout':<16}{'batches':>8}{'token slots':>13}{'efficiency':>12}{'tokens/s':>11}{'images/s':>10}")
    for name, r in results.items():
        print(f"{name:<16}{r['batches']:>8}{r['slots']:>13}{r['eff']:>11.1%}{r['tok_s']:>11.0f}{r['img_s']:>10.1f}")
    p, u = results["packed"], results["pad-to-longest"]
    print(f"packed / pad-to-longest: efficiency x{p['eff'] / u['eff']:.2f}, "
          f"real tokens/s x{p['tok_s'] / u['tok_s']:.2f}, images/s x{p['img_s'] / u['img_s']:.2f}")


if __name__ == "__main__":
    main()
