"""Why a suggestion is slow or empty, for the people waiting for it.

A request that comes while the model is still loading gets nothing at once;
one the time budget (`[serve] max_latency_ms`) cuts gets nothing, or only
its complete lines. Neither is an error, so neither was said anywhere. The
notes kept here are: the state of the last answer ("loading", "over budget
(2.1 s > 1.5 s)" — what both editors' status bars show), how many requests
met each (`budget_hits`, `while_loading` in `shoptalk/status`'s counters),
and a log line when the state changes (at most one per LOG_EVERY_S while
it stays the same), so the log says it too without a line per keystroke.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

LOG_EVERY_S = 30.0

OK = "ok"
LOADING = "loading"
OVER_BUDGET = "over_budget"


@dataclass(frozen=True)
class AnswerNote:
    state: str  # ok | loading | over_budget
    message: str  # what a status bar shows
    elapsed_ms: int | None = None
    budget_ms: int | None = None
    shown: bool = True  # whether the editor got anything (a cut answer may keep whole lines)
    at: float = 0.0


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds >= 0.1 else f"{seconds * 1000:.0f} ms"


def over_budget_message(elapsed_s: float, budget_ms: int) -> str:
    """ "over budget (2.1 s > 1.5 s)"; a generation the budget stopped right at
    its end reads "over budget (1.5 s)"."""
    budget, elapsed = _duration(budget_ms / 1000.0), _duration(elapsed_s)
    return f"over budget ({elapsed} > {budget})" if elapsed != budget else f"over budget ({budget})"


class AnswerNotes:
    """Thread-safe: answers are noted on the inference thread, read on the loop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: AnswerNote | None = None
        self._logged: tuple[str, float] = ("", 0.0)
        self.budget_hits = 0
        self.while_loading = 0

    def loading(self) -> None:
        """A request came before the model was loaded: nothing was sent."""
        with self._lock:
            self.while_loading += 1
            self._note(AnswerNote(LOADING, "loading", shown=False, at=time.time()))

    def answered(
        self, elapsed_s: float, budget_ms: int, stop_reason: str | None, shown: bool
    ) -> None:
        """A request ran (or was given up before running) after `elapsed_s`."""
        with self._lock:
            if stop_reason == "budget":
                self.budget_hits += 1
                message = over_budget_message(elapsed_s, budget_ms)
                note = AnswerNote(
                    OVER_BUDGET, message, round(elapsed_s * 1000), budget_ms, shown, time.time()
                )
            else:
                note = AnswerNote(OK, "ok", round(elapsed_s * 1000), budget_ms, shown, time.time())
            self._note(note)

    def _note(self, note: AnswerNote) -> None:
        self._last = note
        state, when = self._logged
        if note.state == state and note.at - when < LOG_EVERY_S:
            return
        if note.state == OVER_BUDGET:
            what = "a cut answer, its whole lines shown" if note.shown else "nothing shown"
            log.info(
                "completion %s: %s (%d over budget so far; raise [serve] max_latency_ms "
                "or use a smaller model)",
                note.message,
                what,
                self.budget_hits,
            )
        elif note.state == LOADING:
            log.info("completion requested while the model is loading: nothing shown yet")
        elif state in (OVER_BUDGET, LOADING):
            log.info("completions answer within the budget again")
        self._logged = (note.state, note.at)

    def status(self) -> dict[str, Any]:
        """`answer` (the last one's state and message, or None) and the counters."""
        with self._lock:
            last = self._last
            answer = (
                {
                    "state": last.state,
                    "message": last.message,
                    "elapsed_ms": last.elapsed_ms,
                    "budget_ms": last.budget_ms,
                    "shown": last.shown,
                    "age_s": round(time.time() - last.at, 1),
                }
                if last is not None
                else None
            )
            return {
                "answer": answer,
                "counters": {"budget_hits": self.budget_hits, "while_loading": self.while_loading},
            }
