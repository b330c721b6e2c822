"""`make ui` (jobs/ui.py) refuses what it cannot open in one line, exit 1, and creates nothing: a store that is
not there, a port in use, a tracking URI that is neither sqlite nor a server."""
import importlib.util
import socket
from pathlib import Path

from dreamllm_platform.tracking import TrackingConfig, end_run, start_or_resume_run

ROOT = Path(__file__).resolve().parents[2]


def _ui_main():
    spec = importlib.util.spec_from_file_location("job_ui", ROOT / "jobs" / "ui.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def test_a_missing_store_a_taken_port_and_a_foreign_uri_are_refused_in_one_line(tmp_path, capsys, tally):
    main = _ui_main()
    missing = tmp_path / "no-pipeline-here"
    assert main(["--set", f"root={missing}"]) == 1
    err = capsys.readouterr().err
    assert f"no MLflow store at {missing / 'mlflow.db'}: run `make pipeline` first" in err, err
    assert len(err.strip().splitlines()) == 1 and not missing.exists()  # nothing created

    db = tmp_path / "mlflow.db"
    cfg = TrackingConfig(tracking_uri=f"sqlite:///{db}")
    run_id, _ = start_or_resume_run(cfg, "kept")
    end_run(cfg, run_id, "FINISHED")
    before = db.read_bytes()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["--set", f"tracking.tracking_uri=sqlite:///{db}", "--set", f"port={port}"]) == 1
    err = capsys.readouterr().err
    assert f"port {port} on 127.0.0.1 is in use" in err and "--set port=0" in err, err

    assert main(["--set", f"tracking.tracking_uri=file://{tmp_path}/mlruns"]) == 1
    assert "opens a sqlite store (sqlite:///path) or names a tracking server" in capsys.readouterr().err
    assert db.read_bytes() == before and not (tmp_path / "mlruns").exists()  # the store as it was
    tally(bad_inputs=3, records_lost=0 if db.read_bytes() == before else 1)
