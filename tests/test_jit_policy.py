"""Just-in-time batching by margin: the pure policy (``policies/jit.py``) on hand-built
states, and the engine's batch scheduler driving it (``engines/jit_batch.py``)."""

from __future__ import annotations

import math

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from llumnix_py.engines.core import EngineConfig, EngineCore
from llumnix_py.engines.jit_batch import JitBatchPolicy, MeasuredStepTime
from llumnix_py.engines.sim.executor import SimExecutor
from llumnix_py.engines.sim.profiles import PROFILES
from llumnix_py.engines.types import Objective, Request, SamplingParams
from llumnix_py.llumlet_core import LlumletCore
from llumnix_py.llumlet_types import LlumletConfig
from policies.jit import Group, JitParams, SloView, classify, edf_victim, margin, pick_victim, plan_edf, plan_jit
from policies.length import LengthPrior

STEP = 0.01  # a decode step, whatever the batch
PER_TOKEN = 0.0001  # a prefill token


def step_time(prefill: int, decodes: int, ctx: int) -> float:
    return (STEP if decodes else 0.0) + PER_TOKEN * prefill


def view(rid, *, running=True, tokens=10, blocks=1, remaining=10, next_due=math.inf, tbt=0.0, end=math.inf,
         objective=True, arrival=0.0, priority=0):
    return SloView(request_id=rid, running=running, num_tokens=tokens, blocks=blocks, remaining=remaining,
                   next_due=next_due, tbt_s=tbt, end_due=end, has_objective=objective, arrival=arrival,
                   priority=priority)


# ----- margins and groups ----------------------------------------------------------------


def test_deadline_margin_counts_every_remaining_step():
    v = view("d", remaining=10, end=1.0)
    assert margin(v, 0.0, STEP, STEP) == pytest.approx(1.0 - 10 * STEP)


def test_stream_margin_is_the_tighter_of_next_and_last_token():
    fast = view("s", remaining=5, next_due=0.05, tbt=0.02)  # tbt above the step: the next token binds
    assert margin(fast, 0.0, STEP, STEP) == pytest.approx(0.05 - STEP)
    slow = view("s", remaining=5, next_due=0.05, tbt=0.005)  # tbt below the step: the last token binds
    assert margin(slow, 0.0, STEP, STEP) == pytest.approx(0.05 - STEP + 4 * (0.005 - STEP))
    assert margin(view("b", objective=False), 0.0, STEP, STEP) == math.inf


def test_groups():
    views = [view("urgent", end=0.15, remaining=10), view("slack", end=10.0, remaining=10),
             view("lost", end=0.05, remaining=10), view("best", objective=False),
             view("late-but-savable", end=0.12, remaining=10)]
    margins, groups = classify(views, 0.0, step_time, JitParams(urgent_steps=8))
    assert groups == {"urgent": Group.URGENT, "slack": Group.SLACK, "lost": Group.LOST,
                      "best": Group.BEST_EFFORT, "late-but-savable": Group.URGENT}
    assert margins["lost"] < 0


# ----- admission order and preemption of lost requests ----------------------------------------


def test_admission_order_goes_group_by_group_least_margin_first():
    views = [view("best", running=False, objective=False, arrival=0.0),
             view("slack", running=False, end=50.0, arrival=1.0),
             view("lost", running=False, end=0.01, arrival=2.0),
             view("urgent2", running=False, end=0.3, arrival=3.0),
             view("urgent1", running=False, end=0.2, arrival=4.0)]
    plan = plan_jit(views, 0.0, step_time, free_blocks=100, block_size=16, free_slots=None)
    assert plan.admit_order == ("urgent1", "urgent2", "slack", "best", "lost")
    assert plan.preempt == ()


def test_a_lost_request_is_preempted_when_its_blocks_admit_an_urgent_one():
    views = [view("lost", blocks=4, end=0.01), view("ok", blocks=1, end=100.0),
             view("urgent", running=False, tokens=48, end=0.3)]  # needs 3 blocks of 16
    plan = plan_jit(views, 0.0, step_time, free_blocks=1, block_size=16, free_slots=None)
    assert plan.preempt == ("lost",)


