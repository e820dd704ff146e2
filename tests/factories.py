"""Factory helpers shared by the tests (preferred over fixtures, see STYLE.md "Tests").

- ``small_model_config(dtype)``: a tiny Llama (2 layers, hidden 64) that runs in
  milliseconds on a CPU; use ``dtype="float64"`` where tokens must be identical
  across different batch compositions.
- ``make_engine(kind, ...)``: an ``EngineCore`` over the tiny model (``"torch"``)
  or over ``SimExecutor`` (``"sim"``, scheduling only, no model).
- ``make_requests(n, seed=...)``: seeded random requests.
- ``run_to_completion(engine)`` / ``run_engines(engines)``: step until done,
  checking engine invariants after every step and that each request's output
  indices are consecutive; return the tokens per request.
- ``AcceptingHandler``: a migration-server handler that accepts every valid
  message (pre-allocations get block ids ``0..n-1``) and records it.
"""

from __future__ import annotations

import dataclasses
import random
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence

from llumnix_py.engines.core import EngineConfig, EngineCore
from llumnix_py.engines.sim.executor import SimExecutor
from llumnix_py.engines.sim.profiles import LLAMA_7B_A10
from llumnix_py.engines.torch_engine.engine import make_torch_engine
from llumnix_py.engines.torch_engine.model import ModelConfig
from llumnix_py.engines.types import FinishReason, Request, SamplingParams, StepOutput
from migration import wire

SMALL_VOCAB = 320  # the small model's (and ByteTokenizer's) vocabulary size
_ENGINE_FIELDS = {f.name for f in dataclasses.fields(EngineConfig)}


def small_model_config(dtype: str = "float32", **overrides) -> ModelConfig:
    """A tiny Llama: 2 layers, hidden 64, 4 heads, 2 KV heads, vocab 320, 512 positions."""
    kw = dict(vocab_size=SMALL_VOCAB, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
              num_kv_heads=2, max_position_embeddings=512, dtype=dtype, seed=0)
    kw.update(overrides)
    return ModelConfig(**kw)


def make_engine(
    kind: str = "torch",
    *,
    num_blocks: int = 64,
    block_size: int = 16,
    max_batch_size: int = 16,
    dtype: str = "float32",
    model: Optional[ModelConfig] = None,
    max_model_len: Optional[int] = None,
    **kw,
) -> EngineCore:
    """An engine for tests.

    Args:
        kind: ``"torch"`` (the built-in engine over ``model``, default the small
            model in ``dtype``) or ``"sim"`` (``SimExecutor`` with the LLaMA-7B/A10
            cost profile and a 320-token vocabulary).
        max_model_len: cap on prompt + output tokens (torch engine only).
        **kw: other ``EngineConfig`` fields (``watermark``, ``max_batched_tokens``,
            ``eos_token_id``, ``preemption_policy``). The torch engine takes its
            ``eos_token_id`` from the tokenizer (257) unless one is given.
    """
    unknown = set(kw) - _ENGINE_FIELDS
    if unknown:
        raise TypeError(f"make_engine: unknown arguments {sorted(unknown)}")
    config = EngineConfig(num_blocks=num_blocks, block_size=block_size, max_batch_size=max_batch_size, **kw)
    if kind == "torch":
        return make_torch_engine(engine=config, model=model or small_model_config(dtype), max_model_len=max_model_len)
    if kind == "sim":
        if model is not None or max_model_len is not None:
            raise TypeError("make_engine: the sim engine has no model")
        return EngineCore(config, SimExecutor(LLAMA_7B_A10, vocab_size=SMALL_VOCAB, eos_token_id=config.eos_token_id,
                                             num_host_blocks=config.num_host_blocks))
    raise ValueError(f"make_engine: unknown kind {kind!r} (torch or sim)")


