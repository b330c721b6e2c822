"""The live OpenAI-compatible API through the official `openai` client on loopback.

One Serve application per module (start-up is the slow part): a tiny `debug`
DreamLLM with random weights, saved with `save_checkpoint`, uploaded to the
session's S3 endpoint (moto) and served from its s3:// URI, with an API key
read from a secret file. The checkpoint's weights are nudged so that the model
opens every answer with `<dream_start>`: chat answers then contain a created
image whenever the request allows one, which the inline-image tests rely on.

The playground page at `/` is tested here too, on the same app (no second Serve start-up), in a real
headless browser: Debian's Chromium (`make chromium`) driven by Playwright, launched once per module.
"""
from __future__ import annotations

import base64
import io
import json
import os
import re
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import openai
import pytest
from PIL import Image

pytestmark = pytest.mark.slow

KEY = "sk-test-0123456789"
NATIVE = 32  # the debug flavor's diffusion.resolution


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _biased_debug_checkpoint(path: Path) -> Path:
    """A debug checkpoint whose LM always ranks <dream_start> first (while images are still allowed)."""
    import torch

    from dreamllm.checkpoint import save_checkpoint
    from dreamllm.config import get_flavor
    from dreamllm.model import DreamLLM

    model = DreamLLM.from_config(get_flavor("debug"))
    with torch.no_grad():
        # A large constant in hidden dimension 0 of every token embedding survives to the final hidden
        # state; the <dream_start> output row reads only that dimension, so its logit is the largest.
        model.llm.get_input_embeddings().weight[:, 0] += 50
        row = model.ids.dream_start - model.ids.base_vocab_size
        model.new_token_head[row].zero_()
        model.new_token_head[row, 0] = 100
    return save_checkpoint(model, path)


@pytest.fixture(scope="module")
def server(ray_session, s3, tmp_path_factory):
    from ray import serve

    from dreamllm_platform import storage
    from dreamllm_platform.config import load_config
    from dreamllm_platform.serving.app import build_app
    from dreamllm_platform.serving.config import ServeConfig

    tmp = tmp_path_factory.mktemp("serve")
    local = _biased_debug_checkpoint(tmp / "ckpt")
    uri = f"s3://{s3['bucket']}/serve-test/ckpt"
    for f in local.rglob("*"):
        if f.is_file():
            storage.write_bytes(storage.join(uri, str(f.relative_to(local))), f.read_bytes())
    key_file = tmp / "api-key"
    key_file.write_text(KEY + "\n")
    port = _free_port()
    cfg = load_config(ServeConfig, None, [
        f"model.uri={uri}", f"model.cache_dir={tmp / 'cache'}", f"auth.api_key_file={key_file}",
        "auth.require_api_key=true", f"http.port={port}",
        "defaults.steps=2", "defaults.max_tokens=6", "limits.max_tokens=240", "limits.max_steps=10",
        # A small decode loop (4 rows, 4 waiting) so that the back-pressure test can fill it.
        "batching.text_max_rows=4", "batching.text_max_waiting=4", "model.max_ongoing_requests=16",
        "limits.max_chat_chars=2000", "limits.max_prompt_chars=500",
        f"limits.max_image_pixels={64 * 64}", f"limits.max_request_bytes={256 * 1024}", "limits.max_n=4",
    ])
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg), name=cfg.app_name, route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="module")
def loop_stats(server):
    """The model replica's decode-loop counters (rows, waiting, cancelled, refused), read through Serve."""
    from ray import serve

    from dreamllm_platform.serving.config import ServeConfig

    handle = serve.get_deployment_handle("DreamLLMModel", app_name=ServeConfig().app_name)
    return lambda: handle.stats.remote().result(timeout_s=30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)


def _png_data_url(w: int, h: int, color="red") -> str:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _decode_b64_png(b64: str) -> Image.Image:
    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert img.format == "PNG"
    return img


