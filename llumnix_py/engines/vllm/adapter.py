"""``VLLMEngineAdapter``: a vLLM v1 engine core under llumnix-py, live migration included.

The adapter drives ``vllm.v1.engine.core.EngineCore`` directly (no tokenizer, no
output processor, no busy loop): requests go in as token ids, one ``step()`` is one
vLLM iteration (schedule, execute, update), and its ``EngineCoreOutput`` become our
``RequestOutput``. Private vLLM fields are reached only through ``_internals``.

How a migrated request continues on the destination::

    source (vLLM request r)                 destination (new vLLM request r')
    prompt P, outputs O, computed c         prompt P+O, outputs (), max_tokens - |O|
    blocks b0 b1 ... bk  ---- KV copy --->  reserved d0 d1 ... dk = r'.block table
                                            num_computed_tokens = c, queued holding KV:
                                            vLLM schedules it first, as a new request
                                            whose prompt is already computed up to c

The destination sees the tokens generated so far as part of the prompt, so its
worker learns the whole sequence the first time it is scheduled (vLLM sends a new
request whole, running ones only as deltas). Output positions stay right because
the adapter remembers ``|O|`` (``RequestOutput.index`` counts from the original
prompt). Greedy decoding continues exactly; a seeded sampled request continues
with a generator seeded by (seed, output position) instead of vLLM's generator
state, which does not travel.

Sampling fields go to vLLM's own ``SamplingParams`` (vLLM applies them). Because the
destination sees earlier outputs as prompt, ``repetition_penalty`` (prompt and output
alike) and ``min_tokens`` (counted down by the adapter) continue exactly, while
``presence_penalty`` and ``frequency_penalty`` (outputs only, in vLLM) no longer count the
outputs generated before the migration: a documented difference of this engine.
Log probabilities come from vLLM's outputs (raw logprobs, vLLM's default), prompt log
probabilities are collected over the prefill chunks and sent with the first token.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Optional, Sequence

import torch

from llumnix_py.engines.base import EngineAdapter
from llumnix_py.engines.sequence import cdiv
from llumnix_py.engines.types import (
    FinishReason,
    Request,
    RequestOutput,
    StepOutput,
    TokenLogprob,
)
from llumnix_py.engines.vllm._internals import VLLMInternals
from llumnix_py.engines.vllm.config import VLLMEngineConfig, prepare_environment
from llumnix_py.engines.vllm.migration import _PROCESS_LOCK, VLLMMigration, _Tracked
from llumnix_py.errors import InvalidRequestError, UnknownRequestError
from llumnix_py.load import InstanceLoad, RequestLoad

log = logging.getLogger(__name__)

_SEED_MIX = 0x9E3779B97F4A7C15


class VLLMEngineAdapter(VLLMMigration, EngineAdapter):
    """One vLLM engine core (single process) as an ``EngineAdapter``.

    Args:
        core: a built ``vllm.v1.engine.core.EngineCore``.
        config: the settings it was built from (watermark, limits).

    Use ``VLLMEngineAdapter.start(config)`` to build the core; ``close()`` shuts it down.
    """

    def __init__(self, core: Any, config: VLLMEngineConfig) -> None:
        from vllm.v1.request import RequestStatus

        self.core = core
        self.config = config
        self.vllm = VLLMInternals(core)
        self._status = RequestStatus
        vcfg = core.vllm_config
        self._block_size = int(vcfg.cache_config.block_size)
        self._max_model_len = int(vcfg.model_config.max_model_len)
        self._vocab_size = int(vcfg.model_config.get_vocab_size())
        self._eos = _eos_token_ids(vcfg.model_config.hf_config)
        self._watermark = max(int(self.vllm.num_total_blocks() * config.watermark), self.vllm.watermark_blocks())
        self._tracked: dict[str, _Tracked] = {}
        self._prealloc: dict[str, list] = {}  # incoming migrations: request id -> vLLM KVCacheBlock objects

    @classmethod
    def start(cls, config: VLLMEngineConfig) -> "VLLMEngineAdapter":
        """Build the engine core in this process (loads the model; seconds)."""
        prepare_environment(config.num_threads)
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)  # before vLLM's CPU worker disables this call
        from vllm.engine.arg_utils import EngineArgs
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.core import EngineCore
        from vllm.v1.executor import Executor

        from llumnix_py.engines.vllm._internals import check_version

        check_version()
        vllm_config = EngineArgs(**config.engine_args()).create_engine_config(UsageContext.ENGINE_CONTEXT)
        try:
            core = EngineCore(vllm_config, Executor.get_class(vllm_config), log_stats=False)
        except ValueError as exc:
            if "block size" in str(exc):
                raise ValueError(f"vLLM cannot use block_size={config.block_size} here: {exc} "
                                 f"(vLLM's CPU attention needs a multiple of 32)") from exc
            raise
        return cls(core, config)

    def close(self) -> None:
        self.core.shutdown()

    # ----- serving -----------------------------------------------------------------------------
    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def kv_block_bytes(self) -> int:
        itemsize = getattr(torch, self.vllm.kv_dtype.replace("torch.", "")).itemsize
        return math.prod(self.vllm.block_shape) * itemsize

    def add_request(self, request: Request) -> None:
        rid = request.request_id
        if rid in self._tracked or rid in self._prealloc or self.vllm.request(rid) is not None:
            raise InvalidRequestError(f"request {rid} already exists on this instance")
        self._validate_tokens(request.prompt_token_ids, len(request.prompt_token_ids), rid)
        self._validate_sampling(request)
        self.core.add_request(self._vllm_request(request, prior=()))
        self._tracked[rid] = _Tracked(request)

    def _validate_tokens(self, token_ids: Sequence[int], prompt_len: int, rid: str, ints_checked: bool = False) -> None:
        vocab = self._vocab_size
        if ints_checked:
            bad = [] if min(token_ids) >= 0 and max(token_ids) < vocab else [t for t in token_ids if not 0 <= t < vocab]
        else:
            bad = [t for t in token_ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"request {rid}: token ids {bad[:5]} outside the vocabulary (size {vocab})")
        if prompt_len >= self._max_model_len:
            raise InvalidRequestError(
                f"request {rid}: prompt of {prompt_len} tokens leaves no room for output "
                f"(model context is {self._max_model_len} tokens)")
        usable = self.vllm.num_total_blocks() - self._watermark
        if cdiv(len(token_ids), self.block_size) > usable:
            raise InvalidRequestError(
                f"request {rid}: {len(token_ids)} tokens need more KV blocks than this instance has ({usable})")

    def _validate_sampling(self, request: Request) -> None:
        bad = [t for t in request.sampling.token_ids_used() if t >= self._vocab_size]
        if bad:
            raise InvalidRequestError(f"request {request.request_id}: stop_token_ids/logit_bias name token ids "
                                      f"{bad[:5]} outside the vocabulary (size {self._vocab_size})")

    def _vllm_request(self, request: Request, prior: tuple[int, ...]):
        """vLLM's ``Request`` for ``request`` whose first ``len(prior)`` outputs are already known."""
        from vllm import SamplingParams as VSamplingParams
        from vllm.v1.engine import EngineCoreRequest

        sp = request.sampling
        remaining = sp.max_tokens - len(prior)
        if remaining < 1:
            raise InvalidRequestError(f"request {request.request_id}: no output tokens left to generate")
        seed = sp.seed
        if seed is not None and prior:  # vLLM's generator state does not travel: reseed by position
            seed = (seed * _SEED_MIX + len(prior)) % (1 << 63)
        vsp = VSamplingParams(**vllm_sampling_kwargs(sp, remaining, len(prior), seed))
        eos, more_eos = (self._eos[0], self._eos[1:]) if self._eos else (None, ())
        vsp.update_from_generation_config({"eos_token_id": list(self._eos)} if more_eos else {}, eos)
        ecr = EngineCoreRequest(
            request_id=request.request_id, prompt_token_ids=list(request.prompt_token_ids) + list(prior),
            mm_features=None, sampling_params=vsp, pooling_params=None, arrival_time=float(request.arrival_time),
            lora_request=None, cache_salt=None, data_parallel_rank=None, priority=-request.priority,
        )
        vreq, _ = self.core.preprocess_add_request(ecr)
        return vreq

    def abort_request(self, request_id: str) -> None:
        if request_id not in self._tracked:
            raise UnknownRequestError(f"request {request_id} is not on this instance")
        self.core.abort_requests([request_id])
        del self._tracked[request_id]

    def has_unfinished(self) -> bool:
        return self.core.scheduler.has_unfinished_requests()

    def step(self) -> StepOutput:
        if not self.core.scheduler.has_requests():
            return StepOutput()
        # vLLM's CPU attention sizes its metadata by this thread's OpenMP thread count, then
        # checks it in the kernel after torch has lazily applied its own count to the thread:
        # in a thread that is not the one that built the engine (a llumlet's engine loop) the
        # two differ unless torch initializes the thread first, which this call does.
        torch.get_num_threads()
        before = [(r, r.num_computed_tokens, r.num_tokens, r.num_preemptions)
                  for r in self.vllm.running() + self.vllm.waiting()]
        t0 = time.perf_counter()
        with _PROCESS_LOCK:
            outputs, executed = self.core.step()
            self.core.post_step(executed)
        duration = time.perf_counter() - t0
        prefill = decode = 0
        preempted = []
        for r, computed, num_tokens, preemptions in before:
            if r.num_preemptions > preemptions:
                preempted.append(r.request_id)
                continue
            done = r.num_computed_tokens - computed
            if done == 1 and computed == num_tokens - 1:
                decode += 1
            elif done > 0:
                prefill += done
        mapped = [self._output(o) for eco in outputs.values() for o in eco.outputs]
        return StepOutput(outputs=tuple(o for o in mapped if o is not None), duration_s=duration,
                          num_prefill_tokens=prefill, num_decode_tokens=decode, preempted=tuple(preempted))

    def _output(self, o: Any) -> Optional[RequestOutput]:
        rec = self._tracked.get(o.request_id)
        if rec is None:
            return None
        sp = rec.request.sampling
        if o.new_prompt_logprobs_tensors is not None and sp.prompt_logprobs is not None:
            t = o.new_prompt_logprobs_tensors  # one chunk of prompt positions (chunked prefill)
            rec.prompt_logprobs += _token_logprobs(t.logprob_token_ids.tolist(), t.logprobs.tolist(),
                                                   sp.prompt_logprobs)
        index = rec.num_outputs
        rec.num_outputs += len(o.new_token_ids)
        reason = None
        if o.finish_reason is not None:
            reason = _FINISH.get(int(o.finish_reason), FinishReason.ABORT)
            del self._tracked[o.request_id]
        lps = None
        if sp.logprobs is not None and o.new_logprobs is not None:
            lps = tuple(_token_logprobs(o.new_logprobs.logprob_token_ids.tolist(), o.new_logprobs.logprobs.tolist(),
                                        sp.logprobs)[:len(o.new_token_ids)])
        prompt = None
        if index == 0 and o.new_token_ids and sp.prompt_logprobs is not None:
            prompt = (None, *rec.prompt_logprobs)
        return RequestOutput(o.request_id, tuple(o.new_token_ids), index, reason, logprobs=lps, prompt_logprobs=prompt)

    def load(self) -> InstanceLoad:
        # Waiting requests that hold KV (migrated in, not yet stepped) run first at the next step:
        # they count as running, with their blocks.
        queued = [r for r in self.vllm.waiting() if r.request_id in self._tracked]
        running = [self._request_load(r, migrating=self._tracked[r.request_id].mig_epoch is not None)
                   for r in self.vllm.running() if r.request_id in self._tracked]
        running += [self._request_load(r, migrating=False) for r in queued if r.num_computed_tokens > 0]
        running += [self._request_load(self.vllm.request(rid), migrating=True)
                    for rid, t in self._tracked.items() if t.frozen_from is not None]
        waiting = [self._request_load(r, migrating=False) for r in queued if r.num_computed_tokens == 0]
        total, free = self.vllm.num_total_blocks(), self.vllm.num_free_blocks()
        return InstanceLoad(
            total_blocks=total, used_blocks=total - free, watermark_blocks=self._watermark,
            block_size=self.block_size, running=tuple(running), waiting=tuple(waiting),
            reserved_blocks=sum(len(b) for b in self._prealloc.values()), max_batch_size=self.vllm.max_num_seqs(),
        )

    def _request_load(self, r: Any, migrating: bool) -> RequestLoad:
        rec = self._tracked[r.request_id]
        blocks = len(self.vllm.block_ids(r.request_id))
        return RequestLoad(
            request_id=r.request_id, num_blocks=blocks,
            blocks_needed=0 if blocks else cdiv(r.num_tokens, self.block_size),
            prompt_len=len(rec.request.prompt_token_ids), output_len=rec.num_outputs,
            priority=rec.request.priority, arrival_time=rec.request.arrival_time,
            num_preemptions=rec.base_preemptions + r.num_preemptions,
            migrating=migrating or rec.frozen_from is not None,
        )

    def request_ids(self) -> list[str]:
        return list(self._tracked)

    # ----- checks ------------------------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Every block is free, owned by one live request, or reserved for a migration."""
        reserved = sum(len(b) for b in self._prealloc.values())
        owned = self.vllm.owned_blocks()
        total, free = self.vllm.num_total_blocks(), self.vllm.num_free_blocks()
        assert free + owned + reserved == total, f"free {free} + owned {owned} + reserved {reserved} != {total}"
        for r in self.vllm.running():
            assert r.request_id in self._tracked and self._tracked[r.request_id].frozen_from is None


