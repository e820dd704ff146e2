"""The discrete-event cluster simulator: the real scheduler, engine core and migration
protocol on a virtual clock, with the simulated engine's cost model."""

from llumnix_py.sim.cluster import SimCluster, SimConfig, SimInstance
from llumnix_py.sim.metrics import RequestRecord, SimResult, Timeline

__all__ = ["SimCluster", "SimConfig", "SimInstance", "RequestRecord", "SimResult", "Timeline"]
