"""Faults of configuration, runtime and serving auth: a wrong value is refused naming the key, the type
expected and the value given; `--set` on a map of sections changes one entry's value and keeps the rest;
a job never hangs on a dead recorded cluster; an open API on a public address needs an explicit yes; no
credential reaches MLflow's params."""
from pathlib import Path

import pytest

from dreamllm_platform.config import load_config
from dreamllm_platform.data.config import PrecomputeConfig
from dreamllm_platform.serving.config import ServeConfig
from dreamllm_platform.train.config import STAGE_DEFAULTS, TrainConfig

ROOT = Path(__file__).resolve().parents[2]

BAD_VALUES = [  # (config, override, what the message must name)
    (ServeConfig, "http.port=80.5", "http.port: expected an integer, got 80.5"),
    (PrecomputeConfig, "ray_num_cpus=true", "ray_num_cpus: expected an integer or null, got True"),
    (ServeConfig, "limits.allowed_image_hosts=images.example.com",
     "limits.allowed_image_hosts: expected a list of strings, got 'images.example.com'"),
    (TrainConfig, "data.assembly.record_types=document", "data.assembly.record_types: expected a list of strings"),
    (PrecomputeConfig, "filters.dedupe_images=1", "filters.dedupe_images: expected true or false, got 1"),
    (ServeConfig, "model.num_cpus=yes", "model.num_cpus: expected a number, got True"),
    (ServeConfig, "model.name=12", "model.name: expected a string, got 12"),
    (TrainConfig, "optim.betas=[0.9]", "optim.betas: expected a list of 2 (a number, a number), got [0.9]"),
    (TrainConfig, "data.mix.laion=high", "data.mix: expected a mapping of strings to numbers"),
    (PrecomputeConfig, "sources.laion.enabled=maybe", "sources.laion.enabled: expected true or false, got 'maybe'"),
]


@pytest.mark.parametrize("cls, override, message", BAD_VALUES, ids=[o for _, o, _ in BAD_VALUES])
def test_a_value_of_the_wrong_type_is_refused_naming_key_type_and_value(cls, override, message, tally):
    base = STAGE_DEFAULTS["igpt"] if cls is TrainConfig else None
    with pytest.raises(ValueError) as e:
        load_config(cls, None, [override], base=base)
    assert message in str(e.value)
    tally(bad_inputs=1)


def test_values_of_the_right_type_pass_an_int_as_a_float_and_lists_as_tuples(tally):
    cfg = load_config(TrainConfig, None, ["optim.lr=1", "optim.betas=[0.9, 0.95]",
                                          "data.assembly.record_types=[pair]", "scaling.use_gpu=null"],
                      base=STAGE_DEFAULTS["igpt"])
    assert cfg.optim.lr == 1 and cfg.optim.betas == (0.9, 0.95) and cfg.data.assembly.record_types == ("pair",)
    assert cfg.scaling.use_gpu is None


def test_set_on_a_map_entry_merges_into_the_default_entry(tally):
    cfg = load_config(PrecomputeConfig, None, ["sources.laion.uri=/data/laion-blip"])
    # The webdataset source keeps its format (it was read as MMC4) and the other sources stay.
    assert cfg.sources["laion"].format == "webdataset" and cfg.sources["laion"].uri == "/data/laion-blip"
    assert set(cfg.sources) == set(PrecomputeConfig().sources)
    assert cfg.sources["mmc4"] == PrecomputeConfig().sources["mmc4"]
    # A map the YAML writes stays the YAML's: --set changes its entry, adds none of the defaults.
    cfg = load_config(PrecomputeConfig, ROOT / "configs/precompute_7b.yaml", ["sources.laion_blip.enabled=false"])
    assert "laion" not in cfg.sources and cfg.sources["laion_blip"].format == "webdataset"
    assert not cfg.sources["laion_blip"].enabled
    # A plain map too: one mix weight changes, the others stay.
    igpt = load_config(TrainConfig, None, [], base=STAGE_DEFAULTS["igpt"]).data.mix
    mix = load_config(TrainConfig, None, ["data.mix.laion=2.5"], base=STAGE_DEFAULTS["igpt"]).data.mix
    assert mix == {**igpt, "laion": 2.5} and len(mix) > 1


def test_a_source_without_a_format_is_refused(tmp_path, tally):
    with pytest.raises(ValueError, match=r"sources\.web\.format: required \(no default\)"):
        load_config(PrecomputeConfig, None, ["sources.web.uri=/data/web"])
    yaml = tmp_path / "c.yaml"
    yaml.write_text("sources:\n  laion: {uri: laion}\n")
    with pytest.raises(ValueError, match=r"sources\.laion\.format: required"):
        load_config(PrecomputeConfig, yaml)
    tally(bad_inputs=2)


# ------------------------------------------------------------------ serving auth