def make_requests(
    n: int,
    *,
    seed: int,
    prompt_len: tuple[int, int] = (4, 40),
    max_tokens: int = 16,
    sampling: str = "greedy",
    prefix: str = "r",
    vocab_size: int = SMALL_VOCAB,
    ignore_eos: bool = True,
    priority: int = 0,
) -> list[Request]:
    """``n`` seeded random requests ``{prefix}{i}`` with arrival times ``0, 1, 2, ...``.

    Args:
        prompt_len: inclusive range of prompt lengths.
        sampling: ``"greedy"``; ``"seeded"`` (temperature 0.8, top_p 0.9, a seed
            per request); ``"mixed"`` (alternating greedy and seeded).
        ignore_eos: default True so that output lengths are predictable
            (``max_tokens``) whatever the random weights produce.
    """
    if sampling not in ("greedy", "seeded", "mixed"):
        raise ValueError(f"make_requests: unknown sampling {sampling!r}")
    rng = random.Random(seed)
    lo, hi = prompt_len
    out = []
    for i in range(n):
        prompt = tuple(rng.randrange(vocab_size) for _ in range(rng.randint(lo, hi)))
        seeded = sampling == "seeded" or (sampling == "mixed" and i % 2 == 1)
        if seeded:
            sp = SamplingParams(max_tokens=max_tokens, temperature=0.8, top_p=0.9, seed=rng.randrange(2**32),
                                ignore_eos=ignore_eos)
        else:
            sp = SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos)
        out.append(Request(f"{prefix}{i}", prompt, sp, priority=priority, arrival_time=float(i)))
    return out


@dataclass
class RunResult:
    """What a run produced: tokens and finish reason per request, and every StepOutput."""

    tokens: dict[str, list[int]] = field(default_factory=dict)
    finish_reasons: dict[str, FinishReason] = field(default_factory=dict)
    steps: list[StepOutput] = field(default_factory=list)

    def record(self, out: StepOutput) -> None:
        """Add one step's outputs; asserts indices are consecutive and nothing follows a finish."""
        self.steps.append(out)
        for o in out.outputs:
            assert o.request_id not in self.finish_reasons, f"{o.request_id}: output after it finished"
            got = self.tokens.setdefault(o.request_id, [])
            assert o.index == len(got), f"{o.request_id}: output index {o.index}, expected {len(got)}"
            got.extend(o.new_token_ids)
            if o.finish_reason is not None:
                self.finish_reasons[o.request_id] = o.finish_reason


def run_engines(
    engines: Sequence[EngineCore],
    *,
    max_steps: int = 10_000,
    requests: Iterable[Request] = (),
    before_step: Optional[Callable[[int], None]] = None,
    check: bool = True,
    result: Optional[RunResult] = None,
) -> RunResult:
    """Step every engine in turn until none holds a request (frozen ones included).

    Outputs of all engines are merged per request id, so a request that moves
    between engines (migration) must continue its indices there.

    Args:
        requests: added to ``engines[0]`` first (convenience).
        before_step: called with the round number before each round (e.g. to migrate).
        check: call ``check_invariants`` on every engine after every step.
        result: a ``RunResult`` to continue; it is returned, updated. Requests the
            engines already hold whose id it lacks start from the outputs they
            have so far (so engines stepped by hand before can be run to the end).

    Raises ``AssertionError`` if the engines are not done after ``max_steps`` rounds.
    """
    assert engines, "run_engines needs at least one engine"
    for r in requests:
        engines[0].add_request(r)
    result = RunResult() if result is None else result
    for e in engines:
        for rid in e.request_ids():
            done = e.seqs[rid].output_token_ids
            if done and rid not in result.tokens:
                result.tokens[rid] = list(done)
    for round_no in range(max_steps):
        if not any(e.has_unfinished() or e.request_ids() for e in engines):
            return result
        if before_step is not None:
            before_step(round_no)
        for e in engines:
            result.record(e.step())
            if check:
                e.check_invariants()
    assert not any(e.has_unfinished() or e.request_ids() for e in engines), f"not done after {max_steps} steps"
    return result


def run_engine(engine: EngineCore, **kw) -> RunResult:
    """``run_engines([engine], **kw)``."""
    return run_engines([engine], **kw)


def run_to_completion(engine: EngineCore, max_steps: int = 10_000, **kw) -> dict[str, list[int]]:
    """Step ``engine`` until done; the tokens generated per request id."""
    return run_engines([engine], max_steps=max_steps, **kw).tokens


class AcceptingHandler:
    """A migration-server handler that accepts everything valid and records it (thread-safe)."""

    def __init__(self) -> None:
        self.messages: list[Any] = []
        self.lock = threading.Lock()

    def __call__(self, msg: Any, payload: Any) -> dict:
        with self.lock:
            self.messages.append(msg)
        if isinstance(msg, wire.PreAlloc):
            return wire.Reply(True, block_ids=tuple(range(msg.num_blocks))).to_header()
        return wire.Reply(True).to_header()
