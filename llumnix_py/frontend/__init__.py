"""The frontend side of llumnix-py: what a process serving clients holds.

- ``cluster``: ``Cluster``, the Python library API (start or attach, submit, abort, state);
- ``handles``: ``RequestHandle``, its ``TokenEvent``s and ``OrderedStream``, the request errors;
- ``requests``: ``RequestTable``, the active requests behind one lock;
- ``supervision``: ``Supervisor``, dead instances, resumed requests, leases;
- ``receiver``: ``TokenReceiver``, the socket llumlets push tokens to.

Nothing below the frontend (llumlet, runtimes, scheduler, engines) imports it; the
llumlet side of the token path (wire format, sinks) is ``llumnix_py.tokens``.
"""
