"""Benchmarks that print figures and write JSON."""
