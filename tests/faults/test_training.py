"""Training under faults, on the debug flavor (2 CPU workers, ZeRO-2, a real latent store and MLflow):

- a worker killed mid-run (os._exit in the last rank, first attempt only) resumes at the same examples,
  random state and losses as an uninterrupted run (compared through `data.record_ids`' per-step record);
  the towers job likewise (its `record_ids`), killed in its LLM phase after three phases' worth of images;
- a resubmission with a changed config records harmless changes and refuses the others;
- a tracking-server outage (a real `mlflow server`, unreachable for part of the run) costs no metric and
  does not stop the worker group, and the gap shows in the run; the towers job likewise.
"""
import collections
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from dreamllm_platform import storage
from dreamllm_platform.config import load_config
from dreamllm_platform.data.config import PrecomputeConfig
from dreamllm_platform.data.latents import run_precompute
from dreamllm_platform.mlflow_tags import CONFIG_CHANGES_TAG, TRACKING_OUTAGE_TAG
from dreamllm_platform.tracking import RunLogger, TrackingConfig, client
from dreamllm_platform.train.config import STAGE_DEFAULTS, TrainConfig
from dreamllm_platform.train.worker import IDS_DIR
from dreamllm_platform.train.trainer import FAIL_ENV, run_stage

pytestmark = pytest.mark.slow
STEPS = 6


@pytest.fixture(scope="module")
def workdir(ray_session, tmp_path_factory):
    d = tmp_path_factory.mktemp("train-faults")
    run_precompute(PrecomputeConfig(flavor="debug", data_root=str(d / "data"), output=str(d / "store")))
    return d


def stage_cfg(d, name, *sets, tracking_uri=None) -> TrainConfig:
    base = ["model.flavor=debug", "scaling.num_workers=2", "log_every=1", "data.micro_batch_size=2",
            "data.record_ids=true", "tracking.sample_images=0", f"data.store={d / 'store'}",
            f"checkpoint.storage_path={d / 'ray'}", f"optim.max_steps={STEPS}", "checkpoint.every_n_steps=2",
            f"tracking.tracking_uri={tracking_uri or 'sqlite:///' + str(d / 'mlflow.db')}", f"run_name={name}"]
    return load_config(TrainConfig, None, base + list(sets), STAGE_DEFAULTS["igpt"])


def ledger(cfg) -> dict[int, list[dict]]:
    """{step: [rank 0's {ids, loss, rng}, rank 1's ...]} of a run's `record_ids` record (a stage's or towers')."""
    d = storage.local_path(storage.join(cfg.checkpoint.storage_path, cfg.run_name, IDS_DIR))
    return {json.loads(f.read_text())["step"]: json.loads(f.read_text())["ranks"] for f in sorted(Path(d).iterdir())}


def history(tracking, run_id, key):
    return [(m.step, m.value) for m in client(tracking).get_metric_history(run_id, key)]


@pytest.fixture(scope="module")
def whole_and_killed(workdir):
    """An uninterrupted run, and the same run whose last worker dies in step 3 (resumed from step 2)."""
    whole = stage_cfg(workdir, "whole")
    run_stage(whole)
    killed = stage_cfg(workdir, "killed")
    os.environ[FAIL_ENV] = "3"
    try:
        r = run_stage(killed)
    finally:
        del os.environ[FAIL_ENV]
    assert storage.exists(storage.join(killed.checkpoint.storage_path, "killed", ".fault_injected"))
    assert [v for _, v in history(killed.tracking, r.mlflow_run_id, "resumed_from_step")] == [2.0]
    return whole, killed, r


def compare_ledgers(a: dict, b: dict, steps: int) -> int:
    """Assert two runs' records are step for step the same (ids in order, random state, loss; each rank its
    own examples and draws); returns the examples one run saw and the other did not."""
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))
    lost = 0
    for step in a:
        for ra, rb in zip(a[step], b[step]):
            # examples skipped or repeated across the resume: what one run saw and the other did not
            ca, cb = collections.Counter(ra["ids"]), collections.Counter(rb["ids"])
            lost += sum(((ca - cb) + (cb - ca)).values())
    assert lost == 0, {s: (a[s], b[s]) for s in a if a[s] != b[s]}
    for step in a:
        assert [r["ids"] for r in a[step]] == [r["ids"] for r in b[step]], step  # the same order too
        assert [r["rng"] for r in a[step]] == [r["rng"] for r in b[step]], step  # the same random state
        assert [r["loss"] for r in a[step]] == [r["loss"] for r in b[step]], step  # hence the same losses
        # each rank its own examples and its own noise, timesteps and dropout
        assert a[step][0]["rng"] != a[step][1]["rng"], step
        assert not set(a[step][0]["ids"]) & set(a[step][1]["ids"]), step
    return lost


