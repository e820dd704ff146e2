"""The OpenAI-compatible wire format: request models (validated, strict) and response models.

Requests are validated in pydantic's strict mode, so a wrong type (``"16"`` for
``max_tokens``, ``1`` for ``stream``) is a 400, not a silent coercion. Nothing that
would change the output is ignored: a field the server cannot honour, and any field
it does not know, is a 400 naming it (``unsupported()``).

Every OpenAI field, and what the server does with it (both endpoints unless noted):

    honoured   model (must name the served model), prompt (completions; one prompt), messages (chat),
               max_tokens, max_completion_tokens (chat), temperature, top_p, seed, stop, stream,
               stream_options.include_usage, n (1..16), presence_penalty, frequency_penalty,
               logit_bias (token id -> bias in [-100, 100]), logprobs (completions: 0..5; chat: bool),
               top_logprobs (chat: 0..20, needs logprobs), echo (completions; with max_tokens=0:
               prompt log-likelihoods), best_of (completions; n..16, not streamed)
    client     user: the client id (fair sharing between clients, metrics); a string of at most 256
    no effect  metadata, store, service_tier, prompt_cache_key, safety_identifier (accepted);
               chat: tools=[] / tool_choice "none" / parallel_tool_calls / response_format
               {"type": "text"} / modalities ["text"] (accepted: they ask for nothing)
    refused    suffix (completions, non-empty), and in chat: tools, tool_choice, functions,
               function_call, response_format other than text, audio, modalities other than
               text, prediction, reasoning_effort, verbosity, web_search_options; and every field
               not listed here (400 with ``param`` naming it)

Extensions (vLLM's sampling fields, with vLLM's semantics):
    top_k: int, -1 or 0 for all tokens; min_p: float in [0, 1];
    repetition_penalty: float > 0 (over prompt and output, as vLLM);
    min_tokens: int >= 0, stop tokens and strings cannot end generation before it;
    stop_token_ids: list of token ids ending generation; ignore_eos: bool.
And this server's own:
    priority: int >= 0, the request's scheduling priority (higher runs first).
    An objective (``llumnix_py.engines.types.Objective``; the official client sends these in
    ``extra_body``), one kind at most: ``ttft_ms`` and ``tbt_ms`` (a stream: token k due
    ttft_ms + k * tbt_ms after arrival); or ``deadline_ms`` (the whole response); or ``job_id``,
    ``job_deadline_ms`` and optionally ``job_calls_left`` (a call of a compound job). Times are
    numbers in (0, one week] of milliseconds; a request without one gets the server's default.
    conversation_id: string (1..256 characters) naming a multi-turn conversation: its turn's KV
        is kept in the host pool and the next turn with the same id reuses the prefix it shares.
        A job call without one is a turn of the conversation ``job:<job_id>`` (its job's calls
        share KV); ids starting with ``job:`` are otherwise reserved (400).
    return_token_ids: add ``token_ids`` (the generated ids) to each choice.
"""

from __future__ import annotations

from typing import Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP_SEQUENCES = 16
MAX_STOP_LENGTH = 256
MAX_STOP_TOKEN_IDS = 64
MAX_PRIORITY = 1 << 31
MAX_ID_LENGTH = 256  # user (client id) and conversation_id
MAX_N = 16  # n and best_of at most: each choice is a request of its own in the cluster
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for /v1/completions
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat
MAX_LOGIT_BIAS = 1024
MAX_OBJECTIVE_MS = 7 * 24 * 3600 * 1000.0
OBJECTIVE_FIELDS = ("ttft_ms", "tbt_ms", "deadline_ms", "job_id", "job_deadline_ms", "job_calls_left")
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
NO_EFFECT_FIELDS = frozenset({"metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier"})

# ----- requests --------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False

    @field_validator("continuous_usage_stats")
    @classmethod
    def _check_continuous(cls, v: bool) -> bool:
        if v:
            raise ValueError("continuous_usage_stats is not supported")
        return v


