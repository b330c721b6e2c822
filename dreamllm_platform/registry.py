"""The model registry's policy: registering exported checkpoints, the promotion gate, alias moves and their records.

Owns: what a registered version carries (stage, flavor, the training run it
came from), the two aliases (`candidate`: the newest registered or named
version; `champion`: the one serving), the gate a candidate must pass to
become champion (configured metrics, no regression beyond a tolerance against
the current champion, both evaluated on the same held-out set), forced
promotions (a reason is required and recorded), rollback and the move history.

Every alias move is recorded as a version tag `dreamllm.move.NNNN` on the
version it moved to: a JSON record of the alias, the action, who, when, why
and the version the alias pointed at before (for `champion`: the previous
champion). A promotion to champion also sets `dreamllm.previous_champion`,
which `rollback` follows; rollback does not rewrite it, so repeated rollbacks
walk back through the champions in order.

All MLflow reads and writes go through `dreamllm_platform.model_registry` (versions, aliases)
and `dreamllm_platform.tracking` (runs).
"""
from __future__ import annotations

import getpass
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from . import model_registry, storage, tracking
from .mlflow_tags import (EVAL_SET_TAG, EVAL_TAG_PREFIX, FLAVOR_TAG, FORCE_REASON_TAG, GATE_TAG, MOVE_TAG_PREFIX,
                          PREVIOUS_CHAMPION_TAG, REGISTERED_BY_TAG, STAGE_TAG)
from .storage import StorageConfig
from .tracking import TrackingConfig

CANDIDATE, CHAMPION = "candidate", "champion"
_NOT_METRICS = ("run_id", "dataset")


@dataclass
class GateMetric:
    """One metric the gate compares between the candidate and the champion."""

    higher_is_better: bool = False
    """True for accuracies and CLIP score; False for losses and FID."""
    tolerance: float = 0.0
    """Largest allowed regression against the champion, in the metric's own units."""

    def __post_init__(self) -> None:
        if self.tolerance < 0:
            raise ValueError(f"gate tolerance must be >= 0, got {self.tolerance}")


def _default_gate_metrics() -> dict[str, GateMetric]:
    # FID and CLIP score need feature networks (Inception, CLIP) that only real runs have:
    # configs/promote.yaml shows how to add them.
    return {"val_loss_lm": GateMetric(False, 0.05), "val_loss_diffusion": GateMetric(False, 0.05),
            "qa_exact_match": GateMetric(True, 0.02)}


@dataclass
class GateConfig:
    """What a candidate must pass to become champion."""

    metrics: dict[str, GateMetric] = field(default_factory=_default_gate_metrics)
    """Metric name (as logged by jobs/evaluate.py) -> direction and tolerance; every one is required."""
    same_eval_set: bool = True
    """Refuse when the candidate and the champion were evaluated on different held-out sets or settings."""

    def __post_init__(self) -> None:
        if not self.metrics:
            raise ValueError("gate.metrics needs at least one metric")


@dataclass
class RegistryConfig:
    """The registry jobs (register, promote)."""

    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """MLflow tracking URI and registered model name."""
    storage: StorageConfig = field(default_factory=StorageConfig)
    """Object-storage endpoint/region (default: the AWS environment)."""
    gate: GateConfig = field(default_factory=GateConfig)
    """The promotion gate."""


@dataclass
class Move:
    """One alias move, as recorded on the version it moved to."""

    alias: str
    version: str
    previous: str | None
    action: str
    """register, candidate, promote, force or rollback."""
    who: str
    when: str
    why: str

    def line(self) -> str:
        prev = f"v{self.previous}" if self.previous else "none"
        return (f"{self.when}  {self.alias:<9} -> v{self.version:<4} (was {prev:<5}) {self.action:<8} "
                f"by {self.who}: {self.why}")


@dataclass
class PromotionResult:
    """What `promote` did: `promoted` False means the gate refused (see `failures`)."""

    version: str
    promoted: bool
    failures: list[str]
    moves: list[Move]
    champion_before: str | None


def current_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        return os.environ.get("USER", "unknown")


# -------------------------------------------------------------- registering

