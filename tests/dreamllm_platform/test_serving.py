"""Serving pieces that need no running app: config and shipped YAMLs, auth sources, image and size checks, imports.

The live API is tested end to end in tests/e2e/test_serve_api.py.
"""
import base64
import http.server
import io
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml
from PIL import Image

from dreamllm_platform.config import load_config
from dreamllm_platform.serving.config import AuthConfig, LimitsConfig, ServeConfig
from dreamllm_platform.serving.limits import APIError, load_api_key, load_image, parse_size

ROOT = Path(__file__).resolve().parents[2]


def _png(w, h) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), "blue").save(buf, format="PNG")
    return buf.getvalue()


def _data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


# ------------------------------------------------------------------ config

def test_configs_serve_yaml_is_the_embedded_defaults():
    assert load_config(ServeConfig, ROOT / "configs/serve.yaml") == ServeConfig()


def test_infra_serve_config_is_a_valid_serve_deploy_file_that_builds():
    from ray.serve.schema import ServeDeploySchema

    from dreamllm_platform.serving.app import app_builder

    raw = yaml.safe_load((ROOT / "infra/serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(raw)
    (app,) = schema.applications
    assert app.import_path == "dreamllm_platform.serving.app:app_builder"
    assert {d.name for d in app.deployments} == {"DreamLLMModel", "OpenAIIngress"}
    model = next(d for d in app.deployments if d.name == "DreamLLMModel")
    assert model.autoscaling_config["max_replicas"] > 1 and model.max_ongoing_requests >= 8
    # The builder binds the s3:// model reference without touching storage or starting Ray.
    assert app_builder(dict(app.args)) is not None
    with pytest.raises(ValueError, match="valid args: config, set"):
        app_builder({"model": "x"})


@pytest.mark.parametrize("override, message", [
    ("model.uri=ftp://host/ckpt", "unsupported scheme 'ftp'"),
    ("limits.max_n=16", "must not exceed batching.image_max_batch_size"),
    ("model.max_ongoing_requests=2", "must be >= the largest batch"),
    ("model.use_gpu=maybe", "model.use_gpu: expected true or false or null, got .maybe."),
    ("limits.allowed_image_hosts=[https://x.com/]", "bare host names"),
    ("model.api_key=sk-123", "valid keys under model"),
])
def test_bad_config_values_are_named(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(ServeConfig, None, [override])


def test_build_app_checks_a_local_checkpoint_before_deploying(tmp_path):
    from dreamllm_platform.serving.app import build_app

    with pytest.raises(ValueError, match="model.uri is required"):
        build_app(ServeConfig())
    with pytest.raises(ValueError, match="not a DreamLLM checkpoint"):
        build_app(load_config(ServeConfig, None, [f"model.uri=file://{tmp_path}"]))
    # Registry and object-storage references are resolved by the model replicas, not when binding.
    for uri in ("models:/dreamllm@champion", "s3://no-such-bucket/ckpt"):
        assert build_app(load_config(ServeConfig, None, [f"model.uri={uri}"])) is not None


def test_serve_job_exits_non_zero_with_a_one_line_reason(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "jobs"))
    try:
        import serve as serve_job
    finally:
        sys.path.pop(0)
    assert serve_job.main(["--set", f"model.uri={tmp_path}"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("serve: failed:") and "not a DreamLLM checkpoint" in err and "\n" not in err


def test_importing_the_app_starts_nothing_and_loads_no_model_code():
    code = ("import sys, dreamllm_platform.serving.app as a; "
            "print(sorted(m for m in ('torch', 'mlflow', 's3fs', 'dreamllm.model') if m in sys.modules)); "
            "import ray; print(ray.is_initialized())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.split() == ["[]", "False"]


# -------------------------------------------------------------------- auth

def test_api_key_sources(tmp_path, monkeypatch):
    monkeypatch.delenv("DREAMLLM_API_KEY", raising=False)
    assert load_api_key(AuthConfig()) is None
    monkeypatch.setenv("DREAMLLM_API_KEY", " sk-env ")
    assert load_api_key(AuthConfig()) == "sk-env"
    secret = tmp_path / "key"
    secret.write_text("sk-file\n")
    assert load_api_key(AuthConfig(api_key_file=str(secret))) == "sk-file"  # the mounted secret wins
    monkeypatch.delenv("DREAMLLM_API_KEY")
    with pytest.raises(ValueError, match="no key was found"):
        load_api_key(AuthConfig(require_api_key=True))
    with pytest.raises(ValueError, match="does not exist"):
        load_api_key(AuthConfig(api_key_file=str(tmp_path / "missing")))


# ------------------------------------------------------------------ images

def test_data_url_images_are_decoded_and_capped():
    limits = LimitsConfig(max_image_pixels=50 * 50)
    img = load_image(_data_url(_png(40, 30)), limits, "p")
    assert img.mode == "RGB" and img.size == (40, 30)
    for url, code in [(_data_url(_png(60, 60)), "image_too_large"),
                      ("data:image/png;base64,!!notbase64", "invalid_image"),
                      (_data_url(b"not an image at all"), "invalid_image"),
                      ("file:///etc/passwd", "invalid_image"),
                      ("https://example.com/a.png", "remote_image_not_allowed")]:
        with pytest.raises(APIError) as e:
            load_image(url, limits, "messages.0.content.0.image_url.url")
        assert e.value.status == 400 and e.value.code == code and e.value.param.startswith("messages.0")


def test_remote_images_are_fetched_only_from_allowed_hosts():
    png = _png(8, 8)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/moved":
                self.send_response(302)
                self.send_header("Location", "http://example.com/x.png")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(png)

        def log_message(self, *args):
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        assert load_image(f"{url}/a.png", LimitsConfig(allowed_image_hosts=["127.0.0.1"]), "p").size == (8, 8)
        with pytest.raises(APIError, match="not allowed from host '127.0.0.1'"):
            load_image(f"{url}/a.png", LimitsConfig(), "p")
        with pytest.raises(APIError) as e:  # a redirect could leave the allow-list: refused
            load_image(f"{url}/moved", LimitsConfig(allowed_image_hosts=["127.0.0.1"]), "p")
        assert e.value.code == "image_fetch_failed"
    finally:
        httpd.shutdown()


def test_output_sizes():
    limits = LimitsConfig(max_output_side=512)
    assert parse_size(None, 32, limits) == 32 and parse_size("auto", 32, limits) == 32
    assert parse_size("256x256", 32, limits) == 256
    for bad in ("256x128", "1024x1024", "big", "8x8"):
        with pytest.raises(APIError) as e:
            parse_size(bad, 32, limits)
        assert e.value.param == "size" and "32x32" in e.value.message