def vllm_sampling_kwargs(sp: Any, remaining: int, num_prior: int, seed: Optional[int]) -> dict[str, Any]:
    """Keyword arguments of ``vllm.SamplingParams`` for our ``SamplingParams`` ``sp``, for a request
    with ``num_prior`` outputs generated elsewhere and ``remaining`` to go (prompt logprobs only
    before the first output: the destination's prompt holds earlier outputs)."""
    return dict(
        n=1, max_tokens=remaining, temperature=float(sp.temperature), top_p=float(sp.top_p), top_k=sp.top_k,
        min_p=float(sp.min_p), presence_penalty=float(sp.presence_penalty),
        frequency_penalty=float(sp.frequency_penalty), repetition_penalty=float(sp.repetition_penalty),
        logit_bias=dict(sp.logit_bias) or None, min_tokens=max(0, sp.min_tokens - num_prior), seed=seed,
        stop_token_ids=list(sp.stop_token_ids), ignore_eos=sp.ignore_eos, logprobs=sp.logprobs,
        prompt_logprobs=sp.prompt_logprobs if num_prior == 0 else None,
    )


def _token_logprobs(ids: list, values: list, k: int) -> list[TokenLogprob]:
    """vLLM's logprob rows (column 0: the chosen token; then the top ones, most likely first) as ours."""
    return [TokenLogprob(float(v[0]), tuple(zip((int(t) for t in i[1:k + 1]), (float(x) for x in v[1:k + 1]))))
            for i, v in zip(ids, values)]


_FINISH = {0: FinishReason.STOP, 1: FinishReason.LENGTH, 2: FinishReason.ABORT, 4: FinishReason.STOP}


def _eos_token_ids(hf_config: Any) -> tuple[int, ...]:
    eos = getattr(hf_config, "eos_token_id", None)
    if eos is None:
        return ()
    return (eos,) if isinstance(eos, int) else tuple(int(e) for e in eos)
