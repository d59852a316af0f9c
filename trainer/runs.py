"""The training runs of a repository at a glance (`shoptalk runs`), and the
run id `latest` that every command taking a run id accepts.

A run's row: its id, purpose and status, the optimizer steps, validation
loss (before training → best kept), the held-out score (exact match of the
newest evaluation report that ran it, beside that report's base), the files
`shoptalk export` wrote, and whether it is the repository's promoted model.
Everything is read from the store (`record.json`, `export/`, `eval/*/report.json`,
`current.json`); nothing is written.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shoptalk.models.errors import ShopTalkError
from shoptalk.models.store import DamagedPointer, RepoStore
from shoptalk.trainer.run_record import DEFAULT_PURPOSE, RunFolder, RunRecordError, run_folders

LATEST = "latest"

# Run ids end in their UTC start time (`RepoStore.new_run_id`): org-20261207-115742[-2].
_STAMP = re.compile(r"(\d{8}-\d{6})(?:-(\d+))?$")


class RunsError(ShopTalkError):
    pass


@dataclass(frozen=True)
class HeldOut:
    """A run's exact match on the newest commits, from one evaluation report."""

    exact_match: float
    count: int
    base_exact_match: float | None
    report: Path


@dataclass(frozen=True)
class RunSummary:
    run_id: str
    purpose: str
    status: str
    steps: int | None
    base_val_loss: float | None
    best_val_loss: float | None
    exports: tuple[str, ...]
    promoted: bool
    held_out: HeldOut | None
    started: float


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _started(folder: RunFolder, data: dict[str, Any]) -> float:
    """When the run started: its record, else the time in its id, else the folder's."""
    recorded = _number(data.get("started_at"))
    if recorded is not None:
        return recorded
    match = _STAMP.search(folder.run_id)
    if match:
        import calendar
        import time

        stamp = calendar.timegm(time.strptime(match.group(1), "%Y%m%d-%H%M%S"))
        return stamp + int(match.group(2) or 1) * 1e-3
    return folder.root.stat().st_mtime


def _promoted_run(store: RepoStore) -> str | None:
    try:
        promotion = store.promotion()
    except DamagedPointer:
        return None
    return promotion.run_id if promotion is not None else None


def held_out_scores(store: RepoStore) -> dict[str, HeldOut]:
    """For each run id, its exact match in the newest evaluation report that ran it."""
    scores: dict[str, HeldOut] = {}
    eval_dir = store.root / "eval"
    reports = sorted(eval_dir.glob("*/report.json"), reverse=True) if eval_dir.is_dir() else []
    for path in reports:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            models = data["models"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        base = next((m for m in models if m.get("spec") == "base"), None)
        for model in models:
            run_id = model.get("run_id")
            if not run_id or run_id in scores:
                continue
            try:
                pooled = model["completion"]["pooled"]
                base_em = base["completion"]["pooled"]["exact_match"]["value"] if base else None
                scores[run_id] = HeldOut(
                    float(pooled["exact_match"]["value"]),
                    int(pooled["count"]),
                    _number(base_em),
                    path.parent / "report.html",
                )
            except (KeyError, TypeError, ValueError):
                continue
    return scores


def list_runs(store: RepoStore) -> list[RunSummary]:
    """Every run of the repository, oldest first."""
    promoted = _promoted_run(store)
    held_out = held_out_scores(store)
    runs: list[RunSummary] = []
    for folder in run_folders(store.runs_dir):
        try:
            record = folder.load_record()
        except RunRecordError:
            runs.append(
                RunSummary(folder.run_id, "?", "unreadable", None, None, None, (), False, None, 0.0)
            )
            continue
        data = record.data
        steps = data.get("steps")
        exports = [p.name for p in (*folder.exported_models(), *folder.exported_adapters())]
        runs.append(
            RunSummary(
                run_id=record.run_id,
                purpose=record.purpose,
                status=record.status or "?",
                steps=steps if isinstance(steps, int) else None,
                base_val_loss=_number(data.get("base_val_loss")),
                best_val_loss=_number(data.get("best_val_loss")),
                exports=tuple(exports),
                promoted=record.run_id == promoted,
                held_out=held_out.get(record.run_id),
                started=_started(folder, data),
            )
        )
    return sorted(runs, key=lambda run: (run.started, run.run_id))


def latest_run_id(store: RepoStore) -> str:
    """The newest complete run of the repository (what `latest` names)."""
    complete = [run for run in list_runs(store) if run.status == "complete"]
    if not complete:
        others = ", ".join(f"{run.run_id} ({run.status})" for run in list_runs(store)[-3:])
        raise RunsError(
            f"no complete training run under {store.runs_dir}"
            + (f" (newest: {others}; finish one with `shoptalk train --resume`)" if others else "")
            + "; train one with `shoptalk train --repo <repository>`"
        )
    return complete[-1].run_id


def resolve_run_id(store: RepoStore, run_id: str) -> str:
    """`run_id` itself, or the newest complete run's id for `latest`."""
    return latest_run_id(store) if run_id == LATEST else run_id


# ------------------------------------------------------------------ view


def _loss(run: RunSummary) -> str:
    if run.best_val_loss is None:
        return "–"
    if run.base_val_loss is None:
        return f"{run.best_val_loss:.3f}"
    return f"{run.base_val_loss:.3f} → {run.best_val_loss:.3f}"


def _held_out(run: RunSummary) -> str:
    score = run.held_out
    if score is None:
        return "–"
    base = "" if score.base_exact_match is None else f"base {score.base_exact_match:.1f}, "
    return f"{score.exact_match:.1f} ({base}n={score.count})"


def runs_table(runs: Sequence[RunSummary], title: str, width: int | None = None) -> Any:
    """The runs as a rich table (run ids and file names are never cut short)."""
    from rich.table import Table

    from shoptalk.models.tables import whole_cells

    purposes = any(run.purpose != DEFAULT_PURPOSE for run in runs)
    headers = ["run", *(["purpose"] if purposes else []), "status", "steps", "val loss"]
    headers += ["EM %", "exports", "served"]
    table = Table(
        title=title,
        caption="EM %: exact match on the newest commits, held out of training (shoptalk eval)",
        box=None,
        pad_edge=False,
        header_style="bold",
    )
    for header in headers:
        table.add_column(header, justify="right" if header == "steps" else "left")
    for run in runs:
        cells = [run.run_id, *([run.purpose] if purposes else []), run.status]
        cells += [
            "–" if run.steps is None else str(run.steps),
            _loss(run),
            _held_out(run),
            "\n".join(run.exports) or "–",
            "yes" if run.promoted else "",
        ]
        table.add_row(*cells)
    return whole_cells(table, keys=("run", "exports"), width=width)
