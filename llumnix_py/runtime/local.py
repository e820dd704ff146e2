"""In-process runtime: llumlets as objects in this process, same code as on Ray."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

from llumnix_py.engines.registry import EngineSpec, build_engine
from llumnix_py.engines.types import EngineLoad, MigrationRequestState, Request
from llumnix_py.llumlet import Llumlet
from llumnix_py.llumlet_types import LlumletConfig, TokenSink
from llumnix_py.runtime.base import InstanceDiedError, InstanceHandle, InstanceLauncher
from migration.driver import MigrationResult


class LocalInstance(InstanceHandle):
    """A llumlet in this process. After ``crash`` (fault injection) it behaves like a
    killed Ray actor: the llumlet stops abruptly and every call raises ``InstanceDiedError``."""

    def __init__(self, llumlet: Llumlet) -> None:
        self.llumlet = llumlet
        self.instance_id = llumlet.instance_id
        self.address = llumlet.address

    def _live(self) -> Llumlet:
        if self.llumlet.dead:
            raise InstanceDiedError(f"instance {self.instance_id} died")
        return self.llumlet

    def crash(self) -> None:
        """Kill the instance abruptly (tests; and fencing of an unresponsive instance)."""
        self.llumlet.crash()

    def alive(self) -> bool:
        return not self.llumlet.dead

    def add_request(self, request: Request) -> None:
        self._live().add_request(request)

    def resume_request(self, state: MigrationRequestState) -> bool:
        return self._live().resume_request(state)

    def held(self, request_ids: Sequence[str]) -> list[str]:
        return self._live().held(request_ids)

    def renew_lease(self, reply_to: str) -> None:
        self._live().renew_lease(reply_to)

    def abort(self, request_id: str) -> bool:
        return self._live().abort(request_id)

    def load(self) -> EngineLoad:
        return self._live().load()

    def migrate_out(self, request_id: str, dst_address: str, migration_id: str, waiting: bool) -> bool:
        return self._live().migrate_out(request_id, dst_address, migration_id, waiting)

    def pop_results(self) -> list[MigrationResult]:
        return self._live().pop_results()

    def stats(self) -> dict[str, Any]:
        return dataclasses.asdict(self.llumlet.stats)

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

    def launch(self, instance_id: str) -> InstanceHandle:
        cfg = dataclasses.replace(self.llumlet, instance_id=instance_id)
        llumlet = Llumlet(cfg, build_engine(self.engine), self.make_sink())
        llumlet.start()
        return LocalInstance(llumlet)

    def terminate(self, handle: InstanceHandle) -> None:
        handle.stop()

    def fence(self, handle: InstanceHandle) -> None:
        if isinstance(handle, LocalInstance):
            handle.crash()
