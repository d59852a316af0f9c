"""The console report when output goes to a file: plain progress lines."""

from __future__ import annotations

import io

from rich.console import Console

from shoptalk.models.cli_support import PLAIN_EVERY_S, ConsoleReport
from shoptalk.models.progress import Progress


def test_work_sent_to_a_file_is_reported_in_plain_lines_with_the_eta() -> None:
    out = io.StringIO()
    now = [0.0]
    report = ConsoleReport(Console(file=out, force_terminal=False), clock=lambda: now[0])
    report("run r1: 60 training examples")
    for step in range(0, 61):
        now[0] = step * 5.0  # a step every 5 s: 300 s in all
        report(Progress(step, 60, "fine-tuning", f"step {step}/60 loss 1.5"))
    report(Progress(60, 60, "fine-tuning", "step 60/60 loss 1.2", final=True))
    lines = out.getvalue().splitlines()
    assert lines[0] == "run r1: 60 training examples"
    progress = lines[1:]
    # Its start, one line a minute (five minutes), its end: no bar characters.
    assert progress[0] == "fine-tuning 0/60 step 0/60 loss 1.5 (0%)"
    assert len(progress) == 1 + int(300 // PLAIN_EVERY_S) + 1, progress
    assert progress[1] == "fine-tuning 12/60 step 12/60 loss 1.5 (20%) · 1:00 elapsed, ETA 4:00"
    assert progress[-1] == "fine-tuning 60/60 step 60/60 loss 1.2 (100%) · 5:00 elapsed"
    assert "━" not in out.getvalue()


def test_a_count_that_ends_where_it_starts_prints_nothing() -> None:
    out = io.StringIO()
    report = ConsoleReport(Console(file=out, force_terminal=False), clock=lambda: 0.0)
    report(Progress(0, 0, "base: completions", final=True))
    assert out.getvalue() == ""
