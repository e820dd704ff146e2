"""Pure scheduling policies of llumnix-py: no I/O, no clocks, no engine objects.

Inputs are frozen snapshots (``InstanceLoad``, ``RequestLoad`` from ``llumnix_py.load``); outputs are typed
decisions. Policies are registered by name in validating registries.
"""
