"""The model registry's policy: registering exported checkpoints, the promotion gate, alias moves and their records.

Owns: what a registered version carries (stage, flavor, the training run it
came from, and an immutable copy of its weights: `store_weights` copies the
checkpoint to `<store>/<model>/sha256-<digest>/`, named by the digest of its
files, so a stage rerun that overwrites its output folder never changes what a
version serves, and the same content registered twice shares one copy), the two aliases (`candidate`: the newest registered or named
version; `champion`: the one serving), the gate a candidate must pass to
become champion (configured metrics, no regression beyond a tolerance against
the current champion, both evaluated on the same held-out set), forced
promotions (a reason is required and recorded), rollback and the move history.

The gate refuses missing or non-finite (NaN, infinite) metrics and versions
whose held-out set digest is missing or differs from the champion's. Moving
`champion` is compare-and-set: the champion read before the gate must still be
the champion just before the alias moves, else nothing moves (`AliasMoved`).

Every alias move is recorded as a version tag `dreamllm.move.NNNN` on the
version it moved to, written BEFORE the alias moves (a crash in between leaves
the intent recorded): a JSON record of the alias, the action, who, when, why,
the version the alias pointed at before (for `champion`: the previous
champion), both versions' gate metrics and digests (weights, held-out set) and
the gate's decision; a move refused at the last check is marked `aborted`. A promotion to champion also sets `dreamllm.previous_champion`,
which `rollback` follows; rollback does not rewrite it, so repeated rollbacks
walk back through the champions in order.

All MLflow reads and writes go through `dreamllm_platform.model_registry` (versions, aliases)
and `dreamllm_platform.tracking` (runs).
"""
from __future__ import annotations

import getpass
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from . import model_registry, storage, tracking
from .mlflow_tags import (CONTENT_DIGEST_TAG, EVAL_SET_TAG, EVAL_TAG_PREFIX, FLAVOR_TAG, FORCE_REASON_TAG, GATE_TAG,
                          MOVE_TAG_PREFIX, PREVIOUS_CHAMPION_TAG, REGISTERED_BY_TAG, SOURCE_URI_TAG, STAGE_TAG)
from .storage import StorageConfig
from .tracking import TrackingConfig

CANDIDATE, CHAMPION = "candidate", "champion"
_NOT_METRICS = ("run_id", "dataset")
MANIFEST = ".dreamllm-registry.json"
"""Written last into a version's weights copy (the files' sizes and sha256s): without it the copy is unfinished.
Hidden, so it is not part of the content it describes."""


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
    store: str = ""
    """Where registered versions' weights are copied, content-addressed (`<store>/<model>/sha256-<digest>/`;
    local dir or s3://). '' = `<tracking.artifact_location>/registry` when that is s3:// or local, else
    `registry/` beside the sqlite tracking file."""


class AliasMoved(ValueError):
    """`champion` moved between the gate's read and the move: nothing was moved."""


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
    metrics: dict = field(default_factory=dict)
    """The gate metrics of the version moved to (`to`) and of the one moved from (`from`)."""
    digests: dict = field(default_factory=dict)
    """`content_to`/`content_from`: the weights' sha256; `eval_set_to`/`eval_set_from`: the held-out set's."""
    gate: dict | None = None
    """The gate's decision (passed, failures, forced) for a promotion; None for other moves."""
    aborted: str | None = None
    """Set when the alias was not moved after all (it moved meanwhile): why."""

    def line(self) -> str:
        prev = f"v{self.previous}" if self.previous else "none"
        return (f"{self.when}  {self.alias:<9} -> v{self.version:<4} (was {prev:<5}) {self.action:<8} "
                f"by {self.who}: {self.why}" + (f" [ABORTED: {self.aborted}]" if self.aborted else ""))


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