def _raw(server: str, method: str, path: str, body: bytes | None = None, key: str | None = KEY,
         content_type: str = "application/json") -> tuple[int, dict]:
    """One HTTP request without the client library (for payloads the client would refuse to send)."""
    req = urllib.request.Request(server + path, data=body, method=method)
    if key is not None:
        req.add_header("Authorization", f"Bearer {key}")
    if body is not None:
        req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _assert_openai_error(body: dict, code: str | None = None, param: str | None = None) -> dict:
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert err["message"] and "Traceback" not in err["message"]
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err


# ----------------------------------------------------------------- happy paths

def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["dreamllm"]
    status, body = _raw(server, "GET", "/healthz", key=None)
    assert status == 200 and body == {"status": "ok", "model": "ok"}


def test_chat_about_an_image_answers_in_text(client):
    r = client.chat.completions.create(
        model="dreamllm",
        messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": _png_data_url(40, 30)}},
            {"type": "text", "text": "What colour is this picture?"}]}],
        max_tokens=5, extra_body={"max_images": 0})
    msg = r.choices[0].message
    assert msg.role == "assistant" and isinstance(msg.content, str) and msg.content.strip()
    assert "data:image" not in msg.content  # no image may be created with max_images=0
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"
    # The prompt holds the image block: 16 visual tokens of the debug flavor plus the template's text.
    assert r.usage.prompt_tokens > 16


def test_created_images_come_back_inline_in_order(client):
    r = client.chat.completions.create(
        model="dreamllm", messages=[{"role": "user", "content": "Draw a red circle, then describe it."}],
        max_tokens=6, seed=3, extra_body={"max_images": 1, "image_steps": 2})
    content = r.choices[0].message.content
    prefix = "![image 1](data:image/png;base64,"
    assert content.startswith(prefix), content[:80]  # the (biased) model opens with its image
    b64, _, rest = content[len(prefix):].partition(")")
    assert _decode_b64_png(b64).size == (NATIVE, NATIVE)
    assert rest.strip(), "the text written after the image is missing"


def test_image_generation_sizes_n_and_seeds(client):
    r = client.images.generate(model="dreamllm", prompt="a blue square", n=3, response_format="b64_json",
                               extra_body={"steps": 2, "seed": 11})
    imgs = [_decode_b64_png(d.b64_json) for d in r.data]
    assert len(imgs) == 3 and all(im.size == (NATIVE, NATIVE) for im in imgs)
    assert not np.array_equal(np.asarray(imgs[0]), np.asarray(imgs[1]))  # n images, each its own noise
    again = client.images.generate(prompt="a blue square", n=3, extra_body={"steps": 2, "seed": 11})
    for a, b in zip(again.data, imgs):  # the same request: the same pixels
        assert np.array_equal(np.asarray(_decode_b64_png(a.b64_json)), np.asarray(b))
    one = client.images.generate(prompt="a blue square", n=1, extra_body={"steps": 2, "seed": 11})
    # Image 0 alone has image 0's noise; the kernels may sum in another order for another batch size
    # (seen on a 2-thread CPU: 2 of 3,072 values 1 level apart), so equal up to that rounding only.
    d = np.abs(np.asarray(_decode_b64_png(one.data[0].b64_json)).astype(int) - np.asarray(imgs[0]).astype(int))
    assert d.max() <= 2 and (d > 0).mean() < 0.01, (d.max(), (d > 0).mean())
    big = client.images.generate(prompt="a blue square", size="64x64", extra_body={"steps": 2})
    assert _decode_b64_png(big.data[0].b64_json).size == (64, 64)


def test_seeded_requests_batched_together_stay_reproducible(client):
    """Concurrent requests share image batches; a seeded one must still get exactly its own images."""
    def gen(seed):
        r = client.images.generate(prompt="a green star", extra_body={"steps": 2, "seed": seed})
        return np.asarray(_decode_b64_png(r.data[0].b64_json))

    alone = gen(5)
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(gen, [5, 6, 5, 7, 5, 8]))
    for i in (0, 2, 4):
        assert np.array_equal(together[i], alone)
    assert not np.array_equal(together[1], alone)


