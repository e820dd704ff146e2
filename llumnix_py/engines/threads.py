"""Torch's intra-op thread count: one value per process, set by whoever owns the process.

``torch.set_num_threads`` is process-wide. So an engine builder never calls it (a
library call must not change it behind its caller's back); the runtime that owns the
process does:

- Ray runtime: one instance per worker process, so the instance's actor applies its
  ``EngineSpec.num_threads`` when it starts (``apply_process_threads``).
- Local runtime: every instance and the frontend share one process, so the cluster
  claims one value for the process when it starts and gives it back when it stops
  (``claim_process_threads``). A second in-process cluster that asks for a different
  value gets a ``ValueError``: its "threads per instance" could not be honoured.
"""

from __future__ import annotations

import threading
from typing import Optional

_lock = threading.Lock()
_claimed: Optional[int] = None  # the value in force while claims are held
_holders = 0
_before = 0  # the process's value before the first claim


class ThreadClaim:
    """A held claim on the process's torch thread count; ``release`` gives it back once."""

    def __init__(self, num_threads: Optional[int]) -> None:
        self.num_threads = num_threads
        self._released = num_threads is None

    def release(self) -> None:
        global _claimed, _holders
        import torch

        with _lock:
            if self._released:
                return
            self._released = True
            _holders -= 1
            if _holders == 0:
                torch.set_num_threads(_before)
                _claimed = None


def claim_process_threads(num_threads: Optional[int], owner: str) -> ThreadClaim:
    """Set this process's torch threads to ``num_threads`` for as long as the claim is held.

    ``None`` claims nothing and leaves the setting alone. Claims of the same value
    stack; the value before the first claim comes back when the last is released.

    Raises:
        ValueError: ``num_threads`` is not positive, or differs from the value that
            other claims in this process hold.
    """
    global _claimed, _holders, _before
    if num_threads is None:
        return ThreadClaim(None)
    if num_threads <= 0:
        raise ValueError(f"{owner}: torch threads must be positive, got {num_threads}")
    import torch

    with _lock:
        if _holders and _claimed != num_threads:
            raise ValueError(
                f"{owner} asks for {num_threads} torch threads, but this process already runs instances with "
                f"{_claimed}: the setting is per process, so in-process instances must agree (the Ray runtime "
                f"runs one process per instance)")
        if _holders == 0:
            _before = torch.get_num_threads()
            torch.set_num_threads(num_threads)
            _claimed = num_threads
        _holders += 1
    return ThreadClaim(num_threads)


def apply_process_threads(num_threads: Optional[int]) -> None:
    """Set the torch threads of a process that runs exactly one instance (a Ray worker)."""
    if num_threads is None:
        return
    if num_threads <= 0:
        raise ValueError(f"torch threads must be positive, got {num_threads}")
    import torch

    torch.set_num_threads(num_threads)