def weights_store(cfg: RegistryConfig) -> str:
    """The root of the versions' weights copies (`RegistryConfig.store`, else derived from the tracking store)."""
    if cfg.store:
        return storage.absolute(cfg.store)
    art = cfg.tracking.artifact_location
    if art and (storage.is_remote(art) or storage.is_local(art)):
        return storage.join(storage.absolute(art), "registry")
    uri = tracking.tracking_uri(cfg.tracking)
    if uri.startswith("sqlite:///"):
        return str(Path(uri[len("sqlite:///"):]).parent / "registry")
    raise ValueError(f"store is not set and the tracking store {uri} has no local or s3:// artifact_location: "
                     "set store=s3://bucket/registry (where registered versions' weights are kept)")


def store_weights(cfg: RegistryConfig, checkpoint_uri: str) -> tuple[str, str]:
    """(URI, digest): an immutable copy of the checkpoint's files at `<store>/<model>/sha256-<digest>/`.

    The digest (`storage.dir_digest`) is taken first; content already stored is reused as is. The copy
    hashes what it writes: a checkpoint that changed while it was read (a stage still writing) is refused.
    """
    st = cfg.storage
    digest, _ = storage.dir_digest(checkpoint_uri, st)
    dest = storage.join(weights_store(cfg), cfg.tracking.registered_model, f"sha256-{digest}")
    manifest = storage.join(dest, MANIFEST)
    if storage.exists(manifest, st):
        return dest, digest
    copied, files = storage.copy_dir(checkpoint_uri, dest, st)
    if copied != digest:
        if not storage.exists(manifest, st):  # never leave bytes under a name that is not theirs
            storage.remove(dest, st)
        raise ValueError(f"{checkpoint_uri} changed while it was being registered (sha256 {digest[:12]} when "
                         f"read, {copied[:12]} when copied): register it once its stage has finished writing")
    storage.write_bytes(manifest, json.dumps({"digest": digest, "source": checkpoint_uri, "files": files},
                                             indent=1).encode(), st)
    return dest, digest


def register(cfg: RegistryConfig, checkpoint_uri: str, run_id: str | None = None, who: str | None = None):
    """Register an exported checkpoint as a new version and make it the candidate.

    The version points at an immutable copy of the checkpoint (`store_weights`), never at
    `checkpoint_uri` itself, which a rerun of its stage overwrites. `run_id` (default: the training
    run in the checkpoint's metadata) links the version to its run when that run is in this tracking
    store. Returns (ModelVersion, the candidate Move).
    """
    if not storage.is_remote(checkpoint_uri):  # a local path is stored absolute: the registry outlives the cwd
        checkpoint_uri = str(storage.local_path(checkpoint_uri))
    checkpoint_info(checkpoint_uri, cfg.storage)  # a checkpoint at all, before anything is copied
    location, digest = store_weights(cfg, checkpoint_uri)
    info = checkpoint_info(location, cfg.storage)  # what the version holds: the copy
    meta = info.get("metadata", {})
    run_id = run_id or meta.get("mlflow_run_id")
    if run_id and not tracking.run_exists(cfg.tracking, run_id):
        run_id = None  # trained against another tracking store: nothing here to link to
    who = who or current_user()
    tags = {STAGE_TAG: info["stage"], FLAVOR_TAG: info["config"].get("flavor", ""), REGISTERED_BY_TAG: who,
            SOURCE_URI_TAG: checkpoint_uri, CONTENT_DIGEST_TAG: digest}
    params = {"stage": info["stage"], "flavor": info["config"].get("flavor", ""), "llm_trained": info["llm_trained"],
              **{f"metadata.{k}": v for k, v in meta.items()}}
    mv = model_registry.register_checkpoint_version(
        cfg.tracking, location, run_id, tags, params,
        description=f"DreamLLM {info['stage']} checkpoint registered from {checkpoint_uri} (sha256 {digest})")
    move = move_alias(cfg.tracking, CANDIDATE, mv.version, who,
                      f"registered from {checkpoint_uri} (sha256 {digest[:12]})", "register")
    return mv, move


