"""One interface per boundary, one generic proxy per runtime (``llumnix_py.proxy``).

The method table of an interface is its abstract methods. These tests show that
(1) a method added to an interface is reachable through a direct proxy and a Ray
actor without any other edit, and nothing outside the table is; (2) every method of
``InstanceHandle`` and ``SchedulerAPI`` works through both runtimes, driven from the
tables themselves: a new method fails here until its call is added below.
"""

from __future__ import annotations

import abc
import contextlib
import inspect
import sys
from typing import Any, Callable, Iterator, Mapping, Sequence

import pytest

from llumnix_py.config import ClusterConfig, SchedulerConfig
from llumnix_py.engines.types import MigrationRequestState, Request, SamplingParams, SeqStatus
from llumnix_py.errors import LlumnixError, UnknownInstanceError, UnknownRoleError
from llumnix_py.frontend.cluster import Cluster
from llumnix_py.instance import INSTANCE_METHODS, InstanceHandle
from llumnix_py.proxy import Endpoint, UnknownMethodError, forwards, is_oneway, method_table, oneway
from llumnix_py.scheduler.api import SchedulerAPI
from llumnix_py.scheduler.frontends import FrontendRecord
from llumnix_py.load import RequestLoad
from tests.cluster_helpers import HoldOutputs, running_ray_cluster, small_spec, wait_for
from tests.ray_gates import RayEngineGate


# ----- the mechanism, on a toy interface ---------------------------------------------------
class Counter(abc.ABC):
    @abc.abstractmethod
    def add(self, n: int, times: int = 1) -> int:
        """Add ``n`` ``times`` times; returns the total."""

    @abc.abstractmethod
    def total(self) -> int: ...

    @abc.abstractmethod
    @oneway
    def note(self, text: str) -> None: ...


class CounterV2(Counter):
    """The one edit: a method added to the interface."""

    @abc.abstractmethod
    def reset(self) -> int: ...


class Tally:
    """Implements ``CounterV2``, plus methods no interface serves."""

    def __init__(self) -> None:
        self.value = 0
        self.notes: list[str] = []

    def add(self, n: int, times: int = 1) -> int:
        self.value += n * times
        return self.value

    def total(self) -> int:
        return self.value

    def note(self, text: str) -> None:
        self.notes.append(text)

    def reset(self) -> int:
        old, self.value = self.value, 0
        return old

    def wipe_everything(self) -> None:
        raise AssertionError("not in any method table: never callable through a proxy")