def test_no_preemption_when_it_saves_nobody():
    base = [view("lost", blocks=1, end=0.01), view("ok", blocks=1, end=100.0)]
    big = view("urgent", running=False, tokens=160, end=0.5)  # 10 blocks: the lost one frees too few
    assert plan_jit(base + [big], 0.0, step_time, free_blocks=1, block_size=16, free_slots=None).preempt == ()
    best = view("best", running=False, tokens=16, objective=False)  # no objective to save
    assert plan_jit(base + [best], 0.0, step_time, free_blocks=0, block_size=16, free_slots=None).preempt == ()
    fits = view("urgent", running=False, tokens=16, end=0.5)  # it fits anyway
    assert plan_jit(base + [fits], 0.0, step_time, free_blocks=5, block_size=16, free_slots=None).preempt == ()
    lost_waiting = view("lost2", running=False, tokens=16, end=0.001)
    assert plan_jit(base + [lost_waiting], 0.0, step_time, free_blocks=0, block_size=16, free_slots=None).preempt == ()


def test_a_lost_request_gives_up_its_batch_slot_to_an_urgent_one():
    views = [view("lost", blocks=1, end=0.01), view("urgent", running=False, tokens=16, end=0.5)]
    plan = plan_jit(views, 0.0, step_time, free_blocks=10, block_size=16, free_slots=0)
    assert plan.preempt == ("lost",)


def test_priority_classes_are_strict_and_margins_order_within_each():
    views = [view("low-urgent", running=False, end=0.2, arrival=0.0),
             view("high-best", running=False, objective=False, arrival=1.0, priority=1),
             view("high-slack", running=False, end=50.0, arrival=2.0, priority=1),
             view("low-slack", running=False, end=40.0, arrival=3.0)]
    plan = plan_jit(views, 0.0, step_time, free_blocks=100, block_size=16, free_slots=None)
    assert plan.admit_order == ("high-slack", "high-best", "low-urgent", "low-slack")
    assert plan_edf(views).admit_order == ("high-slack", "high-best", "low-urgent", "low-slack")


def test_a_lost_request_is_preempted_only_for_its_own_class_or_a_higher_one():
    running = [view("lost-high", blocks=4, end=0.01, priority=1), view("ok", blocks=1, end=100.0)]
    low = view("urgent-low", running=False, tokens=48, end=0.3)
    assert plan_jit(running + [low], 0.0, step_time, free_blocks=1, block_size=16, free_slots=None).preempt == ()
    high = view("urgent-high", running=False, tokens=48, end=0.3, priority=1)
    assert plan_jit(running + [high], 0.0, step_time, free_blocks=1, block_size=16,
                    free_slots=None).preempt == ("lost-high",)


def test_victims_come_from_the_lowest_class_first():
    views = [view("lost-high", blocks=9, end=0.01, priority=1), view("urgent-low", end=0.15),
             view("slack-high", end=50.0, priority=1)]
    _, groups = classify(views, 0.0, step_time, JitParams())
    margins = {v.request_id: margin(v, 0.0, STEP, PER_TOKEN) for v in views}
    assert pick_victim(views, groups, margins) == "urgent-low"
    assert edf_victim(views) == "urgent-low"


@given(prios=st.lists(st.tuples(st.integers(0, 2), st.booleans(), st.floats(0.0, 5.0)), min_size=1, max_size=12))
@settings(max_examples=60, deadline=None)
def test_no_request_is_admitted_or_spared_ahead_of_a_higher_class(prios):
    views = [view(f"r{i}", running=running, end=end, arrival=float(i), priority=p)
             for i, (p, running, end) in enumerate(prios)]
    by_id = {v.request_id: v for v in views}
    for plan in (plan_jit(views, 0.0, step_time, free_blocks=100, block_size=16, free_slots=None), plan_edf(views)):
        order = [by_id[r].priority for r in plan.admit_order]
        assert order == sorted(order, reverse=True)
    running = [v for v in views if v.running]
    if running:
        lowest = min(v.priority for v in running)
        _, groups = classify(running, 0.0, step_time, JitParams())
        margins = {v.request_id: margin(v, 0.0, STEP, PER_TOKEN) for v in running}
        assert by_id[pick_victim(running, groups, margins)].priority == lowest
        assert by_id[edf_victim(running)].priority == lowest


