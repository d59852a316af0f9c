"""How a stage tells its caller what it is doing: one callback type, `Report`.

Stages (mine, train, export, eval, retrain, personal, provisioning, the
model registry, the demo) never print. They call the `report` they were
given with a line for a person (a `str`) or, for counted work, a `Progress`
(how many of how many, of what). The command line decides where that goes
(a console, a progress bar: `shoptalk.models.cli_support.ConsoleReport`);
a library caller passes `to_log(log)` or `log.info` (the stages' defaults)
or `quiet`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Progress:
    """How far a counted piece of work is: `done` of `total` (None while the
    total is not known yet).

    `label` names the work when a stage counts more than one thing (a bar's
    description: "fine-tuning", "base: completions"); `detail` holds the
    figures shown after the count ("step 3/40", "812 tok/s", "loss 1.234");
    `final` marks the last event of that work (it may end short of `total`:
    early stopping). `heading`: not a count but a recipe beginning its part
    `done` of `total`, named `label` (the demo's "1/6 provision ...")."""

    done: float
    total: float | None = None
    label: str = ""
    detail: str = ""
    final: bool = False
    heading: bool = False

    def __str__(self) -> str:
        count = f"{_number(self.done)}/{'?' if self.total is None else _number(self.total)}"
        if self.heading:
            return f"{count} {self.label}"
        return " ".join(part for part in (self.label, count, self.detail) if part)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.1f}"


Report = Callable[[str | Progress], None]


def quiet(_event: str | Progress) -> None:
    """A `Report` that drops everything."""


def to_log(logger: logging.Logger) -> Report:
    """A `Report` that logs each line at info and drops counts (a library
    caller's default: per-step counts are for a bar, not a log)."""

    def report(event: str | Progress) -> None:
        if isinstance(event, str):
            logger.info("%s", event)

    return report
