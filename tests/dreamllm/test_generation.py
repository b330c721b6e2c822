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
