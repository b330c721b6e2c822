import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from dreamllm.generation import ImageSampling, TextSampling, chat, generate_document, text_to_image
from dreamllm.images import clip_pixels
from dreamllm.sequence import Image, Text, Turn

FAST = ImageSampling(num_inference_steps=2, seed=0)


@pytest.mark.parametrize("scheduler", ["ddim", "dpm++"])
def test_text_to_image_returns_seeded_pil_images(model, cfg, scheduler):
    s = ImageSampling(num_inference_steps=3, seed=7, scheduler=scheduler, guidance_scale=3.0)
    a = text_to_image(model, ["a red circle", "a blue star on a green background"], s)
    assert [im.size for im in a] == [(cfg.diffusion.resolution,) * 2] * 2
    b = text_to_image(model, ["a red circle"], s)
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0]))  # same seed, same image
    c = text_to_image(model, ["a red circle"], ImageSampling(num_inference_steps=3, seed=8, scheduler=scheduler))
    assert not np.array_equal(np.asarray(a[0]), np.asarray(c[0]))
    with pytest.raises(ValueError, match="unknown scheduler"):
        text_to_image(model, ["x"], ImageSampling(scheduler="euler"))


def test_chat_about_an_image_answers_in_text(model):
    img = PILImage.new("RGB", (48, 40), "red")
    parts = chat(model, [Turn("user", (Image("x"), Text("What color is the shape?")))], {"x": img},
                 TextSampling(max_new_tokens=6))
    assert parts and all(isinstance(p, str) for p in parts)
    with pytest.raises(ValueError, match="no image given"):
        chat(model, [Turn("user", (Image("x"), Text("?")))], {}, TextSampling(max_new_tokens=2))


def test_chat_uses_the_kv_cache_consistently_with_a_full_forward(model, builder):
    """Greedy decoding with the cache picks the same tokens as re-running the whole sequence."""
    img = PILImage.new("RGB", (32, 32), "blue")
    turns = [Turn("user", (Image("x"), Text("Describe it.")))]
    seen = []
    chat(model, turns, {"x": img}, TextSampling(max_new_tokens=5),
         logits_processor=lambda gen, lg: seen.append((list(gen), lg.clone())) or lg)
    ex = builder.conversation(turns, add_generation_prompt=True)
    pixels = clip_pixels(img, model.cfg.vision.image_size)[None]
    for gen, cached in seen:
        ids = torch.tensor([ex.input_ids + gen])
        with torch.no_grad():
            full = model.logits(model.hidden_states(ids, pixel_values=pixels))[0, -1]
        finite = torch.isfinite(cached)
        assert torch.allclose(cached[finite], full[finite], atol=1e-4)


def test_interleaved_generation_creates_an_image_at_dream_start_and_feeds_it_back(model, builder):
    ds = model.ids.dream_start
    seen = []

    def force_dream_at_step_1(gen, logits):
        seen.append(logits.clone())
        if len(gen) == 1:
            logits = logits.clone()
            logits[ds] += 1e4  # still -inf if the image limit forbids it
        return logits

    sampling = TextSampling(max_new_tokens=4, max_images=1, image=FAST)
    parts = generate_document(model, "A story about shapes.", sampling, force_dream_at_step_1)
    kinds = [type(p).__name__ for p in parts]
    assert "Image" in kinds and kinds.index("Image") == 1, kinds  # text, then the image, then more text
    created = parts[1]
    assert created.size == (model.cfg.diffusion.resolution,) * 2

    # After the image, the model must be reading exactly what training shows it:
    # text, dream slot, then the created image as an input block.
    prompt = builder.document([Text("A story about shapes.")]).input_ids[:-1]
    t0 = int(seen[0].argmax())
    ids = torch.tensor([prompt + [t0] + builder.dream_slot_ids() + builder.image_block_ids()])
    with torch.no_grad():
        full = model.logits(model.hidden_states(ids, pixel_values=clip_pixels(created, model.cfg.vision.image_size)[None]))
    finite = torch.isfinite(seen[2])
    assert torch.allclose(seen[2][finite], full[0, -1][finite], atol=1e-4)

    # with no image allowed, forcing <dream_start> has no effect
    parts = generate_document(model, "A story.", TextSampling(max_new_tokens=4, max_images=0), force_dream_at_step_1)
    assert all(isinstance(p, str) for p in parts)


def test_limits_on_tokens_and_images(model):
    ds = model.ids.dream_start

    def always_dream(gen, logits):
        logits = logits.clone()
        logits[ds] += 1e4
        return logits

    parts = generate_document(model, "Go.", TextSampling(max_new_tokens=10, max_images=2, image=FAST), always_dream)
    assert sum(isinstance(p, PILImage.Image) for p in parts) == 2
    ids = model.tokenizer("Go.").input_ids
    from dreamllm.generation import generate
    n_tokens = []
    generate(model, ids, None, TextSampling(max_new_tokens=3), lambda g, lg: n_tokens.append(len(g)) or lg)
    assert len(n_tokens) <= 3


# ----------------------------------------------------------- batched decoding

def _no_eos(model):
    def proc(gen, logits):
        logits = logits.clone()
        logits[model.ids.eos] = float("-inf")
        return logits
    return proc


