"""The synergy ablation, the paper's Table 3 in miniature: does learning to create help comprehension, and
learning to comprehend help creation?

Owns: the arms (joint learning, comprehension-only, creation-only, joint
without interleaved documents), each a set of overrides of the pipeline's
stage sections; running every arm x seed through the pipeline's steps up to
stage III (synthetic data, towers and latents are shared: their steps are
keyed by the pipeline's own seed, so they run once; the seeds vary the
stages' initialisation of DreamLLM's own parameters, data order and noise);
the learning check of each arm's SFT export on the same held-out scenes; an
MLflow parent run with one child run per arm x seed; mean and spread of every
figure per arm; the table and a plot.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from dreamllm.config import check

from . import storage, tracking
from .config import deep_merge, load_config
from .evaluation.config import LearningCheckConfig
from .mlflow_tags import ABLATION_ARM_TAG, JOB_TAG, SFT_RUN_TAG
from .pipeline import PipelineConfig, StepConfigs, resolved_tracking, run_pipeline

_COMPREHENSION = {"data": {"assembly": {"pair_tasks": ["comprehension"]}}}
_CREATION = {"data": {"assembly": {"pair_tasks": ["creation"]}}}


def _default_arms() -> dict[str, dict]:
    return {
        "joint": {},
        # No diffusion loss anywhere: pairs read, documents' images are inputs, no instruction documents.
        "comprehension_only": {
            "align": _COMPREHENSION,
            "igpt": deep_merge(_COMPREHENSION, {"data": {"assembly": {"document_images": "read"}}}),
            "sft": {"data": {"mix": {"instruct": 0.0, "laion": 0.0}, "assembly": {"record_types": ["conversation"]}}}},
        # No question about a picture: pairs create, no LLaVA conversations.
        "creation_only": {"align": _CREATION, "igpt": _CREATION, "sft": {"data": {"mix": {"llava": 0.0}}}},
        # Joint learning on pairs and conversations only.
        "joint_no_documents": {"igpt": {"data": {"mix": {"mmc4": 0.0}}}, "sft": {"data": {"mix": {"instruct": 0.0}}}},
    }


@dataclass
class AblationConfig:
    """jobs/ablation.py: which arms, how many seeds, on which pipeline."""

    pipeline: dict[str, Any] = field(default_factory=dict)
    """Overrides of the pipeline's config (configs/pipeline.yaml keys; e.g. flavor, towers, stage sections)."""
    root: str = "outputs/ablation"
    """Folder of every output (shared data, towers and latents; each arm's checkpoints; the figures)."""
    arms: dict[str, dict[str, Any]] = field(default_factory=_default_arms)
    """Arm name -> overrides of the pipeline's stage sections (align, igpt, sft), merged over them."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """Seeds of the stages, each arm runs once per seed."""
    check: LearningCheckConfig = field(default_factory=LearningCheckConfig)
    """The learning check of each arm's SFT export."""

    def __post_init__(self) -> None:
        self.seeds = tuple(self.seeds)
        check(bool(self.arms) and len(self.seeds) >= 1, "ablation needs at least one arm and one seed")
        bad = {a: sorted(set(o) - {"align", "igpt", "sft"}) for a, o in self.arms.items() if set(o) - {"align", "igpt", "sft"}}
        check(not bad, f"arm overrides may only hold the sections align, igpt, sft; got {bad}")


@dataclass
class AblationResult:
    figures: dict[str, list[dict[str, float]]]
    """Arm -> one dict of learning figures per seed."""
    summary: dict[str, dict[str, tuple[float, float]]]
    """Arm -> figure -> (mean, standard deviation over seeds; 0 with one seed)."""
    parent_run_id: str
    table: str
    files: str
    seconds: float


def arm_config(cfg: AblationConfig, arm: str, seed: int) -> PipelineConfig:
    """The pipeline config of one arm and seed (the arm's overrides merged over the stage sections)."""
    tree = deep_merge({"root": cfg.root}, cfg.pipeline)
    base = PipelineConfig()
    for stage in ("align", "igpt", "sft"):
        section = deep_merge(deep_merge(getattr(base, stage), tree.get(stage, {})), cfg.arms[arm].get(stage, {}))
        tree[stage] = deep_merge(section, {"seed": seed})
    return load_config(PipelineConfig, None, (), base=tree)


def summarise(figures: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, tuple[float, float]]]:
    out = {}
    for arm, runs in figures.items():
        out[arm] = {k: (statistics.fmean(r[k] for r in runs),
                        statistics.stdev([r[k] for r in runs]) if len(runs) > 1 else 0.0) for k in runs[0]}
    return out


