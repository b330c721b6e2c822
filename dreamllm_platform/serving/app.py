"""The OpenAI-compatible HTTP ingress and the application builder.

Owns: the FastAPI routes (POST /v1/chat/completions, POST /v1/images/generations,
GET /v1/models, GET /healthz, and GET /: the playground page, package file
playground.html, which calls only those public routes), turning OpenAI requests
into model jobs and model results into OpenAI responses (created images inline as data URLs,
server-sent events for `stream: true`), OpenAI-style JSON errors for every
failure, and `build_app(cfg)` / `app_builder(args)`, which bind the model
reference and deployment options into a Serve application.

The ingress runs on CPU and never holds the model: a model replica that fails
or restarts turns into a 503 JSON error here while the ingress keeps serving.
Importing this module (or building the app) starts nothing and opens no
storage or tracking server; the model reference is resolved inside the model
replica.
"""
# No `from __future__ import annotations`: FastAPI must see real types on the routes (Serve re-wraps the
# methods, and string annotations would no longer resolve, turning `request: Request` into a query param).
import asyncio
import dataclasses
import importlib.resources
import json
import logging
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from dreamllm_platform import storage
from dreamllm_platform.sampling import data_url, encode_image

from .config import ServeConfig
from .limits import APIError, check_api_key, check_max, load_api_key, load_image, parse_size, read_json, \
    secure_auth
from .model import ChatJob, ChatResult, DreamLLMModel, Failure, ImageJob
from .schemas import (ChatChoice, ChatCompletion, ChatCompletionChunk, ChatCompletionMessage,
                      ChatCompletionRequest, ChunkChoice, ChunkDelta, ImageData, ImageGenerationRequest,
                      ImagesResponse, ModelCard, ModelList, Usage)

logger = logging.getLogger("ray.serve")

# The playground may load nothing from elsewhere and talk to this API only; images it shows are data URLs.
# Its script is inline (one file, no build step) and puts model output into the page as text, never as HTML.
PLAYGROUND_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:; "
                  "connect-src 'self'; base-uri 'none'; form-action 'none'")

api = FastAPI(title="DreamLLM", description="OpenAI-compatible chat and image generation with DreamLLM",
              docs_url=None, redoc_url=None)


# ------------------------------------------------------------------ errors
# Every failure leaves as {"error": {...}}: clients parse one shape and never see a traceback.

@api.exception_handler(APIError)
async def _api_error(_: Request, e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
    # Unknown routes (404) and wrong methods (405) from the router.
    return JSONResponse(APIError(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None)
                        .body(), status_code=e.status_code)


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
    return JSONResponse(APIError(400, f"Invalid request: {e.errors()[0].get('msg')}").body(), status_code=400)


@api.exception_handler(Exception)
async def _unexpected(_: Request, e: Exception) -> JSONResponse:
    logger.exception("unexpected error in the ingress")  # the trace goes to the replica log, not the client
    return JSONResponse(APIError(500, "Internal server error.", type="server_error").body(), status_code=500)


RETRY_AFTER = {"Retry-After": "1"}


def _overloaded(message: str) -> APIError:
    return APIError(503, message, type="server_error", code="overloaded", headers=RETRY_AFTER)


def _model_unavailable(e: BaseException) -> APIError:
    from ray.serve.exceptions import BackPressureError

    if isinstance(e, BackPressureError):  # the model replicas' queues are full (model.max_queued_requests)
        return _overloaded("The server is at capacity; retry later.")
    logger.warning("model deployment call failed: %r", e)
    return APIError(503, "The model is unavailable right now; retry later.", type="server_error",
                    code="model_unavailable", headers=RETRY_AFTER)


def _content_pieces(parts: list) -> list[str]:
    """The answer's parts as content strings: text as is, created images as Markdown data-URL images."""
    pieces, k = [], 0
    for p in parts:
        if isinstance(p, str):
            pieces.append(p)
        else:
            k += 1
            pieces.append(f"![image {k}]({data_url(p)})")
    return pieces


def _usage(result) -> Usage:
    return Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                 total_tokens=result.prompt_tokens + result.completion_tokens)


def _raise_failure(result):
    """A model-side `Failure` as the matching API error; anything else passes through."""
    if isinstance(result, Failure):
        if result.status == 503:  # the replica's decode loop is full (batching.text_max_waiting)
            raise _overloaded(result.message)
        raise APIError(result.status, result.message,
                       type="invalid_request_error" if result.status < 500 else "server_error")
    return result


