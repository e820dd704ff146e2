"""Plain data shared by every engine adapter: requests, sampling, outputs, migration state.

Load snapshots live in ``llumnix_py.load``.

Everything here is a frozen or plain dataclass with no engine objects inside, so
it can cross a process boundary as msgpack (see ``to_wire``/``from_wire``).
"""

from __future__ import annotations

import array
import enum
import math
import sys
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional, Sequence as Seq

from llumnix_py.errors import InvalidRequestError

MAX_ADDRESS_LEN = 256
NORMAL_PRIORITY = 0
HIGH_PRIORITY = 1


MAX_LOGPROBS = 20  # top alternatives per token at most (OpenAI's chat limit)
MAX_LOGIT_BIAS = 1024  # entries of logit_bias at most
PENALTY_RANGE = 2.0  # presence and frequency penalties lie in [-2, 2], as in OpenAI's API
BIAS_RANGE = 100.0  # logit_bias values lie in [-100, 100]


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token (vLLM's semantics for every field).

    The logits of a step go through, in this order (``engines/torch_engine/sampler.py``):
    ``min_tokens`` (stop and end-of-sequence tokens banned while fewer outputs exist),
    ``logit_bias``, the penalties, then greedy argmax or temperature, ``min_p``,
    ``top_k``, ``top_p`` and a seeded draw.

    Attributes:
        max_tokens: number of tokens to generate at most (>= 1).
        temperature: 0 means greedy decoding; > 0 samples from softmax(logits / T).
        top_p: nucleus sampling mass in (0, 1].
        top_k: keep only the k most likely tokens; 0 keeps all.
        min_p: drop tokens less likely than ``min_p`` times the most likely one; in [0, 1].
        presence_penalty: subtracted once from the logit of every token generated so far; [-2, 2].
        frequency_penalty: subtracted from a token's logit once per time it was generated; [-2, 2].
        repetition_penalty: > 0; the logits of tokens in the prompt or the output are divided by
            it when positive and multiplied by it when negative (1 is off).
        logit_bias: ``(token_id, bias)`` pairs added to the logits; bias in [-100, 100].
        min_tokens: stop and end-of-sequence tokens cannot end generation before this many
            outputs (<= ``max_tokens``).
        seed: per-request seed; with it, sampling is reproducible whatever else
            is in the batch and across preemption and migration.
        stop_token_ids: generation ends after emitting one of these.
        ignore_eos: keep generating past the tokenizer's end-of-sequence token.
        logprobs: None for none; k in 0..20: each output token carries its log probability
            and the k most likely tokens with theirs (of the model's raw logits, as vLLM).
        prompt_logprobs: None for none; k in 0..20: the first output carries the log
            probability of each prompt token (None for the first) and its top k.
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0
    seed: Optional[int] = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: Optional[int] = None
    prompt_logprobs: Optional[int] = None

    def __post_init__(self) -> None:
        _check_int("max_tokens", self.max_tokens, 1)
        t = self.temperature
        if not _is_number(t) or not math.isfinite(t) or t < 0:
            raise InvalidRequestError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _is_number(self.top_p) or not (0.0 < self.top_p <= 1.0):
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p!r}")
        _check_int("top_k", self.top_k, 0)
        if not _is_number(self.min_p) or not (0.0 <= self.min_p <= 1.0):
            raise InvalidRequestError(f"min_p must be in [0, 1], got {self.min_p!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_number(v) or not -PENALTY_RANGE <= v <= PENALTY_RANGE:
                raise InvalidRequestError(f"{name} must be in [-2, 2], got {v!r}")
        r = self.repetition_penalty
        if not _is_number(r) or not math.isfinite(r) or r <= 0:
            raise InvalidRequestError(f"repetition_penalty must be a finite number > 0, got {r!r}")
        object.__setattr__(self, "logit_bias", _check_bias(self.logit_bias))
        _check_int("min_tokens", self.min_tokens, 0)
        if self.min_tokens > self.max_tokens:
            raise InvalidRequestError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise InvalidRequestError(f"seed must be an integer, got {self.seed!r}")
        if self.seed is not None and not (-(2**63) <= self.seed < 2**63):
            raise InvalidRequestError("seed must fit in 64 bits")
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        for t in self.stop_token_ids:
            if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                raise InvalidRequestError(f"stop_token_ids must be non-negative integers, got {t!r}")
        if not isinstance(self.ignore_eos, bool):
            raise InvalidRequestError(f"ignore_eos must be a boolean, got {self.ignore_eos!r}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None:
                _check_int(name, v, 0, MAX_LOGPROBS)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        """Whether the tokens so far change the logits (some penalty is on)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    def token_ids_used(self) -> list[int]:
        """Token ids the parameters name (stop tokens, biased tokens), to check against a vocabulary."""
        return list(self.stop_token_ids) + [t for t, _ in self.logit_bias]

    def to_wire(self) -> dict[str, Any]:
        d = asdict(self)
        d["stop_token_ids"] = list(self.stop_token_ids)
        d["logit_bias"] = [[t, b] for t, b in self.logit_bias]
        return d

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> "SamplingParams":
        if not isinstance(d, dict):
            raise InvalidRequestError("sampling params must be a mapping")
        allowed = {f.name for f in fields(cls)}
        extra = set(d) - allowed
        if extra:
            raise InvalidRequestError(f"unknown sampling fields: {sorted(extra)}")
        return cls(**d)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_int(name: str, v: Any, low: int, high: Optional[int] = None) -> None:
    if isinstance(v, bool) or not isinstance(v, int):
        raise InvalidRequestError(f"{name} must be an integer, got {v!r}")
    if v < low or (high is not None and v > high):
        where = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise InvalidRequestError(f"{name} must be {where}, got {v}")


def _check_bias(bias: Any) -> tuple[tuple[int, float], ...]:
    """``logit_bias`` as sorted ``(token_id, bias)`` pairs, validated (from pairs or a mapping)."""
    items = list(bias.items()) if isinstance(bias, dict) else bias
    if not isinstance(items, (list, tuple)) or len(items) > MAX_LOGIT_BIAS:
        raise InvalidRequestError(f"logit_bias must hold at most {MAX_LOGIT_BIAS} (token id, bias) pairs")
    out = {}
    for item in items:
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise InvalidRequestError("logit_bias entries must be (token id, bias) pairs")
        tok, b = item
        if isinstance(tok, bool) or not isinstance(tok, int) or not 0 <= tok <= MAX_TOKEN_ID:
            raise InvalidRequestError(f"logit_bias token ids must be non-negative integers, got {tok!r}")
        if not _is_number(b) or not -BIAS_RANGE <= b <= BIAS_RANGE:
            raise InvalidRequestError(f"logit_bias values must be in [-100, 100], got {b!r}")
        if tok in out:
            raise InvalidRequestError(f"logit_bias names token {tok} twice")
        out[tok] = float(b)
    return tuple(sorted(out.items()))


OBJECTIVE_KINDS = ("stream", "deadline", "job")
MAX_OBJECTIVE_MS = 7 * 24 * 3600 * 1000.0  # a week: longer objectives are mistakes, not objectives
MAX_JOB_ID_LEN = 128
MAX_JOB_CALLS = 1 << 16


@dataclass(frozen=True)
class Objective:
    """What a request must achieve to count as served (JITServe's three kinds of objective).

    Exactly one kind is set (JITServe, Zhang et al., arXiv 2504.20068, Section 2: latency-
    sensitive streams, deadline-sensitive calls, compound requests):

    * ``stream``: ``ttft_ms`` and ``tbt_ms``. Output token ``k`` (from 0) is due
      ``ttft_ms + k * tbt_ms`` after arrival: a token earlier than its due time may be
      held by the client, so a stream that runs ahead banks slack for later tokens.
    * ``deadline``: ``deadline_ms``: the whole response is due that long after arrival.
    * ``job``: one call of a compound job: ``job_id``, ``job_deadline_ms`` (the time left
      to the job's deadline, from this call's arrival) and ``job_calls_left`` (calls of the
      job still to run, this one included; None when unknown). The call is met when it ends
      before the job's deadline; a scheduler aims for its share (``target_ms``).

    Times are relative to the request's ``arrival_time``, so an objective means the same
    on every instance a request migrates to.
    """

    ttft_ms: Optional[float] = None
    tbt_ms: Optional[float] = None
    deadline_ms: Optional[float] = None
    job_id: Optional[str] = None
    job_deadline_ms: Optional[float] = None
    job_calls_left: Optional[int] = None

    def __post_init__(self) -> None:
        for name in ("ttft_ms", "tbt_ms", "deadline_ms", "job_deadline_ms"):
            v = getattr(self, name)
            if v is not None and (not _is_number(v) or not math.isfinite(v) or not 0 < v <= MAX_OBJECTIVE_MS):
                raise InvalidRequestError(f"{name} must be a number in (0, {MAX_OBJECTIVE_MS:.0f}], got {v!r}")
        stream = self.ttft_ms is not None or self.tbt_ms is not None
        job = self.job_id is not None or self.job_deadline_ms is not None or self.job_calls_left is not None
        kinds = int(stream) + int(self.deadline_ms is not None) + int(job)
        if kinds != 1:
            raise InvalidRequestError("an objective is one of: ttft_ms and tbt_ms (a stream), deadline_ms "
                                      "(a whole response), or job_id with job_deadline_ms (a compound job)")
        if stream and (self.ttft_ms is None or self.tbt_ms is None):
            raise InvalidRequestError("a stream objective needs both ttft_ms and tbt_ms")
        if job:
            if not isinstance(self.job_id, str) or not 0 < len(self.job_id) <= MAX_JOB_ID_LEN:
                raise InvalidRequestError(f"job_id must be a string of 1 to {MAX_JOB_ID_LEN} characters")
            if self.job_deadline_ms is None:
                raise InvalidRequestError("a job objective needs job_deadline_ms")
            if self.job_calls_left is not None:
                _check_int("job_calls_left", self.job_calls_left, 1, MAX_JOB_CALLS)

    @property
    def kind(self) -> str:
        """``stream``, ``deadline`` or ``job``."""
        if self.ttft_ms is not None:
            return "stream"
        return "deadline" if self.deadline_ms is not None else "job"

    @property
    def target_ms(self) -> float:
        """When the whole response should end, after arrival, for a scheduler aiming just in time:
        the deadline; for a job call its share of the job's time left (an unknown number of
        calls left counts as two); for a stream, infinite (its tokens have their own due times)."""
        if self.deadline_ms is not None:
            return self.deadline_ms
        if self.job_deadline_ms is not None:
            return self.job_deadline_ms / (self.job_calls_left or 2)
        return math.inf

    def due_s(self, k: int, num_tokens: int) -> float:
        """Seconds after arrival by which output token ``k`` of ``num_tokens`` must arrive to meet it."""
        if self.ttft_ms is not None:
            return (self.ttft_ms + k * self.tbt_ms) / 1e3  # type: ignore[operator]
        end = self.deadline_ms if self.deadline_ms is not None else self.job_deadline_ms
        return end / 1e3 if k == num_tokens - 1 else math.inf  # type: ignore[operator]

    def margin_s(self, arrival: float, token_times: "Seq[float]") -> float:
        """The least slack over the response's tokens (seconds; met iff >= 0): ``due - actual``.

        Args:
            arrival: the request's arrival time, on the clock of ``token_times``.
            token_times: when each output token arrived, in order (at least one).
        """
        if not token_times:
            raise ValueError("a margin needs at least one token")
        n = len(token_times)
        if self.ttft_ms is None:
            return arrival + self.due_s(n - 1, n) - token_times[-1]
        return min(arrival + self.due_s(k, n) - t for k, t in enumerate(token_times))

    def to_wire(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_wire(cls, d: Any) -> "Objective":
        if not isinstance(d, dict):
            raise InvalidRequestError("objective must be a mapping")
        extra = set(d) - {f.name for f in fields(cls)}
        if extra:
            raise InvalidRequestError(f"unknown objective fields: {sorted(extra)}")
        return cls(**d)


@dataclass(frozen=True)
class Request:
    """A request as handed to an engine.

    Attributes:
        request_id: unique id (a string, chosen by the caller).
        prompt_token_ids: the tokenized prompt (non-empty).
        sampling: sampling parameters.
        priority: ``NORMAL_PRIORITY`` (0) or higher; higher runs first.
        arrival_time: seconds on the runtime's clock; orders the waiting queue.
        reply_to: where the instance holding the request sends its tokens (a frontend's
            address; opaque to engines, travels with the request across migrations).
        objective: what the request must achieve (``Objective``); None for none.
        client_id: who sent it (the OpenAI ``user`` field); fairness counts service per client.
        conversation_id: the conversation this turn belongs to; when a turn ends its KV stays
            in the host pool and the next turn reuses the prefix its prompt shares with it.
            A call of a compound job that names no conversation is a turn of its job's
            (``job_kv_key``): the job's next call reuses the KV of this call's prompt and output
            as far as its prompt repeats them. A request naming both keeps its conversation
            (the client said where its history lives). Ids starting with ``job:`` are reserved.
    """

    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    priority: int = NORMAL_PRIORITY
    arrival_time: float = 0.0
    reply_to: str = ""
    objective: Optional[Objective] = None
    client_id: str = ""
    conversation_id: str = ""

    def __post_init__(self) -> None:
        if self.objective is not None and not isinstance(self.objective, Objective):
            raise InvalidRequestError("objective must be an Objective")
        if not isinstance(self.request_id, str) or not self.request_id:
            raise InvalidRequestError("request_id must be a non-empty string")
        object.__setattr__(self, "prompt_token_ids", tuple(self.prompt_token_ids))
        if not self.prompt_token_ids:
            raise InvalidRequestError(f"request {self.request_id}: prompt is empty")
        if isinstance(self.priority, bool) or not isinstance(self.priority, int) or self.priority < 0:
            raise InvalidRequestError(f"priority must be an integer >= 0, got {self.priority!r}")
        if not isinstance(self.reply_to, str) or len(self.reply_to) > MAX_ADDRESS_LEN:
            raise InvalidRequestError("reply_to must be a string of at most 256 characters")
        for name in ("client_id", "conversation_id"):
            if not isinstance(getattr(self, name), str) or len(getattr(self, name)) > MAX_ADDRESS_LEN:
                raise InvalidRequestError(f"{name} must be a string of at most 256 characters")
        job_key = job_kv_key(self.objective)
        if self.conversation_id.startswith(JOB_KEY_PREFIX) and self.conversation_id != job_key:
            raise InvalidRequestError(f"conversation_id must not start with {JOB_KEY_PREFIX!r} (reserved for jobs)")
        if not self.conversation_id and job_key:
            object.__setattr__(self, "conversation_id", job_key)


JOB_KEY_PREFIX = "job:"


def job_kv_key(objective: Optional[Objective]) -> str:
    """The conversation key under which a compound job's calls share KV ("" for a request that
    is no job call): ``job:<job_id>``, a prefix no client-named conversation may use."""
    if objective is None or objective.job_id is None:
        return ""
    return JOB_KEY_PREFIX + objective.job_id


class FinishReason(str, enum.Enum):
    STOP = "stop"  # a stop token was produced
    LENGTH = "length"  # max_tokens or the model's context was reached
    ABORT = "abort"  # aborted by the caller


@dataclass(frozen=True)
class TokenLogprob:
    """The log probability of one token at one position, and the most likely tokens there.

    Attributes:
        logprob: log probability of the token (of the model's raw distribution).
        top: ``(token_id, logprob)`` of the k most likely tokens, most likely first
            (ties by token id); k is the request's ``logprobs``/``prompt_logprobs``.
    """

    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class RequestOutput:
    """New tokens of one request from one engine step.

    ``index`` is the position (in the request's output) of ``new_token_ids[0]``,
    which lets a consumer drop duplicates and reorder across migrations.
    ``logprobs`` (when the request asked for them) has one entry per new token;
    ``prompt_logprobs`` (only with index 0, when asked for) one per prompt token,
    ``None`` for the first, which has no context.
    """

    request_id: str
    new_token_ids: tuple[int, ...]
    index: int
    finish_reason: Optional[FinishReason] = None
    logprobs: Optional[tuple[TokenLogprob, ...]] = None
    prompt_logprobs: Optional[tuple[Optional[TokenLogprob], ...]] = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class StepOutput:
    """What one ``EngineAdapter.step()`` produced.

    Attributes:
        outputs: one entry per request that produced a token or finished.
        duration_s: time the step took (wall time for real engines, cost-model
            time for the simulated engine).
        num_prefill_tokens / num_decode_tokens: work done in the step.
        preempted: ids of requests preempted (moved back to the waiting queue) in this step.
    """

    outputs: tuple[RequestOutput, ...] = ()
    duration_s: float = 0.0
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0
    preempted: tuple[str, ...] = ()


class SeqStatus(str, enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FROZEN = "frozen"  # removed from the batch for the stop-and-copy stage of a migration
    FINISHED = "finished"


@dataclass(frozen=True)
class MigrationRequestState:
    """Everything a destination needs to continue a request it did not start.

    The random-generator state is (``sampling.seed``, output position): sampling
    draws from a generator seeded by both, so no generator bytes need to travel.
    """

    request_id: str
    prompt_token_ids: tuple[int, ...]
    output_token_ids: tuple[int, ...]
    sampling: SamplingParams
    priority: int
    arrival_time: float
    num_preemptions: int
    status: SeqStatus  # RUNNING (KV blocks travel) or WAITING (re-queued)
    # Tokens whose KV is in the migrated blocks: all but the last for a RUNNING request; for a
    # WAITING one, 0, or the whole blocks of its conversation's stored prefix that travel with it.
    num_computed_tokens: int
    reply_to: str = ""
    objective: Optional[Objective] = None  # on the wire only when set (an optional key)
    client_id: str = ""  # see ``Request``
    conversation_id: str = ""
    # The client's lead over the least-served active client on the source's fairness
    # counters (``policies.fairness.lead``); None when the source shares unfairly. On the
    # wire only when set (an optional key); the destination lifts its counter with it.
    fair_lead: Optional[float] = None

    def to_wire(self) -> dict[str, Any]:
        d = self._wire_fields()
        if self.objective is not None:
            d["objective"] = self.objective.to_wire()
        if self.fair_lead is not None:
            d["fair_lead"] = self.fair_lead
        return d

    def _wire_fields(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "prompt_token_ids": _pack_ids(self.prompt_token_ids),
            "output_token_ids": _pack_ids(self.output_token_ids),
            "sampling": self.sampling.to_wire(),
            "priority": self.priority,
            "arrival_time": self.arrival_time,
            "num_preemptions": self.num_preemptions,
            "status": self.status.value,
            "num_computed_tokens": self.num_computed_tokens,
            "reply_to": self.reply_to,
            "client_id": self.client_id,
            "conversation_id": self.conversation_id,
        }

    @classmethod
    def from_wire(cls, d: Any) -> "MigrationRequestState":
        """Decode and validate a state received from the network."""
        if not isinstance(d, dict):
            raise InvalidRequestError("migration state must be a mapping")
        need = {"request_id", "prompt_token_ids", "output_token_ids", "sampling", "priority",
                "arrival_time", "num_preemptions", "status", "num_computed_tokens", "reply_to", "client_id",
                "conversation_id"}
        optional = {"objective", "fair_lead"}
        if set(d) - optional != need:
            raise InvalidRequestError(f"migration state fields differ: missing {sorted(need - set(d))}, "
                                      f"unexpected {sorted(set(d) - need - optional)}")
        lead = d.get("fair_lead")
        if "fair_lead" in d and (isinstance(lead, bool) or not isinstance(lead, (int, float))
                                 or not 0 <= lead <= MAX_FAIR_LEAD):
            raise InvalidRequestError(f"migration state fair_lead must be a number in [0, {MAX_FAIR_LEAD:g}]")
        ids = {key: _unpack_ids(d[key], key) for key in ("prompt_token_ids", "output_token_ids")}
        for key in ("priority", "num_preemptions", "num_computed_tokens"):
            if isinstance(d[key], bool) or not isinstance(d[key], int) or d[key] < 0:
                raise InvalidRequestError(f"migration state {key} must be a non-negative integer")
        if not isinstance(d["arrival_time"], (int, float)) or isinstance(d["arrival_time"], bool):
            raise InvalidRequestError("migration state arrival_time must be a number")
        try:
            status = SeqStatus(d["status"])
        except ValueError:
            raise InvalidRequestError(f"migration state status {d['status']!r} is not valid") from None
        if status not in (SeqStatus.RUNNING, SeqStatus.WAITING):
            raise InvalidRequestError("only running or waiting requests migrate")
        if not ids["prompt_token_ids"]:
            raise InvalidRequestError("migration state prompt is empty")
        total = len(ids["prompt_token_ids"]) + len(ids["output_token_ids"])
        if d["num_computed_tokens"] > total:
            raise InvalidRequestError("num_computed_tokens exceeds the sequence length")
        if status == SeqStatus.WAITING and d["num_computed_tokens"] and (
                d["num_computed_tokens"] >= total or not d["conversation_id"]):
            raise InvalidRequestError("a waiting request carries computed tokens only as a conversation's "
                                      "stored prefix: a conversation id and at least one token left to prefill")
        if not isinstance(d["request_id"], str) or not d["request_id"]:
            raise InvalidRequestError("migration state request_id must be a non-empty string")
        if not isinstance(d["reply_to"], str) or len(d["reply_to"]) > MAX_ADDRESS_LEN:
            raise InvalidRequestError("migration state reply_to must be a string of at most 256 characters")
        for key in ("client_id", "conversation_id"):
            if not isinstance(d[key], str) or len(d[key]) > MAX_ADDRESS_LEN:
                raise InvalidRequestError(f"migration state {key} must be a string of at most 256 characters")
        return cls(
            request_id=d["request_id"],
            prompt_token_ids=ids["prompt_token_ids"],
            output_token_ids=ids["output_token_ids"],
            sampling=SamplingParams.from_wire(d["sampling"]),
            priority=d["priority"],
            arrival_time=float(d["arrival_time"]),
            num_preemptions=d["num_preemptions"],
            status=status,
            num_computed_tokens=d["num_computed_tokens"],
            reply_to=d["reply_to"],
            objective=Objective.from_wire(d["objective"]) if "objective" in d else None,
            client_id=d["client_id"],
            conversation_id=d["conversation_id"],
            fair_lead=None if lead is None else float(lead),
        )


# Token ids travel as little-endian uint32 bytes: packing and checking 8k ids costs
# microseconds, which keeps the stop-and-copy stage (the migration's downtime) flat in length.
MAX_TOKEN_ID = 2**31 - 1
MAX_FAIR_LEAD = 1e15  # weighted tokens: far beyond any real service, finite (NaN and inf fail the range check)
MAX_WIRE_TOKENS = 1 << 22


def _pack_ids(ids: tuple[int, ...]) -> bytes:
    return array.array("I", ids).tobytes() if sys.byteorder == "little" else _swapped(ids)


def _swapped(ids: tuple[int, ...]) -> bytes:
    a = array.array("I", ids)
    a.byteswap()
    return a.tobytes()


def _unpack_ids(v: Any, key: str) -> tuple[int, ...]:
    if not isinstance(v, (bytes, bytearray)) or len(v) % 4 or len(v) > 4 * MAX_WIRE_TOKENS:
        raise InvalidRequestError(f"migration state {key} must be packed uint32 token ids")
    a = array.array("I")
    a.frombytes(bytes(v))
    if sys.byteorder != "little":
        a.byteswap()
    if a and max(a) > MAX_TOKEN_ID:
        raise InvalidRequestError(f"migration state {key} holds a token id above {MAX_TOKEN_ID}")
    return tuple(a)
