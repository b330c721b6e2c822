"""Towers pretraining on a real local Ray and a real S3 endpoint (moto), and its use by the rest of the platform.

One job is run per module (debug flavor, a tiny synthetic set in S3 plus a
shard with a corrupt image) and then checked: the output loads through the
model builders and as a diffusers pipeline, every phase's loss fell (VAE,
UNet, vision, LLM), a resubmission does nothing, a resumed run continues
from its last checkpoint, the precompute encodes with the trained VAE, and a
DreamLLM built on it starts from the trained LLM and exports a
self-contained checkpoint.
"""
import dataclasses
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from dreamllm.checkpoint import load_checkpoint
from dreamllm.components import build_train_scheduler, build_unet, build_vae, encode_latent_dist
from dreamllm.config import get_flavor
from dreamllm.images import vae_pixels
from dreamllm.model import DreamLLM
from dreamllm_platform import storage
from dreamllm_platform.checkpoints import DECODER_FILE, export_checkpoint, flavor_config
from dreamllm_platform.config import load_config
from dreamllm_platform.data.config import PrecomputeConfig, SourceConfig, SyntheticConfig
from dreamllm_platform.data.latents import run_precompute
from dreamllm_platform.data.store import LatentStore
from dreamllm_platform.data.synthetic import write_synthetic
from dreamllm_platform.towers import TowersConfig, run_towers_pretraining
from dreamllm_platform.tracking import TrackingConfig, client

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TINY = SyntheticConfig(image_size=32, mmc4_shards=0, webdataset_shards=1, parquet_shards=1, pairs_per_shard=12,
                       conversations=0, instruct_docs=0)


def snapshot(uri):
    """path -> bytes of every object under `uri`."""
    fs, path = storage.fsspec_fs(uri)
    return {p: fs.cat_file(p) for p in sorted(fs.find(path))}


@pytest.fixture(scope="module")
def job(ray_session, s3, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("towers")
    root = f"s3://{s3['bucket']}/towers-test"
    write_synthetic(f"{root}/data", TINY)
    bad = [{"key": "bad", "caption": "A small red circle in the center of the image.", "jpg": b"\xff\xd8 not a jpeg"}]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(bad), buf)
    storage.write_bytes(f"{root}/data/laion_parquet/00001.parquet", buf.getvalue())
    tree = {"flavor": "debug", "data_root": f"{root}/data", "output": f"{root}/out",
            "checkpoint": {"storage_path": str(tmp / "runs"), "every_n_steps": 20},
            "synthetic": {**dataclasses.asdict(TINY), "enabled": False}, "log_every": 10,
            "tracking": {"tracking_uri": f"sqlite:///{tmp}/mlflow.db"},
            "scaling": {"num_workers": 1, "cpus_per_worker": 1},
            "vae": {"steps": 60, "batch_size": 8, "crop": None, "lr": 2e-3, "warmup_steps": 5, "scaling_images": 12},
            "unet": {"steps": 30, "batch_size": 8, "warmup_steps": 5},
            "vision": {"steps": 30, "batch_size": 8, "warmup_steps": 5, "lr": 2e-3},
            "llm": {"steps": 30, "batch_size": 8, "warmup_steps": 5, "lr": 3e-3, "scored": 2},
            "samples": {"prompts": ["A large red circle in the center of the image."], "num_inference_steps": 2,
                        "scored": 2}}
    cfg = load_config(TowersConfig, None, (), base=tree)  # as a job builds it from YAML
    return cfg, run_towers_pretraining(cfg), tmp