def direct_proxy(interface: type) -> Callable[[Any], Any]:
    """A proxy class for ``interface`` that calls its target directly (as the local runtime does)."""

    @forwards(interface)
    class Direct(interface):  # type: ignore[misc, valid-type]
        def __init__(self, target: Any) -> None:
            self.target = target
            self.calls: list[str] = []

        def _invoke(self, method: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
            self.calls.append(method)
            return getattr(self.target, method)(*args, **kwargs)

    return Direct


def test_the_method_table_is_the_abstract_methods():
    assert method_table(Counter) == {"add", "total", "note"}
    assert method_table(CounterV2) == {"add", "total", "note", "reset"}
    assert is_oneway(Counter, "note") and not is_oneway(Counter, "add")
    with pytest.raises(TypeError):
        method_table(Tally)


def test_a_forwarded_method_keeps_its_declared_signature_and_doc():
    Direct = direct_proxy(Counter)
    assert not inspect.isabstract(Direct)
    assert inspect.signature(Direct.add) == inspect.signature(Counter.add)
    assert Direct.add.__doc__ == Counter.add.__doc__
    assert Direct.add.__qualname__.endswith("Direct.add")


def test_a_method_the_proxy_defines_itself_is_kept():
    @forwards(Counter)
    class Cached(Counter):
        def _invoke(self, method, args, kwargs):
            raise AssertionError("total is answered locally")

        def total(self) -> int:
            return 42

    assert Cached().total() == 42


def test_a_proxy_without_invoke_is_refused():
    with pytest.raises(TypeError):
        @forwards(Counter)
        class Broken(Counter):  # noqa: F841
            pass


def test_an_added_method_is_served_directly_with_no_other_edit():
    proxy = direct_proxy(CounterV2)(Tally())
    assert proxy.add(2, times=3) == 6 and proxy.total() == 6
    proxy.note("hello")
    assert proxy.reset() == 6 and proxy.total() == 0
    assert proxy.calls == ["add", "total", "note", "reset", "total"]
    assert proxy.target.notes == ["hello"]


def test_an_endpoint_runs_only_the_names_of_its_table():
    target = Tally()
    old, new = Endpoint(Counter, target), Endpoint(CounterV2, target)
    assert new.call("add", (5,), {"times": 2}) == 10
    assert new.call("reset") == 10
    with pytest.raises(UnknownMethodError, match="reset"):
        old.call("reset")  # served only once the interface declares it
    for name in ("wipe_everything", "__init__", "__class__", "value", "nonexistent"):
        with pytest.raises(UnknownMethodError):
            new.call(name)


@pytest.mark.ray
def test_an_added_method_is_served_through_a_ray_actor_with_no_other_edit(ray_session):
    ray = ray_session
    this_module = sys.modules[__name__]  # not importable in Ray's workers: send its classes by value
    ray.cloudpickle.register_pickle_by_value(this_module)
    actor = ray.remote(Endpoint).remote(CounterV2, Tally())
    try:
        @forwards(CounterV2)
        class RayCounter(CounterV2):
            def _invoke(self, method, args, kwargs):
                ref = actor.call.remote(method, tuple(args), dict(kwargs))
                return None if is_oneway(CounterV2, method) else ray.get(ref, timeout=60)

        proxy = RayCounter()
        assert proxy.add(4, times=2) == 8
        proxy.note("sent without waiting")
        assert proxy.reset() == 8 and proxy.total() == 0
        with pytest.raises(ray.exceptions.RayTaskError) as err:
            ray.get(actor.call.remote("wipe_everything"), timeout=60)
        assert isinstance(err.value.cause, UnknownMethodError)
    finally:
        ray.kill(actor)
        ray.cloudpickle.unregister_pickle_by_value(this_module)


# ----- every method of the real interfaces, through both runtimes -------------------------
PROMPT = tuple(range(1, 33))


def instance_calls(reply_to: str, dst_address: str) -> list[tuple[str, tuple, Callable[[Any], bool]]]:
    """One call of every ``InstanceHandle`` method, in order, with a check of its reply."""
    sp = SamplingParams(max_tokens=400, ignore_eos=True)
    resumed = MigrationRequestState("px-resumed", PROMPT, (5, 6), sp, 0, 0.0, 0, SeqStatus.WAITING, 0, reply_to)
    return [
        ("add_request", (Request("px-added", PROMPT, sp, reply_to=reply_to),), lambda r: r is None),
        ("held", (["px-added", "px-unknown"],), lambda r: r == ["px-added"]),
        ("renew_lease", (reply_to,), lambda r: r is None),
        ("resume_request", (resumed,), lambda r: r is True),
        ("load", (), lambda r: r.total_blocks > 0 and r.used_blocks + r.free_blocks == r.total_blocks),
        ("migrate_out", ("px-unknown", dst_address, "px-migration", False), lambda r: r is False),
        ("pop_results", (), lambda r: r == []),
        ("set_fair_offsets", ({"px-client": 1.0},), lambda r: r is None),
        ("set_role", ("decode",), lambda r: r is None),
        ("abort", ("px-added",), lambda r: r is True),
        ("abort", ("px-resumed",), lambda r: r is True),
        ("stats", (), lambda r: r["resumed"] == 1),
        ("stop", (), lambda r: r is None),
    ]


def test_the_instance_calls_below_cover_the_whole_table():
    assert [name for name, _, _ in instance_calls("", "")] != []
    assert {name for name, _, _ in instance_calls("", "")} == INSTANCE_METHODS


@contextlib.contextmanager
def one_instance_cluster(runtime: str, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    cfg = ClusterConfig(num_instances=1, runtime=runtime, engine=small_spec(num_blocks=64),
                        ray_namespace="llumnix-test-proxy",
                        scheduler=SchedulerConfig(poll_interval_s=0.02, migration_interval_s=10.0))
    if runtime == "ray":
        with running_ray_cluster(request.getfixturevalue("ray_session"), cfg) as cluster:
            yield cluster
    else:
        cluster = Cluster.start(cfg)
        try:
            yield cluster
        finally:
            cluster.stop()


def engine_gate(runtime: str, request: pytest.FixtureRequest, cluster: Cluster,
                instance_id: str) -> "HoldOutputs | RayEngineGate":
    if runtime == "ray":
        return RayEngineGate(request.getfixturevalue("ray_session"), cluster, instance_id)
    return HoldOutputs(cluster, instance_id)


@pytest.mark.parametrize("runtime", ["local", pytest.param("ray", marks=[pytest.mark.ray, pytest.mark.slow])])
def test_every_interface_method_is_reachable_through_the_runtime(runtime, request):
    with one_instance_cluster(runtime, request) as cluster:
        control = cluster.control
        first = control.instance_ids()
        assert first == ["instance-000"]
        # The scheduler's table (its ``stop`` is the cluster's own, on leaving the block).
        (new,) = control.launch(1)
        assert control.instance_ids() == ["instance-000", new]
        view = RequestLoad(request_id="px-dispatched", num_blocks=0, blocks_needed=2, prompt_len=len(PROMPT))
        assert control.dispatch(view) in {"instance-000", new}
        wait_for(lambda: new in (control.membership() or {}).get("instances", []), 30, "membership to list it")
        assert {i["instance_id"] for i in control.state()["instances"]} == {"instance-000", new}
        # The ownership arbiter (llumlets reach it through this method): first claim wins.
        assert control.claim_ownership("px-migration", "source") == "source"
        assert control.claim_ownership("px-migration", "destination") == "source"
        control.frontend_heartbeat(FrontendRecord("px-frontend", api_url="http://127.0.0.1:1"))
        listed = {f["frontend_id"]: f["api_url"] for f in control.state()["frontends"]}
        assert listed["px-frontend"] == "http://127.0.0.1:1"
        control.frontend_left("px-frontend")
        assert "px-frontend" not in {f["frontend_id"] for f in control.state()["frontends"]}
        # Roles flip at run time; a bad role or instance is a typed error through the runtime.
        control.set_role(new, "decode")
        assert {i["instance_id"]: i["role"] for i in control.state()["instances"]}[new] == "decode"
        with pytest.raises(UnknownRoleError, match="expected one of"):
            control.set_role(new, "chef")
        with pytest.raises(UnknownInstanceError, match="instance-999"):
            control.set_role("instance-999", "decode")
        cluster.set_role(new, "Both")  # the library's entry point: validated there, then this call
        assert {i["instance_id"]: i["role"] for i in control.state()["instances"]}[new] == "both"
        assert [f[1:] for f in control.state()["role_flips"]] == [[new, "decode"], [new, "both"]]
        scheduler_calls = {"instance_ids", "launch", "dispatch", "membership", "state", "drain", "frontend_heartbeat",
                           "frontend_left", "stop", "claim_ownership", "set_role"}
        assert scheduler_calls == method_table(SchedulerAPI)

        # The instance's table, on the new instance; ``stop`` ends it.
        inst = control.instance(new)
        assert isinstance(inst, InstanceHandle)
        dst = control.instance("instance-000").address
        with engine_gate(runtime, request, cluster, new) as gate:
            gate.hold()  # held after its first batch: the requests added below are still there when aborted
            for name, args, check in instance_calls(cluster.reply_to, dst):
                if name == "stop":
                    gate.release()  # ``stop`` joins the engine thread
                reply = getattr(inst, name)(*args)
                assert check(reply), f"{name}{args!r} answered {reply!r}"

        # A stopped instance leaves by drain (local: it is stopped again) or as dead (Ray).
        with contextlib.suppress(LlumnixError):
            control.drain(new)
        wait_for(lambda: control.instance_ids() == ["instance-000"], 60, f"{new} to leave")
