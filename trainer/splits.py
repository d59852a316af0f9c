"""Temporal splits of mined instances, decided per commit by author date.

- test: every commit at or after the cutoff (given, or chosen so that
  `test_share` of the commits are after it), plus, for an author with fewer
  than `test_per_author` completion instances there, their newest earlier
  commits until they have that many (never more than half of their own);
- validation: the newest `validation_share` of the commits before the cutoff;
- train: the rest. Nothing at or after the cutoff is ever in train.

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


def plan_splits(
    commits: Sequence[CommitPoint],
    test_share: float,
    validation_share: float,
    test_per_author: int,
    cutoff: int | None = None,
) -> SplitPlan:
    ordered = sorted(commits, key=lambda c: (c.time, c.sha))
    if not ordered:
        return SplitPlan(cutoff=cutoff or 0, validation_from=cutoff or 0)
    count = len(ordered)
    if cutoff is None:
        index = min(count - 1, max(0, math.floor(count * (1 - test_share))))
        cutoff = ordered[index].time
    before = [c for c in ordered if c.time < cutoff]
    validation_commits = math.floor(count * validation_share)
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
