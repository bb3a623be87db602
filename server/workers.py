"""Several worker processes on one port: what one worker knows of the others.

Each worker has its own sessions and batchers. Readiness is shared through marker files
in the group's folder (one per ready worker), so any worker's ``/readyz`` can say whether
all of them are ready. Metrics are shared through prometheus-client's multiprocess mode
(files in ``metrics_dir``), aggregated by whichever worker answers ``/metrics``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class WorkerGroup:
    index: int  # this worker, 0-based
    size: int
    folder: Path  # shared by the group, made and removed by the supervisor

    @property
    def metrics_dir(self) -> Path:
        return self.folder / "metrics"

    def _marker(self) -> Path:
        return self.folder / f"ready-{self.index}"

    def mark_ready(self, ready: bool) -> None:
        if ready:
            self._marker().touch()
        else:
            self._marker().unlink(missing_ok=True)

    def ready_count(self) -> int:
        return sum(1 for _ in self.folder.glob("ready-*"))
