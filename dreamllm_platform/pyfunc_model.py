"""The `pyfunc` flavor of a registered DreamLLM: what `mlflow.pyfunc.load_model("models:/dreamllm@champion")` returns.

Owns: the request format of the pyfunc model and answering it with
`dreamllm.generation` (chat, text-to-image, free-form interleaved documents);
sampling defaults and image decoding/encoding are `dreamllm_platform.sampling`'s,
shared with the Serve app.
The logged model holds no weights, only the checkpoint URI in its model
config; `load_context` loads that checkpoint with `load_checkpoint_uri`
(object storage is downloaded once per node).

This module subclasses MLflow's `PythonModel` (the interface MLflow calls) but
never talks to a tracking server or registry: that is `tracking`'s and
`model_registry`'s job alone.

Requests (a dict, a list of dicts, or a DataFrame with one request per row):
  {"task": "chat", "messages": [{"role": "user", "content": "What colour is it?"
        | [{"type": "text", "text": ...}, {"type": "image", "image": <base64 or data: URL>}]}],
   "max_tokens": 64, "temperature": 0.0, "top_p": 1.0, "seed": null, "max_images": 0,
   "steps": 25, "guidance_scale": 7.5}
  {"task": "text_to_image", "prompt": "A red circle.", "n": 1, "steps": 25, "guidance_scale": 7.5,
   "scheduler": "dpm++", "negative_prompt": "", "seed": null}
  {"task": "document", "prompt": "A story:", "max_tokens": 128, "max_images": 2, "steps": 25, ...}
Answers (one per request, JSON-serialisable so `mlflow models serve` works too):
  {"text": "<all text parts joined>", "images": [<base64 PNG>, ...],
   "parts": [{"type": "text", "text": ...} | {"type": "image", "image": <base64 PNG>}, ...]}
"""
from __future__ import annotations

from typing import Any

import mlflow.pyfunc

from .sampling import decode_image, encode_image, image_sampling, text_sampling

# What a loaded model needs: the project's package (dreamllm + dreamllm_platform) in the same versions.
PIP_REQUIREMENTS = ["dreamllm-ray==0.1.0"]
TASKS = ("chat", "text_to_image", "document")


def _turns(messages: Any, where: str):
    """(turns, images) for `dreamllm.generation.chat` from OpenAI-like messages."""
    from dreamllm.sequence import Image, Text, Turn

    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}.messages: expected a non-empty list of messages")
    turns, images = [], {}
    for i, m in enumerate(messages):
        w = f"{where}.messages[{i}]"
        role = m.get("role") if isinstance(m, dict) else None
        if role == "system":
            continue  # the model's own system prompt is used (Vicuna template)
        if role not in ("user", "assistant"):
            raise ValueError(f"{w}.role: expected user, assistant or system, got {role!r}")
        content = m.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise ValueError(f"{w}.content: expected a string or a list of parts")
        items = []
        for j, p in enumerate(parts):
            kind = p.get("type") if isinstance(p, dict) else None
            if kind == "text":
                items.append(Text(str(p.get("text", ""))))
            elif kind == "image":
                key = f"m{i}p{j}"
                images[key] = decode_image(p.get("image"), f"{w}.content[{j}].image")
                items.append(Image(key))
            else:
                raise ValueError(f"{w}.content[{j}].type: expected text or image, got {kind!r}")
        turns.append(Turn(role, tuple(items)))
    if turns[-1].role != "user":
        raise ValueError(f"{where}.messages: the last message must be the user's")
    return turns, images


def _answer(parts: list) -> dict:
    out, texts, images = [], [], []
    for p in parts:
        if isinstance(p, str):
            texts.append(p)
            out.append({"type": "text", "text": p})
        else:
            images.append(encode_image(p))
            out.append({"type": "image", "image": images[-1]})
    return {"text": "\n".join(texts), "images": images, "parts": out}


def answer(model, request: dict, where: str = "request") -> dict:
    """Serve one request with a loaded `DreamLLM` (see the module docstring for the format)."""
    from dreamllm.generation import chat, generate_document, text_to_image

    if not isinstance(request, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(request).__name__}")
    task = request.get("task", "chat")
    image = image_sampling(request.get("steps"), request.get("guidance_scale"), request.get("scheduler"),
                           request.get("negative_prompt"), request.get("seed"))
    if task == "text_to_image":
        prompt = request.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"{where}.prompt: a non-empty string is required for text_to_image")
        return _answer(text_to_image(model, [prompt] * int(request.get("n", 1)), image))
    text = text_sampling(request.get("max_tokens"), request.get("temperature"), request.get("top_p"),
                         request.get("max_images", 2 if task == "document" else 0), request.get("seed"), image)
    if task == "chat":
        turns, images = _turns(request.get("messages"), where)
        return _answer(chat(model, turns, images, text))
    if task == "document":
        prompt = request.get("prompt")
        if not isinstance(prompt, str):
            raise ValueError(f"{where}.prompt: a string is required for document")
        return _answer(generate_document(model, prompt, text))
    raise ValueError(f"{where}.task: unknown task {task!r}; expected one of {', '.join(TASKS)}")


def as_requests(model_input: Any) -> list[dict]:
    """A list of request dicts from what pyfunc's `predict` may receive (dict, list of dicts, DataFrame)."""
    if isinstance(model_input, dict):
        return [model_input]
    if hasattr(model_input, "to_dict") and hasattr(model_input, "columns"):  # pandas.DataFrame
        return model_input.to_dict(orient="records")
    if isinstance(model_input, list):
        return model_input
    raise ValueError(f"expected a request dict, a list of them or a DataFrame, got {type(model_input).__name__}")


def load_checkpoint_uri(uri: str):
    """The `DreamLLM` (eval mode, CPU) of the checkpoint at storage URI `uri` (local, file:// or s3://).

    The pyfunc model's own loader. Its model config holds a storage URI (the
    registry stores one, never a models:/ reference), so storage and the
    checkpoint format suffice; `checkpoints.load_model` would also resolve
    references through the registry, which imports this module to write the
    model: an import cycle.
    """
    from dreamllm.checkpoint import load_checkpoint

    from . import storage

    # Keyed on the objects' content (as `checkpoints.cache_key`), never on the path alone.
    key = storage.listing_key(uri) if storage.is_remote(uri) else None
    return load_checkpoint(storage.download_dir(uri, storage.CHECKPOINT_CACHE_DIR, key=key), device="cpu")


class DreamLLMPyfunc(mlflow.pyfunc.PythonModel):
    """The pyfunc model: a DreamLLM checkpoint named by URI in the model config."""

    def load_context(self, context) -> None:
        uri = (context.model_config or {}).get("checkpoint_uri")
        if not uri:
            raise ValueError("this pyfunc model has no checkpoint_uri in its model_config")
        self.model = load_checkpoint_uri(uri)

    def predict(self, context, model_input, params=None) -> list[dict]:
        return [answer(self.model, r, f"request {i}") for i, r in enumerate(as_requests(model_input))]
