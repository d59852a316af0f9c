"""Promotion: whether a candidate model replaces the served one, and making
a run the repository's served model.

The gate compares a candidate with the current model on one evaluation
report (`shoptalk.trainer.evaluate`): pooled exact match, with a tolerance
in EM points. `promote_run` writes the repository's promotion pointer
(`current.json`, through `RepoStore.promote`); a running server picks it up.

Used by export (`--promote`), the retraining job, personal adapters and the
demo; it imports none of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shoptalk.models.errors import ShopTalkError
from shoptalk.models.store import RepoStore
from shoptalk.trainer.dataset_folder import read_split

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


def gate(candidate_em: float, current_em: float, tolerance_points: float) -> tuple[bool, str]:
    """Promote when the candidate is not worse than the current model by more
    than the tolerance (in EM points)."""
    if candidate_em + tolerance_points >= current_em:
        return (
            True,
            f"EM {candidate_em:.1f} vs current {current_em:.1f} (tolerance {tolerance_points:.1f})",
        )
    return False, (
        f"worse than the current model: EM {candidate_em:.1f} vs {current_em:.1f} "
        f"(tolerance {tolerance_points:.1f}); current model kept"
    )


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
