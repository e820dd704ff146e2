"""In-process runtime: llumlets as objects in this process, same code as on Ray."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Sequence

from llumnix_py.engines.registry import EngineSpec, build_engine
from llumnix_py.instance import InstanceDiedError, InstanceHandle, InstanceLauncher
from llumnix_py.llumlet import Llumlet
from llumnix_py.llumlet_types import LlumletConfig, TokenSink
from llumnix_py.proxy import forwards
from migration.ownership import OwnershipPort


@forwards(InstanceHandle)
class LocalInstance(InstanceHandle):
    """A llumlet in this process: every method of ``InstanceHandle`` is a direct call on it.

    After ``crash`` (fault injection) it behaves like a killed Ray actor: the
    llumlet stops abruptly and every call raises ``InstanceDiedError``. The Ray
    runtime's actor serves one of these too, so both runtimes share this code.
    """

    def __init__(self, llumlet: Llumlet) -> None:
        self.llumlet = llumlet
        self.instance_id = llumlet.instance_id
        self.address = llumlet.address
        self.incarnation = llumlet.incarnation

    def _invoke(self, method: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
        if self.llumlet.dead:
            raise InstanceDiedError(f"instance {self.instance_id} died")
        return getattr(self.llumlet, method)(*args, **kwargs)

    def crash(self) -> None:
        """Kill the instance abruptly (tests; and fencing of an unresponsive instance)."""
        self.llumlet.crash()

    def alive(self) -> bool:
        return not self.llumlet.dead

    def stats(self) -> dict[str, Any]:
        return dataclasses.asdict(self.llumlet.stats)  # the llumlet's stats are a dataclass, not a method

    def stop(self) -> None:
        self.llumlet.stop()  # also releases the threads of a crashed llumlet


class LocalLauncher(InstanceLauncher):
    """Builds an engine and a llumlet per instance in this process.

    Args:
        engine: what each instance runs.
        llumlet: template config (its ``instance_id`` is replaced per instance).
        make_sink: the token sink of each instance.
    """

    def __init__(self, engine: EngineSpec, llumlet: LlumletConfig, make_sink: Callable[[], TokenSink]) -> None:
        self.engine = engine
        self.llumlet = llumlet
        self.make_sink = make_sink
        self.ownership: Optional[OwnershipPort] = None

    def bind_ownership(self, port: OwnershipPort) -> None:
        self.ownership = port

    def launch(self, instance_id: str) -> InstanceHandle:
        cfg = dataclasses.replace(self.llumlet, instance_id=instance_id)
        llumlet = Llumlet(cfg, build_engine(self.engine), self.make_sink(), ownership=self.ownership)
        llumlet.start()
        return LocalInstance(llumlet)

    def terminate(self, handle: InstanceHandle) -> None:
        handle.stop()

    def fence(self, handle: InstanceHandle) -> None:
        if isinstance(handle, LocalInstance):
            handle.crash()