def test_output_loads_through_the_model_builders_and_as_a_pipeline(job):
    from diffusers import StableDiffusionPipeline

    cfg, r, _ = job
    assert not r.skipped and r.output == cfg.output
    info = json.loads(storage.read_bytes(storage.join(cfg.output, DECODER_FILE)))
    assert info["config_hash"] == cfg.config_hash() and info["mlflow_run_id"] == r.mlflow_run_id
    model_cfg = flavor_config("debug", cfg.output)  # downloads the s3:// decoder
    d = model_cfg.diffusion
    assert Path(d.name_or_path, "vae").is_dir()
    vae, unet, sched = build_vae(d), build_unet(d), build_train_scheduler(d)
    assert vae.config.scaling_factor == pytest.approx(r.metrics["scaling_factor"])
    assert vae.config.scaling_factor != pytest.approx(0.18215)  # computed, not the default
    assert sched.config.beta_schedule == "scaled_linear" and sched.config.num_train_timesteps == 1000
    random_unet = build_unet(get_flavor("debug").diffusion)
    assert not torch.equal(unet.conv_in.weight, random_unet.conv_in.weight)  # trained weights
    # The scaled latents are about unit variance, as model.py's `latents * scaling_factor` expects.
    pixels = torch.rand(12, 3, 32, 32) * 2 - 1
    mean, _ = encode_latent_dist(vae, pixels)
    assert 0.2 < float((mean * vae.config.scaling_factor).std()) < 5
    pipe = StableDiffusionPipeline.from_pretrained(d.name_or_path, safety_checker=None)
    image = pipe("A small red circle in the center of the image.", num_inference_steps=2,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)
    for k in ("recon_mse", "diffusion_loss", "sample_color_accuracy", "skipped_images", "vision_retrieval_accuracy"):
        assert k in r.metrics
    # The trained CLIP vision tower comes with it, and a fresh model of the flavor uses it.
    from dreamllm.components import build_vision
    assert model_cfg.vision.name_or_path == str(Path(d.name_or_path) / "vision")
    trained, random_tower = build_vision(model_cfg.vision), build_vision(get_flavor("debug").vision)
    assert trained.config.image_size == get_flavor("debug").vision.image_size
    assert not torch.equal(trained.embeddings.patch_embedding.weight, random_tower.embeddings.patch_embedding.weight)


def test_losses_fall_on_a_tiny_set(job):
    _, r, tmp = job
    c = client(TrackingConfig(tracking_uri=r.tracking_uri))
    # Means over 10 steps each. The VAE leaves its first plateau (the mean colour, MSE ~0.45) slowly.
    for key, windows, factor in (("vae/recon_mse", 6, 0.9), ("unet/mse", 3, 0.7), ("vision/loss", 3, 0.9),
                                 ("llm/loss", 3, 0.8)):
        history = [m.value for m in sorted(c.get_metric_history(r.mlflow_run_id, key), key=lambda m: m.step)]
        assert len(history) == windows and history[-1] < factor * history[0], (key, history)
    assert c.get_run(r.mlflow_run_id).info.status == "FINISHED"
    artifacts = [a.path for a in c.list_artifacts(r.mlflow_run_id, "samples")]
    assert artifacts == ["samples/00.png"]
    # The run's pictures, as a stage run's: one loss panel per phase (4.5 in at 100 dpi each: the vae/, unet/,
    # vision/ and llm/ curves, not the one-point final figures) and the grid of the fixed prompt's sample.
    plots = {a.path for a in c.list_artifacts(r.mlflow_run_id, "plots")}
    assert plots == {"plots/loss.png", "plots/samples_grid.png"}, plots
    loss = Image.open(c.download_artifacts(r.mlflow_run_id, "plots/loss.png", str(tmp)))
    assert loss.format == "PNG" and loss.width == 4 * 450, loss.size
    grid = Image.open(c.download_artifacts(r.mlflow_run_id, "plots/samples_grid.png", str(tmp)))
    assert grid.width == 160 and grid.height > 160, grid.size  # one cell and its caption


def test_a_corrupt_image_is_counted_and_skipped(job):
    _, r, _ = job
    assert r.metrics["skipped_images"] == 1


def test_resubmission_is_a_no_op(job):
    cfg, r, _ = job
    before = snapshot(cfg.output)
    again = run_towers_pretraining(cfg)
    assert again.skipped and again.mlflow_run_id == r.mlflow_run_id and again.metrics == r.metrics
    assert snapshot(cfg.output) == before


