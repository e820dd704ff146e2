"""A hypothesis state machine over an engine whose copies wait on a gated link.

Requests arrive (plain, or a conversation's next turn, whose prefix is restored from the
host pool), steps run, copies land one at a time when the machine says so, requests are
aborted. Swap-outs, swap-ins, a finished turn's store and a new turn's restore all queue
on the same link (``GatedCopier``), so any interleaving of them with steps is explored.
After every rule: each block of either pool is owned by exactly one request or stored
turn, or free, and no step has touched a block a copy in flight reads or writes. Every
request that finishes gives exactly the tokens of a run alone on a large engine without
reuse (greedy).
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from llumnix_py.engines.core import EngineCore
from llumnix_py.engines.types import Request, SamplingParams
from tests.factories import make_engine, run_to_completion
from tests.test_swap_async import GatedCopier, watch_blocks

CONVERSATIONS = ("c0", "c1", "c2")


class AsyncCopiesMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        base = make_engine(dtype="float64", num_blocks=20, block_size=4, watermark=0.0, num_host_blocks=48,
                           conversation_host_blocks=24, preemption_mode="swap", async_swap=True)
        self.gate = GatedCopier()
        self.engine = EngineCore(base.config, base.executor, copier=self.gate)
        self.touched: list = []
        watch_blocks(self.engine, self.touched)  # fails a step that touches a block in flight
        self.ref = make_engine(dtype="float64", num_blocks=256, block_size=4)
        self.live: dict[str, Request] = {}
        self.tokens: dict[str, list[int]] = {}
        self.history: dict[str, tuple[int, ...]] = {}  # conversation -> its last finished turn's tokens
        self.busy: set[str] = set()  # conversations with a turn in the engine
        self.n = 0

    def _add(self, req: Request) -> None:
        self.engine.add_request(req)
        self.live[req.request_id] = req
        self.tokens[req.request_id] = []

    @rule(prompt=st.lists(st.integers(0, 255), min_size=1, max_size=14), out=st.integers(1, 12))
    def plain(self, prompt, out):
        self.n += 1
        self._add(Request(f"p{self.n}", tuple(prompt), SamplingParams(max_tokens=out, ignore_eos=True)))

    @rule(cid=st.sampled_from(CONVERSATIONS), new=st.lists(st.integers(0, 255), min_size=1, max_size=8),
          out=st.integers(1, 10))
    def turn(self, cid, new, out):
        if cid in self.busy:
            return
        prompt = self.history.get(cid, ()) + tuple(new)
        if len(prompt) > 48:  # a short conversation: start it again
            prompt = tuple(new)
        self.n += 1
        self._add(Request(f"{cid}t{self.n}", prompt, SamplingParams(max_tokens=out, ignore_eos=True),
                          conversation_id=cid))
        self.busy.add(cid)

    @rule()
    def step(self):
        for o in self.engine.step().outputs:
            self.tokens[o.request_id].extend(o.new_token_ids)
            if o.finish_reason is not None:
                self._finished(self.live.pop(o.request_id))

    @precondition(lambda self: self.gate.pending)
    @rule()
    def land_one(self):
        self.gate.release()

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def abort(self, data):
        rid = data.draw(st.sampled_from(sorted(self.live)))
        req = self.live.pop(rid)
        self.engine.abort_request(rid)
        self.busy.discard(req.conversation_id)

    def _finished(self, req: Request) -> None:
        got = self.tokens[req.request_id]
        expected = run_to_completion(self.ref, requests=[req])[req.request_id]
        assert got == expected, f"{req.request_id}: {got} != {expected} (a run alone, without reuse)"
        if req.conversation_id:
            self.history[req.conversation_id] = req.prompt_token_ids + tuple(got)
            self.busy.discard(req.conversation_id)

    @invariant()
    def books_balance(self):
        self.engine.check_invariants()

    def teardown(self):
        steps = 0
        while self.engine.has_unfinished():
            self.step()
            steps += 1
            assert steps < 2000, "the engine stopped making progress"
        while self.gate.pending:
            self.gate.release()
        self.engine.check_invariants()
        assert self.engine.blocks.num_used == 0
        assert self.engine.host.num_used == self.engine.conversations.num_blocks  # only stored turns


AsyncCopiesMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=40, deadline=None,
                                                suppress_health_check=[HealthCheck.too_slow])
test_async_copies_machine = AsyncCopiesMachine.TestCase