@pytest.mark.parametrize("max_images", [0, 1])
def test_streaming_sends_openai_chunks_with_the_same_answer(client, max_images):
    kwargs = dict(model="dreamllm", messages=[{"role": "user", "content": "Tell me and draw something."}],
                  max_tokens=8, seed=1, extra_body={"max_images": max_images, "image_steps": 2})
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "length"
    deltas = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert "".join(deltas) == whole
    if max_images == 0:  # plain text is streamed as it is decoded, not in one piece at the end
        assert len(deltas) >= 3, deltas
    else:  # the image leaves when it is made, as one piece, and the text after it streams live
        assert deltas[0].startswith("![image 1](data:image/png;base64,") and deltas[0].endswith(")")
        assert deltas[1].startswith("\n\n") and len(deltas) >= 3, deltas[1:]


def _text_chat(i: int, n: int) -> dict:
    return dict(model="dreamllm", messages=[{"role": "user", "content": f"Question {i}: " + "why? " * (i * 7 % 23)}],
                max_tokens=n, extra_body={"max_images": 0})


def test_concurrent_streams_answer_what_each_request_gets_alone(client, loop_stats):
    """Greedy rows of different lengths decoded in one batch (joining and leaving) equal their lone answers."""
    kwargs = [_text_chat(i, n) for i, n in enumerate((40, 7, 25, 60, 12, 33))]
    alone = [client.chat.completions.create(**k).choices[0].message.content for k in kwargs]

    def stream(k):
        chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **k))
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks[-1].usage

    with ThreadPoolExecutor(len(kwargs)) as pool:
        together = list(pool.map(stream, kwargs))
    assert [t for t, _ in together] == alone
    for (_, usage), k in zip(together, kwargs):  # the usage chunk closes the stream, when asked for
        assert usage.completion_tokens <= k["max_tokens"] and usage.prompt_tokens > 0
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert loop_stats()["rows"] == 0