def test_an_image_stream_skips_to_where_its_takes_went(ray_session):
    """The towers' data position is one count: a stream that skips it goes on as the one that took it."""
    from dreamllm_platform.towers.streams import ImageStream

    rows = [{"pixels": np.full((4, 4, 3), i, np.uint8), "caption": f"c{i}", "skip": "undecodable" if i % 7 == 0 else "",
             "id": f"s/{i}"} for i in range(150)]
    ds = ray_session.data.from_items(rows, override_num_blocks=3)
    a = ImageStream(ds, shuffle_buffer=16, seed=5)
    for n in (3, 70, 1, 64, 130, 9):  # 277 of 128 usable images: past the first pass, into replayed epochs
        a.take(n)
    b = ImageStream(ds, shuffle_buffer=16, seed=5)
    b.skip(a.taken)
    assert (b.taken, b.skipped, b.first_pass_done) == (a.taken, {"undecodable": 22}, True)
    pa, ca = a.take(50)
    pb, cb = b.take(50)
    assert ca == cb and torch.equal(pa, pb) and a.drawn[-50:] == b.drawn
    assert sorted(a.drawn[:128]) == sorted(f"s/{i}" for i in range(150) if i % 7)  # each image once an epoch
    c = ImageStream(ds, shuffle_buffer=16, seed=6)
    assert c.take(50)[1] != ca  # the order is the seed's


def test_a_run_of_the_same_name_resumes_from_its_last_checkpoint(job):
    """Another output, same config: the Ray run's final checkpoint is restored, nothing is retrained."""
    cfg, r, tmp = job
    other = dataclasses.replace(cfg, output=str(tmp / "copy"))
    again = run_towers_pretraining(other)
    assert not again.skipped and again.mlflow_run_id == r.mlflow_run_id
    a = build_unet(flavor_config("debug", cfg.output).diffusion)
    b = build_unet(flavor_config("debug", other.output).diffusion)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    for part in ("llm", "vision"):  # restored from the checkpoint, not retrained (nor left random)
        a, b = (Path(storage.download_dir(o, tmp / f"dl-{part}-{i}")) / part for i, o in
                enumerate((cfg.output, other.output)))
        assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    steps = [m.step for m in client(cfg.tracking).get_metric_history(r.mlflow_run_id, "resumed_from_step")]
    assert steps == [sum(p.steps for p in cfg.phases().values())]


def test_precompute_encodes_with_the_trained_vae(job, tmp_path):
    cfg, _, _ = job
    pre = PrecomputeConfig(flavor="debug", data_root=cfg.data_root, output=str(tmp_path / "store"),
                           decoder=cfg.output, synthetic=dataclasses.replace(TINY, enabled=False),
                           sources={"laion_parquet": SourceConfig("laion_parquet", "laion_parquet")})
    plain = dataclasses.replace(pre, decoder=None)
    src = pre.sources["laion_parquet"]
    assert pre.shard_config_hash(src) != plain.shard_config_hash(src)  # a store of another VAE is redone
    run_precompute(pre)
    row = LatentStore(pre.output).read_latents("laion_parquet/00000").to_pylist()[0]
    table = pq.read_table(io.BytesIO(storage.read_bytes(f"{cfg.data_root}/laion_parquet/00000.parquet")))
    from PIL import Image
    import hashlib

    by_sha = {hashlib.sha256(b).hexdigest(): b for b in table.column("jpg").to_pylist()}
    pixels = vae_pixels(Image.open(io.BytesIO(by_sha[row["sha256"]])), 32)[None]
    stored = np.frombuffer(row["mean"], np.float16).reshape(1, 4, 16, 16).astype(np.float32)
    trained = encode_latent_dist(build_vae(flavor_config("debug", cfg.output).diffusion), pixels)[0].numpy()
    random = encode_latent_dist(build_vae(get_flavor("debug").diffusion), pixels)[0].numpy()
    assert np.allclose(stored, trained, atol=2e-2 * np.abs(trained).max())
    assert not np.allclose(stored, random, atol=0.1 * np.abs(random).max())