class GenerationRequest(_Strict):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="allow", strict=True)  # extras are refused in ``unsupported()``, by name

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(default=None, ge=1)  # None: the server's default (16)
    temperature: Optional[float] = Field(default=None, ge=0, allow_inf_nan=False)  # None: 1.0, as OpenAI
    top_p: Optional[float] = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    top_k: Optional[int] = Field(default=None, ge=-1)
    min_p: Optional[float] = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    presence_penalty: Optional[float] = Field(default=None, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: Optional[float] = Field(default=None, ge=-2, le=2, allow_inf_nan=False)
    repetition_penalty: Optional[float] = Field(default=None, gt=0, allow_inf_nan=False)
    logit_bias: Optional[Dict[str, float]] = None
    min_tokens: Optional[int] = Field(default=None, ge=0)
    seed: Optional[int] = Field(default=None, ge=-(1 << 63), lt=1 << 63)
    stop: Union[str, List[str], None] = None
    stop_token_ids: Optional[List[int]] = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    n: Optional[int] = Field(default=None, ge=1, le=MAX_N)
    priority: int = Field(default=0, ge=0, lt=MAX_PRIORITY)
    user: Optional[str] = Field(default=None, max_length=MAX_ID_LENGTH)  # the client id
    conversation_id: Optional[str] = Field(default=None, min_length=1, max_length=MAX_ID_LENGTH)
    ignore_eos: bool = False
    return_token_ids: bool = False
    ttft_ms: Optional[float] = Field(default=None, gt=0, le=MAX_OBJECTIVE_MS, allow_inf_nan=False)
    tbt_ms: Optional[float] = Field(default=None, gt=0, le=MAX_OBJECTIVE_MS, allow_inf_nan=False)
    deadline_ms: Optional[float] = Field(default=None, gt=0, le=MAX_OBJECTIVE_MS, allow_inf_nan=False)
    job_id: Optional[str] = Field(default=None, min_length=1, max_length=128)
    job_deadline_ms: Optional[float] = Field(default=None, gt=0, le=MAX_OBJECTIVE_MS, allow_inf_nan=False)
    job_calls_left: Optional[int] = Field(default=None, ge=1, le=1 << 16)

    def objective_fields(self) -> dict[str, Any]:
        """The objective fields this request set (empty: none, the server's default applies)."""
        return {k: getattr(self, k) for k in OBJECTIVE_FIELDS if getattr(self, k) is not None}

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

    @field_validator("stop_token_ids")
    @classmethod
    def _check_stop_ids(cls, v: Optional[List[int]]) -> Optional[List[int]]:
        if v is not None and (len(v) > MAX_STOP_TOKEN_IDS or any(t < 0 for t in v)):
            raise ValueError(f"stop_token_ids must be at most {MAX_STOP_TOKEN_IDS} non-negative token ids")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _check_bias(cls, v: Optional[Dict[str, float]]) -> Optional[Dict[str, float]]:
        if v is None:
            return None
        if len(v) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias may name at most {MAX_LOGIT_BIAS} tokens")
        for key, bias in v.items():
            if not key.isascii() or not key.isdigit() or len(key) > 10:
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias!r}")
        return v

    @property
    def stop_sequences(self) -> List[str]:
        return list(self.stop or [])  # a list after _check_stop

    @property
    def include_usage_in_stream(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def num_choices(self) -> int:
        return self.n or 1

    def logit_bias_pairs(self) -> tuple[tuple[int, float], ...]:
        return tuple((int(k), float(b)) for k, b in (self.logit_bias or {}).items())

    def num_logprobs(self) -> Optional[int]:
        """Top alternatives per generated token, None for no logprobs."""
        return None

    def num_prompt_logprobs(self) -> Optional[int]:
        """Top alternatives per prompt token (echo), None for no prompt logprobs."""
        return None

    def _no_effect(self, name: str, value: Any) -> bool:
        """Whether an extra field asks for nothing that changes the output."""
        return name in NO_EFFECT_FIELDS

    def unsupported(self) -> Optional[tuple[str, str]]:
        """``(param, message)`` for a requested feature the server does not support, else None."""
        for name, value in (self.model_extra or {}).items():
            if not self._no_effect(name, value):
                return name, f"{name} is not supported by this server"
        if self.stream_options is not None and not self.stream:
            return "stream_options", "stream_options is only allowed with stream=true"
        return None


class CompletionRequest(GenerationRequest):
    """``POST /v1/completions``.

    ``prompt`` is a string, a list of token ids, or a list holding exactly one
    string or one token-id list (batches of several prompts are not supported).
    ``max_tokens=0`` with ``echo`` scores the prompt without generating.
    """

    prompt: Any = Field(default=None, validate_default=True)
    max_tokens: Optional[int] = Field(default=None, ge=0)
    echo: Optional[bool] = None
    logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    best_of: Optional[int] = Field(default=None, ge=1, le=MAX_N)
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

    @property
    def num_generated(self) -> int:
        """Sequences generated per prompt (``best_of``, else ``n``)."""
        return self.best_of or self.num_choices

    def num_logprobs(self) -> Optional[int]:
        return self.logprobs

    def num_prompt_logprobs(self) -> Optional[int]:
        return self.logprobs if self.echo and self.logprobs is not None else None

    def unsupported(self) -> Optional[tuple[str, str]]:
        if self.suffix:
            return "suffix", "suffix is not supported"
        if self.max_tokens == 0 and not self.echo:
            return "max_tokens", "max_tokens=0 is only allowed with echo=true (prompt scoring)"
        if self.best_of is not None:
            if self.best_of < self.num_choices:
                return "best_of", f"best_of ({self.best_of}) must be >= n ({self.num_choices})"
            if self.stream and self.best_of > 1:
                return "best_of", "best_of > 1 cannot be streamed"
        return super().unsupported()


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    model_config = ConfigDict(extra="ignore", strict=True)  # tool_call_id, refusal, ...: no text to render

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


_CHAT_NO_EFFECT = {
    "tools": lambda v: v == [],
    "tool_choice": lambda v: v in (None, "none"),
    "parallel_tool_calls": lambda v: isinstance(v, bool),
    "response_format": lambda v: v == {"type": "text"},
    "modalities": lambda v: v == ["text"],
}


class ChatCompletionRequest(GenerationRequest):
    """``POST /v1/chat/completions``; ``max_completion_tokens`` is the newer name of ``max_tokens``."""

    messages: List[ChatMessage]
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    @field_validator("messages")
    @classmethod
    def _check_messages(cls, v: List[ChatMessage]) -> List[ChatMessage]:
        if not v:
            raise ValueError("messages must not be empty")
        return v

    @property
    def num_generated(self) -> int:
        return self.num_choices

    def requested_max_tokens(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def chat_messages(self) -> list[dict]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]

    def num_logprobs(self) -> Optional[int]:
        return (self.top_logprobs or 0) if self.logprobs else None

    def _no_effect(self, name: str, value: Any) -> bool:
        check = _CHAT_NO_EFFECT.get(name)
        return super()._no_effect(name, value) or (check is not None and check(value))

    def unsupported(self) -> Optional[tuple[str, str]]:
        if self.top_logprobs is not None and not self.logprobs:
            return "top_logprobs", "top_logprobs requires logprobs=true"
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
    logprobs: Optional[dict] = None  # {tokens, token_logprobs, top_logprobs, text_offset}
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
    logprobs: Optional[dict] = None  # {content: [{token, logprob, bytes, top_logprobs}]}
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
    logprobs: Optional[dict] = None
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
