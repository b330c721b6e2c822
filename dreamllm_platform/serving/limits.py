"""Request guards of the ingress: API-key auth, body size, schema validation, input images, output sizes.

Owns: `APIError` (the one way a handler refuses a request: an HTTP status
plus OpenAI's error fields) and the checks that raise it; input images are
decoded by `dreamllm_platform.sampling`, whose refusals become `APIError`s here. Everything here runs
before the model sees a request, so a malformed, oversized or unauthorised
request costs the model replica nothing. Messages name the offending field
(`param`) and what was expected; they never carry a stack trace.
"""
from __future__ import annotations

import dataclasses
import hmac
import ipaddress
import json
import os
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlparse

from PIL import Image
from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from dreamllm_platform.sampling import ImageInputError, decode_image, open_image

from .config import AuthConfig, LimitsConfig

M = TypeVar("M", bound=BaseModel)

_DATA_URL = re.compile(r"^data:image/(png|jpeg|jpg|webp|gif|bmp);base64,(.*)$", re.DOTALL)


class APIError(Exception):
    """A refused request: rendered as {"error": {message, type, param, code}} with `status`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# --------------------------------------------------------------------------- auth

def load_api_key(cfg: AuthConfig) -> str | None:
    """The configured key (secret file first, then the environment variable), or None when auth is off."""
    key = None
    if cfg.api_key_file:
        p = Path(cfg.api_key_file)
        if not p.is_file():
            raise ValueError(f"auth.api_key_file {p} does not exist")
        key = p.read_text().strip() or None
    if key is None and cfg.api_key_env:
        key = os.environ.get(cfg.api_key_env, "").strip() or None
    if key is None and cfg.require_api_key:
        raise ValueError(f"auth.require_api_key is set but no key was found in "
                         f"{cfg.api_key_file or '(no file)'} or ${cfg.api_key_env or '(no variable)'}")
    return key


def secure_auth(auth: AuthConfig, host: str) -> AuthConfig:
    """The auth the ingress replicas enforce for an API bound to `host`.

    On loopback, `auth` as it is (no key: an open API on this machine only). Elsewhere a key must be found
    here (ValueError naming both ways out otherwise) and every replica must find one too (`require_api_key`),
    so that a secret missing on one node fails its deployment instead of opening the API, unless
    `auth.allow_open` says an open API is meant.
    """
    if auth.allow_open or is_loopback(host):
        return auth
    if load_api_key(auth) is None:
        raise ValueError(f"http.host {host} exposes the API beyond this machine but no API key was found "
                         f"(${auth.api_key_env or '(no variable)'} or auth.api_key_file {auth.api_key_file or '(none)'}): "
                         f"set one, or set auth.allow_open=true to serve an open API")
    return dataclasses.replace(auth, require_api_key=True)


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable from this machine only (127.0.0.0/8, ::1, localhost)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:  # a host name or 0.0.0.0-style wildcard: other machines may reach it
        return False


def check_api_key(request: Request, key: str | None) -> None:
    """401 unless the request carries `Authorization: Bearer <key>` (no-op when no key is configured)."""
    if key is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise APIError(401, "Missing API key: send 'Authorization: Bearer <key>'.", code="invalid_api_key")
    # Constant-time comparison: response timing must not leak how much of a guess was right.
    if not hmac.compare_digest(given.strip().encode(), key.encode()):
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")


# ------------------------------------------------------------------ body + schema

async def read_json(request: Request, schema: type[M], limits: LimitsConfig) -> M:
    """The request body parsed into `schema`; 413 when larger than the cap, 400 when not valid."""
    cap = limits.max_request_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > cap:
        raise APIError(413, f"Request body of {declared} bytes exceeds the limit of {cap} bytes.",
                       code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():  # counted as it arrives: chunked bodies have no content-length
        size += len(chunk)
        if size > cap:
            raise APIError(413, f"Request body exceeds the limit of {cap} bytes.", code="request_too_large")
        chunks.append(chunk)
    try:
        payload = json.loads(b"".join(chunks))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise APIError(400, f"Request body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:  # nesting deeper than the parser's stack: never a 500
        raise APIError(400, "Request body is nested too deeply.", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise APIError(400, "Request body must be a JSON object.", code="invalid_json")
    try:
        return schema.model_validate(payload)
    except ValidationError as e:
        errors = sorted(e.errors(), key=lambda err: -len(err["loc"]))  # the deepest error is the most specific
        param = _param(errors[0]["loc"])
        # A value matching no branch of a union (content: str | list) fails once per branch: say so in one line.
        msgs = list(dict.fromkeys(err["msg"] for err in errors if _param(err["loc"]) == param))
        # Errors on a parent path are the other union branches of this same value, not further mistakes.
        more = sum(not param.startswith(_param(err["loc"])) for err in errors)
        tail = f" (and {more} more error(s))" if more else ""
        raise APIError(400, f"Invalid value for '{param}': {' or '.join(msgs)}{tail}", param=param or None,
                       code="invalid_value") from None


def _param(loc: tuple) -> str:
    """pydantic's error location as the JSON path the client sent (union-branch labels dropped)."""
    out, i = [], 0
    while i < len(loc):
        p = loc[i]
        if isinstance(p, str) and (p == "str" or "[" in p):
            if "tagged-union" in p and i + 2 < len(loc) and isinstance(loc[i + 1], int):
                out.append(str(loc[i + 1]))  # the list index; the discriminator tag after it is skipped
                i += 3
                continue
            i += 1
            continue
        out.append(str(p))
        i += 1
    return ".".join(out)