def test_a_model_on_the_towers_starts_from_the_trained_llm_and_exports_a_self_contained_checkpoint(job, tmp_path):
    cfg, r, _ = job
    model = DreamLLM.from_config(flavor_config("debug", cfg.output))
    assert Path(model.cfg.llm.name_or_path).name == "llm"
    fresh = DreamLLM.from_config(get_flavor("debug"))
    assert not torch.equal(model.llm.get_input_embeddings().weight, fresh.llm.get_input_embeddings().weight)
    assert {f"llm_qa_{a}_accuracy" for a in ("color", "shape", "position")} <= set(r.metrics)
    export_checkpoint(model, str(tmp_path / "ckpt"))
    # Elsewhere: another directory, and no local copy of the decoder to point at.
    shutil.copytree(tmp_path / "ckpt", tmp_path / "elsewhere")
    shutil.rmtree(tmp_path / "ckpt")
    shutil.rmtree(model.cfg.diffusion.name_or_path)
    info = json.loads((tmp_path / "elsewhere" / "dreamllm.json").read_text())
    assert info["config"]["diffusion"]["name_or_path"] == "diffusion"
    assert info["config"]["llm"]["name_or_path"] == "llm"  # a frozen LLM from a local folder travels too
    loaded = load_checkpoint(tmp_path / "elsewhere")
    assert loaded.vae.config.scaling_factor == model.vae.config.scaling_factor
    for part in ("unet", "vae"):
        for p, q in zip(getattr(model, part).parameters(), getattr(loaded, part).parameters()):
            assert torch.equal(p, q)


def test_the_trainer_builds_its_model_config_from_the_towers(job):
    from dreamllm_platform.train.config import ModelSpec, TrainConfig
    from dreamllm_platform.train.trainer import model_config_for_data

    cfg, _, _ = job
    model_cfg = model_config_for_data(TrainConfig(model=ModelSpec(flavor="debug", decoder=cfg.output)))
    assert Path(model_cfg.diffusion.name_or_path, "unet").is_dir()
    with pytest.raises(ValueError, match="trained for flavor 'debug', not 'small'"):
        flavor_config("small", cfg.output)


def test_unfinished_decoders_and_bad_configs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="is not a finished decoder: decoder.json is missing"):
        flavor_config("debug", str(tmp_path))
    with pytest.raises(ValueError, match=r"unknown config key\(s\) vae.learning_rate; valid keys under vae"):
        load_config(TowersConfig, None, ["vae.learning_rate=1"])
    with pytest.raises(ValueError, match="flavor 7b uses Stable Diffusion 2.1's pretrained decoder"):
        load_config(TowersConfig, None, ["flavor=7b"])
    with pytest.raises(ValueError, match="have a format without image-caption pairs"):
        load_config(TowersConfig, None, ["sources.docs.format=mmc4", "sources.docs.uri=mmc4"])
    with pytest.raises(ValueError, match="caption_dropout"):
        load_config(TowersConfig, None, ["unet.caption_dropout=1.5"])
    with pytest.raises(ValueError, match=r"llm.mix has unknown text kind\(s\) \['tweets'\]"):
        load_config(TowersConfig, None, ["llm.mix.tweets=1"])


def test_configs_towers_yaml_is_the_embedded_defaults():
    assert load_config(TowersConfig, ROOT / "configs/towers.yaml") == TowersConfig()
    assert TowersConfig().output == "outputs/towers/small"


def test_the_job_exits_with_a_one_line_reason(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("pretrain_towers", ROOT / "jobs/pretrain_towers.py")
    job_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job_module)
    with pytest.raises(SystemExit) as e:
        job_module.main(["--set", "unet.lr=-1"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == \
        "config error: unet.lr must be > 0, unet.weight_decay and unet.warmup_steps >= 0"
