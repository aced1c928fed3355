"""A modeled host<->device link, so tests and the bench can model a slow link (PCIe) against a fast one (NVLink-C2C)
on any machine: every copy takes at least ``latency + bytes / bandwidth`` (each backend enforces it its own way)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LinkModel:
    """A modeled host<->device link: a copy of N bytes takes at least ``latency_s + N / bandwidth_bytes_per_s``."""

    bandwidth_bytes_per_s: float | None = None  # None: no bandwidth limit
    latency_s: float = 0.0

    def seconds(self, nbytes: int) -> float:
        bw = self.bandwidth_bytes_per_s
        return self.latency_s + (nbytes / bw if bw else 0.0)