def check_max(value: int, cap: int, param: str) -> None:
    if value > cap:
        raise APIError(400, f"'{param}' is {value}; this server allows at most {cap}.", param=param,
                       code="limit_exceeded")


# ---------------------------------------------------------------------- images in

def _refused(e: ImageInputError, param: str) -> APIError:
    return APIError(400, str(e), param=param, code=e.code)


def _fetch(url: str, limits: LimitsConfig, param: str) -> bytes:
    class _NoRedirect(urllib.request.HTTPRedirectHandler):
        # A redirect could lead off the allow-list; refuse it instead of following.
        def redirect_request(self, *args, **kwargs):
            return None

    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(url, timeout=limits.remote_image_timeout_s) as resp:
            data = resp.read(limits.max_request_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise APIError(400, f"'{param}': could not fetch {url}: {getattr(e, 'reason', e)}", param=param,
                       code="image_fetch_failed") from None
    if len(data) > limits.max_request_bytes:
        raise APIError(400, f"'{param}': the image at {url} exceeds {limits.max_request_bytes} bytes.",
                       param=param, code="image_too_large")
    return data


def load_image(url: str, limits: LimitsConfig, param: str) -> Image.Image:
    """An RGB image from a base64 data URL, or from http(s) when its host is allow-listed.

    Blocking (decoding, maybe a download): call it from a worker thread.
    """
    if _DATA_URL.match(url):
        try:
            return decode_image(url, param, limits.max_image_pixels)
        except ImageInputError as e:
            raise _refused(e, param) from None
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https"):
        if parsed.hostname not in limits.allowed_image_hosts:
            raise APIError(400, f"'{param}': remote images are not allowed from host {parsed.hostname!r}; "
                                "send the image inline as a data:image/...;base64 URL.",
                           param=param, code="remote_image_not_allowed")
        data = _fetch(url, limits, param)
        try:
            return open_image(data, param, limits.max_image_pixels)
        except ImageInputError as e:
            raise _refused(e, param) from None
    raise APIError(400, f"'{param}' must be a data:image/<png|jpeg|webp|gif>;base64,... URL.", param=param,
                   code="invalid_image")


# --------------------------------------------------------------------- images out

def parse_size(size: str | None, native: int, limits: LimitsConfig) -> int:
    """Side in pixels of generated images: 'auto'/None is the model's native size; 'NxN' is resized to.

    Only square sizes are supported: the model creates square images.
    """
    if size in (None, "", "auto"):
        return native
    m = re.fullmatch(r"(\d+)x(\d+)", size)
    ok = m is not None and m.group(1) == m.group(2) and 16 <= int(m.group(1)) <= limits.max_output_side
    if not ok:
        raise APIError(400, f"Invalid size {size!r}: use 'auto' ({native}x{native}, the model's native size) or a "
                            f"square 'NxN' with 16 <= N <= {limits.max_output_side}.", param="size",
                       code="invalid_size")
    return int(m.group(1))
