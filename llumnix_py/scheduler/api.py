"""What a frontend may ask of the global scheduler, wherever it runs.

``SchedulerAPI``'s abstract methods are its method table (``llumnix_py.proxy``):
``SchedulerDaemon`` implements them; the in-process control plane calls the
daemon directly and the Ray scheduler actor serves the same table through one
generic ``call``. Adding a method is one edit here (plus the daemon's
implementation).
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from llumnix_py.load import RequestLoad
    from llumnix_py.scheduler.frontends import FrontendRecord


class SchedulerAPI(abc.ABC):
    """The global scheduler as a frontend sees it."""

    @abc.abstractmethod
    def dispatch(self, request: RequestLoad) -> Optional[str]:
        """The instance that should serve ``request`` (None: no instance can)."""

    @abc.abstractmethod
    def instance_ids(self) -> list[str]: ...

    @abc.abstractmethod
    def state(self) -> dict[str, Any]: ...

    @abc.abstractmethod
    def membership(self) -> Optional[dict[str, Any]]:
        """``{"generation", "instances", "dead", "loads"}`` (see ``SchedulerDaemon.membership``);
        None while a starting scheduler has not attached all its instances yet."""

    @abc.abstractmethod
    def claim_ownership(self, migration_id: str, side: str) -> str:
        """The ownership arbiter (``migration.ownership``): a llumlet that cannot learn a
        migration's outcome claims its request for ``side`` (``Owner`` value); the
        answer is the first claim's side, the same for every claim of that migration."""

    @abc.abstractmethod
    def drain(self, instance_id: str) -> None:
        """Scale in by hand: the instance migrates everything away, then stops."""

    @abc.abstractmethod
    def set_role(self, instance_id: str, role: str) -> None:
        """Flip an instance's role at run time (``prefill``, ``decode`` or ``both``): from the
        scheduler's next tick on, its requests of the phase it no longer runs leave it by
        migration. ``UnknownRoleError`` for an unknown role, ``UnknownInstanceError`` for an
        instance the scheduler does not know; the same role again changes nothing."""

    @abc.abstractmethod
    def launch(self, n: int) -> list[str]: ...

    @abc.abstractmethod
    def frontend_heartbeat(self, frontend: FrontendRecord) -> None:
        """``frontend`` is attached (sent about once a second): the scheduler lists it in
        ``state()["frontends"]`` until it is silent for ``SchedulerConfig.frontend_timeout_s``."""

    @abc.abstractmethod
    def frontend_left(self, frontend_id: str) -> None:
        """The frontend stopped: list it no more."""

    @abc.abstractmethod
    def stop(self, terminate_instances: bool = True) -> None: ...
