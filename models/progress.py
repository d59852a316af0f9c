"""How a stage tells its caller what it is doing: one callback type, `Report`.

Stages (mine, train, export, eval, retrain, personal, provisioning, the
model registry) never print. They call the `report` they were given with a
line for a person (a `str`) or, for counted work, a `Progress` (how many of
how many). The command line decides where that goes (a console, a progress
bar); a library caller passes `log.info` (the stages' default) or `quiet`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Progress:
    """How far a counted piece of work is: `done` of `total` (None while the
    total is not known yet)."""

    done: int
    total: int | None = None

    def __str__(self) -> str:
        return f"{self.done}/{'?' if self.total is None else self.total}"


Report = Callable[[str | Progress], None]


def quiet(_event: str | Progress) -> None:
    """A `Report` that drops everything."""
