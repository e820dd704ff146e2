"""Closed-loop agentic jobs for ``experiments/slo.py`` (workload ``agentic-loop``).

A job is a chain of 2-4 LLM calls with one deadline (``DEADLINE_PER_CALL_S`` per call, from the
job's start). Its first call arrives at the job's start (Poisson starts at the workload's rate);
each later call is submitted when the previous one has finished, plus a tool time
(exponential, mean ``TOOL_S``), and its prompt is the previous call's prompt and output with
the tool's result appended (BurstGPT-like lengths: the first call's prompt and each tool
result are drawn as BurstGPT prompts, each output as a BurstGPT output; a job stops adding
calls before its context would pass ``MAX_CONTEXT``). Each call carries ``job_id``, the job's
time left at its submission (``job_deadline_ms``; 1 ms once the deadline has passed: the agent
does not know it is lost and calls on) and its calls left.

``JobCluster`` is a ``SimCluster`` that builds the real prompts (so the conversation store
checks them token by token, as in the real system) and releases each call when its
predecessor ends. Measures, besides the per-call goodput and attainment of ``slo.py``:
job attainment (jobs whose last call ended by the job's deadline), prefill tokens saved by
reused KV (the conversation stores' restored tokens) against all prompt tokens, and where
each later call went (the instance holding its job's KV or another).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from experiments.workloads import burstgpt_like, poisson_arrivals
from llumnix_py.engines.jit_batch import with_objective
from llumnix_py.engines.types import Objective, Request, SamplingParams, StepOutput, job_kv_key
from llumnix_py.load import RequestLoad
from llumnix_py.sim.cluster import SimCluster, SimInstance
from llumnix_py.sim.config import SimConfig

AGENT_CALLS = (2, 4)
DEADLINE_PER_CALL_S = 20.0
TOOL_S = 1.0
MAX_CONTEXT = 8192
VOCAB = 32000


@dataclass(frozen=True)
class Job:
    """One agentic job: when it starts, its deadline (seconds from the start), and per call the
    tokens it appends (the task, then each tool result), its output length and the tool time
    before it (0 for the first call)."""

    start: float
    deadline_s: float
    appended: tuple[tuple[int, ...], ...]
    outputs: tuple[int, ...]
    tools_s: tuple[float, ...]

    @property
    def num_calls(self) -> int:
        return len(self.outputs)

    def prompt_len(self, call: int) -> int:
        return sum(len(a) for a in self.appended[:call + 1]) + sum(self.outputs[:call])


@dataclass(frozen=True)
class JobWorkload:
    """The jobs of one ``agentic-loop`` run (at least ``calls`` calls in all)."""

    jobs: tuple[Job, ...]

    @property
    def num_calls(self) -> int:
        return sum(j.num_calls for j in self.jobs)

    @property
    def span_s(self) -> float:
        starts = [j.start for j in self.jobs]
        return max(starts) - min(starts)


def make_job_workload(calls: int, rate: float, seed: int) -> JobWorkload:
    """Jobs starting at ``rate`` per second (Poisson) until they hold at least ``calls`` calls."""
    rng = np.random.default_rng(seed)
    starts = poisson_arrivals(max(1, calls), rate, rng)
    jobs: list[Job] = []
    total = 0
    while total < calls:
        n = int(rng.integers(AGENT_CALLS[0], AGENT_CALLS[1] + 1))
        p, o = burstgpt_like(n, rng)
        appended, outputs, tools = [], [], []
        context = 0
        for c in range(n):
            new, out = int(p[c]), max(1, int(o[c]))
            if c and context + new + out > MAX_CONTEXT:
                break
            appended.append(tuple(int(x) for x in rng.integers(1, VOCAB, new)))
            outputs.append(out)
            tools.append(float(rng.exponential(TOOL_S)) if c else 0.0)
            context += new + out
        jobs.append(Job(float(starts[len(jobs)]), DEADLINE_PER_CALL_S * n, tuple(appended), tuple(outputs),
                        tuple(tools)))
        total += len(outputs)
    return JobWorkload(tuple(jobs))


@dataclass
class _Call:  # a WorkloadRequest for SimCluster.run; later calls arrive when released (inf until then)
    arrival_time: float
    prompt_len: int
    output_len: int
    objective: Optional[Objective]
    priority: int = 0


@dataclass
class JobStats:
    """What ``JobCluster`` measured beyond the request records."""

    later_calls: int = 0  # calls after a job's first
    later_calls_home: int = 0  # of those, dispatched to the instance keeping their job's KV
    history: dict[int, tuple[int, ...]] = field(default_factory=dict)  # job -> prompt + output of its last call


class JobCluster(SimCluster):
    """``SimCluster`` with closed-loop jobs (see the module docstring)."""

    def __init__(self, config: SimConfig, workload: JobWorkload) -> None:
        super().__init__(config)
        self.workload = workload
        self.calls = [(j, c) for j, job in enumerate(workload.jobs) for c in range(job.num_calls)]
        self.stats = JobStats()
        self._rids: list[str] = []
        self._index: dict[str, int] = {}
        self._tokens: dict[str, list[int]] = {}

    def requests(self) -> list[_Call]:
        """The workload for ``run``: first calls at their job's start, later ones unreleased."""
        out = []
        for j, c in self.calls:
            job = self.workload.jobs[j]
            obj = Objective(job_id=f"job-{j}", job_deadline_ms=job.deadline_s * 1e3, job_calls_left=job.num_calls)
            out.append(_Call(job.start if c == 0 else float("inf"), job.prompt_len(c), job.outputs[c],
                             obj if c == 0 else None))
        return out

    def _order(self) -> None:
        if not self._rids:  # run() creates the records in workload order before any event
            self._rids = list(self.records)
            self._index = {rid: k for k, rid in enumerate(self._rids)}

    @property
    def request_ids(self) -> list[str]:
        """Request ids in the order of ``calls``."""
        self._order()
        return self._rids

    def _dispatch(self, rec: Any) -> None:
        self._order()
        j, c = self.calls[self._index[rec.request_id]]
        job = self.workload.jobs[j]
        prompt = self.stats.history.get(j, ()) + job.appended[c]
        if len(prompt) != rec.prompt_len:
            raise RuntimeError(f"call {c} of job {j}: prompt of {len(prompt)} tokens, expected {rec.prompt_len}")
        key = job_kv_key(rec.objective)
        view = with_objective(RequestLoad.queued(rec.request_id, prompt_len=rec.prompt_len,
                                                 block_size=self.engine_config.block_size,
                                                 arrival_time=rec.arrival_time, conversation_id=key), rec.objective)
        iid = self.scheduler.dispatch(view)
        if iid is None:
            self._undispatched.append(rec)
            return
        if c:
            self.stats.later_calls += 1
            self.stats.later_calls_home += int(key in self.instances[iid].engine.conversations)
        inst = self.instances[iid]
        rec.dispatched_to = iid
        self._tokens[rec.request_id] = list(prompt)
        inst.core.submit(Request(rec.request_id, prompt, SamplingParams(max_tokens=rec.output_len, ignore_eos=True),
                                 arrival_time=rec.arrival_time, objective=rec.objective))
        inst.core.admit(self.now)
        inst.dirty = True
        self._wake(inst)

    def _on_step_end(self, arg: tuple[SimInstance, StepOutput]) -> None:
        _, out = arg
        finished = []
        for o in out.outputs:
            self._tokens[o.request_id].extend(o.new_token_ids)
            if o.finish_reason is not None:
                finished.append(o.request_id)
        super()._on_step_end(arg)
        now = self.now
        for rid in finished:  # release the job's next call, if it has one
            k = self._index[rid]
            j, c = self.calls[k]
            job = self.workload.jobs[j]
            self.stats.history[j] = tuple(self._tokens.pop(rid))
            if c + 1 < job.num_calls:
                nxt = self.records[self._rids[k + 1]]
                nxt.arrival_time = now + job.tools_s[c + 1]
                left_ms = (job.start + job.deadline_s - nxt.arrival_time) * 1e3
                nxt.objective = Objective(job_id=f"job-{j}", job_deadline_ms=max(1.0, left_ms),
                                          job_calls_left=job.num_calls - c - 1)
                self._push(nxt.arrival_time, self._on_arrival, nxt.request_id)

    def _loads_read_before_next_tick(self, round_now: bool) -> bool:
        return True  # calls arrive in a closed loop, unknown to the parent's look-ahead: poll every tick


def job_results(cluster: JobCluster) -> dict:
    """Job attainment, prefill saved and placement counts of a finished ``JobCluster`` run."""
    wl = cluster.workload
    last = {j: k for k, (j, _) in enumerate(cluster.calls)}  # job -> index of its last call
    met_jobs = 0
    for j, job in enumerate(wl.jobs):
        end = cluster.records[cluster.request_ids[last[j]]].finish_time
        met_jobs += int(end is not None and end <= job.start + job.deadline_s)
    saved = sum(e.conversations.restored_tokens for e in cluster.engines().values())
    prompt = sum(r.prompt_len for r in cluster.records.values())
    s = cluster.stats
    return {"jobs": len(wl.jobs), "job_attainment": met_jobs / len(wl.jobs), "prefill_saved_tokens": saved,
            "prompt_tokens": prompt, "prefill_saved_share": saved / prompt if prompt else 0.0,
            "later_calls": s.later_calls, "later_calls_home": s.later_calls_home}
