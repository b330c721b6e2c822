import pytest
import torch
import torch.nn.functional as F

from dreamllm.config import STAGES
from dreamllm.model import ALWAYS_FROZEN, OWN_PARAMS, TRAINABLE
from dreamllm.sequence import IGNORE, Image, Text, collate


def test_shapes_through_every_path(model, batch, cfg):
    B, L = batch["input_ids"].shape
    H = model.llm.config.hidden_size
    query_mask, patch_mask = model.slot_masks(batch["input_ids"])
    assert int(query_mask.sum()) == 3 * cfg.num_dream_queries  # doc has 2 dream slots, the creation pair 1
    assert int(patch_mask.sum()) == 3 * cfg.vision.num_tokens  # doc has 2 input blocks, the comprehension pair 1
    assert model.encode_images(batch["pixel_values"]).shape == (3, cfg.vision.num_tokens, H)
    hidden = model.hidden_states(batch["input_ids"], batch["position_ids"], batch["pixel_values"])
    assert hidden.shape == (B, L, H)
    assert model.logits(hidden).shape == (B, L, len(model.tokenizer))
    cond = model.condition(hidden, query_mask)
    assert cond.shape == (3, cfg.num_dream_queries, cfg.diffusion.cross_attention_dim)
    out = model(**batch)
    assert out.num_images_created == 3 and out.num_text_tokens > 0
    assert torch.isfinite(out.loss) and out.loss_lm > 0 and out.loss_diffusion > 0


def test_missing_or_mismatched_images_give_clear_errors(model, batch):
    with pytest.raises(ValueError, match="no pixel_values"):
        model(batch["input_ids"], batch["labels"], batch["position_ids"])
    with pytest.raises(ValueError, match="visual-token slots"):
        model(batch["input_ids"], batch["labels"], batch["position_ids"], batch["pixel_values"][:1])
    with pytest.raises(ValueError, match="latents or latent_mean"):
        model(batch["input_ids"], batch["labels"], batch["position_ids"], batch["pixel_values"])


def test_a_latent_sample_or_its_distribution_are_both_accepted(model, batch):
    model.eval()
    mean, logvar = batch.pop("latent_mean"), batch.pop("latent_logvar")
    a = model(**batch, latent_mean=mean, latent_logvar=logvar, generator=torch.Generator().manual_seed(1))
    # a sample drawn with the same generator state as the model's own draw gives the same loss
    from dreamllm.components import sample_latents
    g = torch.Generator().manual_seed(1)
    b = model(**batch, latents=sample_latents(mean, logvar, g), generator=g)
    assert a.loss_lm == b.loss_lm and a.loss_diffusion > 0 and b.loss_diffusion > 0


@pytest.mark.parametrize("stage", STAGES)
def test_freeze_policy_per_stage(model, batch, stage):
    model.set_stage(stage).train()
    for name in ALWAYS_FROZEN:
        assert not getattr(model, name).training  # frozen towers stay in eval mode
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1)
    model(**batch).loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        top = n.split(".")[0]
        if top in TRAINABLE[stage]:
            assert p.requires_grad, n
        else:
            assert not p.requires_grad and p.grad is None, f"{n} got a gradient in stage {stage}"
            assert torch.equal(p, before[n]), f"frozen {n} changed in stage {stage}"
    for name in OWN_PARAMS:  # DreamLLM's own parts learn in every stage
        changed = [not torch.equal(p, before[n]) for n, p in model.named_parameters() if n.split(".")[0] == name]
        assert any(changed), f"{name} did not change in stage {stage}"
    llm_changed = any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n.startswith("llm."))
    assert llm_changed == ("llm" in TRAINABLE[stage])


def test_a_fixed_batch_is_overfit_lowering_both_losses(model, batch):
    model.cfg.condition_dropout = 0.0
    model.set_stage("igpt").train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    history = []
    for _ in range(50):
        # the same timesteps and noise every step, so the diffusion loss can be driven down
        out = model(**batch, generator=torch.Generator().manual_seed(0))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        history.append((out.loss_lm.item(), out.loss_diffusion.item()))
    (lm0, diff0), (lm1, diff1) = history[0], history[-1]
    assert lm1 < 0.5 * lm0, history
    # the UNet is frozen: only the condition (queries, projector, LLM) can lower it
    assert diff1 < 0.95 * diff0, history


def _per_example_lm_losses(model, batch, spans):
    hidden = model.hidden_states(batch["input_ids"], batch["position_ids"], batch.get("pixel_values"))
    logits = model.logits(hidden)
    losses = []
    for row, start, end in spans:
        lg, lab = logits[row, start:end - 1], batch["labels"][row, start + 1:end]
        losses.append(F.cross_entropy(lg, lab, ignore_index=IGNORE).item())
    return losses, hidden