def test_a_client_that_disconnects_mid_stream_frees_its_row(client, loop_stats):
    before = loop_stats()
    stream = client.chat.completions.create(stream=True, **_text_chat(1, 240))
    it = iter(stream)
    for _ in range(3):  # the role chunk and two text deltas: the row is decoding
        next(it)
    stream.close()  # the connection goes away with ~200 tokens still to decode
    deadline = time.monotonic() + 30
    while (now := loop_stats())["cancelled"] == before["cancelled"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert now["cancelled"] == before["cancelled"] + 1, now  # stopped, not finished in the background
    assert now["rows"] == 0
    r = client.chat.completions.create(**_text_chat(2, 5))  # and the replica goes on serving
    assert r.choices[0].finish_reason in ("stop", "length")


def test_a_full_decode_loop_answers_503_and_the_admitted_requests_all_succeed(client, loop_stats):
    """24 long requests at once against 4 rows + 4 waiting: the rest are refused at once, with Retry-After."""
    before = loop_stats()["refused"]

    def ask(i):
        try:
            r = client.chat.completions.create(**_text_chat(i, 120))
            return r.choices[0].finish_reason, r.usage.completion_tokens
        except openai.InternalServerError as e:
            return e

    with ThreadPoolExecutor(24) as pool:
        out = list(pool.map(ask, range(24)))
    refused = [e for e in out if isinstance(e, Exception)]
    served = [o for o in out if not isinstance(o, Exception)]
    assert refused and len(served) >= 8, out
    for e in refused:
        assert e.status_code == 503 and e.response.headers["retry-after"] == "1"
        _assert_openai_error(e.response.json(), code="overloaded")
    for finish, tokens in served:
        assert finish in ("stop", "length") and 0 < tokens <= 120
    assert loop_stats()["refused"] - before == len(refused)


def test_streaming_errors_before_the_first_token_keep_their_status(client):
    with pytest.raises(openai.BadRequestError, match="does not fit the context"):
        list(client.chat.completions.create(model="dreamllm", stream=True, max_tokens=3,
                                            messages=[{"role": "user", "content": " ".join(["word"] * 399)}]))  # over the context


# ------------------------------------------------------------ refused requests

def test_the_pipelines_acceptance_client_sends_the_configured_key(server, tmp_path, monkeypatch):
    from dreamllm_platform.serving.acceptance import AcceptanceRequests, check_api
    from dreamllm_platform.serving.config import AuthConfig

    monkeypatch.setenv("ACCEPTANCE_TEST_KEY", KEY)  # the key as the served config names it
    req = AcceptanceRequests(("green", "circle", "upper left", "large", "white"), "What color is the circle?",
                             "A large red circle.", seed=0)
    r = check_api(f"{server}/v1", "dreamllm", req, str(tmp_path), auth=AuthConfig(api_key_env="ACCEPTANCE_TEST_KEY"))
    assert isinstance(r["chat_answer"], str)
    assert Image.open(tmp_path / "created_image.png").format == "PNG"


def test_wrong_or_missing_key_is_401(server):
    bad = openai.OpenAI(base_url=f"{server}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert e.value.status_code == 401
    _assert_openai_error(e.value.response.json(), code="invalid_api_key")
    with pytest.raises(openai.AuthenticationError):
        bad.images.generate(prompt="x")
    status, body = _raw(server, "POST", "/v1/images/generations", b'{"prompt": "x"}', key=None)
    assert status == 401
    _assert_openai_error(body, code="invalid_api_key")


@pytest.mark.parametrize("path, body, code, param", [
    ("/v1/chat/completions", b"{not json", "invalid_json", None),
    ("/v1/chat/completions", b"[1, 2]", "invalid_json", None),
    ("/v1/chat/completions", b'{"model": "dreamllm"}', "invalid_value", "messages"),
    ("/v1/chat/completions", b'{"messages": [{"role": "robot", "content": "hi"}]}', "invalid_value", "messages.0.role"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}',
     "invalid_value", "messages.0.content.0.image_url.url"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "tools": []}', "invalid_value", "tools"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}',
     "limit_exceeded", "max_tokens"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": '
                             b'{"url": "data:image/png;base64,@@@"}}]}]}', "invalid_image",
     "messages.0.content.0.image_url.url"),
    ("/v1/images/generations", b'{"prompt": "x", "n": 5}', "limit_exceeded", "n"),
    ("/v1/images/generations", b'{"prompt": "x", "steps": 500}', "limit_exceeded", "steps"),
    ("/v1/images/generations", b'{"prompt": "x", "size": "64x32"}', "invalid_size", "size"),
    ("/v1/images/generations", b'{"prompt": "x", "response_format": "url"}', "unsupported_value", "response_format"),
    ("/v1/images/generations", b'{"prompt": ""}', "invalid_value", "prompt"),
    ("/v1/images/generations", b'{"prompt": "x", "model": "gpt-image-1"}', "model_not_found", "model"),
])
def test_malformed_payloads_get_openai_errors(server, path, body, code, param):
    status, out = _raw(server, "POST", path, body)
    assert 400 <= status < 500
    _assert_openai_error(out, code=code, param=param)


def _chat_body(**fields) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": "hi"}], **fields}).encode()


LONG = "x" * 2001  # over this server's limits.max_chat_chars (2000) and every other string cap


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", _chat_body(messages=[{"role": "user", "content": LONG}]), "messages"),
    ("/v1/chat/completions", _chat_body(messages=[{"role": "user", "content": [{"type": "text", "text": LONG}]}]),
     "messages"),
    ("/v1/chat/completions", _chat_body(messages=[{"role": "system", "content": LONG},
                                                  {"role": "user", "content": "hi"}]), "messages"),
    ("/v1/chat/completions", _chat_body(messages=[{"role": "user", "content": "hi", "name": LONG}]),
     "messages.0.name"),
    ("/v1/chat/completions", _chat_body(model=LONG), "model"),
    ("/v1/chat/completions", _chat_body(user=LONG), "user"),
    ("/v1/chat/completions", _chat_body(seed=2**64), "seed"),
    ("/v1/chat/completions", _chat_body(seed=-1), "seed"),
    ("/v1/chat/completions", _chat_body(image_steps=10**6), "image_steps"),
    ("/v1/chat/completions", _chat_body(image_guidance_scale=1e9), "image_guidance_scale"),
    ("/v1/chat/completions", b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None),
    ("/v1/images/generations", json.dumps({"prompt": "x" * 501}).encode(), "prompt"),
    ("/v1/images/generations", json.dumps({"prompt": "x", "negative_prompt": "x" * 501}).encode(), "negative_prompt"),
    ("/v1/images/generations", json.dumps({"prompt": "x", "size": LONG}).encode(), "size"),
    ("/v1/images/generations", json.dumps({"prompt": "x", "user": LONG}).encode(), "user"),
    ("/v1/images/generations", json.dumps({"prompt": "x", "seed": 2**40}).encode(), "seed"),
    ("/v1/images/generations", json.dumps({"prompt": "x", "guidance_scale": -3}).encode(), "guidance_scale"),
])
def test_oversize_and_out_of_range_fields_get_4xx_before_model_work(server, path, body, param):
    status, out = _raw(server, "POST", path, body)
    assert 400 <= status < 500, (status, out)
    err = _assert_openai_error(out)
    if param is not None:
        assert err["param"] == param, err


