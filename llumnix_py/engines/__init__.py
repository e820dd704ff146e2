"""Engine adapters: the built-in paged-KV PyTorch engine, the simulated engine, external engines."""