def test_a_killed_worker_resumes_at_the_same_examples_random_state_and_losses(whole_and_killed, tally):
    whole, killed, _ = whole_and_killed
    lost = compare_ledgers(ledger(whole), ledger(killed), STEPS)
    tally(faults_injected=1, runs_completed=2, records_lost=lost)


TOWERS_STEPS = {"vae": 10, "unet": 10, "vision": 10, "llm": 20}


def test_a_killed_towers_worker_resumes_at_the_same_images_random_state_and_losses(ray_session, tmp_path, tally):
    """Killed in step 44 (the LLM phase, whose captions come from the image stream), resumed from the
    checkpoint of step 40: every step, before and after, trains on what the uninterrupted run's did."""
    from dreamllm_platform.data.config import SyntheticConfig
    from dreamllm_platform.data.synthetic import write_synthetic
    from dreamllm_platform.towers import TowersConfig, run_towers_pretraining

    tiny = SyntheticConfig(image_size=32, mmc4_shards=0, webdataset_shards=1, parquet_shards=1, pairs_per_shard=12,
                           conversations=0, instruct_docs=0)
    write_synthetic(str(tmp_path / "data"), tiny)

    def towers(name):
        tree = {"flavor": "debug", "data_root": str(tmp_path / "data"), "output": str(tmp_path / name),
                "checkpoint": {"storage_path": str(tmp_path / "runs"), "every_n_steps": 10}, "run_name": name,
                "synthetic": {**dataclasses.asdict(tiny), "enabled": False}, "log_every": 5, "record_ids": True,
                "tracking": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"},
                "scaling": {"num_workers": 2, "cpus_per_worker": 1}, "shuffle_buffer": 8,
                **{k: {"steps": n, "batch_size": 3, "warmup_steps": 2} for k, n in TOWERS_STEPS.items()},
                "samples": {"prompts": ["A large red circle in the center of the image."],
                            "num_inference_steps": 2, "scored": 2}}
        tree["vae"].update(crop=16, scaling_images=4)  # the crops draw from their own generator
        tree["llm"]["scored"] = 2
        return load_config(TowersConfig, None, (), base=tree)

    whole = towers("whole")
    a = run_towers_pretraining(whole)
    killed = towers("killed")
    os.environ[FAIL_ENV] = "44"
    try:
        b = run_towers_pretraining(killed)
    finally:
        del os.environ[FAIL_ENV]
    assert storage.exists(str(tmp_path / "runs" / "killed" / ".fault_injected"))
    assert [v for _, v in history(killed.tracking, b.mlflow_run_id, "resumed_from_step")] == [40.0]
    lost = compare_ledgers(ledger(whole), ledger(killed), sum(TOWERS_STEPS.values()))
    assert a.metrics == b.metrics  # the phases' final metrics (means of their last steps) and the samples' scores
    for part in ("llm/model.safetensors", "unet/diffusion_pytorch_model.safetensors"):
        assert (tmp_path / "whole" / part).read_bytes() == (tmp_path / "killed" / part).read_bytes(), part
    tally(faults_injected=1, runs_completed=2, records_lost=lost)