def test_victims_lost_then_best_effort_then_most_slack():
    views = [view("urgent", end=0.15), view("slack", end=5.0), view("slacker", end=50.0),
             view("best", objective=False), view("lost", end=0.01, blocks=2), view("lost-big", end=0.01, blocks=9)]
    margins, groups = classify(views, 0.0, step_time)
    order = []
    rest = list(views)
    while rest:
        rid = pick_victim(rest, groups, margins)
        order.append(rid)
        rest = [v for v in rest if v.request_id != rid]
    assert order == ["lost-big", "lost", "best", "slacker", "slack", "urgent"]
    with pytest.raises(ValueError):
        pick_victim([], groups, margins)


# ----- in the engine -------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def sim_engine(num_blocks=16, max_batch_size=8, policy=None):
    cfg = EngineConfig(num_blocks=num_blocks, block_size=16, watermark=0.0, max_batch_size=max_batch_size)
    return EngineCore(cfg, SimExecutor(PROFILES["llama-7b-a10"], vocab_size=320), batch_policy=policy)


def req(rid, n_prompt, max_tokens, objective=None, arrival=0.0):
    return Request(rid, tuple(range(1, n_prompt + 1)), SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                   arrival_time=arrival, objective=objective)


def test_engine_preempts_a_lost_request_to_admit_an_urgent_one():
    clock = Clock()
    policy = JitBatchPolicy(clock, step_time, LengthPrior(), estimator="oracle")
    e = sim_engine(num_blocks=4, policy=policy)
    e.add_request(req("lost", 40, 500, Objective(deadline_ms=100)))  # 500 tokens in 0.1 s: cannot be met
    e.step()
    assert [s.request_id for s in e.scheduler.running] == ["lost"]
    e.add_request(req("urgent", 40, 5, Objective(deadline_ms=500)))  # 3 blocks, 1 free: needs the lost one's
    out = e.step()
    assert out.preempted == ("lost",)
    assert [s.request_id for s in e.scheduler.running] == ["urgent"]
    assert [s.request_id for s in e.scheduler.waiting] == ["lost"]
    e.check_invariants()


def test_engine_runs_a_higher_priority_request_first_under_jit():
    clock = Clock()
    policy = JitBatchPolicy(clock, step_time, LengthPrior(), estimator="oracle")
    e = sim_engine(num_blocks=4, policy=policy)
    e.add_request(req("urgent", 40, 5, Objective(deadline_ms=200)))  # 3 blocks; the tighter margin
    high = req("high", 40, 5, Objective(deadline_ms=100_000))  # 3 blocks; lots of slack, higher class
    e.add_request(Request(high.request_id, high.prompt_token_ids, high.sampling, priority=1,
                          arrival_time=high.arrival_time, objective=high.objective))
    e.step()
    assert [s.request_id for s in e.scheduler.running] == ["high"]
    assert [s.request_id for s in e.scheduler.waiting] == ["urgent"]
    e.check_invariants()


def test_fcfs_stays_the_default_and_blocks_behind_its_head():
    e = sim_engine(num_blocks=4)
    e.add_request(req("lost", 40, 500, Objective(deadline_ms=100)))
    e.step()
    e.add_request(req("urgent", 40, 5, Objective(deadline_ms=500)))
    assert e.step().preempted == ()
    assert [s.request_id for s in e.scheduler.running] == ["lost"]


def test_engine_admits_past_a_request_that_does_not_fit():
    clock = Clock()
    policy = JitBatchPolicy(clock, step_time, LengthPrior(), estimator="oracle")
    e = sim_engine(num_blocks=8, policy=policy)
    e.add_request(req("hog", 64, 50))  # best effort: 4 blocks, 5 once it decodes
    e.step()
    e.add_request(req("big", 60, 5, Objective(deadline_ms=1100), arrival=1.0))  # 4 blocks; 3 are free
    e.add_request(req("small", 10, 5, Objective(deadline_ms=5000), arrival=1.0))
    clock.now = 1.0
    assert e.scheduler.batch_policy.plan(e.scheduler.running, e.scheduler.waiting, free_blocks=3, block_size=16,
                                         free_slots=None).admit_order == ("big", "small")
    e.step()
    assert [s.request_id for s in e.scheduler.running] == ["hog", "small"]  # past "big", which waits


