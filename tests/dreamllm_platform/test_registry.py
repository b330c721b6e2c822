"""The model registry against a real sqlite-backed MLflow: register, evaluate, promote through the gate,
refusal, forced promotion, rollback, history, and the champion loaded as a pyfunc model.

The jobs are called as users run them (`main(argv)` with the command line), in this process.
"""
import base64
import importlib.util
import io
import json
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from dreamllm.config import get_flavor
from dreamllm.model import DreamLLM
from dreamllm_platform import model_registry, tracking
from dreamllm_platform.checkpoints import export_checkpoint
from dreamllm_platform.config import load_config
from dreamllm_platform.evaluation.tiny import save_tiny_clip, save_tiny_inception
from dreamllm_platform.mlflow_tags import CHECKPOINT_URI_TAG, CONTENT_DIGEST_TAG, SOURCE_URI_TAG
from dreamllm_platform.registry import RegistryConfig, check_gate, history

ROOT = Path(__file__).resolve().parents[2]


def _job(name):
    spec = importlib.util.spec_from_file_location(f"job_{name}", ROOT / "jobs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A sqlite registry, a training run, two debug checkpoints (v2: the LM head scrambled) and tiny
    feature networks."""
    d = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{d / 'mlflow.db'}"
    t = tracking.TrackingConfig(tracking_uri=uri)
    run_id, _ = tracking.start_or_resume_run(t, "dreamllm-igpt-debug")  # the run that "trained" v1
    model = DreamLLM.from_config(get_flavor("debug"))
    good = export_checkpoint(model, str(d / "good"), {"mlflow_run_id": run_id, "stage": "igpt"})
    torch.manual_seed(0)
    torch.nn.init.normal_(model.llm.get_output_embeddings().weight, std=5.0)  # much worse next-token predictions
    bad = export_checkpoint(model, str(d / "bad"), {"stage": "igpt"})
    ev = ["heldout.synthetic.pairs_per_shard=4", "heldout.synthetic.conversations=1", "heldout.max_pairs=4",
          "heldout.max_questions=2", "text_to_image=3", "image_steps=2", "answer_tokens=4", "batch_size=4",
          f"heldout.root={d / 'heldout'}", f"features.inception={save_tiny_inception(d / 'f' / 'inception.pt')}",
          "features.inception_size=32", f"features.clip={save_tiny_clip(d / 'f' / 'clip')}"]
    return {"dir": d, "uri": uri, "tracking": t, "run_id": run_id, "good": good, "bad": bad,
            "set": ["--set", f"tracking.tracking_uri={uri}"], "eval": [a for o in ev for a in ("--set", o)]}


def _version(env, ref):
    return model_registry.get_version(env["tracking"], ref)


def _moves(mv):
    return [json.loads(v) for k, v in sorted(mv.tags.items()) if k.startswith("dreamllm.move.")]


def test_register_evaluate_promote_refuse_force_rollback(env, capsys):
    register, evaluate, promote = _job("register"), _job("evaluate"), _job("promote")
    S = env["set"]
    c = MlflowClient(env["uri"])

    # --- register: a version backed by a pyfunc logged model that references an immutable copy of the weights
    assert register([env["good"], *S, "--who", "alice"]) == 0
    out = capsys.readouterr().out
    assert "registered dreamllm version 1" in out
    v1 = _version(env, "@candidate")
    assert v1.version == "1" and v1.run_id == env["run_id"]  # linked to its training run via the metadata
    copy = str(env["dir"] / "registry" / "dreamllm" / f"sha256-{v1.tags[CONTENT_DIGEST_TAG]}")  # beside mlflow.db
    assert v1.tags[SOURCE_URI_TAG] == env["good"] and v1.tags[CHECKPOINT_URI_TAG] == copy
    assert f"copied from    {env['good']}" in out
    assert model_registry.resolve_model_ref("models:/dreamllm@candidate", env["tracking"]) == copy
    assert (Path(copy) / "trainable.safetensors").read_bytes() == (Path(env["good"]) / "trainable.safetensors").read_bytes()
    assert v1.source == f"models:/{v1.model_id}"
    logged = c.get_logged_model(v1.model_id)
    assert logged.source_run_id == env["run_id"] and logged.tags[CHECKPOINT_URI_TAG] == copy
    files = {a.path for a in c.list_logged_model_artifacts(v1.model_id)}
    assert "MLmodel" in files and not any(f.endswith(".safetensors") for f in files)  # weights: in the store only
    mlmodel = (Path(urlparse(logged.artifact_location).path) / "MLmodel").read_text()
    assert "python_function" in mlmodel and f"checkpoint_uri: {copy}" in mlmodel

    # --- evaluate: metrics printed, on the version's tags and on its logged model
    assert evaluate([*S, "--set", "model=models:/dreamllm@candidate", *env["eval"]]) == 0
    out = capsys.readouterr().out
    for name in ("val_loss_lm", "val_loss_diffusion", "qa_exact_match", "fid", "clip_score"):
        assert name in out
    v1 = _version(env, "1")
    m1 = {k[len("dreamllm.eval."):]: float(v) for k, v in v1.tags.items()
          if k.startswith("dreamllm.eval.") and k[len("dreamllm.eval."):] not in ("run_id", "dataset")}
    assert set(m1) == {"val_loss_lm", "val_loss_diffusion", "qa_exact_match", "fid", "clip_score"}
    assert {m.key for m in c.get_logged_model(v1.model_id).metrics} == set(m1)
    assert c.get_run(v1.tags["dreamllm.eval.run_id"]).data.metrics["val_loss_lm"] == pytest.approx(m1["val_loss_lm"])
    # ... and the evaluation's figures on its run (artifacts: no tag the gate reads), their paths printed
    eval_run = v1.tags["dreamllm.eval.run_id"]
    figures = {a.path for a in c.list_artifacts(eval_run, "plots")}
    assert figures == {"plots/metrics.png", "plots/samples_grid.png"}, figures
    bars = Image.open(c.download_artifacts(eval_run, "plots/metrics.png", str(env["dir"])))
    assert bars.format == "PNG" and bars.width > 5 * 150, bars.size  # a panel per metric
    grid = Image.open(c.download_artifacts(eval_run, "plots/samples_grid.png", str(env["dir"])))
    assert grid.width == 3 * 160, grid.size  # the text_to_image=3 images it created
    assert f"{c.get_run(eval_run).info.artifact_uri}/plots/metrics.png" in out

    # --- the first champion: no champion to compare with, every gate metric present
    assert promote([*S, "--who", "alice"]) == 0
    assert "champion -> v1 (was none)" in capsys.readouterr().out
    assert model_registry.alias_version(env["tracking"], "champion") == "1"

    # --- a worse version: registered as candidate, evaluated, refused with the metric and the amount
    assert register([env["bad"], *S, "--who", "bob"]) == 0
    assert evaluate([*S, "--set", "model=models:/dreamllm@candidate", *env["eval"]]) == 0
    capsys.readouterr()
    v2 = _version(env, "2")
    lm1, lm2 = float(v1.tags["dreamllm.eval.val_loss_lm"]), float(v2.tags["dreamllm.eval.val_loss_lm"])
    assert lm2 > lm1 + 0.05
    # Only the LM head differs, and every model sees the same noise and timesteps: the same diffusion loss.
    assert float(v2.tags["dreamllm.eval.val_loss_diffusion"]) == pytest.approx(
        float(v1.tags["dreamllm.eval.val_loss_diffusion"]), rel=1e-5)
    assert promote([*S, "--who", "bob"]) == 1
    err = capsys.readouterr().err
    assert f"val_loss_lm regressed by {lm2 - lm1:.6g}" in err and "tolerance 0.05" in err
    assert "val_loss_diffusion" not in err  # only the failing metric is named
    assert model_registry.alias_version(env["tracking"], "champion") == "1"
    assert model_registry.alias_version(env["tracking"], "candidate") == "2"
    assert json.loads(_version(env, "2").tags["dreamllm.gate"])["passed"] is False

    # --- forced promotion: needs a reason, which is recorded with who, when and the previous champion
    with pytest.raises(SystemExit) as exc:
        promote([*S, "--version", "2", "--force"])
    assert exc.value.code == 2 and "--force needs --reason" in capsys.readouterr().err
    assert promote([*S, "--version", "2", "--force", "--reason", "demo needs the new head", "--who", "carol"]) == 0
    assert "[forced]" in capsys.readouterr().out
    v2 = _version(env, "@champion")
    assert v2.version == "2"
    assert v2.tags["dreamllm.force_reason"] == "demo needs the new head"
    assert v2.tags["dreamllm.previous_champion"] == "1"
    last = _moves(v2)[-1]
    assert last["alias"] == "champion" and last["action"] == "force" and last["who"] == "carol"
    assert last["previous"] == "1" and last["when"] and "demo needs the new head" in last["why"]
    assert "val_loss_lm regressed" in last["why"]  # what the gate said is kept with the override

    # --- rollback restores the previous champion; there is none before v1
    assert promote([*S, "--rollback", "--reason", "bad answers", "--who", "dave"]) == 0
    assert "champion -> v1 (was v2)" in capsys.readouterr().out
    assert model_registry.alias_version(env["tracking"], "champion") == "1"
    assert promote([*S, "--rollback"]) == 1
    assert "champion version 1 of 'dreamllm' has no previous champion" in capsys.readouterr().err

    # --- history: every move, in order
    assert promote([*S, "--history"]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    assert len(lines) == 5
    for line, (alias, v, action, who) in zip(lines, [("candidate", 1, "register", "alice"),
                                                      ("champion", 1, "promote", "alice"),
                                                      ("candidate", 2, "register", "bob"),
                                                      ("champion", 2, "force", "carol"),
                                                      ("champion", 1, "rollback", "dave")]):
        assert f"{alias:<9} -> v{v}" in line and action in line and f"by {who}" in line
    assert [m.action for m in history(load_config(RegistryConfig, None, [f"tracking.tracking_uri={env['uri']}"]))] \
        == ["register", "promote", "register", "force", "rollback"]


def test_the_champion_loads_as_a_pyfunc_model_and_answers_chat_and_image_requests(env, monkeypatch):
    test_flow_ran = model_registry.alias_version(env["tracking"], "champion")
    if test_flow_ran is None:  # run on its own: register and crown the good checkpoint
        cfg = load_config(RegistryConfig, None, [f"tracking.tracking_uri={env['uri']}"])
        from dreamllm_platform.registry import promote, register
        register(cfg, env["good"])
        promote(cfg, "@candidate", force_reason="pyfunc test on its own")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["uri"])  # as a serving host would be configured
    model = mlflow.pyfunc.load_model("models:/dreamllm@champion")
    png = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(png, format="PNG")
    chat, image, doc = model.predict([
        {"task": "chat", "max_tokens": 6, "messages": [
            {"role": "user", "content": [{"type": "image", "image": base64.b64encode(png.getvalue()).decode()},
                                         {"type": "text", "text": "What color is the circle?"}]}]},
        {"task": "text_to_image", "prompt": "A small red circle in the center of the image.", "n": 2, "steps": 2,
         "seed": 0},
        {"task": "document", "prompt": "This document describes several scenes.", "max_tokens": 6,
         "max_images": 1, "steps": 2, "seed": 0}])
    assert isinstance(chat["text"], str) and chat["text"] and chat["images"] == []
    assert len(image["images"]) == 2 and image["text"] == ""
    decoded = Image.open(io.BytesIO(base64.b64decode(image["images"][0])))
    assert decoded.size == (get_flavor("debug").diffusion.resolution,) * 2
    assert isinstance(doc["parts"], list)
    with pytest.raises(Exception, match="unknown task 'video'"):
        model.predict({"task": "video", "prompt": "x"})


def test_unknown_versions_aliases_and_missing_metrics_are_named(env, capsys):
    promote, register = _job("promote"), _job("register")
    S = env["set"]
    assert promote([*S, "--version", "99"]) == 1
    assert "registered model 'dreamllm' has no version 99 (versions: 1" in capsys.readouterr().err
    assert promote([*S, "--version", "@nightly"]) == 1
    assert "has no alias 'nightly'" in capsys.readouterr().err
    champion = model_registry.alias_version(env["tracking"], "champion")
    assert promote([*S, "--version", champion]) == 1
    assert "is already the champion" in capsys.readouterr().err
    assert _job("evaluate")([*S, "--set", "model=models:/dreamllm/42", *env["eval"]]) == 1
    assert "evaluate failed: registered model 'dreamllm' has no version 42" in capsys.readouterr().err
    assert register([str(env["dir"]), *S]) == 1
    assert "is not a DreamLLM checkpoint" in capsys.readouterr().err
    # A version never evaluated: refused, naming each missing metric.
    assert register([env["good"], *S]) == 0
    assert promote(S) == 1
    err = capsys.readouterr().err
    for name in ("val_loss_lm", "val_loss_diffusion", "qa_exact_match"):
        assert f"{name}: missing on version" in err
    with pytest.raises(SystemExit) as e:  # a bad config: exit 2 with one line, as in every job
        promote([*S, "--set", "gate.metrics={}"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == "config error: gate.metrics needs at least one metric"


def test_gate_compares_direction_and_tolerance_and_the_eval_set():
    from mlflow.entities.model_registry import ModelVersion, ModelVersionTag

    from dreamllm_platform.registry import GateConfig, GateMetric

    def mv(version, dataset="d1", **metrics):
        tags = {f"dreamllm.eval.{k}": str(v) for k, v in metrics.items()}
        tags["dreamllm.eval.dataset"] = dataset
        return ModelVersion("dreamllm", version, 0, tags=[ModelVersionTag(k, v) for k, v in tags.items()])

    gate = GateConfig(metrics={"acc": GateMetric(higher_is_better=True, tolerance=0.02),
                               "loss": GateMetric(higher_is_better=False, tolerance=0.0)})
    champ = mv("1", acc=0.50, loss=2.0)
    assert check_gate(gate, mv("2", acc=0.49, loss=2.0), champ) == []          # within tolerance
    assert check_gate(gate, mv("2", acc=0.90, loss=1.0), champ) == []          # better
    (fail,) = check_gate(gate, mv("2", acc=0.40, loss=1.0), champ)
    assert fail.startswith("acc regressed by 0.1 ") and "higher is better" in fail
    (fail,) = check_gate(gate, mv("2", acc=0.5, loss=2.5), champ)
    assert fail.startswith("loss regressed by 0.5 ")
    (fail,) = check_gate(gate, mv("2", dataset="d2", acc=0.5, loss=2.0), champ)
    assert "different held-out sets" in fail
    assert check_gate(gate, mv("2", acc=0.1, loss=9.0), None) == []            # no champion yet
    with pytest.raises(ValueError, match="tolerance must be >= 0"):
        GateMetric(tolerance=-1)


def test_model_references_parse_in_one_place():
    assert model_registry.parse_model_ref("models:/dreamllm@champion") == ("dreamllm", "@champion")
    assert model_registry.parse_model_ref("models:/dreamllm/3") == ("dreamllm", "3")
    assert model_registry.version_ref("dreamllm", "3") == "models:/dreamllm/3"
    assert model_registry.is_model_ref("models:/x/1") and not model_registry.is_model_ref("s3://b/models:/x")
    for bad in ("models:/dreamllm", "models:/@champion", "models:/dreamllm@", "models:/dreamllm/", "s3://b/k"):
        with pytest.raises(ValueError, match="expected models:/NAME@ALIAS or models:/NAME/VERSION"):
            model_registry.parse_model_ref(bad)
    assert model_registry.resolve_model_ref("s3://b/ckpt") == "s3://b/ckpt"  # a URI is not looked up


def test_configs_promote_yaml_is_the_embedded_defaults():
    assert load_config(RegistryConfig, ROOT / "configs/promote.yaml") == RegistryConfig()


def test_a_checkpoint_in_object_storage_is_copied_by_content_and_loads_from_there(env, s3):
    from dreamllm_platform import storage
    from dreamllm_platform.checkpoints import local_checkpoint
    from dreamllm_platform.registry import register

    remote = f"s3://{s3['bucket']}/registry-test/good"
    for f in Path(env["good"]).rglob("*"):
        if f.is_file():
            storage.write_bytes(f"{remote}/{f.relative_to(env['good'])}", f.read_bytes())
    cfg = load_config(RegistryConfig, None, [f"tracking.tracking_uri={env['uri']}"])
    mv, move = register(cfg, remote, who="erin")
    assert mv.tags[SOURCE_URI_TAG] == remote and move.alias == "candidate"
    # The same bytes as the local checkpoint registered as v1: one copy, whichever storage they came from.
    local_mv = register(cfg, env["good"], who="erin")[0]
    assert mv.tags[CONTENT_DIGEST_TAG] == local_mv.tags[CONTENT_DIGEST_TAG]
    assert mv.tags[CHECKPOINT_URI_TAG] == local_mv.tags[CHECKPOINT_URI_TAG]
    assert mv.run_id == env["run_id"]  # read from dreamllm.json in the bucket
    files = {a.path for a in MlflowClient(env["uri"]).list_logged_model_artifacts(mv.model_id)}
    assert not any(f.endswith(".safetensors") for f in files)
    local = local_checkpoint(f"models:/dreamllm/{mv.version}", env["tracking"], env["dir"] / "cache")
    assert (local / "trainable.safetensors").read_bytes() == (Path(env["good"]) / "trainable.safetensors").read_bytes()


def test_only_the_tracking_and_registry_store_modules_talk_to_mlflow():
    # pyfunc_model.py subclasses mlflow's PythonModel (the interface MLflow calls) and talks to no server.
    importers = sorted(str(p.relative_to(ROOT)) for folder in ("dreamllm", "dreamllm_platform", "jobs")
                       for p in (ROOT / folder).rglob("*.py")
                       if "import mlflow" in p.read_text() or "from mlflow" in p.read_text())
    assert importers == ["dreamllm_platform/model_registry.py", "dreamllm_platform/pyfunc_model.py",
                         "dreamllm_platform/tracking.py"]