def test_client_sees_bad_request_errors(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="dreamllm", messages=[{"role": "user", "content": "hi"}], temperature=5)
    assert e.value.status_code == 400 and e.value.param == "temperature"
    with pytest.raises(openai.BadRequestError, match="last message must have role 'user'"):
        client.chat.completions.create(model="dreamllm", messages=[{"role": "assistant", "content": "hi"}])


def test_oversized_and_remote_images_are_refused(server, client):
    with pytest.raises(openai.BadRequestError) as e:  # 100x100 > the 64x64-pixel cap of this server
        client.chat.completions.create(model="dreamllm", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": _png_data_url(100, 100)}}]}])
    assert e.value.code == "image_too_large" and "10000 pixels" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="dreamllm", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}])
    assert e.value.code == "remote_image_not_allowed"
    huge = json.dumps({"messages": [{"role": "user", "content": "x" * (300 * 1024)}]}).encode()
    status, out = _raw(server, "POST", "/v1/chat/completions", huge)
    assert status == 413
    _assert_openai_error(out, code="request_too_large")
    status, out = _raw(server, "GET", "/v1/nothing-here")
    assert status == 404
    _assert_openai_error(out)


def test_a_failing_request_does_not_fail_its_batch(client):
    """A prompt longer than the context fails inside the model (400); a request sent with it (and usually
    joining the same decode loop) still succeeds."""
    too_long = " ".join(["word"] * 399)  # under max_chat_chars, over the 256-token context

    def ask(text):
        try:
            r = client.chat.completions.create(model="dreamllm", messages=[{"role": "user", "content": text}],
                                               max_tokens=3, extra_body={"max_images": 0})
            return r.choices[0].message.content
        except openai.BadRequestError as e:
            return e

    with ThreadPoolExecutor(2) as pool:
        bad, good = pool.map(ask, [too_long, "hello"])
    assert isinstance(bad, openai.BadRequestError) and "does not fit the context" in bad.message
    assert isinstance(good, str) and good


# ------------------------------------------------------- the playground page
# Chromium's own background connections are refused by closed networks (and slow start-up): keep it quiet.
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1000, "height": 700}  # the size of docs/playground.png
UI_TIMEOUT_MS = 120_000  # a debug-model answer or image on a busy 2-core machine


def _get(server: str, path: str):
    with urllib.request.urlopen(server + path, timeout=60) as r:
        return r.status, r.headers, r.read().decode()


def test_the_playground_page_is_served_at_the_root_and_loads_nothing_from_elsewhere(server):
    status, headers, page = _get(server, "/")  # no key: the page is public, the API behind it is not
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert "<title>DreamLLM playground</title>" in page
    assert not re.findall(r"https?://|(?:src|href|action)\s*=\s*[\"']?//", page, re.I)  # no other origin
    # Only the public API routes, by relative path (so the page also works under a route prefix).
    assert set(re.findall(r"api\(\"([^\"]+)\"", page)) == {"v1/models", "v1/chat/completions", "v1/images/generations"}
    csp = headers["content-security-policy"]  # and the browser is told to load nothing from elsewhere
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "img-src data:" in csp


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=UI_TIMEOUT_MS)
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: `make chromium` installs it (apt-get install chromium)")
    # Playwright gives each launch a fresh profile (user-data-dir) under TMPDIR, the checkout's .tmp.
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