def test_core_feeds_the_prior_that_the_policy_reads():
    prior = LengthPrior()
    clock = Clock()
    e = sim_engine(num_blocks=64, policy=JitBatchPolicy(clock, step_time, prior))
    core = LlumletCore(LlumletConfig("i0", transport="inproc", lease_timeout_s=None), e, length_prior=prior)
    for i, n in enumerate((3, 5, 7)):
        core.submit(req(f"d{i}", 8, n, Objective(deadline_ms=1e6)))
    core.submit(req("s", 8, 4, Objective(ttft_ms=1e6, tbt_ms=1e3)))
    core.admit(0.0)
    while core.step_due():
        core.step(route=False)
    assert sorted(prior._by_kind["deadline"]) == [3, 5, 7]
    assert list(prior._by_kind["stream"]) == [4]
    assert len(prior) == 4


def test_measured_step_time_learns_from_steps():
    m = MeasuredStepTime(initial_s=0.5)
    assert m(0, 4, 100) == 0.5
    for _ in range(50):
        m.observe(0, 4, 0.02)
        m.observe(1000, 0, 0.1)
    assert m(0, 4, 100) == pytest.approx(0.02, rel=1e-3)
    assert m(0, 8, 100) == pytest.approx(0.04, rel=1e-3)  # scaled from the nearest batch measured
    assert m(500, 0, 0) == pytest.approx(0.05, rel=1e-2)



objective_st = st.one_of(
    st.none(),
    st.builds(lambda t, b: Objective(ttft_ms=t, tbt_ms=b), st.floats(1, 2000), st.floats(1, 200)),
    st.builds(lambda d: Objective(deadline_ms=d), st.floats(1, 20000)),
    st.builds(lambda d, c: Objective(job_id="j", job_deadline_ms=d, job_calls_left=c), st.floats(1, 20000),
              st.one_of(st.none(), st.integers(1, 4))),
)


@settings(max_examples=40, deadline=None)
@given(reqs=st.lists(st.tuples(st.integers(1, 60), st.integers(1, 40), objective_st, st.floats(0, 0.5)),
                     min_size=1, max_size=12),
       estimator=st.sampled_from(["quantile", "oracle"]), edf=st.booleans())
def test_policy_driven_engine_keeps_blocks_consistent_and_finishes_everything(reqs, estimator, edf):
    """Whatever the objectives, the JIT (or EDF) policy's admissions and preemptions leave every
    block owned once, and every request ends with exactly its max_tokens tokens."""
    from llumnix_py.engines.jit_batch import EdfBatchPolicy

    clock = Clock()
    cls = EdfBatchPolicy if edf else JitBatchPolicy
    e = sim_engine(num_blocks=12, max_batch_size=4, policy=cls(clock, step_time, LengthPrior(), estimator))
    pending = sorted(enumerate(reqs), key=lambda x: x[1][3])
    got: dict[str, int] = {}
    steps = 0
    while pending or e.has_unfinished():
        while pending and pending[0][1][3] <= clock.now:
            i, (n, m, obj, at) = pending.pop(0)
            e.add_request(req(f"r{i}", n, m, obj, arrival=at))
        out = e.step()
        e.check_invariants()
        for o in out.outputs:
            got[o.request_id] = got.get(o.request_id, 0) + len(o.new_token_ids)
        clock.now += max(out.duration_s, 0.01)
        steps += 1
        assert steps < 5000, "no progress"
    assert got == {f"r{i}": m for i, (n, m, obj, at) in enumerate(reqs)}
    assert e.blocks.num_used == 0


def test_a_job_call_late_for_its_share_but_not_for_its_job_is_not_lost():
    share_missed = view("call", end=0.05, remaining=10)  # its share of the job's time: cannot make it
    assert classify([share_missed], 0.0, step_time)[1]["call"] == Group.LOST
    job_ok = SloView(request_id="call", running=True, num_tokens=10, blocks=1, remaining=10, end_due=0.05,
                     hard_due=5.0)  # the job's deadline itself is far
    margins, groups = classify([job_ok], 0.0, step_time)
    assert groups["call"] == Group.URGENT and margins["call"] < 0  # behind its share: served first, not dropped


