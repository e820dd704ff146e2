"""What the scheduler and the frontends may ask of an instance, wherever it runs.

``InstanceHandle`` is that one interface: its abstract methods are the llumlet's
public methods and form the method table (``llumnix_py.proxy``) that the
runtimes serve generically: the in-process runtime by direct calls on the
llumlet, the Ray runtime through one generic actor. Adding a method is one edit
here (plus the llumlet's implementation). ``InstanceLauncher`` starts and stops
instances for the scheduler.

This module sits below the scheduler daemon and the runtimes: both import it.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any, Optional, Sequence

from llumnix_py.errors import LlumnixError
from llumnix_py.proxy import method_table, oneway

if TYPE_CHECKING:
    from llumnix_py.engines.types import MigrationRequestState, Request
    from llumnix_py.load import InstanceLoad
    from migration.driver import MigrationResult
    from migration.ownership import OwnershipPort


class InstanceDiedError(LlumnixError):
    """The instance's process is gone (killed, crashed): a call to it can never succeed.

    Distinct from a timeout (the instance may still be working): only this error
    lets a caller conclude that the instance holds nothing any more.
    """


class InstanceHandle(abc.ABC):
    """One llumlet, wherever it runs.

    Every method may raise ``InstanceDiedError`` once the instance is gone.
    """

    instance_id: str
    address: str  # its migration server
    incarnation: str  # this life of the instance: ids can be reused by later instances, incarnations never

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
    @oneway
    def renew_lease(self, reply_to: str) -> None:
        """The frontend at ``reply_to`` is alive (see ``LlumletConfig.lease_timeout_s``).
        Sent without waiting: a lost renewal is retried in a second."""

    @abc.abstractmethod
    def abort(self, request_id: str) -> bool: ...

    @abc.abstractmethod
    def load(self) -> InstanceLoad: ...

    @abc.abstractmethod
    def migrate_out(self, request_id: str, dst_address: str, migration_id: str, waiting: bool) -> bool: ...

    @abc.abstractmethod
    def pop_results(self) -> list[MigrationResult]: ...

    @abc.abstractmethod
    @oneway
    def set_fair_offsets(self, offsets: dict[str, float]) -> None:
        """The scheduler's cluster-wide fairness view for this instance's engine (global
        fairness: per client, cluster counter minus the engine's). Sent without waiting: the
        next poll sends a fresh one."""

    @abc.abstractmethod
    @oneway
    def set_role(self, role: str) -> None:
        """The instance's role in prefill/decode disaggregation (``prefill``, ``decode`` or
        ``both``), as the scheduler has it: a ``decode`` instance holds the prefill work
        queued on it for the scheduler to redirect (``llumnix_py.prefill_hold``). Sent
        without waiting: the scheduler sends it again while the instance's load reports
        another role."""

    @abc.abstractmethod
    def stats(self) -> dict[str, Any]: ...

    @abc.abstractmethod
    def stop(self) -> None: ...

    def alive(self) -> bool:
        return True


INSTANCE_METHODS = method_table(InstanceHandle)


class InstanceLauncher(abc.ABC):
    """Starts and stops instances for the scheduler (initial set and scaling)."""

    @abc.abstractmethod
    def launch(self, instance_id: str) -> InstanceHandle: ...

    @abc.abstractmethod
    def terminate(self, handle: InstanceHandle) -> None: ...

    def bind_ownership(self, port: OwnershipPort) -> None:
        """The scheduler's ownership arbiter, for the instances launched from now on (a
        launcher whose instances reach the scheduler another way ignores it)."""

    def fence(self, handle: InstanceHandle) -> None:
        """Make sure an instance declared dead really is (it may only be unresponsive), so
        that the requests resumed elsewhere never run twice. Must not block for long."""

    def attach(self, instance_id: str) -> Optional[InstanceHandle]:
        """An already running instance by id (a restarted scheduler finds its llumlets)."""
        return None
