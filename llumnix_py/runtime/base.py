"""What the scheduler daemon and the frontend need from a runtime.

Framework types (Ray handles, threads) stay behind these two small interfaces.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Optional

from llumnix_py.engines.types import EngineLoad, Request
from migration.driver import MigrationResult


@dataclass(frozen=True)
class InstanceInfo:
    instance_id: str
    address: str  # its migration server


class InstanceHandle(abc.ABC):
    """One llumlet, wherever it runs."""

    instance_id: str
    address: str

    @abc.abstractmethod
    def add_request(self, request: Request) -> None: ...

    @abc.abstractmethod
    def abort(self, request_id: str) -> bool: ...

    @abc.abstractmethod
    def load(self) -> EngineLoad: ...

    @abc.abstractmethod
    def migrate_out(self, request_id: str, dst_address: str, migration_id: str, waiting: bool) -> bool: ...

    @abc.abstractmethod
    def pop_results(self) -> list[MigrationResult]: ...

    @abc.abstractmethod
    def stats(self) -> dict[str, Any]: ...

    @abc.abstractmethod
    def stop(self) -> None: ...

    def alive(self) -> bool:
        return True


class InstanceLauncher(abc.ABC):
    """Starts and stops instances for the scheduler (initial set and scaling)."""

    @abc.abstractmethod
    def launch(self, instance_id: str) -> InstanceHandle: ...

    @abc.abstractmethod
    def terminate(self, handle: InstanceHandle) -> None: ...

    def attach(self, instance_id: str) -> Optional[InstanceHandle]:
        """An already running instance by id (a restarted scheduler finds its llumlets)."""
        return None