def table(summary: dict[str, dict[str, tuple[float, float]]], seeds: int) -> str:
    arms = list(summary)
    lines = [f"synergy ablation: mean ± standard deviation over {seeds} seed(s)",
             f"{'':<28}" + "".join(f"{a:>22}" for a in arms)]
    for k in next(iter(summary.values())):
        lines.append(f"{k:<28}" + "".join(f"{summary[a][k][0]:>14.3f} ± {summary[a][k][1]:<5.3f}" for a in arms))
    return "\n".join(lines)


def plot(summary: dict[str, dict[str, tuple[float, float]]]) -> bytes:
    """PNG: accuracy per attribute and arm (bars with the seeds' standard deviation), comprehension and
    creation side by side."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(summary)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    width = 0.8 / len(arms)
    for ax, kind in zip(axes, ("comprehension", "creation")):
        for i, arm in enumerate(arms):
            attrs = ("color", "shape", "position")
            ax.bar([j + i * width for j in range(3)], [summary[arm][f"{kind}.{a}"][0] for a in attrs], width,
                   yerr=[summary[arm][f"{kind}.{a}"][1] for a in attrs], label=arm, capsize=3)
        ax.set_xticks([j + width * (len(arms) - 1) / 2 for j in range(3)], ["colour", "shape", "position"])
        ax.set_title(kind)
        ax.set_ylim(0, 1.02)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("accuracy on held-out scenes")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def run_ablation(cfg: AblationConfig, log=print) -> AblationResult:
    """Every arm x seed, then the summary, logged on a parent run with one child per arm x seed."""
    from .checkpoints import load_model
    from .evaluation.learning import learning_curve

    start = time.time()
    first = arm_config(cfg, next(iter(cfg.arms)), cfg.seeds[0])
    track = resolved_tracking(StepConfigs(first).cfg)
    name = f"ablation-{first.flavor}-" + hashlib.sha256(json.dumps(dataclasses.asdict(cfg), sort_keys=True,
                                                                   default=str).encode()).hexdigest()[:8]
    figures: dict[str, list[dict[str, float]]] = {}
    with tracking.run(track, name, params={"arms": ",".join(cfg.arms), "seeds": ",".join(map(str, cfg.seeds))},
                      tags={JOB_TAG: "ablation"}) as (parent, _):
        for arm in cfg.arms:
            figures[arm] = []
            for seed in cfg.seeds:
                log(f"[ablation] arm {arm}, seed {seed}")
                pcfg = arm_config(cfg, arm, seed)
                steps = StepConfigs(pcfg)
                r = run_pipeline(pcfg, steps, log=lambda line: log("  " + line), until="sft",
                                 state_file=f"ablation-{arm}-seed{seed}.json")
                export = r.results["sft"]["export"]
                curve = learning_curve({"sft": lambda: load_model(export, tracking=track)}, cfg.check)["sft"]
                figures[arm].append(curve)
                with tracking.run(track, f"{name}-{arm}-seed{seed}", params={"arm": arm, "seed": seed},
                                  tags={"mlflow.parentRunId": parent, ABLATION_ARM_TAG: arm,
                                        SFT_RUN_TAG: r.results["sft"]["mlflow_run_id"]}) as (child, _):
                    tracking.RunLogger(track, child).metrics({f"learning.{k}": v for k, v in curve.items()}, 0)
        summary = summarise(figures)
        text, png = table(summary, len(cfg.seeds)), plot(summary)
        files = storage.join(cfg.root, "ablation")
        storage.write_bytes(storage.join(files, "table.txt"), (text + "\n").encode(), first.storage)
        storage.write_bytes(storage.join(files, "figures.json"),
                            json.dumps({"figures": figures, "summary": summary}, indent=1).encode(), first.storage)
        storage.write_bytes(storage.join(files, "ablation.png"), png, first.storage)
        logger = tracking.RunLogger(track, parent)
        logger.metrics({f"{arm}.{k}.{stat}": v[i] for arm, figs in summary.items() for k, v in figs.items()
                        for i, stat in enumerate(("mean", "std"))}, 0)
        logger.text(text + "\n", "ablation/table.txt")
        with tempfile.TemporaryDirectory() as d:
            with open(f"{d}/ablation.png", "wb") as f:
                f.write(png)
            logger.client.log_artifact(parent, f"{d}/ablation.png", "ablation")
    return AblationResult(figures, summary, parent, text, files, time.time() - start)