def test_engine_publishes_a_job_calls_margin_against_the_job_deadline():
    clock = Clock()
    e = sim_engine(num_blocks=64, policy=JitBatchPolicy(clock, step_time, LengthPrior(), estimator="oracle"))
    e.add_request(req("c", 10, 11, Objective(job_id="j", job_deadline_ms=4000, job_calls_left=4)))
    e.step()
    (c,) = e.load().running
    assert c.slo_margin_end_s == pytest.approx(4.0 - (0.01 + 9 * 0.01))  # not the 1 s share


# ----- slack requests sitting out a step ---------------------------------------------------------

PER_DECODE = 0.002  # a decode step grows with the batch: 2 ms per request in it


def batch_step(prefill: int, decodes: int, ctx: int) -> float:
    return PER_DECODE * decodes + PER_TOKEN * prefill


SKIP = JitParams(skip_slack=True)


def skip_plan(views, params=SKIP, now=0.0):
    return plan_jit(views, now, batch_step, free_blocks=100, block_size=16, free_slots=None, params=params)


def four(urgent_end: float, slack_priority: int = 0):
    """An urgent deadline (10 tokens) beside three slack requests: 8 ms a step at four, 6 ms at three."""
    return [view("u", remaining=10, end=urgent_end), view("s1", remaining=10, end=100.0, priority=slack_priority),
            view("s2", remaining=10, end=50.0, priority=slack_priority),
            view("s3", remaining=10, end=0.5, priority=slack_priority)]


def test_the_most_slack_request_sits_out_when_that_lets_an_urgent_one_meet():
    views = four(urgent_end=0.06)  # 10 steps of 8 ms miss it; of 6 ms (one fewer in the batch) meet it exactly
    margins, groups = classify(views, 0.0, batch_step, SKIP)
    assert groups["u"] == Group.URGENT and margins["u"] < 0
    assert skip_plan(views).skip == ("s1",)
    assert skip_plan(views, JitParams()).skip == ()  # off by default


def test_as_few_sit_out_as_meet_the_urgent_one():
    assert skip_plan(four(urgent_end=0.045)).skip == ("s1", "s2")  # needs 4 ms steps: two out
    assert skip_plan(four(urgent_end=0.045)[:2] + [view("s3", remaining=10, end=0.5)]).skip == ("s1",)


def test_nobody_sits_out_when_it_saves_nobody():
    assert skip_plan(four(urgent_end=1.0)).skip == ()  # the urgent one meets anyway
    assert skip_plan(four(urgent_end=0.045)[:2]).skip == ()  # one out is not enough: 6 ms steps still miss
    too_little = JitParams(skip_slack=True, skip_keep_steps=1e6)
    assert skip_plan(four(urgent_end=0.06), too_little).skip == ()  # no request has that much slack to keep
    assert skip_plan(four(urgent_end=0.06, slack_priority=1)).skip == ()  # a higher class never sits out for a lower
    best = [view("u", remaining=10, end=0.06)] + [view(f"b{i}", objective=False) for i in range(3)]
    assert skip_plan(best).skip == ()  # best effort has no slack to spend


def test_a_waiting_urgent_request_admitted_this_step_is_helped_too():
    running = [view("s1", remaining=10, end=100.0), view("s2", remaining=10, end=50.0)]
    late = view("u", running=False, tokens=16, remaining=10, end=0.045)  # 3 in the batch: 6 ms steps, misses
    plan = skip_plan(running + [late])
    assert plan.admit_order == ("u",) and plan.skip == ("s1",)


step_st = st.tuples(st.floats(0.0, 0.005), st.floats(0.001, 0.01), st.floats(0.0, 1e-6))
req_st = st.tuples(st.booleans(), st.integers(1, 400), st.integers(1, 50),
                   st.sampled_from(["none", "deadline", "stream"]),
                   st.one_of(st.floats(0.001, 0.5), st.floats(5.0, 100.0)), st.integers(0, 1))


@settings(max_examples=200, deadline=None)
@given(slack=st.lists(st.tuples(st.integers(1, 400), st.integers(1, 50), st.floats(5.0, 100.0), st.integers(0, 1)),
                      max_size=10),
       tight=st.lists(st.tuples(st.booleans(), st.integers(1, 400), st.integers(1, 50),
                                st.sampled_from(["deadline", "stream"]), st.floats(0.0, 1.2), st.integers(0, 1)),
                      min_size=1, max_size=3),
       others=st.lists(req_st, max_size=6), costs=step_st, keep=st.floats(0.0, 20.0))
