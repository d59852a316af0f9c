"""The held-out windows are as long as the measurement needs (issue 20,
item 8): counted in completion instances from the newest commit back, never
longer than their share of the history, and the old share-only windows when
the instance counts are 0."""

from __future__ import annotations

from shoptalk.trainer.splits import CommitPoint, WindowSizes, plan_splits


def _history(commits: int, completions: int = 10) -> list[CommitPoint]:
    return [CommitPoint(f"c{i:04d}", "alice", 1000 + i, completions) for i in range(commits)]


def _splits(plan_split_of: dict[str, str], name: str) -> list[str]:
    return sorted(sha for sha, split in plan_split_of.items() if split == name)


def test_a_long_history_holds_out_only_the_instances_the_measurement_needs() -> None:
    history = _history(1000)  # 10 completions a commit
    plan = plan_splits(history, WindowSizes(300, 200, 0.1, 0.05), test_per_author=0)
    test = _splits(plan.split_of, "test")
    validation = _splits(plan.split_of, "validation")
    # 30 commits hold 300 test instances (the share would have taken 100),
    # the 20 before them 200 validation instances (the share: 50).
    assert test == [f"c{i:04d}" for i in range(970, 1000)]
    assert validation == [f"c{i:04d}" for i in range(950, 970)]
    assert plan.cutoff == 1970 and plan.validation_from == 1950
    assert len(_splits(plan.split_of, "train")) == 950


def test_a_short_history_keeps_the_share_as_the_longest_window() -> None:
    history = _history(100, completions=2)
    sized = plan_splits(history, WindowSizes(300, 200, 0.1, 0.05), test_per_author=0)
    shares = plan_splits(history, WindowSizes(0, 0, 0.1, 0.05), test_per_author=0)
    assert sized.split_of == shares.split_of
    assert len(_splits(sized.split_of, "test")) == 10
    assert len(_splits(sized.split_of, "validation")) == 5


def test_commits_without_completions_do_not_count_toward_the_window() -> None:
    history = _history(200, completions=0)
    history[-1] = CommitPoint("newest", "alice", 5000, 40)
    history[-2] = CommitPoint("empty", "alice", 4500, 0)
    history[-3] = CommitPoint("third", "alice", 4000, 30)
    plan = plan_splits(history, WindowSizes(60, 0, 0.5, 0.0), test_per_author=0)
    test = _splits(plan.split_of, "test")
    # The newest three commits hold 70 completions (0 in the middle one).
    assert test == ["empty", "newest", "third"]
    assert not _splits(plan.split_of, "validation")
