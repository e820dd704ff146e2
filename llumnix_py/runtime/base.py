"""What the scheduler daemon and the frontend need from a runtime.

Framework types (Ray handles, threads) stay behind these two small interfaces.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from llumnix_py.engines.types import MigrationRequestState, Request
from llumnix_py.load import InstanceLoad
from llumnix_py.errors import LlumnixError
from migration.driver import MigrationResult


class InstanceDiedError(LlumnixError):
    """The instance's process is gone (killed, crashed): a call to it can never succeed.

    Distinct from a timeout (the instance may still be working): only this error
    lets a caller conclude that the instance holds nothing any more.
    """


@dataclass(frozen=True)
class InstanceInfo:
    instance_id: str
    address: str  # its migration server


class InstanceHandle(abc.ABC):
    """One llumlet, wherever it runs.

    Every method may raise ``InstanceDiedError`` once the instance is gone.
    """

    instance_id: str
    address: str

    @abc.abstractmethod
    def add_request(self, request: Request) -> None: ...

    @abc.abstractmethod
    def resume_request(self, state: MigrationRequestState) -> bool:
        """Continue a request whose instance died, by recomputation from ``state`` (WAITING,
        its prompt and the tokens already delivered). False if the request is already here."""

    @abc.abstractmethod
    def held(self, request_ids: Sequence[str]) -> list[str]:
        """Those of ``request_ids`` this instance holds (running, waiting or migrating out)."""

    @abc.abstractmethod
    def renew_lease(self, reply_to: str) -> None:
        """The frontend at ``reply_to`` is alive (see ``LlumletConfig.lease_timeout_s``)."""

    @abc.abstractmethod
    def abort(self, request_id: str) -> bool: ...

    @abc.abstractmethod
    def load(self) -> InstanceLoad: ...

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

    def fence(self, handle: InstanceHandle) -> None:
        """Make sure an instance declared dead really is (it may only be unresponsive), so
        that the requests resumed elsewhere never run twice. Must not block for long."""

    def attach(self, instance_id: str) -> Optional[InstanceHandle]:
        """An already running instance by id (a restarted scheduler finds its llumlets)."""
        return None