def checkpoint_info(uri: str, st: StorageConfig | None = None) -> dict:
    """The checkpoint's `dreamllm.json` (validated); only that file is read, even from object storage."""
    from dreamllm.checkpoint import CONFIG_FILE, read_checkpoint_info  # torch et al.: only when registering

    if not storage.is_remote(uri):
        return read_checkpoint_info(storage.local_path(uri))
    try:
        data = storage.read_bytes(storage.join(uri, CONFIG_FILE), st)
    except FileNotFoundError:
        raise ValueError(f"{uri} is not a DreamLLM checkpoint: {CONFIG_FILE} is missing") from None
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / CONFIG_FILE).write_bytes(data)
        return read_checkpoint_info(tmp)


def register(cfg: RegistryConfig, checkpoint_uri: str, run_id: str | None = None, who: str | None = None):
    """Register an exported checkpoint as a new version and make it the candidate.

    `run_id` (default: the training run in the checkpoint's metadata) links the
    version to its run when that run is in this tracking store. Returns
    (ModelVersion, the candidate Move).
    """
    if not storage.is_remote(checkpoint_uri):  # a local path is stored absolute: the registry outlives the cwd
        checkpoint_uri = str(storage.local_path(checkpoint_uri))
    info = checkpoint_info(checkpoint_uri, cfg.storage)
    meta = info.get("metadata", {})
    run_id = run_id or meta.get("mlflow_run_id")
    if run_id and not tracking.run_exists(cfg.tracking, run_id):
        run_id = None  # trained against another tracking store: nothing here to link to
    who = who or current_user()
    tags = {STAGE_TAG: info["stage"], FLAVOR_TAG: info["config"].get("flavor", ""), REGISTERED_BY_TAG: who}
    params = {"stage": info["stage"], "flavor": info["config"].get("flavor", ""), "llm_trained": info["llm_trained"],
              **{f"metadata.{k}": v for k, v in meta.items()}}
    mv = model_registry.register_checkpoint_version(cfg.tracking, checkpoint_uri, run_id, tags, params,
                                              description=f"DreamLLM {info['stage']} checkpoint {checkpoint_uri}")
    move = move_alias(cfg.tracking, CANDIDATE, mv.version, who, f"registered from {checkpoint_uri}", "register")
    return mv, move


# --------------------------------------------------------------- the gate

def version_metrics(mv) -> dict[str, float]:
    """Evaluation metrics recorded on a version (its `dreamllm.eval.*` tags)."""
    out = {}
    for k, v in mv.tags.items():
        name = k[len(EVAL_TAG_PREFIX):]
        if k.startswith(EVAL_TAG_PREFIX) and name not in _NOT_METRICS:
            out[name] = float(v)
    return out


def check_gate(gate: GateConfig, candidate, champion) -> list[str]:
    """Why `candidate` may not replace `champion` (ModelVersions; champion None = no champion yet); [] = passes."""
    cand, champ = version_metrics(candidate), version_metrics(champion) if champion is not None else {}
    failures = []
    for name, g in gate.metrics.items():
        if name not in cand:
            failures.append(f"{name}: missing on version {candidate.version} (evaluate it with jobs/evaluate.py)")
            continue
        if champion is None:
            continue
        if name not in champ:
            failures.append(f"{name}: missing on champion version {champion.version} "
                            "(evaluate it with jobs/evaluate.py)")
            continue
        regression = champ[name] - cand[name] if g.higher_is_better else cand[name] - champ[name]
        if regression > g.tolerance:
            failures.append(f"{name} regressed by {regression:.6g} (candidate v{candidate.version} {cand[name]:.6g} vs "
                            f"champion v{champion.version} {champ[name]:.6g}; tolerance {g.tolerance:g}, "
                            f"{'higher' if g.higher_is_better else 'lower'} is better)")
    if gate.same_eval_set and champion is not None:
        a, b = candidate.tags.get(EVAL_SET_TAG), champion.tags.get(EVAL_SET_TAG)
        if a and b and a != b:
            failures.append(f"evaluated on different held-out sets or settings ({EVAL_SET_TAG} {a} on "
                            f"v{candidate.version}, {b} on v{champion.version}): evaluate both with the same config")
    return failures


