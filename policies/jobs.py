"""Compound jobs: a job's later calls go where its earlier calls' KV is, when that keeps its deadline.

JITServe (Zhang et al., arXiv 2504.20068) serves compound requests, chains of LLM calls
with one end-to-end deadline. An agent's next call usually repeats the previous call's
prompt and output and appends a tool result, so the instance that ran the previous call
holds most of the next call's prefix: with the conversation store (``engines/conversations.py``)
a finished call's KV stays in that instance's host pool under the key ``job:<job_id>``
(``engines.types.job_kv_key``) and the instance reports it in ``InstanceLoad.conversations``.
There the call prefills only its new tokens; but that instance may be busy, and a job that
misses its deadline is lost whatever it saved. So, for a job call (``RequestLoad.job_deadline_s``
finite) whose job's KV some instance holds (``home``):

    saved    = min(tokens the home keeps, prompt_len - 1)
    expected = the home's conservative length of a new job call (``InstanceLoad.job_len_bounds``,
               from its length prior, ``policies.length``), else ``PolicyConfig.slo_expected_len``
    margin   = job deadline - (home's queue + prefill of prompt_len - saved tokens
                               + expected steps at the home's predicted step time with the call)
    go home  iff  the call fits there  and  margin >= 0   (or the home predicts no step time:
                                                           nothing says it misses there)

else the call goes where ``slo`` dispatch (``policies.rescue.by_slo``) predicts the most margin
for its share of the job's time, unless the job is predicted to miss its deadline there too
(no saved prefill): a call lost everywhere goes home, where it costs the others least. Every
other request is dispatched by ``slo``. Registered as dispatch policy ``jobs``; ``slo`` itself
stays job-blind, so the two compare side by side.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Optional, Sequence

from llumnix_py.load import InstanceLoad, RequestLoad
from policies.config import PolicyConfig
from policies.conversation import home_of
from policies.length import prompt_bucket
from policies.rescue import by_slo, dispatch_margin

if TYPE_CHECKING:
    from policies.dispatch import DispatchState


def expected_len(inst: InstanceLoad, prompt_len: int, cfg: PolicyConfig) -> int:
    """The output length a new job call is assumed to reach on ``inst``."""
    bounds = inst.job_len_bounds
    return bounds[min(prompt_bucket(prompt_len), len(bounds) - 1)] if bounds else cfg.slo_expected_len


def saved_tokens(kept: int, prompt_len: int) -> int:
    """Prompt tokens a call need not prefill where ``kept`` tokens of its job are kept (at least
    one prompt token is always computed: its logits give the first output)."""
    return max(0, min(kept, prompt_len - 1))


def home_margin(home: InstanceLoad, kept: int, request: RequestLoad, cfg: PolicyConfig) -> float:
    """``request``'s predicted margin against its job's deadline on ``home``, which keeps ``kept``
    tokens of the job (``inf`` where ``home`` predicts no step time)."""
    if home.step_s_next <= 0:
        return math.inf
    view = dataclasses.replace(request, deadline_s=request.job_deadline_s, ttft_s=math.inf)
    return dispatch_margin(home, view, expected_len(home, request.prompt_len, cfg),
                           saved_tokens(kept, request.prompt_len))


def job_home(eligible: Sequence[InstanceLoad], request: RequestLoad) -> Optional[tuple[InstanceLoad, int]]:
    """The eligible instance keeping the KV of ``request``'s job and its tokens (None: no job call, or
    no instance keeps it)."""
    if not math.isfinite(request.job_deadline_s):
        return None
    return home_of(eligible, request.conversation_id)


def by_job(eligible: Sequence[InstanceLoad], request: RequestLoad, cfg: PolicyConfig,
           state: "DispatchState") -> str:
    """Dispatch policy ``jobs``: a job call to its job's KV while that keeps the job's deadline
    (see the module docstring), anything else as ``slo``."""
    home = job_home(eligible, request)
    best = by_slo(eligible, request, cfg, state)
    if home is None or home[0].instance_id == best:
        return best
    inst, kept = home
    if state.dispatch_freeness(inst, cfg, request=request) < 0:
        return best  # the call does not fit there
    if home_margin(inst, kept, request, cfg) >= 0:
        return inst.instance_id
    there = next(i for i in eligible if i.instance_id == best)
    return inst.instance_id if home_margin(there, 0, request, cfg) < 0 else best
