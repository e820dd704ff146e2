"""In-process runtime: llumlets as objects in this process, same code as on Ray."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from llumnix_py.engines.registry import EngineSpec, build_engine
from llumnix_py.engines.types import EngineLoad, Request
from llumnix_py.llumlet import Llumlet, LlumletConfig, TokenSink
from llumnix_py.runtime.base import InstanceHandle, InstanceLauncher
from migration.driver import MigrationResult


class LocalInstance(InstanceHandle):
    def __init__(self, llumlet: Llumlet) -> None:
        self.llumlet = llumlet
        self.instance_id = llumlet.instance_id
        self.address = llumlet.address

    def add_request(self, request: Request) -> None:
        self.llumlet.add_request(request)

    def abort(self, request_id: str) -> bool:
        return self.llumlet.abort(request_id)

    def load(self) -> EngineLoad:
        return self.llumlet.load()

    def migrate_out(self, request_id: str, dst_address: str, migration_id: str, waiting: bool) -> bool:
        return self.llumlet.migrate_out(request_id, dst_address, migration_id, waiting)

    def pop_results(self) -> list[MigrationResult]:
        return self.llumlet.pop_results()

    def stats(self) -> dict[str, Any]:
        return dataclasses.asdict(self.llumlet.stats)

    def stop(self) -> None:
        self.llumlet.stop()


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
