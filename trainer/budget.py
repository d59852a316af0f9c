"""The time budget of a whole `shoptalk train` command (`--max-minutes`):
loading, data preparation, validation, fine-tuning, the held-out
measurement, the final pass and saving all come out of it, so the command
ends within the budget plus a small margin (issue 20: `--max-minutes 3`
once ran 11.4 minutes).

Pure: a clock started when the command starts, and the shares the run's
recipe (`shoptalk.trainer.train`) gives its phases.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

# Data preparation (tokenizing the training mix) may use this share of the
# budget; what is not prepared by then is left out (the newest first).
PREPARE_SHARE = 0.2
# Writing the adapters and the record: a fixed allowance.
SAVE_SECONDS = 3.0


@dataclass
class CommandBudget:
    """Seconds the command may take (`None`: no time budget), from `started`
    (a `time.perf_counter()` value)."""

    seconds: float | None
    started: float = field(default_factory=time.perf_counter)

    @classmethod
    def of_minutes(cls, minutes: float | None, started: float | None = None) -> CommandBudget:
        seconds = minutes * 60 if minutes else None
        return cls(seconds, started if started is not None else time.perf_counter())

    @property
    def bounded(self) -> bool:
        return self.seconds is not None

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def left(self, reserve: float = 0.0) -> float | None:
        """Seconds left once `reserve` is set aside (None: unbounded; never
        below 0)."""
        if self.seconds is None:
            return None
        return max(0.0, self.seconds - self.elapsed() - reserve)

    def spent(self, reserve: float = 0.0) -> bool:
        left = self.left(reserve)
        return left is not None and left <= 0.0

    def prepare_deadline(self) -> float | None:
        """The `perf_counter` time by which data preparation stops."""
        if self.seconds is None:
            return None
        return self.started + self.seconds * PREPARE_SHARE


def fine_tuning_seconds(left: float, reserve: float, final_share: float) -> float:
    """Of the `left` seconds, what fine-tuning may use: the `reserve` (final
    validation, measurement, saving) set aside, then `final_share` of the
    rest kept for the final pass."""
    return max(0.0, (left - reserve) * (1.0 - final_share))
