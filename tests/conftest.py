"""Shared fixtures: the debug flavor, its tokenizer and model, built once per session."""
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


# ---------------------------------------------------------------- Ray and S3
# Session-scoped and generic so every platform test (data, train, serve) shares
# one local Ray and one S3 endpoint.

@pytest.fixture(scope="session")
def s3():
    """A real S3 HTTP endpoint on loopback (moto) with bucket `dreamllm-test`; sets the AWS_* variables.

    Yields a dict with `endpoint` and `bucket`. Requested by `ray_session` so that
    Ray's worker processes inherit the variables.
    """
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_REGION", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_REGION="us-east-1", AWS_DEFAULT_REGION="us-east-1")
    bucket = "dreamllm-test"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    yield {"endpoint": endpoint, "bucket": bucket}
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def ray_session(s3):
    """One local Ray for the whole session, with 4 logical CPUs on the 2-core CI machine so that a
    trainer or an actor pool and the Ray Data tasks feeding it can be scheduled together."""
    import ray

    from dreamllm_platform.runtime import init_ray

    init_ray(num_cpus=4)
    yield ray
    ray.shutdown()