def test_a_changed_config_on_resume_is_recorded_or_refused(whole_and_killed, workdir, tally):
    _, killed, r = whole_and_killed
    with pytest.raises(ValueError, match=r"changes what it computes: data.micro_batch_size '2' -> '3', "
                                         r"optim.lr '2e-05' -> '0.001'; set them back or use a new run_name"):
        run_stage(stage_cfg(workdir, "killed", "optim.lr=1e-3", "data.micro_batch_size=3", "log_every=2"))
    c = client(killed.tracking)
    assert c.get_run(r.mlflow_run_id).info.status == "FINISHED"  # the refusal did not touch the run
    assert CONFIG_CHANGES_TAG not in c.get_run(r.mlflow_run_id).data.tags

    again = run_stage(stage_cfg(workdir, "killed", f"optim.max_steps={STEPS + 1}", "log_every=2"))
    assert again.mlflow_run_id == r.mlflow_run_id and again.metrics["step"] == STEPS + 1
    changes = json.loads(c.get_run(r.mlflow_run_id).data.tags[CONFIG_CHANGES_TAG])
    assert changes == {"optim.max_steps": [str(STEPS), str(STEPS + 1)], "log_every": ["1", "2"]}
    tally(bad_inputs=1, runs_completed=1)


# ------------------------------------------------------------------ tracking outage

class Link:
    """A TCP forwarder on loopback to the MLflow server that a test can cut (new connections refused, open
    ones reset: a network outage) and restore on the same port."""

    def __init__(self, target_port: int):
        self.target, self.conns, self.listener = target_port, [], None
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.up()

    def up(self) -> None:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(64)
        self.listener = s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def down(self) -> None:
        for s in [self.listener, *self.conns]:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        self.conns = []

    def _accept(self, listener) -> None:
        while True:
            try:
                c, _ = listener.accept()
            except OSError:
                return
            u = socket.create_connection(("127.0.0.1", self.target))
            self.conns += [c, u]
            for a, b in ((c, u), (u, c)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a, b) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


