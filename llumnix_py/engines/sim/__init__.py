"""The simulated engine: the shared engine core with a cost-model executor on a virtual clock."""