def _open_playground(browser, server: str, key: str | None):
    """A fresh page (nothing remembered from other tests) on the playground, with `key` typed in."""
    page = browser.new_context(viewport=VIEWPORT).new_page()
    page.set_default_timeout(UI_TIMEOUT_MS)
    page.goto(server + "/")
    if key is not None:
        page.fill("#api-key", key)
        page.click("#load-models")
    return page


@pytest.fixture(scope="module")
def playground(browser, server):
    """One page for the happy paths (chat, then image creation), so that its screenshot shows both."""
    from playwright.sync_api import expect

    page = _open_playground(browser, server, KEY)
    expect(page.locator("#model option")).to_have_text(["dreamllm"])  # listed from GET /v1/models
    expect(page.locator("#error")).to_be_hidden()
    yield page
    page.context.close()


def _data_url_png(src: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix), src[:60]
    return _decode_b64_png(src[len(prefix):])


def test_the_playground_chats_about_an_uploaded_image_and_shows_the_created_image_in_place(playground):
    from playwright.sync_api import expect

    page = playground
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), "red").save(buf, format="PNG")
    page.set_input_files("#chat-files", files=[{"name": "red.png", "mimeType": "image/png", "buffer": buf.getvalue()}])
    expect(page.locator("#attachments img")).to_have_count(1)
    page.fill("#chat-text", "What colour is this picture? Draw one too.")
    page.fill("#max-tokens", "6")
    page.fill("#max-images", "1")
    with page.expect_request("**/v1/chat/completions") as sent:
        page.click("#send")
    body = json.loads(sent.value.post_data)  # OpenAI's shape: a stream, the upload as an image_url part
    assert body["stream"] is True and body["max_tokens"] == 6 and body["max_images"] == 1
    assert [p["type"] for p in body["messages"][0]["content"]] == ["image_url", "text"]
    expect(page.locator("#send")).to_be_enabled()  # the stream has ended
    expect(page.locator("#error")).to_be_hidden()
    user = page.locator(".msg.user").last
    assert _data_url_png(user.locator("img").get_attribute("src")).size == (40, 30)  # the upload, as sent
    answer = page.locator(".msg.assistant").last
    # The (biased) model opens with its image, then writes text: rendered in that order, no raw Markdown.
    kinds = answer.locator("[data-kind]").evaluate_all("nodes => nodes.map(n => n.dataset.kind)")
    assert kinds[:2] == ["image", "text"], kinds
    assert _data_url_png(answer.locator("img").first.get_attribute("src")).size == (NATIVE, NATIVE)
    text = "".join(answer.locator("[data-kind=text]").all_inner_texts())
    assert text.strip() and "data:image" not in text and "![" not in text
    # A second turn sends the first one back (its created image as an image part) and is answered too.
    page.fill("#chat-text", "And in one word?")
    page.fill("#max-images", "0")
    with page.expect_request("**/v1/chat/completions") as sent:
        page.click("#send")
    turns = json.loads(sent.value.post_data)["messages"]
    assert [t["role"] for t in turns] == ["user", "assistant", "user"]
    assert [p["type"] for p in turns[1]["content"]][:2] == ["image_url", "text"]
    expect(page.locator("#send")).to_be_enabled()
    expect(page.locator("#error")).to_be_hidden()
    expect(page.locator(".msg.assistant")).to_have_count(2)
    assert page.locator(".msg.assistant").last.locator("img").count() == 0


