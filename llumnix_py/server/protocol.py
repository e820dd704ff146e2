"""The OpenAI-compatible wire format: request models (validated, strict) and response models.

Requests are validated in pydantic's strict mode, so a wrong type (``"16"`` for
``max_tokens``, ``1`` for ``stream``) is a 400, not a silent coercion. Unknown
fields are ignored: OpenAI clients send extras such as ``stream_options`` or
``frequency_penalty``. Fields the server cannot honour (``echo``, ``logprobs``,
``best_of`` > 1, ``n`` > 1) are rejected by ``unsupported()``.

Extensions (not in the OpenAI API):
    priority: int >= 0, the request's scheduling priority (higher runs first).
    ignore_eos: keep generating past the end-of-sequence token.
    return_token_ids: add ``token_ids`` (the generated ids) to each choice.
"""

from __future__ import annotations

from typing import Any, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP_SEQUENCES = 16
MAX_STOP_LENGTH = 256
MAX_PRIORITY = 1 << 31
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")

# ----- requests --------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class GenerationRequest(_Strict):
    """Fields shared by completions and chat completions."""

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(default=None, ge=1)  # None: the server's default (16)
    temperature: Optional[float] = Field(default=None, ge=0, allow_inf_nan=False)  # None: 1.0, as OpenAI
    top_p: Optional[float] = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    seed: Optional[int] = Field(default=None, ge=-(1 << 63), lt=1 << 63)
    stop: Union[str, List[str], None] = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    n: Optional[int] = None
    user: Optional[str] = None
    priority: int = Field(default=0, ge=0, lt=MAX_PRIORITY)
    ignore_eos: bool = False
    return_token_ids: bool = False

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v: Union[str, List[str], None]) -> Optional[List[str]]:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else list(v)
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
        for s in stops:
            if not s or len(s) > MAX_STOP_LENGTH:
                raise ValueError(f"each stop sequence must have 1 to {MAX_STOP_LENGTH} characters")
        return stops

    @property
    def stop_sequences(self) -> List[str]:
        return list(self.stop or [])  # a list after _check_stop

    @property
    def include_usage_in_stream(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def unsupported(self) -> Optional[tuple[str, str]]:
        """``(param, message)`` for a requested feature the server does not support, else None."""
        if self.n is not None and self.n != 1:
            return "n", "only n=1 is supported"
        return None


class CompletionRequest(GenerationRequest):
    """``POST /v1/completions``.

    ``prompt`` is a string, a list of token ids, or a list holding exactly one
    string or one token-id list (batches of several prompts are not supported).
    """

    prompt: Any = Field(default=None, validate_default=True)
    echo: Optional[bool] = None
    logprobs: Optional[int] = None
    best_of: Optional[int] = None
    suffix: Optional[str] = None

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, v: Any) -> Union[str, List[int]]:
        if v is None:
            raise ValueError("prompt is required")
        if isinstance(v, str):
            return v
        if not isinstance(v, list) or not v:
            raise ValueError("prompt must be a string, a list of token ids, or a list with one of those")
        if all(_is_token(t) for t in v):
            return v
        if len(v) != 1:
            raise ValueError("only one prompt per request is supported")
        inner = v[0]
        if isinstance(inner, str):
            return inner
        if isinstance(inner, list) and inner and all(_is_token(t) for t in inner):
            return inner
        raise ValueError("prompt must be a string, a list of token ids, or a list with one of those")

    def unsupported(self) -> Optional[tuple[str, str]]:
        if self.echo:
            return "echo", "echo is not supported"
        if self.logprobs is not None:
            return "logprobs", "logprobs is not supported"
        if self.best_of is not None and self.best_of != 1:
            return "best_of", "best_of > 1 is not supported"
        if self.suffix:
            return "suffix", "suffix is not supported"
        return super().unsupported()


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: str
    content: Union[str, List[TextPart]]
    name: Optional[str] = None

    @field_validator("role")
    @classmethod
    def _check_role(cls, v: str) -> str:
        if v not in CHAT_ROLES:
            raise ValueError(f"role must be one of {list(CHAT_ROLES)}")
        return v

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(GenerationRequest):
    """``POST /v1/chat/completions``; ``max_completion_tokens`` is the newer name of ``max_tokens``."""

    messages: List[ChatMessage]
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None

    @field_validator("messages")
    @classmethod
    def _check_messages(cls, v: List[ChatMessage]) -> List[ChatMessage]:
        if not v:
            raise ValueError("messages must not be empty")
        return v

    def requested_max_tokens(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def chat_messages(self) -> list[dict]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]

    def unsupported(self) -> Optional[tuple[str, str]]:
        if self.logprobs:
            return "logprobs", "logprobs is not supported"
        if self.top_logprobs:
            return "top_logprobs", "top_logprobs is not supported"
        return super().unsupported()


def _is_token(t: Any) -> bool:
    return isinstance(t, int) and not isinstance(t, bool)


# ----- responses -------------------------------------------------------------------------


class ErrorInfo(BaseModel):
    message: str
    type: str = "invalid_request_error"
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> "Usage":
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: Optional[str] = None
    token_ids: Optional[List[int]] = None  # extension: return_token_ids


class CompletionResponse(BaseModel):
    """A whole completion, or one stream chunk (same object in the OpenAI API)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: List[CompletionChoice]
    usage: Optional[Usage] = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: Optional[str] = None
    token_ids: Optional[List[int]] = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: List[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: None = None
    finish_reason: Optional[str] = None
    token_ids: Optional[List[int]] = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: List[ChatChunkChoice]
    usage: Optional[Usage] = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llumnix-py"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: List[ModelCard]