async def _sse(cid: str, created: int, model: str, first, rest, include_usage: bool = False):
    """OpenAI's chunk stream: a role delta, the content as the model makes it (text deltas, and each
    created image as its Markdown data-URL piece when it is made), whatever the live stream could not
    send from the final result, a finish chunk, then [DONE].

    `first` and the async iterator `rest` are the model's stream: str deltas and PIL images (see
    `model._Streamer`), then a ChatResult or Failure.
    """
    def event(payload: dict) -> str:
        return f"data: {json.dumps(payload)}\n\n"

    def chunk(delta: ChunkDelta, finish: str | None = None) -> str:
        body = ChatCompletionChunk(id=cid, created=created, model=model,
                                   choices=[ChunkChoice(delta=delta, finish_reason=finish)]).model_dump()
        body["choices"][0]["delta"] = delta.model_dump(exclude_none=True)  # as OpenAI: only the fields set
        return event(body)

    yield chunk(ChunkDelta(role="assistant", content=""))
    sent, images, item = "", 0, first
    try:
        while not isinstance(item, (ChatResult, Failure)):
            if not isinstance(item, str):  # a created image, numbered as _content_pieces numbers them
                images += 1
                item = f"![image {images}]({await asyncio.to_thread(data_url, item)})"
            sent += item
            yield chunk(ChunkDelta(content=item))
            item = await rest.__anext__()
    except Exception as e:  # the model replica died mid-answer: the status line is gone, report in-stream
        yield event(_model_unavailable(e).body())
        return
    if isinstance(item, Failure):
        yield event(APIError(item.status, item.message, type="server_error").body())
        return
    full = "\n\n".join(await asyncio.to_thread(_content_pieces, item.parts))
    if not full.startswith(sent):  # cannot happen by construction; never resend what the client has
        logger.warning("streamed text is not a prefix of the final answer")
    rest_text = full[len(sent):] if full.startswith(sent) else ""
    if rest_text:
        yield chunk(ChunkDelta(content=rest_text))
    yield chunk(ChunkDelta(), item.finish_reason)
    if include_usage:  # as OpenAI: one more chunk, with no choices, that carries the usage
        yield event(ChatCompletionChunk(id=cid, created=created, model=model, choices=[],
                                        usage=_usage(item)).model_dump())
    yield "data: [DONE]\n\n"


# ----------------------------------------------------------------- ingress
# Everything the routes use must be defined above this class: @serve.ingress freezes the FastAPI app
# with a cloudpickle round trip at decoration time, which captures only the globals that exist by then.

