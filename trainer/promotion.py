"""Promotion: whether a candidate model replaces the served one, and making
a run the repository's served model.

The gate compares a candidate with the current model on one evaluation
report (`shoptalk.trainer.evaluate`): the paired exact-match difference on
the same instances with its 95% interval (`shoptalk.trainer.em_difference`).
A promotion over the base needs a measured gain (the interval above zero,
McNemar p < 0.05); replacing a promoted model (the watcher's incremental
runs, personal adapters) needs only "not worse" by more than a tolerance.
Every message states the difference with its interval, and says "no
measurable difference" when that is what it is. `export --promote` exports
first, then reads the run's own measurement (`record.json["measured"]`,
taken before the final pass) and serves only a run with a measured gain
unless forced (`check_export_promotion`); not serving is a decision, not an
error. `promote_run` writes the repository's promotion
pointer (`current.json`, through `RepoStore.promote`); a running server
picks it up.

After the retraining job's and a personal adapter's promotions,
`publish_promoted` publishes to the team server when `[team]
publish_on_promote` is set (`shoptalk.trainer.publish`), as `export
--promote` does.

Used by export (`--promote`), the retraining job, personal adapters and the
demo; it imports none of them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from shoptalk.models.errors import ShopTalkError
from shoptalk.models.progress import Report, quiet
from shoptalk.models.settings import TeamSettings
from shoptalk.models.store import RepoStore
from shoptalk.trainer.dataset_folder import read_split
from shoptalk.trainer.em_difference import GAIN, EmDifference, paired_difference
from shoptalk.trainer.metrics import exact_match

# Validation examples of a job's training run (team or personal, before and
# after): the gate judges on the holdout, so the validation loss is only a
# sanity figure, and each pass over 64 examples costs about a minute with the
# default model on a 2-core CPU.
JOB_VAL_LIMIT = 24


class PromotionError(ShopTalkError):
    pass


def completion_em(report_data: dict[str, Any], spec: str) -> float:
    """Pooled exact match (percent) of `spec` in an evaluation report."""
    for model in report_data.get("models", []):
        if model.get("spec") == spec:
            return float(model["completion"]["pooled"]["exact_match"]["value"])
    raise PromotionError(f"the evaluation report has no result for {spec!r}")


def report_difference(report_dir: Path, candidate: str, reference: str) -> EmDifference:
    """The paired exact-match difference of two models of an evaluation
    report (`predictions.jsonl`: what each said on each instance)."""
    ours: list[bool] = []
    theirs: list[bool] = []
    path = report_dir / "predictions.jsonl"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise PromotionError(f"cannot read the evaluation's predictions {path}: {exc}") from None
    for line in lines:
        row = json.loads(line)
        said = row.get("predictions", {})
        if candidate not in said or reference not in said:
            raise PromotionError(f"{path} has no predictions of {candidate!r} and {reference!r}")
        ours.append(exact_match(said[candidate], row["target"]))
        theirs.append(exact_match(said[reference], row["target"]))
    return paired_difference(ours, theirs, (candidate, reference))


def gate(difference: EmDifference, tolerance_points: float, require_gain: bool) -> tuple[bool, str]:
    """Whether the candidate replaces the reference, and why. Over the base
    (`require_gain`) only a measured gain promotes; over a promoted model the
    candidate may be no worse than the tolerance (in EM points)."""
    text = difference.text()
    if require_gain:
        if difference.verdict == GAIN:
            return True, text
        return False, f"{text}; a promotion over the base needs a measured gain"
    if difference.points + tolerance_points >= 0:
        return True, f"{text}; not worse than {difference.reference} by more than " + (
            f"{tolerance_points:.1f} points (watch.tolerance)"
        )
    return False, (
        f"{text}; worse than {difference.reference} by more than {tolerance_points:.1f} "
        "points (watch.tolerance): current model kept"
    )


def check_export_promotion(record: dict[str, Any], force: bool) -> tuple[bool, str]:
    """The gate of `export --promote`, from the run's own record: whether the
    run is served, and why. A run is served with a measured gain over the
    base on its held-out window, or with `force` (the reason then says what
    it overrode); otherwise the reason says what was missing. Not serving is
    a decision, not an error: the export stays usable either way."""
    run_id = record.get("run_id", "?")
    measured = record.get("measured") or {}
    window = measured.get("test_window")
    difference = EmDifference.from_dict(window) if window else None
    if record.get("outcome") == "complete — no gain":
        problem = (
            f"run {run_id} kept its start: no checkpoint beat the base on validation "
            "(complete — no gain)"
        )
    elif difference is None:
        problem = (
            f"run {run_id} has no held-out measurement against the base (train.measure_instances "
            "was 0 or the dataset has no test window)"
        )
    elif difference.verdict != GAIN:
        problem = (
            f"run {run_id}: {difference.text()}; a promotion over the base needs a measured gain"
        )
    else:
        return True, f"measured before the final pass: {difference.text()}"
    if force:
        return True, f"promoted with --force although {problem}"
    return False, problem


def newest_train_date(dataset_dir: Path) -> str | None:
    """The newest author date of the dataset's training instances."""
    dates = [str(r.get("author_date", "")) for r in read_split(dataset_dir, "train")]
    return max(dates) if dates else None


def promote_run(
    store: RepoStore,
    run_id: str,
    model_file: Path,
    adapter_dir: Path,
    candidate_em: float | None = None,
    reference_em: float | None = None,
) -> None:
    """Make an exported run the repository's served model (the server picks
    it up); `adapter_dir` is where the next incremental run starts from."""
    metrics = (
        {"exact_match": candidate_em, "reference_exact_match": reference_em}
        if candidate_em is not None
        else {}
    )
    store.promote(
        {
            "run_id": run_id,
            "model": str(model_file),
            "adapter": None,
            "adapter_dir": str(adapter_dir),
            "data_through": newest_train_date(store.dataset_dir),
            "metrics": metrics,
        }
    )


def publish_promoted(store: RepoStore, team: TeamSettings, report: Report = quiet) -> str:
    """After a promotion: publish it to the team server when `[team]
    publish_on_promote` is set. Returns what happened as a clause for the
    promotion's message ("" when publishing is off). A failure to publish
    does not undo the promotion; the clause says it, and what to do."""
    from shoptalk.trainer.publish import PublishError, publish_if_configured

    try:
        published = publish_if_configured(store, team, report=report)
    except PublishError as exc:
        return f"; not published to the team server: {exc}"
    return "; published to the team server ([team] publish_on_promote)" if published else ""