def test_a_request_sits_out_only_with_slack_to_spare_and_only_to_save_an_urgent_one(slack, tight, others, costs, keep):
    """Given the predicted step times, a request that sits out still meets its objective with its next
    token one full step later; no urgent, lost or best-effort request sits out, nor one of a class
    above a request it helps; and when any sits out, some urgent request that would miss meets.

    The states mix far deadlines (slack), any requests, and tight ones whose time per token lies
    between the step alone and about the whole batch's step (``frac`` 0 to 1.2 of the way)."""
    fixed, per_decode, per_ctx = costs

    def st_fn(prefill: int, decodes: int, ctx: int) -> float:
        return (fixed + per_decode * decodes + per_ctx * ctx if decodes else 0.0) + PER_TOKEN * prefill

    views = [view(f"s{i}", tokens=t, blocks=-(-t // 16), remaining=rem, end=due, arrival=float(i), priority=prio)
             for i, (t, rem, due, prio) in enumerate(slack)]
    for i, (running, tokens, remaining, kind, due, prio) in enumerate(others):
        extra = {"none": dict(objective=False), "deadline": dict(end=due),
                 "stream": dict(next_due=due / 10, tbt=due / 50)}[kind]
        views.append(view(f"o{i}", running=running, tokens=tokens, blocks=-(-tokens // 16), remaining=remaining,
                          arrival=100.0 + i, priority=prio, **extra))
    n = len([v for v in views if v.running]) + sum(1 for t in tight if t[0])
    ctx = sum(v.num_tokens for v in views if v.running) + sum(t[1] for t in tight if t[0])
    whole = st_fn(0, max(1, n), max(1, ctx))
    for i, (running, tokens, remaining, kind, frac, prio) in enumerate(tight):
        alone = st_fn(0, 1, tokens)
        per = alone + frac * (whole - alone)  # seconds a token it can afford
        extra = dict(end=remaining * per) if kind == "deadline" else dict(next_due=per, tbt=per)
        views.append(view(f"t{i}", running=running, tokens=tokens, blocks=-(-tokens // 16), remaining=remaining,
                          arrival=200.0 + i, priority=prio, **extra))
    params = JitParams(skip_slack=True, skip_keep_steps=keep)
    plan = plan_jit(views, 0.0, st_fn, free_blocks=10_000, block_size=16, free_slots=None, params=params)
    by_id = {v.request_id: v for v in views}
    batch = [v for v in views if v.running and v.request_id not in plan.preempt]
    n, ctx = len(batch), sum(v.num_tokens for v in batch)
    full = st_fn(0, max(1, n), max(1, ctx))
    out = [by_id[r] for r in plan.skip]
    event(f"requests sitting out: {min(len(out), 2)}{'+' if len(out) > 2 else ''}")
    dec, dec_ctx = n - len(out), ctx - sum(v.num_tokens for v in out)
    prefill = sum(v.num_tokens for v in views if not v.running)  # every waiting request fits: all admitted
    this = st_fn(prefill, dec, dec_ctx)  # this step as planned, with those sitting out
    for v in out:
        assert v.running and plan.groups[v.request_id] == Group.SLACK
        assert margin(v, 0.0, full, this + full) >= keep * full >= 0  # still met, its next token a step later
    if out:
        needy = [v for v in views if plan.groups[v.request_id] == Group.URGENT and plan.margins[v.request_id] < 0]
        assert needy and max(v.priority for v in out) <= min(v.priority for v in needy)
        step_run = st_fn(0, max(1, dec), max(1, dec_ctx))
        assert any(margin(v, 0.0, step_run if v.running else st_fn(0, dec + 1, dec_ctx + v.num_tokens), this) >= 0
                   for v in needy)  # sitting out meets an urgent request that would miss


def test_tokens_stay_exact_when_requests_sit_out_steps():
    """The built-in engine (float64): slack requests sit out steps for an urgent one, keep their KV,
    and every request's tokens equal a run where nobody sits out."""
    from tests.factories import make_engine, make_requests, run_to_completion

    reqs = make_requests(4, seed=7, prompt_len=(8, 30), max_tokens=12)
    # After the prefill step (8 ms for four), the urgent one's 11 tokens take 88 ms at four in the batch
    # (it misses its 90 ms) and 66 ms at three: one slack request sits out while that still helps.
    objectives = [Objective(deadline_ms=90), Objective(deadline_ms=1e6), Objective(deadline_ms=5e5), None]
    reqs = [Request(r.request_id, r.prompt_token_ids, r.sampling, arrival_time=0.0, objective=o)
            for r, o in zip(reqs, objectives)]
    expected = run_to_completion(make_engine("torch", dtype="float64", num_blocks=64), requests=reqs)
    e = make_engine("torch", dtype="float64", num_blocks=64)
    clock = Clock()
    policy = JitBatchPolicy(clock, batch_step, LengthPrior(), estimator="oracle", params=SKIP)
    e.scheduler.batch_policy, e.scheduler.victim_policy = policy, policy.victim
    for r in reqs:
        e.add_request(r)
    got: dict[str, list[int]] = {}
    sat_out: list[tuple[str, ...]] = []
    while e.has_unfinished():
        out = e.step()
        e.check_invariants()
        ran = {o.request_id for o in out.outputs}
        if policy.last is not None and policy.last.skip:
            sat_out.append(policy.last.skip)
            assert not ran & set(policy.last.skip)  # no token for a request sitting out
        for o in out.outputs:
            got.setdefault(o.request_id, []).extend(o.new_token_ids)
        clock.now += batch_step(0, len(ran), 0)  # the predicted step of what ran, on the policy's clock
    assert sat_out, "no request sat out a step"
    assert got == expected


def test_the_simulator_runs_a_smaller_step_and_keeps_the_kv_of_a_request_sitting_out():
    clock = Clock()
    policy = JitBatchPolicy(clock, batch_step, LengthPrior(), estimator="oracle", params=SKIP)
    e = sim_engine(num_blocks=64, policy=policy)
    for r in (req("u", 16, 12, Objective(deadline_ms=90)), req("s1", 16, 12, Objective(deadline_ms=1e6)),
              req("s2", 16, 12, Objective(deadline_ms=5e5)), req("b", 16, 12)):
        e.add_request(r)
    assert e.step().num_prefill_tokens == 64  # all four admitted
    clock.now = batch_step(0, 4, 0)
    s1 = e.seqs["s1"]
    before = (s1.num_computed, list(s1.block_table), len(s1.output_token_ids))
    out = e.step()
    assert policy.last is not None and policy.last.skip == ("s1",)
    assert out.num_decode_tokens == 3 and {o.request_id for o in out.outputs} == {"u", "s2", "b"}
    assert (s1.num_computed, list(s1.block_table), len(s1.output_token_ids)) == before  # kept, not preempted
    assert {s.request_id for s in e.scheduler.running} == {"u", "s1", "s2", "b"} and out.preempted == ()
    e.check_invariants()


def test_the_skip_is_off_by_default_and_switched_on_by_the_engine_and_simulator_configs():
    from llumnix_py.sim.cluster import SimCluster
    from llumnix_py.sim.config import SimConfig
    from tests.factories import make_engine

    assert not JitParams().skip_slack
    for skip in (False, True):
        e = make_engine("sim", batch_policy="jit", jit_skip_slack=skip)
        assert e.scheduler.batch_policy.params.skip_slack is skip
        sim = SimCluster(SimConfig(num_instances=1, batch_policy="jit", jit_skip_slack=skip))
        (engine,) = sim.engines().values()
        assert engine.scheduler.batch_policy.params.skip_slack is skip


def test_a_step_that_would_compute_nothing_runs_the_requests_told_to_sit_out():
    """Sitting out is for a request in the step; when none is there after all (say the urgent one was not
    admitted), the engine runs the batch rather than a step of nothing."""
    from policies.jit import JitPlan

    class SitOutAll:
        def plan(self, running, waiting, **kw):
            return JitPlan(tuple(s.request_id for s in waiting), (), {}, {},
                           tuple(s.request_id for s in running))

        def victim(self, running):
            return running[-1]

    e = sim_engine(num_blocks=64, policy=SitOutAll())  # type: ignore[arg-type]
    e.add_request(req("a", 16, 4))
    e.add_request(req("b", 16, 4))
    e.step()
    out = e.step()
    assert out.num_decode_tokens == 2 and {o.request_id for o in out.outputs} == {"a", "b"}
