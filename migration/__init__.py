"""Live migration of running requests between instances (Llumnix, Section 4.3)."""
