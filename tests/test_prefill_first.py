"""A ``prefill`` instance puts prompts first (``LlumletConfig.prefill_first_steps``): while
prompts wait, up to N steps in a row prefill them alone and the requests waiting for their
hand-off sit out; the step after runs as usual. On the core (simulated engine) and in the
simulator's disaggregated layouts (the serve flag: ``tests/test_cli.py``)."""

from __future__ import annotations

import pytest

from experiments.workloads import WorkloadRequest
from llumnix_py import planner
from llumnix_py.engines.types import Request, SamplingParams
from llumnix_py.llumlet_core import LlumletCore
from llumnix_py.llumlet_types import PREFILL_FIRST_STEPS, LlumletConfig
from llumnix_py.sim import SimCluster, SimConfig
from tests.factories import make_engine


def make_core(steps: int = 2, **engine_kw) -> LlumletCore:
    engine = make_engine("sim", num_blocks=256, max_batch_size=8, **engine_kw)
    return LlumletCore(LlumletConfig("p0", transport="inproc", lease_timeout_s=None, prefill_first_steps=steps),
                       engine)


def request(rid: str, n: int = 20, max_tokens: int = 50) -> Request:
    return Request(rid, tuple(range(3, 3 + n)), SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                   reply_to="local://frontend")


def submit(core: LlumletCore, *rids: str) -> None:
    for rid in rids:
        core.submit(request(rid))
    core.admit(now=0.0)


def steps(core: LlumletCore, n: int) -> list[tuple[int, int]]:
    """(prefill tokens, decode tokens) of ``n`` steps."""
    out = []
    for _ in range(n):
        step, _ = core.step()
        out.append((step.num_prefill_tokens, step.num_decode_tokens))
    return out


def test_a_prefill_instance_prefills_waiting_prompts_alone_for_at_most_n_steps_in_a_row():
    # one 20-token prompt a step (budget 30 tokens), so each queued prompt takes a step
    core = make_core(steps=2, max_batched_tokens=30)
    core.set_role("prefill", now=0.0)
    submit(core, "a")
    assert steps(core, 1) == [(20, 0)]  # a's first token is out: it waits for its hand-off
    submit(core, "b", "c", "d", "e")
    # two prompt-only steps, then a usual step (the batch decodes beside a prompt), then
    # prompts first again
    assert steps(core, 4) == [(20, 0), (20, 0), (20, 3), (20, 0)]
    assert steps(core, 2) == [(0, 5), (0, 5)]  # nothing left to admit: every step decodes


def test_other_roles_and_zero_steps_decode_the_batch_in_every_step():
    for role, n in (("both", 2), ("prefill", 0)):
        core = make_core(steps=n, max_batched_tokens=40)
        core.set_role(role, now=0.0)
        submit(core, "a")
        steps(core, 1)
        submit(core, "b", "c")
        # the batch decodes beside the prompt admitted (the second does not fit the budget left)
        assert steps(core, 2) == [(20, 1), (20, 2)], role


def test_leaving_the_prefill_role_turns_it_off():
    core = make_core(steps=4, max_batched_tokens=20)
    core.set_role("prefill", now=0.0)
    assert core.engine.scheduler.prefill_first == 4
    core.set_role("decode", now=0.0)
    assert core.engine.scheduler.prefill_first == 0
    core.set_role("prefill", now=0.0)
    core.set_role("both", now=0.0)
    assert core.engine.scheduler.prefill_first == 0


def test_a_waiting_prompt_that_cannot_be_admitted_does_not_stop_the_batch():
    core = make_core(steps=8, max_batched_tokens=8192)
    core.set_role("prefill", now=0.0)
    submit(core, "a")
    steps(core, 1)
    # the prompt below is valid here (253 of 254 usable blocks) but needs more than are free
    core.submit(Request("huge", tuple(3 + i % 300 for i in range(16 * 253)), SamplingParams(max_tokens=4, ignore_eos=True),
                        reply_to="local://frontend"))
    core.admit(now=0.0)
    assert [r.request_id for r in core.engine.load().waiting] == ["huge"]
    assert steps(core, 2) == [(0, 1), (0, 1)]


def test_an_engine_of_its_own_puts_prompts_first_in_any_role_as_vllm_0_3_did():
    # EngineConfig.prefill_first_steps: a colocated engine runs a prompt-only step whenever a
    # prompt can be admitted; a prefill role sets the llumlet's count, leaving it restores this
    core = make_core(steps=2, max_batched_tokens=30, prefill_first_steps=1000)
    assert core.engine.scheduler.prefill_first == 1000
    submit(core, "a")
    steps(core, 1)
    submit(core, "b", "c", "d")
    assert steps(core, 4) == [(20, 0), (20, 0), (20, 0), (0, 4)]
    core.set_role("prefill", now=0.0)
    assert core.engine.scheduler.prefill_first == 2
    core.set_role("both", now=0.0)
    assert core.engine.scheduler.prefill_first == 1000


@pytest.mark.parametrize("bad", [-1, 1001, 1.5, True])
def test_the_step_count_is_validated_everywhere(bad):
    with pytest.raises(ValueError, match="prefill_first_steps"):
        LlumletConfig("x", prefill_first_steps=bad)
    with pytest.raises(ValueError, match="prefill_first_steps"):
        SimConfig(prefill_first_steps=bad)
    with pytest.raises(ValueError, match="prefill_first_steps"):
        SimConfig(engine_prefill_first_steps=bad)
    with pytest.raises(ValueError, match="prefill_first_steps"):
        make_engine("sim", prefill_first_steps=bad)
    with pytest.raises(ValueError, match="prefill_first_steps"):
        make_engine("sim").set_prefill_first(bad)


def _sim(prefill_first: int) -> tuple[SimCluster, object]:
    # three prefill instances and one decode instance, 20 short prompts a second: prefill
    # instances that decode in every step keep the next prompts waiting longer
    reqs = [WorkloadRequest(0.05 * i, 200 + (37 * i) % 300, 40 + (13 * i) % 60) for i in range(300)]
    lay = planner.Layout(4, (3, 1), handoffs=4, prefill_first=prefill_first)
    cluster = SimCluster(lay.sim_config("llama-7b-a10", seed=0))
    return cluster, cluster.run(reqs, progress=False)


def test_in_the_simulator_prompts_first_serves_every_request_whole_and_shortens_time_to_first_token():
    _, first = _sim(PREFILL_FIRST_STEPS)
    _, every = _sim(0)
    for res in (first, every):
        s = res.summary()
        assert s["completed"] == s["num_requests"] == 300
        assert all(r.num_tokens == r.output_len for r in res.requests)
    assert first.summary()["prefill_mean"] < every.summary()["prefill_mean"]
    assert planner.Layout(4, (3, 1), prefill_first=0).name.endswith("decodes every step")


def test_a_layout_carries_both_counts_to_the_simulator():
    cfg = planner.Layout(4, None, "round_robin", False, engine_prefill_first=1000).sim_config("llama-7b-a10", 0)
    assert cfg.engine_config().prefill_first_steps == 1000 and cfg.prefill_first_steps == PREFILL_FIRST_STEPS
    lays = planner.colocated_layouts(4, (1, 2), dispatch="round_robin", migration=False, engine_prefill_first=7)
    assert [lay.engine_prefill_first for lay in lays] == [7, 7]
    assert {lay.prefill_first for lay in planner.layouts(4, prefill_first=3)} == {3}