def test_the_playground_creates_an_image_with_the_steps_guidance_and_seed_it_was_given(playground, client, tmp_path):
    from playwright.sync_api import expect

    page = playground
    page.fill("#image-prompt", "a blue square")
    page.fill("#steps", "2")
    page.fill("#guidance", "4.5")
    page.fill("#seed", "21")
    page.click("#create")
    expect(page.locator("#images img")).to_have_count(1)
    expect(page.locator("#error")).to_be_hidden()
    shown = _data_url_png(page.locator("#images img").get_attribute("src"))
    # The same request through the API gives the same pixels: the fields reached the server as typed.
    same = client.images.generate(prompt="a blue square", extra_body={"steps": 2, "guidance_scale": 4.5, "seed": 21})
    assert np.array_equal(np.asarray(shown), np.asarray(_decode_b64_png(same.data[0].b64_json)))
    other = client.images.generate(prompt="a blue square", extra_body={"steps": 2, "guidance_scale": 4.5, "seed": 22})
    assert not np.array_equal(np.asarray(shown), np.asarray(_decode_b64_png(other.data[0].b64_json)))
    shot = page.screenshot(path=tmp_path / "playground.png")
    if os.environ.get("PLAYGROUND_SCREENSHOT"):  # e.g. docs/playground.png for the README
        Path(os.environ["PLAYGROUND_SCREENSHOT"]).write_bytes(shot)
    assert Image.open(tmp_path / "playground.png").size == (VIEWPORT["width"], VIEWPORT["height"])


def test_the_playground_shows_the_apis_errors_as_the_api_words_them(browser, server):
    from playwright.sync_api import expect

    page = _open_playground(browser, server, key=None)  # on load it lists models without a key
    _, missing = _raw(server, "GET", "/v1/models", key=None)
    expect(page.locator("#error")).to_have_text(missing["error"]["message"])
    page.fill("#api-key", "sk-wrong")
    page.click("#load-models")
    _, wrong = _raw(server, "GET", "/v1/models", key="sk-wrong")
    expect(page.locator("#error")).to_have_text(wrong["error"]["message"])  # "Incorrect API key provided."
    page.fill("#chat-text", "hi")
    page.click("#send")  # the chat route refuses the wrong key too, and the page keeps the input
    expect(page.locator("#send")).to_be_enabled()
    expect(page.locator("#error")).to_have_text(wrong["error"]["message"])
    assert page.locator(".msg").count() == 0 and page.input_value("#chat-text") == "hi"
    # With the right key, a value over this server's limit comes back as the API's message, word for word.
    page.fill("#api-key", KEY)
    page.fill("#image-prompt", "x")
    page.fill("#steps", "500")
    page.click("#create")
    _, over = _raw(server, "POST", "/v1/images/generations", b'{"prompt": "x", "steps": 500}')
    expect(page.locator("#error")).to_have_text(over["error"]["message"])
    assert page.locator("#images img").count() == 0
    page.context.close()


# ------------------------------------------------------------------ load, faults

def test_bounded_load_finishes_without_errors(client):
    """50 requests, 8 in flight at a time, image generation and chat mixed."""
    def one(i):
        if i % 2:
            r = client.images.generate(prompt=f"shape {i}", extra_body={"steps": 2})
            return len(r.data) == 1 and _decode_b64_png(r.data[0].b64_json).size == (NATIVE, NATIVE)
        r = client.chat.completions.create(model="dreamllm", messages=[{"role": "user", "content": f"hi {i}"}],
                                           max_tokens=4, extra_body={"max_images": 0})
        return bool(r.choices[0].message.content)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(50)))
    assert all(results), results
    print(f"50 requests, 8 concurrent: {time.perf_counter() - t0:.1f} s")


def test_a_dead_model_replica_does_not_take_the_ingress_down(server, client):
    import ray

    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True) if "DreamLLMModel" in a["name"]]
    assert replicas, "no model replica found"
    for a in replicas:
        ray.kill(ray.get_actor(a["name"], namespace=a["namespace"]), no_restart=True)
    # While Serve replaces the replica, model calls may fail -- as JSON errors, and the ingress keeps answering.
    status, body = _raw(server, "POST", "/v1/images/generations", b'{"prompt": "x", "steps": 2}')
    assert status in (200, 503), body
    if status == 503:
        _assert_openai_error(body, code="model_unavailable")
    assert [m.id for m in client.models.list().data] == ["dreamllm"]
    deadline = time.time() + 90
    while time.time() < deadline:  # and the app recovers once the new replica is up
        if _raw(server, "GET", "/healthz", key=None)[0] == 200:
            break
        time.sleep(1)
    r = client.images.generate(prompt="after the restart", extra_body={"steps": 2})
    assert len(r.data) == 1