def _serve_job():
    import importlib.util

    spec = importlib.util.spec_from_file_location("job_serve_faults", ROOT / "jobs" / "serve.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def test_an_api_on_a_public_address_without_a_key_refuses_to_start(tmp_path, monkeypatch, capsys, tally):
    from dreamllm_platform.serving.app import build_app
    from dreamllm_platform.serving.limits import secure_auth

    monkeypatch.delenv("DREAMLLM_API_KEY", raising=False)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "dreamllm.json").write_text("{}")  # enough for the early checkpoint check; nothing is loaded
    public = [f"model.uri={ckpt}", "http.host=0.0.0.0"]
    # The job refuses before it starts Ray, in one line naming both ways out.
    assert _serve_job()(sum((["--set", s] for s in public), [])) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("serve: failed: http.host 0.0.0.0 exposes the API") and "auth.allow_open=true" in err
    assert "\n" not in err
    with pytest.raises(ValueError, match="no API key was found"):  # `serve deploy`'s builder and the pipeline
        build_app(load_config(ServeConfig, None, public))
    # Said explicitly, an open API is served; on loopback no key is needed.
    assert build_app(load_config(ServeConfig, None, [*public, "auth.allow_open=true"])) is not None
    assert build_app(load_config(ServeConfig, None, [f"model.uri={ckpt}", "http.host=127.0.0.1"])) is not None
    # With a key, every ingress replica must find one too: a node without the secret fails, never opens.
    monkeypatch.setenv("DREAMLLM_API_KEY", "sk-faults")
    assert secure_auth(ServeConfig().auth, "0.0.0.0").require_api_key
    assert not secure_auth(ServeConfig().auth, "::1").require_api_key
    tally(bad_inputs=2)


# ------------------------------------------------------------------ runtime

def test_a_stale_ray_start_record_does_not_hang_a_job_it_starts_a_local_ray(tally):
    """`ray start --head` then `ray stop` leaves Ray's ray_current_cluster file behind; a job (init_ray
    with no RAY_ADDRESS) must start a local Ray, not retry the dead GCS for minutes."""
    import os
    import shutil
    import socket
    import subprocess
    import sys
    import tempfile

    with socket.socket() as s:  # a port nothing listens on once closed: the stopped cluster's GCS
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    temp = tempfile.mkdtemp(prefix="r")  # short: Ray's socket paths live under it
    try:
        ray_dir = os.path.join(temp, "ray")
        os.makedirs(ray_dir)
        with open(os.path.join(ray_dir, "ray_current_cluster"), "w") as f:
            f.write(dead)
        code = ("import ray; from ray._private import services; from dreamllm_platform.runtime import init_ray; "
                f"assert services.find_bootstrap_address(None) == {dead!r}; "  # Ray reads the record we wrote
                "init_ray(num_cpus=1); print('CPUS', ray.cluster_resources()['CPU']); ray.shutdown()")
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(RAY_TMPDIR=ray_dir.removesuffix("/ray"), TMPDIR=temp, PYTHONPATH=str(ROOT))
        try:
            out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                                 timeout=240)
        except subprocess.TimeoutExpired as e:
            pytest.fail(f"init_ray hung on the stale cluster record {dead}: {(e.stdout or b'')[-2000:]!r}")
        assert out.returncode == 0, out.stderr[-3000:]
        assert "CPUS 1.0" in out.stdout  # a fresh local Ray with the CPUs asked for
        assert f"recorded at {dead} does not answer" in out.stdout
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    tally(faults_injected=1, runs_completed=1)


# ------------------------------------------------------------------ credentials in MLflow

def test_training_and_decoder_runs_log_no_credentials_as_params(tmp_path, tally):
    from mlflow import MlflowClient

    from dreamllm_platform import tracking
    from dreamllm_platform.config import to_flat_dict
    from dreamllm_platform.towers.config import TowersConfig

    secrets = ["tracking-pw", "minio-pw", "sk-storage", "tok-123"]
    sets = ["tracking.tracking_uri=http://alice:tracking-pw@mlflow.example:5000",
            "storage.endpoint_url=http://minio:minio-pw@minio.example:9000"]
    train = load_config(TrainConfig, None, sets, base=STAGE_DEFAULTS["igpt"])
    towers = load_config(TowersConfig, None, sets)
    sqlite = tracking.TrackingConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient(tracking.tracking_uri(sqlite))
    for name, cfg in (("train", train), ("towers", towers)):
        # What run_trainer logs (to_flat_dict of the job's config), plus storage keys as a config may hold them.
        params = {**to_flat_dict(cfg), "storage.secret_access_key": "sk-storage", "hub.token": "tok-123"}
        with tracking.run(sqlite, f"faults-{name}", params=params) as (run_id, _):
            pass
        logged = client.get_run(run_id).data.params
        assert logged["tracking.tracking_uri"] == "http://alice:***@mlflow.example:5000"
        assert logged["storage.endpoint_url"] == "http://minio:***@minio.example:9000"
        assert logged["storage.secret_access_key"] == "***" and logged["hub.token"] == "***"
        leaked = [s for s in secrets if any(s in v for v in logged.values())]
        assert not leaked, f"{name} run params carry {leaked}"
        assert len(logged) == len(params)  # every param still logged, the secret ones masked
    tally(bad_inputs=2 * len(secrets))