def _conversations(model):
    """Rows of very different lengths, two with image inputs (one with two images)."""
    from dreamllm.generation import conversation_inputs

    red, blue = PILImage.new("RGB", (40, 32), "red"), PILImage.new("RGB", (32, 48), "blue")
    long_text = " ".join(["Tell me about the shapes and colours you can see here."] * 6)
    convs = [([Turn("user", (Text("Hi."),))], {}),
             ([Turn("user", (Image("a"), Text("What color is the shape?")))], {"a": red}),
             ([Turn("user", (Text(long_text),))], {}),
             ([Turn("user", (Image("a"), Text("and"), Image("b"), Text("Which is blue?")))], {"a": red, "b": blue})]
    return [conversation_inputs(model, t, im) for t, im in convs]


def test_batched_greedy_decoding_equals_decoding_each_row_alone(model):
    from dreamllm.generation import Request, generate, generate_batch

    inputs = _conversations(model)
    assert max(len(i) for i, _ in inputs) > 3 * min(len(i) for i, _ in inputs)  # very different lengths
    # Different limits per row: rows leave the batch at different steps.
    samplings = [TextSampling(max_new_tokens=n) for n in (12, 5, 9, 12)]
    procs = [_no_eos(model), None, _no_eos(model), _no_eos(model)]
    out = generate_batch(model, [Request(i, p, s, f) for (i, p), s, f in zip(inputs, samplings, procs)])
    for (ids, pixels), s, f, got in zip(inputs, samplings, procs, out):
        tokens = []
        alone = generate(model, ids, pixels, s, lambda g, lg, f=f: (tokens.append(len(g)), f(g, lg) if f else lg)[1])
        assert got.parts == alone, (got.parts, alone)
        assert got.prompt_tokens == len(ids)
        assert got.completion_tokens == len(tokens)  # one sampled token per logits call
        assert got.finish_reason in ("stop", "length")
    assert [g.completion_tokens for g in out][0] == 12 and out[0].finish_reason == "length"


def test_batched_sampling_keeps_each_rows_seed_and_settings(model):
    from dreamllm.generation import Request, generate, generate_batch

    inputs = _conversations(model)[:3]
    samplings = [TextSampling(max_new_tokens=8, temperature=1.0, seed=1),
                 TextSampling(max_new_tokens=8, temperature=0.7, top_p=0.9, seed=2),
                 TextSampling(max_new_tokens=8)]
    out = generate_batch(model, [Request(i, p, s, _no_eos(model)) for (i, p), s in zip(inputs, samplings)])
    for (ids, pixels), s, got in zip(inputs, samplings, out):
        assert got.parts == generate(model, ids, pixels, s, _no_eos(model))


def test_rows_join_and_leave_between_steps_continuous_batching(model):
    """A row that joins a running batch (and one cancelled mid-way) leaves the others' answers unchanged."""
    from dreamllm.generation import BatchDecoder, generate

    inputs = _conversations(model)
    s = TextSampling(max_new_tokens=10)
    dec = BatchDecoder(model)
    first = dec.add(*inputs[0], s, _no_eos(model))
    doomed = dec.add(*inputs[2], s, _no_eos(model))
    for _ in range(3):
        dec.step()
    late = dec.add(*inputs[1], s, _no_eos(model))   # joins at step 4 with a much longer cache around it
    dec.step()
    doomed.cancel()
    width = dec.mask.shape[1]
    dec.step()
    assert doomed not in dec.rows and dec.mask.shape[1] < width  # the long row's columns went with it
    later = dec.add(*inputs[3], s, _no_eos(model))
    while dec.active:
        dec.step()
    assert doomed.result().finish_reason == "cancelled" and len(doomed.generated) == 4  # one token per step
    for row, (ids, pixels) in ((first, inputs[0]), (late, inputs[1]), (later, inputs[3])):
        assert row.result().parts == generate(model, ids, pixels, s, _no_eos(model))
        assert row.result().completion_tokens == 10


def test_a_row_that_dreams_gets_its_image_while_the_others_go_on(model):
    from dreamllm.generation import Request, generate, generate_batch

    ds = model.ids.dream_start

    def dream_at(step):
        def proc(gen, logits):
            logits = _no_eos(model)(gen, logits)
            if len(gen) == step:
                logits[ds] += 1e4
            return logits
        return proc

    inputs = _conversations(model)[:3]
    samplings = [TextSampling(max_new_tokens=6, max_images=1, image=ImageSampling(num_inference_steps=2, seed=s))
                 for s in (3, 4, 5)]
    procs = [dream_at(1), _no_eos(model), dream_at(1)]
    out = generate_batch(model, [Request(i, p, s, f) for (i, p), s, f in zip(inputs, samplings, procs)])
    for (ids, pixels), s, f, got in zip(inputs, samplings, procs, out):
        alone = generate(model, ids, pixels, s, f)
        assert [type(p).__name__ for p in got.parts] == [type(p).__name__ for p in alone]
        for a, b in zip(got.parts, alone):
            if isinstance(a, str):
                assert a == b
            else:  # two images made in one UNet call equal the image made alone (to rounding)
                assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 2
    assert sum(isinstance(p, PILImage.Image) for p in out[0].parts) == 1
    assert all(isinstance(p, str) for p in out[1].parts)
