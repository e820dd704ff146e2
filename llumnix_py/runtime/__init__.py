"""Where components run: Ray actors (default) or all in one process (tests, simulator)."""