@pytest.fixture(scope="module")
def mlflow_link(tmp_path_factory):
    """A real `mlflow server` (sqlite backend) on loopback, reached through a `Link`."""
    d = tmp_path_factory.mktemp("mlflow-server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{d / 'mlflow.db'}",
         "--default-artifact-root", str(d / "artifacts")],
        stdout=open(d / "server.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, (d / "server.log").read_text()[-2000:]
                time.sleep(0.5)
        yield Link(port)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def test_metric_logging_outlives_an_outage_keeps_what_it_can_and_shows_the_gap(mlflow_link, capsys, tally):
    link = mlflow_link
    cfg = TrackingConfig(tracking_uri=f"http://127.0.0.1:{link.port}", experiment="outage-unit")
    c = client(cfg)
    run_id = c.create_run(c.create_experiment("outage-unit")).info.run_id
    log = RunLogger(cfg, run_id, resilient=True, max_buffered=4)
    log.metrics({"loss": 1.0, "lr": 0.1}, 1)
    link.down()
    for step in range(2, 6):  # 8 values, 4 kept: steps 4 and 5
        log.metrics({"loss": float(step), "lr": 0.1}, step)  # never raises
    log.tags({"t": "x"})
    assert capsys.readouterr().err.count("MLflow unreachable") == 1  # one warning for the outage
    link.up()
    log.metrics({"loss": 6.0, "lr": 0.1}, 6)
    log.close()
    got = [s for s, _ in history(cfg, run_id, "loss")]
    kept = [1, 4, 5, 6]
    assert sorted(got) == kept
    assert history(cfg, run_id, "tracking.dropped_metrics") == [(6, 4.0)]
    run = c.get_run(run_id)
    assert run.data.tags["t"] == "x"
    outage = json.loads(run.data.tags[TRACKING_OUTAGE_TAG])
    assert outage == [{"from_step": 2, "to_step": 6, "failed_calls": 5, "dropped_metrics": 4, "skipped_images": 0}]
    tally(faults_injected=1, records_lost=len(set(kept) - set(got)))


def test_a_tracking_outage_during_training_does_not_stop_the_worker_group(workdir, mlflow_link, tally):
    link = mlflow_link
    cfg = stage_cfg(workdir, "outage", "optim.max_steps=8", "checkpoint.every_n_steps=4",
                    tracking_uri=f"http://127.0.0.1:{link.port}")
    ids = Path(storage.local_path(storage.join(cfg.checkpoint.storage_path, cfg.run_name, IDS_DIR)))
    result = {}
    t = threading.Thread(target=lambda: result.update(r=run_stage(cfg)), daemon=True)
    t.start()

    def wait(step):  # for the record of `step`, written once all ranks are past it
        while not (ids / f"step_{step:07d}.json").exists() and t.is_alive():
            time.sleep(0.2)

    wait(2)
    link.down()  # the tracking server is unreachable from step 3 on ...
    wait(5)
    link.up()  # ... until step 5 or 6
    t.join(600)
    r = result["r"]
    assert r.metrics["step"] == 8
    run = client(cfg.tracking).get_run(r.mlflow_run_id)
    assert run.info.status == "FINISHED"
    steps = sorted(s for s, _ in history(cfg.tracking, r.mlflow_run_id, "loss"))
    lost = len(set(range(1, 9)) - set(steps))
    assert lost == 0 and steps == list(range(1, 9)), steps  # what the outage held back came later
    outage = json.loads(run.data.tags[TRACKING_OUTAGE_TAG])
    assert len(outage) == 1 and outage[0]["failed_calls"] >= 1 and outage[0]["dropped_metrics"] == 0, outage
    assert [v for _, v in history(cfg.tracking, r.mlflow_run_id, "tracking.failed_calls")] == [outage[0]["failed_calls"]]
    tally(faults_injected=1, runs_completed=1, records_lost=lost)


def test_a_tracking_outage_during_towers_pretraining_does_not_stop_it(ray_session, mlflow_link, tmp_path, tally):
    """The towers job logs through the same resilient logger: cut mid-run, nothing is lost and it finishes."""
    from dreamllm_platform.data.config import SyntheticConfig
    from dreamllm_platform.data.synthetic import write_synthetic
    from dreamllm_platform.towers import TowersConfig, run_towers_pretraining

    link = mlflow_link
    tiny = SyntheticConfig(image_size=32, mmc4_shards=0, webdataset_shards=1, parquet_shards=1, pairs_per_shard=12,
                           conversations=0, instruct_docs=0)
    write_synthetic(str(tmp_path / "data"), tiny)
    steps = {"vae": 40, "unet": 10, "vision": 10, "llm": 10}
    tree = {"flavor": "debug", "data_root": str(tmp_path / "data"), "output": str(tmp_path / "out"),
            "checkpoint": {"storage_path": str(tmp_path / "runs"), "every_n_steps": 20},
            "synthetic": {**dataclasses.asdict(tiny), "enabled": False}, "log_every": 1,
            "tracking": {"tracking_uri": f"http://127.0.0.1:{link.port}", "experiment": "towers-outage"},
            "scaling": {"num_workers": 1, "cpus_per_worker": 1},
            **{k: {"steps": n, "batch_size": 4, "warmup_steps": 2} for k, n in steps.items()},
            "samples": {"prompts": ["A large red circle in the center of the image."], "num_inference_steps": 2,
                        "scored": 2}}
    tree["vae"].update(crop=None, scaling_images=8)
    tree["llm"]["scored"] = 2
    cfg = load_config(TowersConfig, None, (), base=tree)
    result = {}
    t = threading.Thread(target=lambda: result.update(r=run_towers_pretraining(cfg)), daemon=True)
    t.start()
    c = client(cfg.tracking)
    while t.is_alive():  # until the worker has logged a few steps
        exp = c.get_experiment_by_name("towers-outage")
        runs = c.search_runs([exp.experiment_id]) if exp else []
        if runs and len(c.get_metric_history(runs[0].info.run_id, "vae/loss")) >= 3:
            break
        time.sleep(0.2)
    link.down()  # unreachable for a few seconds of training ...
    time.sleep(4)
    link.up()
    t.join(900)
    r = result["r"]
    run = c.get_run(r.mlflow_run_id)
    assert run.info.status == "FINISHED" and (tmp_path / "out" / "decoder.json").exists()
    want = set(range(1, steps["vae"] + 1))
    got = {s for s, _ in history(cfg.tracking, r.mlflow_run_id, "vae/loss")}
    lost = len(want - got)
    assert lost == 0, sorted(want - got)  # what the outage held back came later
    outage = json.loads(run.data.tags[TRACKING_OUTAGE_TAG])
    assert len(outage) == 1 and outage[0]["failed_calls"] >= 1 and outage[0]["dropped_metrics"] == 0, outage
    tally(faults_injected=1, runs_completed=1, records_lost=lost)
