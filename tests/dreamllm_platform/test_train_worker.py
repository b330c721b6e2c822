"""What every training loop shares (train.worker) and the stages' optimizer: per-group learning rates reach
AdamW and follow the schedule, each rank draws its own randomness, metric windows and the one schedule."""
import pytest
import torch

from dreamllm.config import get_flavor
from dreamllm.model import DreamLLM
from dreamllm_platform.train.config import OptimSpec, TrainConfig
from dreamllm_platform.train.loop import lr_lambda, param_groups
from dreamllm_platform.train.worker import MetricWindow, WorkerContext, lr_factor


def optimizer_of(stage: str, optim: OptimSpec, train_llm: bool | None = None):
    model = DreamLLM.from_config(get_flavor("debug")).set_stage(stage, train_llm)
    cfg = TrainConfig(stage=stage, optim=optim)
    opt = torch.optim.AdamW(param_groups(model, 0.1, optim.lr, optim.llm_lr), lr=optim.lr)
    return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))


def test_the_llm_and_dreamllms_own_parameters_get_their_own_rates():
    model, opt, sched = optimizer_of("igpt", OptimSpec(lr=1e-3, llm_lr=2e-5, max_steps=100, warmup_ratio=0.1))
    by_id = {id(p): g for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert by_id[id(p)]["initial_lr"] == (2e-5 if name.startswith("llm.") else 1e-3), name
    assert sum(len(g["params"]) for g in opt.param_groups) == sum(p.requires_grad for p in model.parameters())
    # Norms, biases, queries and added-token rows are not decayed.
    assert by_id[id(model.dream_queries)]["weight_decay"] == 0.0
    assert by_id[id(model.visual_projector.weight)]["weight_decay"] == 0.1
    for _ in range(50):  # the schedule scales every group alike: the ratio stays
        opt.step()
        sched.step()
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["llm"] / lrs["own"] == pytest.approx(2e-5 / 1e-3)
    assert lrs["own"] < 1e-3  # cosine decay is under way


def test_without_llm_lr_one_rate_and_a_frozen_llm_has_no_group():
    _, opt, _ = optimizer_of("igpt", OptimSpec(lr=3e-4))
    assert {g["initial_lr"] for g in opt.param_groups} == {3e-4}
    _, opt, _ = optimizer_of("align", OptimSpec(lr=2e-3, llm_lr=1e-5))
    assert {g["name"] for g in opt.param_groups} == {"own"}


def test_stage_one_trains_the_llm_at_its_rate_when_asked_and_its_checkpoint_keeps_it(tmp_path):
    from dreamllm.checkpoint import load_checkpoint, save_checkpoint

    model, opt, _ = optimizer_of("align", OptimSpec(lr=2e-3, llm_lr=2e-4), train_llm=True)
    assert model.llm_trainable and all(p.requires_grad for p in model.llm.parameters())
    assert {g["name"]: g["initial_lr"] for g in opt.param_groups} == {"llm": 2e-4, "own": 2e-3}
    assert not any(p.requires_grad for part in ("vision", "unet", "vae") for p in getattr(model, part).parameters())
    with torch.no_grad():
        next(model.llm.parameters()).add_(1.0)  # a trained LLM differs from the flavor's random one
    again = load_checkpoint(save_checkpoint(model, tmp_path / "ckpt"))
    assert (tmp_path / "ckpt" / "llm").is_dir() and again.llm_trainable
    assert torch.equal(next(again.llm.parameters()), next(model.llm.parameters()))
    assert not DreamLLM.from_config(get_flavor("debug")).set_stage("align").llm_trainable  # the paper's policy


def test_each_rank_draws_its_own_noise_and_a_resume_draws_afresh():
    draws = {}
    for rank, step in ((0, 0), (1, 0), (0, 50)):
        WorkerContext(rank, 2, torch.device("cpu")).seed_rank(seed=7, step=step)
        draws[rank, step] = torch.randn(4)
    assert not torch.equal(draws[0, 0], draws[1, 0]) and not torch.equal(draws[0, 0], draws[0, 50])
    WorkerContext(1, 2, torch.device("cpu")).seed_rank(seed=7, step=0)
    assert torch.equal(torch.randn(4), draws[1, 0])  # and the same rank and step draw the same again


def test_the_one_schedule_and_the_metric_window():
    assert lr_factor(0, 100, 10) == pytest.approx(0.1) and lr_factor(9, 100, 10) == 1.0
    assert lr_factor(100, 100, 10) == pytest.approx(0.0) and lr_factor(55, 100, 10, "constant") == 1.0
    assert lr_factor(100, 100, 10, min_ratio=0.1) == pytest.approx(0.1)
    w = MetricWindow()
    w.add({"images": 4}, loss=1.0)
    w.add({"images": 6}, loss=3.0)
    out = w.pop(WorkerContext(0, 1, torch.device("cpu")))
    assert out["loss"] == 2.0 and out["images_per_s"] > 0
    assert w.n == 0 and w.sums == {}
