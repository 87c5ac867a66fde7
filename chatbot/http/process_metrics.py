"""The worker's resident memory as a Prometheus gauge.

BentoML serves metrics in Prometheus' multiprocess mode, which has no process
collector, so ``/metrics`` showed no memory figure at all; a service that slowly grows
is then only seen when Kubernetes kills it at its limit. The gauge is the standard
collector's ``process_resident_memory_bytes`` with this service's prefix (the plain
name is taken inside each process by prometheus_client's own, unexported, collector),
labelled by worker pid, live workers only.
"""

from __future__ import annotations

import asyncio
from types import ModuleType

import psutil  # a dependency of BentoML itself

UPDATE_EVERY_S = 5.0


class ResidentMemory:
    def __init__(self, metrics: ModuleType) -> None:
        self.gauge = metrics.Gauge(
            name="chatbot_process_resident_memory_bytes",
            documentation="Resident memory of the worker process, in bytes",
            multiprocess_mode="liveall",
        )
        self.process = psutil.Process()

    def update(self) -> None:
        self.gauge.set(self.process.memory_info().rss)

    async def keep_updated(self) -> None:
        """Update every few seconds for as long as the worker runs."""
        while True:
            self.update()
            await asyncio.sleep(UPDATE_EVERY_S)
