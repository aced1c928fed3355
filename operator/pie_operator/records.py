"""What a pass reports: a decision (a status.decisions entry and its Event) and a plain Event. Their own module so
that every pure part of a pass (decide.py, scaling.py) can produce them and actuate.py post them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Record:
    """One status.decisions entry (and its Event), added once its action went through."""

    pod: str  # "" for a decision about the whole PieDeployment (replicas)
    field: str  # memory | gpuMemoryBudget | replicas
    old: str
    new: str
    reason: str
    message: str
    via: str  # how it was applied


@dataclass(frozen=True)
class Event:
    type: str
    reason: str
    message: str