# --------------------------------------------------------------- the gate

def _float(v: str) -> float:
    try:
        return float(v)
    except ValueError:
        return math.nan  # not a number at all: refused by the gate like a NaN


def version_metrics(mv) -> dict[str, float]:
    """Evaluation metrics recorded on a version (its `dreamllm.eval.*` tags); an unreadable value is NaN."""
    out = {}
    for k, v in mv.tags.items():
        name = k[len(EVAL_TAG_PREFIX):]
        if k.startswith(EVAL_TAG_PREFIX) and name not in _NOT_METRICS:
            out[name] = _float(v)
    return out


def _metric_failure(name: str, values: dict, mv, role: str) -> str | None:
    """Why metric `name` of `mv` cannot be compared (missing or not a finite number), or None."""
    if name not in values:
        return f"{name}: missing on {role}version {mv.version} (evaluate it with jobs/evaluate.py)"
    if not math.isfinite(values[name]):
        return (f"{name}: {mv.tags.get(EVAL_TAG_PREFIX + name)!r} on {role}version {mv.version} is not a finite "
                "number (the evaluation diverged or failed: evaluate it again)")
    return None


def check_gate(gate: GateConfig, candidate, champion) -> list[str]:
    """Why `candidate` may not replace `champion` (ModelVersions; champion None = no champion yet); [] = passes.

    Refused: a gate metric missing or not finite (NaN, infinite) on either version, a regression beyond
    the tolerance, and (with `same_eval_set`) a held-out set digest missing on either version or differing.
    """
    cand, champ = version_metrics(candidate), version_metrics(champion) if champion is not None else {}
    failures = []
    for name, g in gate.metrics.items():
        bad = _metric_failure(name, cand, candidate, "")
        if bad:
            failures.append(bad)
            continue
        if champion is None:
            continue
        bad = _metric_failure(name, champ, champion, "champion ")
        if bad:
            failures.append(bad)
            continue
        regression = champ[name] - cand[name] if g.higher_is_better else cand[name] - champ[name]
        if regression > g.tolerance:
            failures.append(f"{name} regressed by {regression:.6g} (candidate v{candidate.version} {cand[name]:.6g} vs "
                            f"champion v{champion.version} {champ[name]:.6g}; tolerance {g.tolerance:g}, "
                            f"{'higher' if g.higher_is_better else 'lower'} is better)")
    if gate.same_eval_set:
        a = candidate.tags.get(EVAL_SET_TAG)
        b = champion.tags.get(EVAL_SET_TAG) if champion is not None else None
        for digest, mv, role in ((a, candidate, ""), (b, champion, "champion ")):
            if mv is not None and not digest:
                failures.append(f"{EVAL_SET_TAG}: the held-out set digest is missing on {role}version {mv.version} "
                                "(evaluate it with jobs/evaluate.py)")
        if a and b and a != b:
            failures.append(f"evaluated on different held-out sets or settings ({EVAL_SET_TAG} {a} on "
                            f"v{candidate.version}, {b} on v{champion.version}): evaluate both with the same config")
    return failures


# ------------------------------------------------------------------ moves

def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


_UNCHECKED = object()


def _gate_metrics(mv, gate: GateConfig | None) -> dict[str, float | None]:
    values = version_metrics(mv)
    names = gate.metrics if gate is not None else values
    return {k: (values[k] if k in values and math.isfinite(values[k]) else None) for k in names}  # JSON: no NaN


