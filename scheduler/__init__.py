"""Admission, batch planning and the batching worker; imports neither FastAPI nor torch."""
