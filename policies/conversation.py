"""Conversation-aware dispatch: weigh freeness against where a conversation's KV lives.

A conversation's next turn is cheapest where its last turn's KV sits in the host pool
(``InstanceLoad.conversations``): there it prefills only its new tokens. Prefix-aware
routers (SGLang's cache-aware router, NVIDIA Dynamo's KV router) send a request where
its prefix is cached unless that instance is too loaded; here "too loaded" is measured
in Llumnix's own unit, freeness (decode steps the batch can take, with the request
virtually added), so locality and virtual usage are traded in one scale:

    home = the instance holding the conversation's KV
    best = the freest instance (``freeness`` dispatch)
    go home  iff  the request fits there  and
                  freeness(home) >= freeness(best) - slack * min(1, kept_tokens / prompt_len)

``slack`` is ``PolicyConfig.conversation_slack``. A request with no conversation, or whose
conversation no instance holds, is dispatched by ``freeness``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

from llumnix_py.load import InstanceLoad, RequestLoad
from policies.config import PolicyConfig
from policies.dispatch import by_freeness

if TYPE_CHECKING:
    from policies.dispatch import DispatchState


def home_of(eligible: Sequence[InstanceLoad], conversation_id: str) -> Optional[tuple[InstanceLoad, int]]:
    """The instance keeping the conversation's KV and the tokens it covers (the most, if several)."""
    best: Optional[tuple[InstanceLoad, int]] = None
    if not conversation_id:
        return None
    for inst in eligible:
        for cid, tokens in inst.conversations:
            if cid == conversation_id and (best is None or (tokens, best[0].instance_id) > (best[1], inst.instance_id)):
                best = (inst, tokens)
    return best


def by_conversation(eligible: Sequence[InstanceLoad], request: RequestLoad, cfg: PolicyConfig,
                    state: "DispatchState") -> str:
    """The conversation's home instance while it is free enough, else the freest."""
    best_id = by_freeness(eligible, request, cfg, state)
    home = home_of(eligible, request.conversation_id)
    if home is None or home[0].instance_id == best_id:
        return best_id
    inst, tokens = home
    f_home = state.dispatch_freeness(inst, cfg, request=request)
    if f_home < 0:
        return best_id  # the turn does not fit there
    best = next(i for i in eligible if i.instance_id == best_id)
    f_best = state.dispatch_freeness(best, cfg, request=request)
    share = min(1.0, tokens / request.prompt_len) if request.prompt_len > 0 else 0.0
    return inst.instance_id if f_home >= f_best - cfg.conversation_slack * share else best_id
