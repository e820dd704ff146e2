"""Conversation-aware dispatch: freeness traded against where a conversation's KV lives."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from llumnix_py.engines.types import Request, SamplingParams
from llumnix_py.load import InstanceLoad, RequestLoad
from policies.config import PolicyConfig
from policies.conversation import by_conversation, home_of
from policies.dispatch import DispatchState, by_freeness, dispatch
from tests.factories import make_engine


def inst(iid: str, used: int, conversations=(), total: int = 100, running: int = 1) -> InstanceLoad:
    reqs = tuple(RequestLoad(request_id=f"{iid}-r{k}", num_blocks=used // running, blocks_needed=used // running)
                 for k in range(running))
    return InstanceLoad(instance_id=iid, total_blocks=total, used_blocks=used, block_size=16, running=reqs,
                        conversations=tuple(conversations))


def turn(prompt_len: int = 320, conversation: str = "c") -> RequestLoad:
    return RequestLoad.queued("t", prompt_len=prompt_len, block_size=16, conversation_id=conversation)


CFG = PolicyConfig(dispatch="conversation", conversation_slack=8.0)


def test_goes_home_while_home_is_within_the_slack():
    home = inst("a", used=60, conversations=[("c", 320)])  # freeness (100-60-20)/2 = 10
    free = inst("b", used=40)  # (100-40-20)/2 = 20: 10 better, beyond the slack of 8
    assert dispatch([home, free], turn(), CFG, DispatchState()).instance_id == "b"
    home = inst("a", used=48, conversations=[("c", 320)])  # 16: within 8 of 20
    assert dispatch([home, free], turn(), CFG, DispatchState()).instance_id == "a"


def test_the_slack_shrinks_with_the_share_of_the_prompt_the_kv_covers():
    home = inst("a", used=48, conversations=[("c", 32)])  # covers 32 of 320 tokens: slack 0.8
    free = inst("b", used=40)
    assert dispatch([home, free], turn(), CFG, DispatchState()).instance_id == "b"


def test_never_home_when_the_turn_does_not_fit_there():
    home = inst("a", used=90, conversations=[("c", 320)])
    free = inst("b", used=10)
    big = PolicyConfig(dispatch="conversation", conversation_slack=1e6)
    assert dispatch([home, free], turn(), big, DispatchState()).instance_id == "b"


def test_without_a_conversation_or_a_home_it_is_freeness_dispatch():
    a, b = inst("a", used=50, conversations=[("other", 320)]), inst("b", used=40)
    for req in (turn(conversation=""), turn(conversation="c")):
        assert dispatch([a, b], req, CFG, DispatchState()).instance_id == "b"
    assert home_of([a, b], "") is None and home_of([a, b], "other")[0] is a


@settings(max_examples=200, deadline=None)
@given(used=st.lists(st.integers(0, 99), min_size=1, max_size=5), home=st.integers(0, 4),
       tokens=st.integers(1, 640), slack=st.floats(0, 50), prompt=st.integers(1, 640))
def test_the_pick_is_the_freest_or_a_home_within_the_slack(used, home, tokens, slack, prompt):
    home %= len(used)
    insts = [inst(f"i{k}", u, conversations=[("c", tokens)] if k == home else []) for k, u in enumerate(used)]
    cfg = PolicyConfig(dispatch="conversation", conversation_slack=slack)
    req = turn(prompt_len=prompt)
    state = DispatchState()
    got = by_conversation(insts, req, cfg, state)
    best = by_freeness(insts, req, cfg, state)
    assert got in (best, f"i{home}")
    if got != best:
        f = {i.instance_id: state.dispatch_freeness(i, cfg, request=req) for i in insts}
        assert f[got] >= 0 and f[got] >= f[best] - slack * min(1.0, tokens / prompt)


def test_an_engine_reports_the_conversations_it_keeps():
    e = make_engine("sim", num_blocks=64, block_size=4, num_host_blocks=32, conversation_host_blocks=32)
    e.add_request(Request("t1", tuple(range(1, 14)), SamplingParams(max_tokens=10, ignore_eos=True),
                          conversation_id="c"))
    assert e.load().waiting[0].conversation_id == "c"
    while e.has_unfinished():
        e.step()
    assert e.load().conversations == (("c", 20),)  # 22 computed tokens: 5 full blocks of 4
