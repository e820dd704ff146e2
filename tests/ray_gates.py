"""``HoldOutputs`` for instances on Ray: hold an instance actor's engine after a token batch.

A Ray instance's llumlet sends each step's tokens from its own worker process
(``llumlet.sink.emit`` on the engine thread, outside the engine lock), so the hook of
the in-process ``HoldOutputs`` (the local cluster's ``on_outputs``) never sees them.
``RayEngineGate`` puts a ``HoldOutputs`` inside the instance actor instead, through
``__ray_call__``, and wraps that llumlet's ``sink.emit`` to call its ``after_batch``
after each batch; the test drives it with more ``__ray_call__``s::

    test process                          instance actor (worker process)
    ------------                          -------------------------------
    gate.hold() / step() / wait_held() -> __ray_call__ -> HoldOutputs <- after_batch()
                                                                     engine thread, after
                                                                     each sink.emit

While held, the instance answers every call (the engine lock is free) and migrations
out of it proceed (they need no engine step); its requests cannot finish. Stopping the
instance (a drain ends with it) releases its gate first, so ``stop`` never waits for a
held engine thread. Leaving the gate's ``with`` block releases and uninstalls it,
whatever happened; the gate of a killed instance is gone with its actor.

The functions run in the actor are shipped by value (this module and
``tests.cluster_helpers``), so the workers need not import ``tests`` (the worker's path
depends on the directory pytest was started in).
"""

from __future__ import annotations

import contextlib
import sys
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from tests import cluster_helpers
from tests.cluster_helpers import RESULT_TIMEOUT_S, HoldOutputs

if TYPE_CHECKING:
    from llumnix_py.cluster import Cluster

_GATE_ATTR = "_llumnix_test_gate"  # on the LlumletActor: (gate, original emit, original stop)


# ----- run inside the instance actor (``fn(actor, *args)`` through ``__ray_call__``) ---------
def _install(actor: Any, timeout: float) -> None:
    if getattr(actor, _GATE_ATTR, None) is not None:
        raise RuntimeError("this instance already has a gate")
    llumlet = actor._endpoint.target.llumlet
    gate = HoldOutputs(None, llumlet.instance_id, timeout)
    emit, stop = llumlet.sink.emit, llumlet.stop

    def gated_emit(instance_id, reply_to, outputs):
        emit(instance_id, reply_to, outputs)  # this batch is sent; the engine thread stops after it
        gate.after_batch()

    def stop_released():
        gate.release()  # ``stop`` joins the engine thread: never leave it held
        stop()

    llumlet.sink.emit = gated_emit
    llumlet.stop = stop_released
    setattr(actor, _GATE_ATTR, (gate, emit, stop))


def _uninstall(actor: Any) -> None:
    entry = getattr(actor, _GATE_ATTR, None)
    if entry is None:
        return
    gate, emit, stop = entry
    gate.release()
    llumlet = actor._endpoint.target.llumlet
    llumlet.sink.emit, llumlet.stop = emit, stop
    setattr(actor, _GATE_ATTR, None)


def _on_gate(actor: Any, name: str, *args: Any) -> Any:
    """Call ``HoldOutputs.<name>(*args)`` on the actor's gate, or read a property."""
    gate = getattr(actor, _GATE_ATTR)[0]
    value = getattr(gate, name)
    return value(*args) if callable(value) else value


# ----- the test's side ----------------------------------------------------------------------
def _ship_by_value(ray) -> None:
    for module in (sys.modules[__name__], cluster_helpers):
        ray.cloudpickle.register_pickle_by_value(module)


class RayEngineGate:
    """Holds a Ray instance's engine loop right after each token batch it sends.

    The interface of ``HoldOutputs``: ``hold``, ``wait_held``, ``step``, ``run_until``,
    ``holds``, ``waiting``, ``release``. A condition given to ``run_until`` is checked in
    the test process; make it one the instance answers (``handle.load()``, exact while it
    is held), not the tokens the test has received (they may still be on their way).

    Args:
        ray: the ``ray`` module of the session.
        cluster: a ``Cluster`` of the Ray runtime.
        instance_id: the instance to hold; the others run on.
        timeout: bounds every wait for the engine (a failure bound, not a pause).
    """

    def __init__(self, ray, cluster: "Cluster", instance_id: str, timeout: float = RESULT_TIMEOUT_S) -> None:
        handle = cluster.control.instance(instance_id)
        assert handle is not None, f"no instance {instance_id}"
        self.instance_id = instance_id
        self.timeout = timeout
        self._ray = ray
        self._actor = handle.actor
        _ship_by_value(ray)
        self._call(_install, timeout)

    def _call(self, fn, *args: Any) -> Any:
        ref = self._actor.__ray_call__.remote(fn, *args)
        return self._ray.get(ref, timeout=self.timeout + 30)  # the gate's own waits end first

    def hold(self) -> None:
        """After its next batch is sent, the engine thread waits (until ``step`` or ``release``)."""
        self._call(_on_gate, "hold")

    def wait_held(self) -> None:
        """Block until the engine thread waits at the gate; fails the test after ``timeout``."""
        self._call(_on_gate, "wait_held")

    def step(self, wait: bool = True) -> bool:
        """Let one more batch through and (``wait``) wait until the engine is held after it.
        False if it was not held again (released, or it had nothing left to run)."""
        return self._call(_on_gate, "step", wait)

    def run_until(self, cond, what: str = "condition") -> None:
        """Let batches through one at a time until ``cond()`` holds; the engine is held after."""
        cluster_helpers.step_until(self, cond, what)

    @property
    def holds(self) -> int:
        return self._call(_on_gate, "holds")

    @property
    def waiting(self) -> bool:
        return self._call(_on_gate, "waiting")

    def release(self) -> None:
        """Let the engine run freely from now on and take the gate off (a dead instance has none)."""
        with contextlib.suppress(self._ray.exceptions.RayActorError):
            self._call(_uninstall)

    def __enter__(self) -> "RayEngineGate":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def held_engines(ray, cluster: "Cluster", instance_ids: Sequence[str],
                 timeout: float = RESULT_TIMEOUT_S) -> Iterator[dict[str, RayEngineGate]]:
    """Gates on ``instance_ids`` (by id), each armed with ``hold``; all released on leaving."""
    assert instance_ids
    with contextlib.ExitStack() as stack:
        gates = {iid: stack.enter_context(RayEngineGate(ray, cluster, iid, timeout)) for iid in instance_ids}
        for gate in gates.values():
            gate.hold()
        yield gates
