"""Compound-job placement (``policies/jobs.py``): a job call goes to the instance keeping its
job's KV while its predicted completion there keeps the job's deadline, else where ``slo``
dispatch predicts the most margin; and how a job call maps to a conversation key."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llumnix_py.engines.jit_batch import with_objective
from llumnix_py.engines.types import Objective, Request, job_kv_key
from llumnix_py.errors import InvalidRequestError
from llumnix_py.load import InstanceLoad, RequestLoad
from policies.config import PolicyConfig
from policies.dispatch import DispatchState, dispatch
from policies.jobs import by_job, expected_len, home_margin, saved_tokens
from policies.rescue import by_slo

CFG = PolicyConfig(dispatch="jobs", slo_expected_len=100)


def inst(iid: str, *, step: float = 0.02, step_next: float = 0.021, queue: float = 0.0, per_token: float = 1e-3,
         used: int = 10, keeps: int = 0, job: str = "job:j", bounds=()) -> InstanceLoad:
    return InstanceLoad(instance_id=iid, total_blocks=200, used_blocks=used, block_size=16, step_s=step,
                        step_s_next=step_next, queue_s=queue, prefill_s_per_token=per_token,
                        conversations=((job, keeps),) if keeps else (), job_len_bounds=tuple(bounds))


def call(prompt_len: int = 1000, job_deadline_s: float = 10.0, calls_left: int = 2, job: str = "j") -> RequestLoad:
    obj = Objective(job_id=job, job_deadline_ms=job_deadline_s * 1e3, job_calls_left=calls_left)
    view = RequestLoad.queued("r", prompt_len=prompt_len, block_size=16, conversation_id=job_kv_key(obj))
    return with_objective(view, obj)


def test_a_job_call_maps_to_its_jobs_key_and_a_conversation_wins():
    obj = Objective(job_id="a1", job_deadline_ms=5000.0)
    assert Request("r", (1, 2), objective=obj).conversation_id == "job:a1"
    assert Request("r", (1, 2), objective=obj, conversation_id="chat").conversation_id == "chat"
    assert Request("r", (1, 2), objective=obj, conversation_id="job:a1").conversation_id == "job:a1"  # migrated
    assert Request("r", (1, 2)).conversation_id == "" and job_kv_key(Objective(deadline_ms=1.0)) == ""
    for cid, o in (("job:a1", None), ("job:other", obj)):
        with pytest.raises(InvalidRequestError, match="reserved"):
            Request("r", (1, 2), objective=o, conversation_id=cid)


def test_the_view_carries_the_jobs_whole_time_and_its_share():
    r = call(job_deadline_s=10.0, calls_left=4)
    assert r.job_deadline_s == 10.0 and r.deadline_s == pytest.approx(2.5) and r.conversation_id == "job:j"
    assert with_objective(RequestLoad.queued("x", prompt_len=3, block_size=16),
                          Objective(deadline_ms=1e3)).job_deadline_s == math.inf


def test_goes_home_while_the_home_keeps_the_deadline():
    home = inst("a", step_next=0.05, keeps=960)  # slower batch, but 960 of 1000 tokens kept
    other = inst("b", step_next=0.02)
    # home: 0.04 s prefill + 100 steps * 0.05 = 5.04 s, within the job's 10 s
    assert dispatch([home, other], call(), CFG, DispatchState()).instance_id == "a"
    # slo dispatch alone (job-blind) prefers the faster batch
    assert by_slo([home, other], call(), CFG, DispatchState()) == "b"


def test_leaves_home_when_the_home_would_miss_the_deadline():
    home = inst("a", step_next=0.2, keeps=960)  # 100 steps * 0.2 s = 20 s > 10 s
    other = inst("b", step_next=0.02)
    assert home_margin(home, 960, call(), CFG) < 0
    assert dispatch([home, other], call(), CFG, DispatchState()).instance_id == "b"


def test_a_call_lost_everywhere_stays_home():
    home = inst("a", step_next=0.2, keeps=960)
    other = inst("b", step_next=0.15)  # 15 s: misses too
    assert home_margin(other, 0, call(), CFG) < 0
    assert dispatch([home, other], call(), CFG, DispatchState()).instance_id == "a"


def test_the_homes_length_prior_sets_the_expected_length():
    home = inst("a", step_next=0.05, keeps=960, bounds=(50, 50, 300, 50))  # 1000 tokens: bucket 2 -> 300
    other = inst("b", step_next=0.02)
    assert expected_len(home, 1000, CFG) == 300 and expected_len(other, 1000, CFG) == 100
    assert dispatch([home, other], call(), CFG, DispatchState()).instance_id == "b"  # 300 * 0.05 = 15 s
    assert dispatch([home, other], call(prompt_len=100), CFG, DispatchState()).instance_id == "a"  # 50 steps


def test_never_home_when_the_call_does_not_fit_there():
    home = inst("a", used=199, keeps=960)
    other = inst("b")
    assert dispatch([home, other], call(), CFG, DispatchState()).instance_id == "b"


def test_not_a_job_call_or_no_home_is_slo_dispatch():
    a, b = inst("a", step_next=0.05, keeps=960, job="chat"), inst("b", step_next=0.02)
    chat = RequestLoad.queued("r", prompt_len=1000, block_size=16, conversation_id="chat")
    deadline = with_objective(chat, Objective(deadline_ms=10e3))
    for r in (chat, deadline, call()):  # a conversation turn, a deadline call, a job nobody keeps
        assert by_job([a, b], r, CFG, DispatchState()) == by_slo([a, b], r, CFG, DispatchState())


def test_saved_tokens_leave_one_prompt_token_to_compute():
    assert saved_tokens(960, 1000) == 960 and saved_tokens(2000, 1000) == 999 and saved_tokens(5, 1) == 0


@st.composite
def clusters(draw):
    n = draw(st.integers(1, 5))
    insts = []
    for k in range(n):
        step = draw(st.floats(0.005, 0.2))
        insts.append(inst(f"i{k}", step=step, step_next=step * draw(st.floats(1.0, 1.5)),
                          queue=draw(st.floats(0, 5)), used=draw(st.integers(0, 199)),
                          bounds=draw(st.lists(st.integers(1, 600), min_size=4, max_size=4) | st.just([]))))
    home = draw(st.integers(0, n - 1))
    kept = draw(st.integers(1, 2000))
    insts[home] = dataclasses.replace(insts[home], conversations=(("job:j", kept),))
    return insts, home, kept


@settings(max_examples=200, deadline=None)
@given(c=clusters(), prompt=st.integers(1, 2000), deadline=st.floats(0.5, 60), left=st.integers(1, 5))
def test_the_pick_is_home_if_it_keeps_the_deadline_or_the_call_is_lost_anyway_else_the_slo_pick(c, prompt, deadline, left):
    insts, home, kept = c
    r = call(prompt_len=prompt, job_deadline_s=deadline, calls_left=left)
    state = DispatchState()
    got = by_job(insts, r, CFG, state)
    slo = by_slo(insts, r, CFG, state)
    h = insts[home]
    fits = state.dispatch_freeness(h, CFG, request=r) >= 0
    keeps = fits and home_margin(h, kept, r, CFG) >= 0
    lost_there = home_margin(next(i for i in insts if i.instance_id == slo), 0, r, CFG) < 0
    assert got == (h.instance_id if keeps or (fits and lost_there) or slo == h.instance_id else slo)
    # more kept tokens never make the home worse, and a later deadline never does either
    if keeps:
        more = [dataclasses.replace(i, conversations=(("job:j", kept + 16),)) if i is h else i
                for i in insts]
        assert by_job(more, r, CFG, DispatchState()) == h.instance_id
        later = call(prompt_len=prompt, job_deadline_s=deadline * 2, calls_left=left)
        assert by_job(insts, later, CFG, DispatchState()) == h.instance_id


def test_a_jit_engine_publishes_the_length_of_a_new_job_call_from_its_prior():
    from llumnix_py.engines.jit_batch import JitBatchPolicy
    from policies.length import LengthPrior
    from tests.test_jit_policy import Clock, sim_engine, step_time

    prior = LengthPrior()
    for k in range(20):  # short job calls with short prompts, long ones with prompts of 600 tokens
        prior.observe("job", 50, 40 + k)
        prior.observe("job", 600, 400 + k)
    e = sim_engine(policy=JitBatchPolicy(Clock(), step_time, prior, quantile=0.9))
    bounds = e.load().job_len_bounds
    # buckets 0 and 2: the 18th (ceil(0.9 * 20)) of their own 20; buckets 1 and 3 (too few samples):
    # the 36th of the kind's 40
    assert bounds == (57, 415, 417, 415)
    assert expected_len(dataclasses.replace(inst("a"), job_len_bounds=bounds), 600, CFG) == 417
    assert sim_engine().load().job_len_bounds == ()  # FCFS publishes none: the config's length is used


def test_sim_config_refuses_a_bad_conversation_pool():
    from llumnix_py.sim.config import SimConfig

    for bad in (-1, True, 1.5):
        with pytest.raises(ValueError):
            SimConfig(conversation_blocks=bad)
    assert SimConfig(conversation_blocks=64).engine_config().conversation_host_blocks == 64
