"""OpenAI-shaped request and response bodies (pydantic), so existing OpenAI clients work unchanged.

Owns: the subset of OpenAI's chat-completions, image-generations and models
schemas this API serves, plus DreamLLM's extra request fields (sent by
clients as `extra_body`). Unknown request fields are refused (as OpenAI does)
so that a typo is an error, not a silently ignored setting. Range checks that
depend on the deployment's limits live in `limits.py`, not here.
"""
from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# Identifier-like strings have a fixed cap; prose (messages, prompts) is capped by `limits` in the ingress.
Name = Annotated[str, Field(max_length=256)]


# --------------------------------------------------------------------------- chat

class ImageURL(_Strict):
    url: str  # capped by limits.max_request_bytes and the image checks (a data URL is the image)
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]
    name: Name | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionRequest(_Strict):
    model: Name | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=1, description="one answer per request")
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Name | None = None
    # DreamLLM extras (extra_body): images the model may create in its answer, and how.
    max_images: int | None = Field(default=None, ge=0)
    image_steps: int | None = Field(default=None, ge=1)
    image_guidance_scale: float | None = Field(default=None, ge=1.0, le=30.0)


class ChatCompletionMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatCompletionMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: ChunkDelta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


# ------------------------------------------------------------------------- images

class ImageGenerationRequest(_Strict):
    prompt: str = Field(min_length=1)
    model: Name | None = None
    n: int = Field(default=1, ge=1)
    size: Name | None = Field(default=None, description="'auto' (the model's native size) or 'WxH', square")
    response_format: Literal["b64_json", "url"] = "b64_json"
    output_format: Literal["png", "jpeg", "webp"] = "png"
    user: Name | None = None
    # DreamLLM extras (extra_body).
    seed: int | None = Field(default=None, ge=0, lt=2**31 - 64)
    steps: int | None = Field(default=None, ge=1)
    guidance_scale: float | None = Field(default=None, ge=1.0, le=30.0)
    negative_prompt: str = ""


class ImageData(BaseModel):
    b64_json: str
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: str = "png"
    size: str


# ------------------------------------------------------------------------- models

class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "dreamllm"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ------------------------------------------------------------------------- errors

class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
