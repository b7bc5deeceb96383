"""The OpenAI chat-completions wire format: request models (pydantic, as FastAPI validates them), the
error type every failure becomes, and builders for responses and server-sent-event chunks.

Source: OpenAI's API reference (Chat Completions: request body, ``chat.completion`` and
``chat.completion.chunk`` objects, error objects). Fields the official client sends that change nothing
here (``user``, ``metadata``, ``store``...) are accepted and ignored; fields that would change the
answer but are not implemented (``n`` > 1, logprobs, penalties, tools) are refused with a 400 naming
them, never silently dropped. Extra fields: ``top_k``, ``repetition_penalty`` (as vLLM/SGLang), and
``max_frames`` / ``max_tiles`` (Long-VITA's frame sampling and image tiling, capped by the server).
"""
from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

# ----------------------------------------------------------------------------------------- errors
ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
               413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class APIError(Exception):
    """A failure with its HTTP status, in OpenAI's error shape:
    ``{"error": {"message", "type", "param", "code"}}``. ``retry_after`` (seconds) sets the
    Retry-After header (429, 503)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.retry_after = retry_after

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}

    def __reduce__(self):  # picklable across ranks (all_gather_object)
        return (APIError, (self.status, self.message, self.param, self.code, self.retry_after))


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


# --------------------------------------------------------------------------------------- requests
class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class ImageURL(_Lenient):
    url: str
    detail: Optional[str] = None


class VideoURL(_Lenient):
    url: str


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ImagePart(_Lenient):
    type: Literal["image_url"]
    image_url: Union[ImageURL, str]


class VideoPart(_Lenient):
    """Our video part (vLLM's shape): ``{"type": "video_url", "video_url": {"url": "file:///v.mp4"}}``."""
    type: Literal["video_url"]
    video_url: Union[VideoURL, str]


Part = Annotated[Union[TextPart, ImagePart, VideoPart], Field(discriminator="type")]


class Message(_Lenient):
    role: Literal["system", "user", "assistant"]
    content: Union[str, list[Part]]


class StreamOptions(_Lenient):
    include_usage: bool = False


class ChatCompletionRequest(_Lenient):
    """POST /v1/chat/completions body. Absent sampling fields take the model's generation_config.json."""
    messages: list[Message] = Field(min_length=1)
    model: Optional[str] = None
    max_tokens: Optional[int] = Field(default=None, ge=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(default=None, ge=-1)
    repetition_penalty: Optional[float] = Field(default=None, gt=0.0)
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = 1
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    tools: Optional[list[Any]] = None
    response_format: Optional[dict] = None
    max_frames: Optional[int] = Field(default=None, ge=1)
    max_tiles: Optional[int] = Field(default=None, ge=1)

    def refuse_unsupported(self) -> None:
        """400 for settings that would change the answer but are not implemented."""
        if self.n != 1:
            raise bad_request(f"'n' must be 1 (one choice per request), got {self.n}", "n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise bad_request(f"'{name}' is not supported (use repetition_penalty), got {getattr(self, name)}",
                                  name)
        if self.logprobs or self.top_logprobs:
            raise bad_request("'logprobs' is not supported", "logprobs")
        if self.tools:
            raise bad_request("'tools' (function calling) is not supported", "tools")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise bad_request(f"'response_format' must be text, got {self.response_format.get('type')!r}",
                              "response_format")

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise bad_request(f"'stop' takes up to 4 non-empty strings, got {stops!r}", "stop")
        return stops


# -------------------------------------------------------------------------------------- responses
def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(cid: str, model: str, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int,
               timings: dict) -> dict:
    """A ``chat.completion`` object, plus our ``timings`` (seconds; see engine.Result)."""
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish_reason}],
            "usage": usage(prompt_tokens, completion_tokens), "timings": timings}


def chunk(cid: str, model: str, created: int, delta: dict | None = None, finish_reason: str | None = None,
          with_usage_field: bool = False, **extra) -> dict:
    """A ``chat.completion.chunk``; ``delta=None`` makes the usage-only chunk (empty choices)."""
    out = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}
    out["choices"] = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                                "finish_reason": finish_reason}]
    if with_usage_field:
        out["usage"] = None
    out.update(extra)
    return out