@serve.deployment(name="OpenAIIngress")
@serve.ingress(api)
class OpenAIIngress:
    """Validates, authorises and translates requests; the model deployment does the work."""

    def __init__(self, model: DeploymentHandle, cfg: ServeConfig):
        self.model = model
        self.cfg = cfg
        self.limits = cfg.limits
        self.api_key = load_api_key(cfg.auth)
        if self.api_key is None:
            logger.warning("no API key configured (auth.api_key_env / auth.api_key_file): the API is open")
        self._info: dict | None = None
        self.playground = importlib.resources.files(__package__).joinpath("playground.html").read_text()

    async def _call(self, method: str, *args, timeout_s: float | None = None):
        """Await one model call; failures of the model deployment become JSON errors, never a crash here."""
        try:
            return await asyncio.wait_for(getattr(self.model, method).remote(*args),
                                          timeout=timeout_s or self.cfg.ingress.request_timeout_s)
        except asyncio.TimeoutError:
            raise APIError(504, "The model did not answer in time.", type="server_error", code="timeout") from None
        except Exception as e:  # actor death, back-pressure, replica start-up failure, ...
            raise _model_unavailable(e) from None

    async def _model_info(self) -> dict:
        if self._info is None:  # fixed for the life of the deployment: ask once
            self._info = await self._call("info", timeout_s=30)
        return self._info

    def _check_model_name(self, name: str | None) -> None:
        if name and name != self.cfg.model.name:
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{self.cfg.model.name}'.",
                           param="model", code="model_not_found")

    # ------------------------------------------------------------ routes
    @api.get("/", response_class=HTMLResponse)
    async def playground_page(self):
        """The playground (no auth: a static page; the key typed into it goes with each API call)."""
        return HTMLResponse(self.playground, headers={"Content-Security-Policy": PLAYGROUND_CSP,
                                                      "Cache-Control": "no-cache"})

    @api.get("/healthz")
    async def healthz(self):
        """Liveness of the ingress plus a short probe of the model deployment (no auth: for probes)."""
        try:
            await self._call("info", timeout_s=5)
            return {"status": "ok", "model": "ok"}
        except APIError:
            return JSONResponse({"status": "degraded", "model": "unavailable"}, status_code=503)

    @api.get("/v1/models")
    async def models(self, request: Request):
        check_api_key(request, self.api_key)
        return ModelList(data=[ModelCard(id=self.cfg.model.name, created=0)]).model_dump()

    @api.post("/v1/images/generations")
    async def images_generations(self, request: Request):
        check_api_key(request, self.api_key)
        req = await read_json(request, ImageGenerationRequest, self.limits)
        self._check_model_name(req.model)
        if req.response_format != "b64_json":
            raise APIError(400, "Only response_format='b64_json' is supported.", param="response_format",
                           code="unsupported_value")
        check_max(len(req.prompt), self.limits.max_prompt_chars, "prompt")
        check_max(len(req.negative_prompt), self.limits.max_prompt_chars, "negative_prompt")
        check_max(req.n, self.limits.max_n, "n")
        steps = req.steps or self.cfg.defaults.steps
        check_max(steps, self.limits.max_steps, "steps")
        native = (await self._model_info())["resolution"]
        side = parse_size(req.size, native, self.limits)
        job = ImageJob(prompt=req.prompt, n=req.n, steps=steps, seed=req.seed,
                       guidance_scale=req.guidance_scale or self.cfg.defaults.guidance_scale,
                       scheduler=self.cfg.defaults.scheduler, negative_prompt=req.negative_prompt)
        result = _raise_failure(await self._call("create_images", job))

        def encode() -> list[ImageData]:
            from PIL import Image

            return [ImageData(b64_json=encode_image(im if side == native else im.resize((side, side), Image.LANCZOS),
                                                    req.output_format)) for im in result]

        data = await asyncio.to_thread(encode)  # PNG encoding is CPU work: keep the event loop free
        return ImagesResponse(created=int(time.time()), data=data, output_format=req.output_format,
                              size=f"{side}x{side}").model_dump()

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        check_api_key(request, self.api_key)
        req = await read_json(request, ChatCompletionRequest, self.limits)
        self._check_model_name(req.model)
        job = await self._chat_job(req)
        cid, created, name = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), self.cfg.model.name
        if req.stream:
            return await self._stream(job, cid, created, name,
                                      bool(req.stream_options and req.stream_options.include_usage))
        result = _raise_failure(await self._call("chat", job))
        pieces = await asyncio.to_thread(_content_pieces, result.parts)
        return ChatCompletion(
            id=cid, created=created, model=name,
            choices=[ChatChoice(message=ChatCompletionMessage(content="\n\n".join(pieces)),
                                finish_reason=result.finish_reason)],
            usage=_usage(result)).model_dump()

    async def _stream(self, job: ChatJob, cid: str, created: int, name: str, include_usage: bool) -> StreamingResponse:
        """Server-sent events; the first item is awaited before answering so early failures stay 4xx/5xx."""
        try:
            gen = self.model.options(stream=True).chat_stream.remote(job)
            first = await asyncio.wait_for(gen.__anext__(), timeout=self.cfg.ingress.request_timeout_s)
        except asyncio.TimeoutError:
            raise APIError(504, "The model did not answer in time.", type="server_error", code="timeout") from None
        except Exception as e:
            raise _model_unavailable(e) from None
        _raise_failure(first)
        return StreamingResponse(_sse(cid, created, name, first, gen, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def _chat_job(self, req: ChatCompletionRequest) -> ChatJob:
        """OpenAI messages -> (role, items) turns plus decoded images, enforcing the limits."""
        max_tokens = req.max_completion_tokens or req.max_tokens or self.cfg.defaults.max_tokens
        check_max(max_tokens, self.limits.max_tokens,
                  "max_completion_tokens" if req.max_completion_tokens else "max_tokens")
        max_images = self.cfg.defaults.created_images if req.max_images is None else req.max_images
        check_max(max_images, self.limits.max_created_images, "max_images")
        image_steps = req.image_steps or self.cfg.defaults.steps
        check_max(image_steps, self.limits.max_steps, "image_steps")
        if req.messages[-1].role != "user":
            raise APIError(400, "The last message must have role 'user'.", param=f"messages.{len(req.messages) - 1}.role")

        # dreamllm's chat template has a fixed system prompt; a client's system text goes in front of
        # the first user turn so that it still reaches the model.
        system = [m.content if isinstance(m.content, str) else " ".join(p.text for p in m.content if p.type == "text")
                  for m in req.messages if m.role == "system"]
        turns: list[tuple[str, list[tuple[str, str]]]] = []
        urls: dict[str, tuple[str, str]] = {}
        for i, m in enumerate(req.messages):
            if m.role == "system":
                continue
            items: list[tuple[str, str]] = []
            parts = [m.content] if isinstance(m.content, str) else m.content
            for j, p in enumerate(parts):
                if isinstance(p, str):
                    items.append(("text", p))
                elif p.type == "text":
                    items.append(("text", p.text))
                else:
                    key = f"img{len(urls)}"
                    urls[key] = (p.image_url.url, f"messages.{i}.content.{j}.image_url.url")
                    items.append(("image", key))
            if not items:
                raise APIError(400, f"Message {i} has no content.", param=f"messages.{i}.content")
            turns.append((m.role, items))
        chars = sum(len(v) for _, items in turns for kind, v in items if kind == "text") + sum(map(len, system))
        check_max(chars, self.limits.max_chat_chars, "messages")
        if system:
            first_user = next(t for t in turns if t[0] == "user")
            first_user[1].insert(0, ("text", "\n".join(system)))
        if len(urls) > self.limits.max_images_per_request:
            raise APIError(400, f"The messages hold {len(urls)} images; this server allows at most "
                                f"{self.limits.max_images_per_request} per request.", param="messages",
                           code="limit_exceeded")
        # Decoding runs in threads: base64 + PIL (or an allow-listed download) would block the event loop.
        images = dict(zip(urls, await asyncio.gather(*(asyncio.to_thread(load_image, url, self.limits, param)
                                                       for url, param in urls.values()))))
        return ChatJob(turns=turns, images=images, max_tokens=max_tokens, temperature=req.temperature,
                       top_p=req.top_p, seed=req.seed, max_images=max_images, image_steps=image_steps,
                       image_guidance_scale=req.image_guidance_scale or self.cfg.defaults.guidance_scale,
                       scheduler=self.cfg.defaults.scheduler)


# ----------------------------------------------------------------- building

def _model_resources(cfg: ServeConfig) -> dict:
    """Ray actor options of a model replica: one GPU when present (or forced), else a CPU fraction."""
    use_gpu = cfg.model.use_gpu
    if use_gpu is None:
        import ray

        from dreamllm_platform.runtime import cluster_resources

        # Decided where the app is built (the driver or Serve's builder task), i.e. on the cluster.
        use_gpu = ray.is_initialized() and cluster_resources().gpus >= 1
    return {"num_cpus": cfg.model.num_cpus, "num_gpus": 1 if use_gpu else 0}


def check_model_ref(cfg: ServeConfig) -> None:
    """Fail early on a missing model reference or a local path that is no checkpoint (remote ones are
    checked when a replica loads them)."""
    if not cfg.model.uri:
        raise ValueError("model.uri is required: a DreamLLM checkpoint directory, file://, s3:// or models:/ URI "
                         "(e.g. --set model.uri=models:/dreamllm@champion)")
    if storage.is_local(cfg.model.uri):  # a local checkpoint is checked here, others on load
        local = storage.local_path(cfg.model.uri)
        if not (local / "dreamllm.json").is_file():
            raise ValueError(f"model.uri {cfg.model.uri}: not a DreamLLM checkpoint (no dreamllm.json there)")


def build_app(cfg: ServeConfig):
    """The Serve application for `cfg`: the ingress bound to a model deployment of `cfg.model.uri`.

    Call it where Ray is initialised (a driver or Serve's builder) so that `model.use_gpu: null` sees
    the cluster's GPUs; binding opens no storage.
    """
    check_model_ref(cfg)
    cfg = dataclasses.replace(cfg, auth=secure_auth(cfg.auth, cfg.http.host))
    m, g = cfg.model, cfg.ingress
    model = DreamLLMModel.options(
        ray_actor_options=_model_resources(cfg), max_ongoing_requests=m.max_ongoing_requests,
        max_queued_requests=m.max_queued_requests,
        autoscaling_config={"min_replicas": m.min_replicas, "max_replicas": m.max_replicas,
                            "target_ongoing_requests": m.target_ongoing_requests},
    ).bind(m, cfg.batching, cfg.tracking)
    return OpenAIIngress.options(
        ray_actor_options={"num_cpus": g.num_cpus}, max_ongoing_requests=g.max_ongoing_requests,
        autoscaling_config={"min_replicas": g.min_replicas, "max_replicas": g.max_replicas,
                            "target_ongoing_requests": g.target_ongoing_requests},
    ).bind(model, cfg)


def app_builder(args: dict):
    """Entry point for `serve run` / `serve deploy` (import_path `dreamllm_platform.serving.app:app_builder`).

    `args` takes the jobs' interface: `config` (a YAML path, optional) and `set` (a list of
    `dotted.key=value` overrides).
    """
    from dreamllm_platform.config import load_config

    unknown = sorted(set(args) - {"config", "set"})
    if unknown:
        raise ValueError(f"unknown application arg(s) {unknown}; valid args: config, set")
    overrides = args.get("set") or []
    if isinstance(overrides, str):
        overrides = [overrides]
    return build_app(load_config(ServeConfig, args.get("config"), overrides))
