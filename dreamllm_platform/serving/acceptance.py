"""The acceptance check of a served model: one chat request about a picture and one image request, through
the official `openai` client, against a running API; both saved.

Owns: what `make pipeline`'s serve step proves about the API a user will
call (a picture goes in and a text answer comes out; a prompt goes in and a
PNG comes out), and the files it leaves: chat_input.png, chat.json (question,
picture, answer) and created_image.png under `files`.
"""
from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass

from .. import storage
from ..data.synthetic import Scene
from ..storage import StorageConfig
from .config import AuthConfig


@dataclass
class AcceptanceRequests:
    """What to ask: a synthetic scene (colour, shape, position, size, background) and a question about it,
    and a prompt to draw."""

    scene: tuple[str, ...]
    question: str
    prompt: str
    seed: int = 0


def check_api(api: str, model: str, req: AcceptanceRequests, files: str, st: StorageConfig | None = None,
              auth: AuthConfig | None = None) -> dict:
    """Send both requests to the OpenAI-compatible `api` (…/v1) for `model`; returns the answers and file URIs.

    The API key is the one the served config's `auth` names (what its ingress checks), if any.
    Raises whatever the client raises on an error response: an API that cannot answer fails the check.
    """
    import openai

    from .limits import load_api_key

    key = (load_api_key(auth) if auth is not None else None) or "unused-on-an-open-api"
    client = openai.OpenAI(base_url=api, api_key=key, max_retries=2, timeout=300)
    buf = io.BytesIO()
    Scene(*req.scene).render(64).save(buf, format="PNG")
    storage.write_bytes(storage.join(files, "chat_input.png"), buf.getvalue(), st)
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    chat = client.chat.completions.create(
        model=model, max_tokens=16, seed=req.seed, extra_body={"max_images": 0},
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                               {"type": "text", "text": req.question}]}])
    answer = chat.choices[0].message.content
    storage.write_bytes(storage.join(files, "chat.json"), json.dumps(
        {"question": req.question, "image": "chat_input.png", "answer": answer}, indent=2).encode(), st)
    img = client.images.generate(model=model, prompt=req.prompt, n=1, response_format="b64_json",
                                 extra_body={"seed": req.seed})
    storage.write_bytes(storage.join(files, "created_image.png"), base64.b64decode(img.data[0].b64_json), st)
    return {"api": api, "chat_answer": answer, "chat": storage.join(files, "chat.json"),
            "chat_input": storage.join(files, "chat_input.png"),
            "created_image": storage.join(files, "created_image.png"), "prompt": req.prompt}
