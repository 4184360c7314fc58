"""Measurement: quality on fixed tokens, speed of artifacts, the machine, quality gates."""
