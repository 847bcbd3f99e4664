"""The planner bench's simulator, by its short name: see ``doramesh.sim``."""

from __future__ import annotations

from doramesh.sim import SimResult, simulate

__all__ = ["SimResult", "simulate"]