# ------------------------------------------------------------------ moves

def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def move_alias(cfg: TrackingConfig, alias: str, version: str, who: str, why: str, action: str) -> Move:
    """Point `alias` at `version` and record the move on that version."""
    mv = model_registry.get_version(cfg, str(version))
    move = Move(alias, str(mv.version), model_registry.alias_version(cfg, alias), action, who, _now(), why)
    model_registry.set_alias(cfg, alias, mv.version)
    n = sum(1 for k in mv.tags if k.startswith(MOVE_TAG_PREFIX))
    model_registry.set_version_tags(cfg, mv.version, {f"{MOVE_TAG_PREFIX}{n + 1:04d}": json.dumps(asdict(move))})
    return move


def promote(cfg: RegistryConfig, version: str = "@" + CANDIDATE, who: str | None = None,
            force_reason: str | None = None) -> PromotionResult:
    """Make `version` the candidate, then the champion if it passes the gate (or `force_reason` is given).

    A refusal moves nothing but the candidate alias and records the gate's verdict on the version.
    """
    t = cfg.tracking
    who = who or current_user()
    if force_reason is not None and not force_reason.strip():
        raise ValueError("a forced promotion needs a non-empty reason")
    mv = model_registry.get_version(t, version)
    champion_before = model_registry.alias_version(t, CHAMPION)
    if champion_before == mv.version:
        raise ValueError(f"version {mv.version} of {t.registered_model!r} is already the champion")
    moves = []
    if model_registry.alias_version(t, CANDIDATE) != mv.version:
        moves.append(move_alias(t, CANDIDATE, mv.version, who, "named for promotion", "candidate"))
        mv = model_registry.get_version(t, mv.version)
    champion = model_registry.get_version(t, champion_before) if champion_before else None
    failures = check_gate(cfg.gate, mv, champion)
    verdict = {"when": _now(), "who": who, "passed": not failures, "failures": failures,
               "champion": champion_before, "forced": force_reason is not None}
    model_registry.set_version_tags(t, mv.version, {GATE_TAG: json.dumps(verdict)})
    if failures and force_reason is None:
        return PromotionResult(mv.version, False, failures, moves, champion_before)
    if force_reason is not None:
        why = f"forced: {force_reason.strip()}" + (f" (gate failures: {'; '.join(failures)})" if failures else "")
        action = "force"
    else:
        metrics = version_metrics(mv)
        why = "passed the gate: " + ", ".join(f"{k}={metrics[k]:.6g}" for k in cfg.gate.metrics)
        action = "promote"
    moves.append(move_alias(t, CHAMPION, mv.version, who, why, action))
    tags = {PREVIOUS_CHAMPION_TAG: champion_before or ""}
    if force_reason is not None:
        tags[FORCE_REASON_TAG] = force_reason.strip()
    model_registry.set_version_tags(t, mv.version, tags)
    return PromotionResult(mv.version, True, failures, moves, champion_before)


def rollback(cfg: RegistryConfig, who: str | None = None, reason: str | None = None) -> Move:
    """Point `champion` back at the version it replaced (the current champion's `previous_champion`)."""
    t = cfg.tracking
    current = model_registry.alias_version(t, CHAMPION)
    if current is None:
        raise ValueError(f"{t.registered_model!r} has no champion to roll back")
    previous = model_registry.get_version(t, current).tags.get(PREVIOUS_CHAMPION_TAG)
    if not previous:
        raise ValueError(f"champion version {current} of {t.registered_model!r} has no previous champion to restore")
    why = f"rollback from v{current}" + (f": {reason.strip()}" if reason and reason.strip() else "")
    return move_alias(t, CHAMPION, previous, who or current_user(), why, "rollback")


def history(cfg: RegistryConfig) -> list[Move]:
    """Every recorded alias move of the registered model, oldest first."""
    moves = []
    for mv in model_registry.list_versions(cfg.tracking):
        for k, v in mv.tags.items():
            if k.startswith(MOVE_TAG_PREFIX):
                moves.append(Move(**json.loads(v)))
    return sorted(moves, key=lambda m: m.when)
