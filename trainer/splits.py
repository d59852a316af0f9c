"""Temporal splits of mined instances, decided per commit by author date.

- test: every commit at or after the cutoff (given, or chosen so that the
  newest commits hold `test_instances` completion instances, and never more
  than `test_share` of the commits), plus, for an author with fewer than
  `test_per_author` completion instances there, their newest earlier
  commits until they have that many (never more than half of their own);
- validation: the newest commits before the cutoff that hold
  `validation_instances` completions (at most `validation_share` of them);
- train: the rest. Nothing at or after the cutoff is ever in train.

The windows are as long as the measurement needs, not a share of the
history: with 10% / 5% of a large repository's commits, the served model
was a year behind the code (issue 20). 0 instances: the share alone.

All instances of one commit share its split, so a change is never half
learned, half tested.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from shoptalk.models.errors import ShopTalkError

SPLITS = ("train", "validation", "test")


class CutoffError(ShopTalkError):
    pass


@dataclass(frozen=True)
class CommitPoint:
    sha: str
    author_id: str
    time: int  # author time, unix seconds
    completions: int  # completion instances the commit yields


@dataclass
class SplitPlan:
    cutoff: int
    validation_from: int
    split_of: dict[str, str] = field(default_factory=dict)
    moved_to_test: dict[str, int] = field(default_factory=dict)  # author -> commits


def parse_cutoff(text: str) -> int:
    """An ISO date or date-time (UTC unless it says otherwise) as unix seconds."""
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise CutoffError(
            f"cutoff {text!r} is not an ISO date; write it like 2025-03-01 or 2025-03-01T12:00:00Z"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp())


@dataclass(frozen=True)
class WindowSizes:
    """How long the held-out windows are: completion instances wanted
    (0: the share alone) and the share of all commits neither exceeds."""

    test_instances: int = 0
    validation_instances: int = 0
    test_share: float = 0.1
    validation_share: float = 0.05


def _window_start(newest_first: Sequence[CommitPoint], instances: int, cap: int) -> int:
    """How many of the newest commits a window takes: enough to hold
    `instances` completions (all of `cap` with 0), never more than `cap`."""
    if instances <= 0:
        return cap
    held = 0
    for taken, commit in enumerate(newest_first[:cap], start=1):
        held += commit.completions
        if held >= instances:
            return taken
    return cap


def plan_splits(
    commits: Sequence[CommitPoint],
    sizes: WindowSizes,
    test_per_author: int,
    cutoff: int | None = None,
) -> SplitPlan:
    ordered = sorted(commits, key=lambda c: (c.time, c.sha))
    if not ordered:
        return SplitPlan(cutoff=cutoff or 0, validation_from=cutoff or 0)
    count = len(ordered)
    if cutoff is None:
        share_cap = count - min(count - 1, max(0, math.floor(count * (1 - sizes.test_share))))
        taken = _window_start(ordered[::-1], sizes.test_instances, share_cap)
        cutoff = ordered[count - taken].time
    before = [c for c in ordered if c.time < cutoff]
    validation_cap = math.floor(count * sizes.validation_share)
    validation_commits = _window_start(
        before[::-1], sizes.validation_instances, min(validation_cap, len(before))
    )
    if validation_commits and before:
        validation_from = before[max(0, len(before) - validation_commits)].time
    else:
        validation_from = cutoff
    plan = SplitPlan(cutoff=cutoff, validation_from=validation_from)
    for commit in ordered:
        if commit.time >= cutoff:
            plan.split_of[commit.sha] = "test"
        elif commit.time >= validation_from and validation_commits:
            plan.split_of[commit.sha] = "validation"
        else:
            plan.split_of[commit.sha] = "train"
    if test_per_author > 0:
        _top_up_author_tests(ordered, plan, test_per_author)
    return plan


def _top_up_author_tests(ordered: Sequence[CommitPoint], plan: SplitPlan, wanted: int) -> None:
    by_author: dict[str, list[CommitPoint]] = defaultdict(list)
    for commit in ordered:
        by_author[commit.author_id].append(commit)
    for author, commits in by_author.items():
        total = sum(c.completions for c in commits)
        in_test = sum(c.completions for c in commits if plan.split_of[c.sha] == "test")
        moved = 0
        for commit in reversed(commits):
            if in_test >= wanted:
                break
            if plan.split_of[commit.sha] == "test" or commit.completions == 0:
                continue
            if (in_test + commit.completions) * 2 > total:
                break
            plan.split_of[commit.sha] = "test"
            in_test += commit.completions
            moved += 1
        if moved:
            plan.moved_to_test[author] = moved
