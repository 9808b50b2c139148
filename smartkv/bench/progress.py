"""Progress of a run as plain state: the executor updates it, the CLI renders it (this module never prints)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class SlotState:
    """One worker (Ray actor or the in-process runner)."""
    name: str
    current: str | None = None       # label of the job it is running
    done: int = 0
    model_loads: int = 0
    restarts: int = 0


@dataclass
class Progress:
    total: int = 0
    total_cost: float = 0.0
    done: int = 0
    failed: int = 0                  # status error
    oom: int = 0
    retried: int = 0
    done_cost: float = 0.0
    started_at: float = field(default_factory=time.monotonic)
    slots: dict[str, SlotState] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)

    def start(self, total: int, total_cost: float) -> None:
        self.total, self.total_cost, self.started_at = total, total_cost, time.monotonic()

    def slot(self, name: str) -> SlotState:
        return self.slots.setdefault(name, SlotState(name))

    def finished(self, slot: str | None, status: str, cost: float) -> None:
        self.done += 1
        self.done_cost += cost
        self.failed += status == "error"
        self.oom += status == "oom"
        if slot is not None:
            self.slot(slot).done += 1

    def note(self, message: str) -> None:
        self.messages.append(message)

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started_at

    @property
    def eta_s(self) -> float | None:
        """Remaining time, extrapolated from the cost (context x samples) finished so far."""
        if self.done_cost <= 0 or self.total_cost <= 0:
            return None
        return self.elapsed_s * max(self.total_cost - self.done_cost, 0.0) / self.done_cost
