"""llumnix-py: run-time rescheduling of LLM requests across engine instances."""