def test_packed_batch_gives_the_same_per_document_loss_as_unpacked(model, builder, images, tok):
    pixels, latents = images
    docs = [builder.document([Text("A red circle."), Image("a"), Text("A blue star after it.")]),
            builder.pair("a yellow square", "b", "comprehension"),
            builder.document([Text("Just some text with no image at all, a little longer.")])]
    model.eval()
    unpacked = collate([[d] for d in docs], tok.pad_token_id, pixels=pixels, latents=latents)
    packed = collate([docs], tok.pad_token_id, pixels=pixels, latents=latents)
    lens = [len(d) for d in docs]
    starts = [sum(lens[:i]) for i in range(len(docs))]
    with torch.no_grad():
        ref, ref_hidden = _per_example_lm_losses(model, unpacked, [(i, 0, n) for i, n in enumerate(lens)])
        got, got_hidden = _per_example_lm_losses(model, packed, [(0, s, s + n) for s, n in zip(starts, lens)])
        # without position restarts the later documents would see the earlier ones: a different loss
        leaky = dict(packed, position_ids=torch.arange(packed["input_ids"].shape[1])[None])
        _, leak_hidden = _per_example_lm_losses(model, leaky, [])
    assert got == pytest.approx(ref, rel=1e-4, abs=1e-5)
    for i, (s, n) in enumerate(zip(starts, lens)):
        assert torch.allclose(got_hidden[0, s:s + n], ref_hidden[i, :n], atol=1e-4)
    assert not torch.allclose(leak_hidden[0, starts[1]:starts[1] + lens[1]], ref_hidden[1, :lens[1]], atol=1e-3)
    # the dream conditions (what the UNet sees) are identical too
    q_ref = model.condition(ref_hidden, model.slot_masks(unpacked["input_ids"])[0])
    q_got = model.condition(got_hidden, model.slot_masks(packed["input_ids"])[0])
    assert torch.allclose(q_ref, q_got, atol=1e-5)


def test_condition_dropout_uses_the_unconditional_condition(model, batch):
    model.set_stage("igpt").train()
    model.cfg.condition_dropout = 0.999  # every condition dropped
    hidden = model.hidden_states(batch["input_ids"], batch["position_ids"], batch["pixel_values"])
    null = model.prompt_condition([""])
    g = torch.Generator().manual_seed(3)
    dropped = model(**batch, generator=g)
    # the same loss is obtained by feeding the null condition explicitly with the same randomness
    g = torch.Generator().manual_seed(3)
    torch.rand(3, generator=g)  # the dropout draw
    n = int(model.slot_masks(batch["input_ids"])[0].sum()) // model.cfg.num_dream_queries
    ref = model.diffusion_loss(null.expand(n, -1, -1), None, batch["latent_mean"], batch["latent_logvar"], g)
    assert dropped.loss_diffusion == pytest.approx(ref.item(), rel=1e-5)
    cond = model.condition(hidden, model.slot_masks(batch["input_ids"])[0])
    assert not torch.allclose(cond, null.expand_as(cond))


def test_gradient_checkpointing_gives_the_same_gradients(cfg, tok, batch):
    from dreamllm.config import DreamLLMConfig
    from dreamllm.model import DreamLLM
    grads = []
    for ckpt in (False, True):
        c = DreamLLMConfig.from_dict({**cfg.to_dict(), "gradient_checkpointing": ckpt, "condition_dropout": 0.0})
        m = DreamLLM.from_config(c, tok).set_stage("igpt").train()
        m(**batch, generator=torch.Generator().manual_seed(0)).loss.backward()
        grads.append(m.dream_queries.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_denoising_loss_timestep_draw_and_min_snr_weighting(model):
    from dreamllm.components import denoising_loss

    unet, sched = model.unet, model.noise_scheduler
    R, D = model.cfg.diffusion.latent_size, model.cfg.diffusion.cross_attention_dim
    g = torch.Generator().manual_seed(0)
    x0, cond = torch.randn(64, 4, R, R, generator=g), torch.randn(64, 3, D, generator=g)
    seen = []
    real_forward = unet.forward
    unet.forward = lambda sample, t, **kw: (seen.append(t.clone()), real_forward(sample, t, **kw))[1]
    try:
        with torch.no_grad():
            uniform, mse_u = denoising_loss(unet, sched, x0, cond, "epsilon", generator=torch.Generator().manual_seed(1))
            noisy, _ = denoising_loss(unet, sched, x0, cond, "epsilon", timestep_power=2.0,
                                      generator=torch.Generator().manual_seed(1))
            weighted, mse_w = denoising_loss(unet, sched, x0, cond, "epsilon", snr_gamma=5.0,
                                             generator=torch.Generator().manual_seed(1))
    finally:
        unet.forward = real_forward
    T = sched.config.num_train_timesteps
    assert all(int(t.min()) >= 0 and int(t.max()) < T for t in seen)
    # power 2: timestep density grows with t (mean 2T/3 instead of T/2)
    assert seen[1].float().mean() > seen[0].float().mean() and seen[1].float().mean() > 0.55 * T
    # the paper's default is plain MSE; min-SNR only down-weights (epsilon: weight = min(snr, 5) / snr <= 1)
    assert uniform.item() == pytest.approx(mse_u.item())
    assert torch.equal(seen[0], seen[2]) and mse_w.item() == pytest.approx(mse_u.item())
    assert weighted.item() < uniform.item()
    # the model's diffusion loss is this function with its config's draw and weighting
    model.cfg.diffusion.timestep_power, model.cfg.diffusion.snr_gamma = 2.0, 5.0
    with torch.no_grad():
        ref, _ = denoising_loss(unet, sched, x0 * model.vae.config.scaling_factor, cond, "epsilon", 2.0, 5.0,
                                torch.Generator().manual_seed(4))
        got = model.diffusion_loss(cond, latents=x0, generator=torch.Generator().manual_seed(4))
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)


def test_a_text_only_batch_still_gives_every_own_parameter_a_gradient(model, builder):
    # Data-parallel reduction (DDP, DeepSpeed) waits for every trainable parameter's gradient, so the
    # projectors and queries must join the graph on a batch that has no image at all.
    doc = builder.document([Text("a red circle on a blue background.")])
    batch = collate([[doc]], model.ids.pad)
    model.set_stage("igpt").train()
    model(**batch).loss.backward()
    for n, p in model.own_named_parameters().items():
        assert p.grad is not None, f"{n} got no gradient from a text-only batch"
