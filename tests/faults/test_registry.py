"""Registry faults against a real sqlite MLflow registry (and the moto S3 server): a stage rerun that
overwrites a registered checkpoint's folder, metrics the gate must refuse (NaN, missing, unreadable,
held-out set digests missing or different), `champion` moved by a second promoter while a promotion
is in flight, and a crash between the audit record and the alias move.
"""
import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from dreamllm.checkpoint import load_checkpoint
from dreamllm.config import get_flavor
from dreamllm.model import DreamLLM
from dreamllm_platform import model_registry, storage
from dreamllm_platform.checkpoints import cache_key, export_checkpoint, local_checkpoint
from dreamllm_platform.config import load_config
from dreamllm_platform.mlflow_tags import (CHECKPOINT_URI_TAG, CONTENT_DIGEST_TAG, EVAL_SET_TAG, GATE_TAG,
                                          MOVE_TAG_PREFIX, SOURCE_URI_TAG)
from dreamllm_platform.registry import CHAMPION, AliasMoved, RegistryConfig, promote, register

ROOT = Path(__file__).resolve().parents[2]
GOOD = {"val_loss_lm": "2.0", "val_loss_diffusion": "1.0", "qa_exact_match": "0.5", "dataset": "set-a"}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two debug checkpoints that differ in one tensor (`dream_queries`), as two runs of a stage would."""
    d = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    model = DreamLLM.from_config(get_flavor("debug"))
    a = export_checkpoint(model, str(d / "a"), {"stage": "sft"})
    qa = model.dream_queries.detach().clone()
    torch.nn.init.normal_(model.dream_queries, std=3.0)
    b = export_checkpoint(model, str(d / "b"), {"stage": "sft"})
    return {"a": a, "b": b, "qa": qa, "qb": model.dream_queries.detach().clone()}


def _registry(tmp_path, *sets):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return load_config(RegistryConfig, None, [f"tracking.tracking_uri={uri}", *sets]), uri


def _evaluated(cfg, version, **tags):
    """The tags jobs/evaluate.py leaves on a version (`GOOD`, with `tags` replacing some)."""
    model_registry.set_version_tags(cfg.tracking, version,
                                    {f"dreamllm.eval.{k}": v for k, v in {**GOOD, **tags}.items()})


def _moves(cfg, version):
    mv = model_registry.get_version(cfg.tracking, version)
    return [json.loads(v) for k, v in sorted(mv.tags.items()) if k.startswith(MOVE_TAG_PREFIX)]


def test_a_stage_rerun_never_changes_what_champion_serves(tmp_path, s3, checkpoints, tally):
    prefix = f"s3://{s3['bucket']}/faults-registry-{uuid.uuid4().hex[:8]}"
    export = f"{prefix}/ray_results/dreamllm-sft/export"  # the stage's output folder, rewritten by a rerun
    cfg, _ = _registry(tmp_path, f"store={prefix}/registry")
    storage.upload_dir(checkpoints["a"], export)
    key_a = cache_key(export)[1]
    served_a = local_checkpoint(export, cache_dir=tmp_path / "cache")  # a server reading the folder directly
    v1, _ = register(cfg, export, who="alice")
    promote(cfg, v1.version, force_reason="first champion")
    location = v1.tags[CHECKPOINT_URI_TAG]
    assert v1.tags[SOURCE_URI_TAG] == export and location.startswith(f"{prefix}/registry/dreamllm/sha256-")
    assert location.endswith(v1.tags[CONTENT_DIGEST_TAG]) and location != export

    storage.upload_dir(checkpoints["b"], export)  # the rerun: other weights in the same folder

    champion = local_checkpoint("models:/dreamllm@champion", cfg.tracking, tmp_path / "cache")
    served = load_checkpoint(champion).dream_queries
    lost = int(not torch.equal(served, checkpoints["qa"]))
    # The cache is keyed on content: the same path with other bytes is another entry, never the stale one.
    key_b = cache_key(export)[1]
    assert key_a != key_b
    served_b = local_checkpoint(export, cache_dir=tmp_path / "cache")
    assert served_b != served_a
    assert torch.equal(load_checkpoint(served_b).dream_queries, checkpoints["qb"])
    assert cache_key("models:/dreamllm@champion", cfg.tracking)[1] == f"sha256-{v1.tags[CONTENT_DIGEST_TAG]}"
    # Registering the rerun's output makes a new location; the same content twice shares one.
    v2, _ = register(cfg, export, who="bob")
    v3, _ = register(cfg, export, who="bob")
    assert v2.tags[CHECKPOINT_URI_TAG] == v3.tags[CHECKPOINT_URI_TAG] != location
    assert model_registry.resolve_model_ref("models:/dreamllm/1", cfg.tracking) == location
    tally(faults_injected=1, runs_completed=1, records_lost=lost)
    assert lost == 0, "the champion serves the rerun's weights"


@pytest.fixture()
def crowned(tmp_path, checkpoints):
    """A registry whose champion v1 and candidate v2 were evaluated on the same held-out set."""
    cfg, uri = _registry(tmp_path)
    v1, _ = register(cfg, checkpoints["a"], who="alice")
    _evaluated(cfg, v1.version)
    assert promote(cfg, v1.version, who="alice").promoted
    v2, _ = register(cfg, checkpoints["b"], who="bob")
    _evaluated(cfg, v2.version)
    return cfg, uri


def test_the_gate_refuses_nan_missing_and_unreadable_metrics_and_eval_set_digests(crowned, tally):
    cfg, uri = crowned
    c = MlflowClient(uri)
    cases = [  # (version whose tag is bad, tag, value or None = deleted, what the refusal says)
        ("2", "val_loss_lm", "nan", "val_loss_lm: 'nan' on version 2 is not a finite number"),
        ("2", "qa_exact_match", "inf", "qa_exact_match: 'inf' on version 2 is not a finite number"),
        ("2", "val_loss_diffusion", "n/a", "val_loss_diffusion: 'n/a' on version 2 is not a finite number"),
        ("2", "val_loss_lm", None, "val_loss_lm: missing on version 2"),
        ("1", "val_loss_lm", "nan", "val_loss_lm: 'nan' on champion version 1 is not a finite number"),
        ("1", "qa_exact_match", None, "qa_exact_match: missing on champion version 1"),
        ("2", "dataset", None, f"{EVAL_SET_TAG}: the held-out set digest is missing on version 2"),
        ("1", "dataset", None, f"{EVAL_SET_TAG}: the held-out set digest is missing on champion version 1"),
        ("2", "dataset", "set-b", "evaluated on different held-out sets"),
    ]
    for version, tag, value, reason in cases:
        _evaluated(cfg, "1")
        _evaluated(cfg, "2")
        if value is None:
            c.delete_model_version_tag("dreamllm", version, f"dreamllm.eval.{tag}")
        else:
            model_registry.set_version_tags(cfg.tracking, version, {f"dreamllm.eval.{tag}": value})
        r = promote(cfg, "2", who="bob")
        assert not r.promoted and any(reason in f for f in r.failures), (reason, r.failures)
        verdict = json.loads(model_registry.get_version(cfg.tracking, "2").tags[GATE_TAG])
        assert verdict["passed"] is False and any(reason in f for f in verdict["failures"])  # the audit says why
        assert model_registry.alias_version(cfg.tracking, CHAMPION) == "1"
    _evaluated(cfg, "1")
    _evaluated(cfg, "2")
    assert promote(cfg, "2", who="bob").promoted  # the same versions, good metrics: passes
    tally(bad_inputs=len(cases))


def test_promotion_fails_when_champion_moved_since_the_gate_read_it(crowned, tally, checkpoints):
    cfg, uri = crowned
    v3, _ = register(cfg, checkpoints["a"], who="carol")

    def second_promoter(move):  # another operator's promotion lands between our gate and our move
        r = subprocess.run([sys.executable, "jobs/promote.py", "--version", v3.version, "--force", "--reason",
                            "hotfix", "--who", "carol", "--set", f"tracking.tracking_uri={uri}"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr

    with pytest.raises(AliasMoved, match=r"champion of 'dreamllm' moved from v1 to v3 while v2 was being moved "
                                         r"there; champion was not moved"):
        promote(cfg, "2", who="bob", before_move=second_promoter)
    assert model_registry.alias_version(cfg.tracking, CHAMPION) == v3.version  # not overwritten by ours
    (ours,) = [m for m in _moves(cfg, "2") if m["alias"] == CHAMPION]
    assert ours["previous"] == "1" and "moved from v1 to v3" in ours["aborted"]
    tally(faults_injected=1, runs_completed=1)


def test_every_move_is_one_complete_record_written_before_the_alias_moves(crowned, tally):
    cfg, _ = crowned
    seen = []

    def crash(move):  # the process dies after the record, before the move
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        promote(cfg, "2", who="bob", before_move=crash)
    assert model_registry.alias_version(cfg.tracking, CHAMPION) == "1"
    (intent,) = [m for m in _moves(cfg, "2") if m["alias"] == CHAMPION]

    def look(move):
        seen.append((model_registry.alias_version(cfg.tracking, CHAMPION),
                     [m for m in _moves(cfg, "2") if m["alias"] == CHAMPION]))

    r = promote(cfg, "2", who="bob", before_move=look)
    assert r.promoted and model_registry.alias_version(cfg.tracking, CHAMPION) == "2"
    (alias_then, records), = seen
    assert alias_then == "1" and len(records) == 2  # the record was there while champion was still v1
    v1, v2 = (model_registry.get_version(cfg.tracking, v) for v in ("1", "2"))
    for record in (intent, records[-1]):
        assert record["who"] == "bob" and record["when"] and record["action"] == "promote"
        assert record["previous"] == "1" and record["version"] == "2"
        assert record["metrics"] == {"to": {"val_loss_lm": 2.0, "val_loss_diffusion": 1.0, "qa_exact_match": 0.5},
                                     "from": {"val_loss_lm": 2.0, "val_loss_diffusion": 1.0, "qa_exact_match": 0.5}}
        assert record["digests"] == {"content_to": v2.tags[CONTENT_DIGEST_TAG],
                                     "content_from": v1.tags[CONTENT_DIGEST_TAG],
                                     "eval_set_to": "set-a", "eval_set_from": "set-a"}
        assert record["gate"] == {"passed": True, "failures": [], "forced": False}
        assert record["aborted"] is None
    assert _moves(cfg, "2")[-1] == records[-1]  # the record is final: nothing rewrote it after the move
    tally(faults_injected=1, runs_completed=1)
