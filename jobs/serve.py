"""Serve DreamLLM behind an OpenAI-compatible API with Ray Serve.

    python jobs/serve.py --set model.uri=/path/to/checkpoint [--config configs/serve.yaml] [--set k=v ...]
    ray job submit --working-dir . -- python jobs/serve.py --set model.uri=s3://bucket/ckpt --set http.host=0.0.0.0 \
        --set auth.api_key_file=/var/run/secrets/dreamllm/api-key

On an address other than loopback the API needs a key: the file above is the one ray_cluster.yaml
writes on every node from the secret manager (or $DREAMLLM_API_KEY in the nodes' environment);
without one the job refuses to start, unless `--set auth.allow_open=true` asks for an open API.
With a local Ray (no RAY_ADDRESS) the job keeps serving until Ctrl-C, since the
local Ray ends with it; on a cluster it deploys and exits, and the application
keeps running there (`serve status`, `serve shutdown` manage it).
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, also under --working-dir

from dreamllm_platform.config import parse_job_args  # noqa: E402
from dreamllm_platform.serving.config import ServeConfig  # noqa: E402


def main(argv=None) -> int:
    cfg = parse_job_args(ServeConfig, argv, "Serve DreamLLM with an OpenAI-compatible API")
    from ray import serve

    from dreamllm_platform.runtime import init_ray, serve_until_stopped
    from dreamllm_platform.serving.app import build_app, check_model_ref
    from dreamllm_platform.serving.limits import secure_auth

    on_cluster = bool(os.environ.get("RAY_ADDRESS"))
    try:
        check_model_ref(cfg)  # before starting Ray: a wrong path or an open public API fails in a second
        secure_auth(cfg.auth, cfg.http.host)
        init_ray()
        serve.start(http_options={"host": cfg.http.host, "port": cfg.http.port})
        serve.run(build_app(cfg), name=cfg.app_name, route_prefix="/")
    except Exception as e:  # a bad checkpoint or a replica that cannot start: one line, non-zero exit
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"serve: failed: {reason} (details in the Serve logs)", file=sys.stderr)
        return 1
    base = f"http://{cfg.http.host}:{cfg.http.port}"
    print(f"serving {cfg.model.uri} as '{cfg.model.name}' at {base}/v1 (app '{cfg.app_name}'); "
          f"playground at {base}/", flush=True)
    if not on_cluster:  # the local Ray (and the API) live as long as this process: serve until stopped
        serve_until_stopped()
    return 0


if __name__ == "__main__":
    sys.exit(main())