def move_alias(cfg: TrackingConfig, alias: str, version: str, who: str, why: str, action: str,
               expected=_UNCHECKED, gate: GateConfig | None = None, decision: dict | None = None,
               before_move=None) -> Move:
    """Point `alias` at `version`, recording the move on that version first.

    The record (who, when, from and to version, their gate metrics and digests, the gate's `decision`)
    is written before the alias moves. With `expected` (a version number or None), the move is
    compare-and-set: when `alias` does not point at `expected` just before the move, nothing moves,
    the record is marked aborted and `AliasMoved` is raised. `before_move(move)` is called between
    the record and that last check (tests use it to move the alias meanwhile).
    """
    mv = model_registry.get_version(cfg, str(version))
    previous = model_registry.alias_version(cfg, alias)
    if expected is not _UNCHECKED and previous != expected:
        raise AliasMoved(_moved_message(cfg, alias, expected, previous, mv.version))
    prev = model_registry.get_version(cfg, previous) if previous else None
    metrics = {"to": _gate_metrics(mv, gate), **({"from": _gate_metrics(prev, gate)} if prev else {})}
    digests = {"content_to": mv.tags.get(CONTENT_DIGEST_TAG), "eval_set_to": mv.tags.get(EVAL_SET_TAG),
               "content_from": prev.tags.get(CONTENT_DIGEST_TAG) if prev else None,
               "eval_set_from": prev.tags.get(EVAL_SET_TAG) if prev else None}
    move = Move(alias, str(mv.version), previous, action, who, _now(), why, metrics, digests, decision)
    n = sum(1 for k in mv.tags if k.startswith(MOVE_TAG_PREFIX))
    key = f"{MOVE_TAG_PREFIX}{n + 1:04d}"
    # The record first: a crash between it and the move leaves the intent on record, never a silent move.
    model_registry.set_version_tags(cfg, mv.version, {key: json.dumps(asdict(move))})
    if before_move is not None:
        before_move(move)
    if expected is not _UNCHECKED:
        now = model_registry.alias_version(cfg, alias)
        if now != previous:
            move.aborted = _moved_message(cfg, alias, previous, now, mv.version)
            model_registry.set_version_tags(cfg, mv.version, {key: json.dumps(asdict(move))})
            raise AliasMoved(move.aborted)
    model_registry.set_alias(cfg, alias, mv.version)
    return move


def _moved_message(cfg: TrackingConfig, alias: str, read: str | None, now: str | None, version: str) -> str:
    return (f"{alias} of {cfg.registered_model!r} moved from {'v' + read if read else 'none'} to "
            f"{'v' + now if now else 'none'} while v{version} was being moved there; {alias} was not moved "
            f"(run it again to compare against {'v' + now if now else 'none'})")


def promote(cfg: RegistryConfig, version: str = "@" + CANDIDATE, who: str | None = None,
            force_reason: str | None = None, before_move=None) -> PromotionResult:
    """Make `version` the candidate, then the champion if it passes the gate (or `force_reason` is given).

    A refusal moves nothing but the candidate alias and records the gate's verdict on the version.
    The champion is read once, before the gate; the move is compare-and-set against that read
    (`AliasMoved` when `champion` moved meanwhile; `before_move` as in `move_alias`).
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
               "champion": champion_before, "forced": force_reason is not None,
               "metrics": _gate_metrics(mv, cfg.gate), "eval_set": mv.tags.get(EVAL_SET_TAG),
               "champion_eval_set": champion.tags.get(EVAL_SET_TAG) if champion is not None else None}
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
    decision = {k: verdict[k] for k in ("passed", "failures", "forced")}
    moves.append(move_alias(t, CHAMPION, mv.version, who, why, action, expected=champion_before, gate=cfg.gate,
                            decision=decision, before_move=before_move))
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
    return move_alias(t, CHAMPION, previous, who or current_user(), why, "rollback", expected=current, gate=cfg.gate)


def history(cfg: RegistryConfig) -> list[Move]:
    """Every recorded alias move of the registered model, oldest first."""
    moves = []
    for mv in model_registry.list_versions(cfg.tracking):
        for k, v in mv.tags.items():
            if k.startswith(MOVE_TAG_PREFIX):
                moves.append(Move(**json.loads(v)))
    return sorted(moves, key=lambda m: m.when)
