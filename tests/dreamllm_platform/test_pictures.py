"""The pictures of a run (loss curves, captioned sample grid) logged through RunLogger into real sqlite MLflow."""
import io
from pathlib import Path
from urllib.parse import urlparse

from PIL import Image

from dreamllm_platform.pictures import (GRID_FILE, LOSS_FILE, METRICS_FILE, evaluation_pictures, image_grid_png,
                                        log_run_pictures, loss_keys)
from dreamllm_platform.tracking import RunLogger, TrackingConfig, start_or_resume_run


def test_loss_keys_are_the_losses_of_stages_and_towers():
    keys = ["loss", "loss_lm", "loss_diffusion", "lr", "grad_norm", "tokens_per_s", "vae/recon_mse", "vae/kl",
            "unet/loss", "vision/retrieval_accuracy", "llm/examples_per_s"]
    assert loss_keys(keys) == ["loss", "loss_diffusion", "loss_lm", "unet/loss", "vae/kl", "vae/recon_mse"]


def test_the_grid_has_a_cell_per_image_and_room_for_captions():
    images = [Image.new("RGB", (32, 32), c) for c in ("red", "blue", "green", "white", "black")]
    grid = Image.open(io.BytesIO(image_grid_png(images, [f"prompt {i}" for i in range(5)], columns=4, cell=64)))
    assert grid.width == 4 * 64 and grid.height > 2 * 64  # two rows, each with a caption band
    assert grid.getpixel((10, 10)) == (255, 0, 0) and grid.getpixel((64 + 10, 10)) == (0, 0, 255)


def test_a_run_gets_its_loss_curves_and_grid_as_artifacts(tmp_path, capsys):
    cfg = TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", artifact_location=str(tmp_path / "art"))
    run_id, _ = start_or_resume_run(cfg, "pictures")
    log = RunLogger(cfg, run_id, resilient=True)
    for step in range(1, 4):
        log.metrics({"loss": 1.0 / step, "loss_lm": 0.5 / step, "lr": 1e-3}, step)
    images = [Image.new("RGB", (16, 16), "red"), Image.new("RGB", (16, 16), "blue")]
    logged = log_run_pictures(log, images, ["A red one.", "A blue one."], title="align")
    assert set(logged) == {LOSS_FILE, GRID_FILE}
    for uri in logged.values():
        assert Image.open(Path(urlparse(uri).path)).format == "PNG"
    # Nothing to plot (no metrics) is a warning, not an exception.
    empty, _ = start_or_resume_run(cfg, "empty")
    assert log_run_pictures(RunLogger(cfg, empty)) == {}
    assert "warning: no loss curves" in capsys.readouterr().err


def test_an_evaluation_gets_a_panel_per_metric_and_the_grid_of_what_it_created(capsys):
    images = [Image.new("RGB", (16, 16), "red"), Image.new("RGB", (16, 16), "blue")]
    figures = evaluation_pictures({"val_loss_lm": 2.5, "fid": 310.0, "qa_exact_match": 0.0}, images,
                                  ["A red one.", "A blue one."], title="dreamllm v3")
    assert set(figures) == {METRICS_FILE, GRID_FILE}
    bars = Image.open(io.BytesIO(figures[METRICS_FILE]))
    assert bars.format == "PNG" and abs(bars.width - 100 * (1.9 * 3 + 0.6)) <= 1, bars.size  # three panels
    assert Image.open(io.BytesIO(figures[GRID_FILE])).width == 2 * 160
    # No images created: the metrics alone; nothing to plot: a warning and no figure, never an exception.
    assert set(evaluation_pictures({"val_loss_lm": 2.5})) == {METRICS_FILE}
    assert evaluation_pictures({}) == {}
    assert "warning: no plots/metrics.png" in capsys.readouterr().err
