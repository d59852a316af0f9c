"""Per-developer adapters, strictly opt-in.

A developer enables personalization with their identity (emails and/or
names, matched against the mined authors after alias merging). Their adapter
starts from the team's promoted adapter and is trained further on *their*
instances only (org → dev), on their machine, under their data dir. It is
exported as a GGUF LoRA and served on the base, hot-swappable; disabling
deletes it and the team model is served again. Nothing is ever trained for
a developer who has not enabled it: training refuses without the opt-in file.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from shoptalk.models.errors import ShopTalkError
from shoptalk.models.files import write_json_atomic
from shoptalk.models.progress import Report
from shoptalk.models.settings import Settings
from shoptalk.models.store import RepoStore
from shoptalk.trainer.run_record import RunRecordError, run_folders

PURPOSE = "org+dev"


class PersonalError(ShopTalkError):
    pass


def opt_in_file(store: RepoStore) -> Path:
    return store.root / "personal.json"


def opt_in(store: RepoStore) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(opt_in_file(store).read_text())
    except FileNotFoundError:
        return None
    return data if data.get("enabled") else None


def match_author(authors: dict[str, Any], identity: Iterable[str]) -> str:
    """The mined author id whose names or emails match the identity."""
    wanted = {item.strip().lower() for item in identity if item.strip()}
    if not wanted:
        raise PersonalError("give your identity: --identity you@example.com (email or name)")
    hits = [
        author_id
        for author_id, person in authors.items()
        if wanted & {str(x).lower() for x in [*person.get("emails", []), *person.get("names", [])]}
    ]
    if not hits:
        raise PersonalError(
            f"no commit author matches {', '.join(sorted(wanted))}: use the email or name of your "
            "commits (see `git log --format='%an <%ae>'`)"
        )
    if len(hits) > 1:
        raise PersonalError(
            f"{', '.join(sorted(wanted))} matches several authors ({', '.join(hits)}): "
            "give one email, or merge the aliases with mine.alias_file"
        )
    return hits[0]


def enable(repo: Path, identity: list[str], settings: Settings, data_dir: Path) -> str:
    """Record the opt-in; returns the developer's author id."""
    from shoptalk.trainer.mine import mine_repository

    mined = mine_repository(repo, settings.mine, data_dir)
    author_id = match_author(mined.manifest.get("authors", {}), identity)
    store = RepoStore.for_repo(data_dir, repo)
    write_json_atomic(
        opt_in_file(store), {"enabled": True, "identity": identity, "author_id": author_id}
    )
    return author_id


def _personal_runs(store: RepoStore, author_id: str | None) -> list[Path]:
    runs: list[Path] = []
    for run in run_folders(store.runs_dir):
        try:
            record = run.load_record()
        except RunRecordError:
            continue
        if record.purpose in ("dev", PURPOSE) and (
            author_id is None or record.developer == author_id
        ):
            runs.append(run.root)
    return runs


def disable(repo: Path, data_dir: Path) -> int:
    """Delete the developer's adapters and the opt-in; serve the team model
    again. Returns how many adapters were deleted."""
    store = RepoStore.for_repo(data_dir, repo)
    choice = opt_in(store)
    runs = _personal_runs(store, choice.get("author_id") if choice else None)
    current = store.current()
    if current and current.get("personal"):
        team = {k: v for k, v in current.items() if k not in ("history", "promoted_at")}
        team.update({"adapter": None, "base_model": None, "personal": None})
        store.promote(team)
    for run_dir in runs:
        shutil.rmtree(run_dir, ignore_errors=True)
    opt_in_file(store).unlink(missing_ok=True)
    return len(runs)


def train_personal(repo: Path, settings: Settings, data_dir: Path, report: Report) -> str:
    """Train, export, evaluate and (if not worse than the team model) serve
    the developer's adapter; returns what happened."""
    from shoptalk.models.catalog import resolve_base
    from shoptalk.trainer.evaluate import base_gguf, evaluate_models
    from shoptalk.trainer.export import export_run
    from shoptalk.trainer.promotion import (
        JOB_VAL_LIMIT,
        completion_em,
        gate,
        publish_promoted,
        report_difference,
    )
    from shoptalk.trainer.train import train_adapter

    store = RepoStore.for_repo(data_dir, repo)
    choice = opt_in(store)
    if choice is None:
        raise PersonalError(
            "personalization is not enabled for this repository: "
            "`shoptalk personal enable --identity you@example.com` first"
        )
    current = store.current()
    if not current or not current.get("adapter_dir"):
        raise PersonalError(
            "a personal adapter is trained on top of the team's: promote a team model first "
            "(`shoptalk retrain`)"
        )
    author_id = str(choice["author_id"])
    budget = settings.model_copy(deep=True)
    if budget.train.max_minutes is None and budget.train.max_steps is None:
        budget.train.max_minutes = settings.watch.train_minutes
    # The job's evaluation measures on the test window: training must not see it.
    budget.train.final_pass = False
    budget.train.measure_instances = 0
    trained = train_adapter(
        repo,
        budget,
        data_dir,
        init_adapter=Path(current["adapter_dir"]),
        purpose=PURPOSE,
        developer=author_id,
        val_limit=JOB_VAL_LIMIT,
        show_progress=False,
        report=report,
    )
    if trained.adapter_dir is None:
        raise PersonalError(f"the personal adapter did not finish training: {trained.stop_reason}")
    exported = export_run(trained.run_dir, "f16", adapter_only=True, report=report)
    adapter_file = next(p for p in exported.files if p.suffix == ".gguf")
    spec = f"{PURPOSE}:{author_id}"
    # Judged on the developer's own newest code (all of the newest code when
    # they have none there yet).
    from shoptalk.trainer.evaluate import NoAuthorInstances

    try:
        evaluation = evaluate_models(
            repo,
            ["org", spec],
            settings,
            data_dir,
            settings.watch.holdout,
            general_instances=0,
            author=author_id,
        )
    except NoAuthorInstances:
        evaluation = evaluate_models(
            repo, ["org", spec], settings, data_dir, settings.watch.holdout, general_instances=0
        )
    personal_em = completion_em(evaluation.data, spec)
    team_em = completion_em(evaluation.data, "org")
    difference = report_difference(evaluation.directory, spec, "org")
    promoted, reason = gate(difference, settings.watch.tolerance * 100, require_gain=False)
    if promoted:
        host = base_gguf(resolve_base(settings.train.base), data_dir, report)
        team = {k: v for k, v in current.items() if k not in ("history", "promoted_at")}
        store.promote(
            {
                **team,
                "adapter": str(adapter_file),
                "base_model": str(host),
                "personal": {"developer": author_id, "run_id": trained.run_id},
                "metrics": {"exact_match": personal_em, "team_exact_match": team_em},
            }
        )
        reason += publish_promoted(store, settings.team, report)
    return ("serving your adapter: " if promoted else "kept the team model: ") + reason
