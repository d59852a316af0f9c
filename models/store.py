"""Where ShopTalk keeps its artifacts: a per-user data directory with one
folder per base model and one per repository (datasets, runs, the promoted
model). Nothing is ever written into the user's repository.

    <data_dir>/bases/<key>/            base weights (GGUF, cached HF checkpoint)
    <data_dir>/repos/<name>-<hash>/    one repository
        dataset/                        mined shards + manifest.json
        runs/<run_id>/                  one training run (adapter, exports, record)
        current.json                    the promoted model; moved atomically

`current.json` is the promotion pointer. It is read as untrusted input: one
loader (`load_promotion`) turns it into a typed `Promotion` or raises
`DamagedPointer`, which says what is wrong and how to repair it
(`shoptalk models rollback`), so no reader ever sees a half-valid record.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shoptalk.models.errors import ShopTalkError
from shoptalk.models.files import write_json_atomic

log = logging.getLogger(__name__)

HISTORY_LIMIT = 20
_STRING_KEYS = (
    "run_id",
    "model",
    "adapter",
    "base_model",
    "adapter_dir",
    "data_through",
    "rolled_back_from",
)
_KNOWN_KEYS = (*_STRING_KEYS, "metrics", "personal", "promoted_at", "history")


def bases_dir(data_dir: Path) -> Path:
    return data_dir / "bases"


def base_dir(data_dir: Path, key: str) -> Path:
    return bases_dir(data_dir) / re.sub(r"[^A-Za-z0-9._-]+", "_", key)


def repo_key(repo: Path) -> str:
    """Stable folder name for a repository: its name plus a hash of its path."""
    resolved = repo.expanduser().resolve()
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:10]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", resolved.name) or "repo"
    return f"{name}-{digest}"


class InvalidPromotion(ValueError):
    """A promotion record that does not hold a usable model (the reason is the message)."""


class DamagedPointer(ShopTalkError):
    """`current.json` cannot be used. `salvage` holds the earlier promotions
    still readable in it (newest last), which `RepoStore.repair` restores."""

    def __init__(self, path: Path, reason: str, salvage: tuple[Promotion, ...] = ()) -> None:
        self.path = path
        self.reason = reason
        self.salvage = salvage
        super().__init__(
            f"the promotion pointer {path} is damaged ({reason}); repair it with "
            "`shoptalk models rollback --repo <repository>`"
        )


@dataclass(frozen=True)
class Promotion:
    """One promoted model: `current.json`, and each entry of its history."""

    run_id: str | None
    model: str | None  # the GGUF served (or, with an adapter, the host it runs on)
    adapter: str | None = None  # a LoRA adapter GGUF served on `base_model` (or `model`)
    base_model: str | None = None
    adapter_dir: str | None = None  # where the next incremental run starts from
    data_through: str | None = None  # newest training instance's date
    metrics: dict[str, Any] = field(default_factory=dict)
    personal: dict[str, Any] | None = None
    promoted_at: float | None = None
    rolled_back_from: str | None = None
    history: tuple[Promotion, ...] = ()  # earlier promotions, oldest first
    extra: dict[str, Any] = field(default_factory=dict)  # keys written by newer versions

    @property
    def host(self) -> str | None:
        """The GGUF an adapter runs on."""
        return self.base_model or self.model

    @classmethod
    def from_record(cls, record: object) -> Promotion:
        """Check a decoded record; InvalidPromotion names the first problem.
        Unreadable history entries are dropped (and logged), not fatal."""
        if not isinstance(record, dict):
            raise InvalidPromotion(f"it holds a JSON {_json_kind(record)}, not an object")
        values: dict[str, Any] = {}
        for key in _STRING_KEYS:
            value = record.get(key)
            if value is not None and not isinstance(value, str):
                raise InvalidPromotion(f"{key!r} is a {_json_kind(value)}, not a string")
            values[key] = value or None
        if values["model"] is None and values["adapter"] is None:
            raise InvalidPromotion("it names no model")
        metrics = record.get("metrics") or {}
        if not isinstance(metrics, dict):
            raise InvalidPromotion(f"'metrics' is a {_json_kind(metrics)}, not an object")
        personal = record.get("personal")
        if personal is not None and not isinstance(personal, dict):
            raise InvalidPromotion(f"'personal' is a {_json_kind(personal)}, not an object")
        promoted_at = record.get("promoted_at")
        if promoted_at is not None and (
            isinstance(promoted_at, bool) or not isinstance(promoted_at, int | float)
        ):
            raise InvalidPromotion(f"'promoted_at' is a {_json_kind(promoted_at)}, not a number")
        return cls(
            **values,
            metrics=metrics,
            personal=personal,
            promoted_at=float(promoted_at) if promoted_at is not None else None,
            history=readable_history(record.get("history")),
            extra={k: v for k, v in record.items() if k not in _KNOWN_KEYS},
        )

    def to_record(self) -> dict[str, Any]:
        """The JSON object written to `current.json`."""
        record: dict[str, Any] = dict(self.extra)
        record.update(
            run_id=self.run_id,
            model=self.model,
            adapter=self.adapter,
            base_model=self.base_model,
            adapter_dir=self.adapter_dir,
            data_through=self.data_through,
            metrics=self.metrics,
            personal=self.personal,
            promoted_at=self.promoted_at,
            rolled_back_from=self.rolled_back_from,
            history=[entry.to_record() for entry in self.history],
        )
        return record

    def without_history(self) -> Promotion:
        return Promotion.from_record({**self.to_record(), "history": []})


def readable_history(value: object) -> tuple[Promotion, ...]:
    """The usable entries of a `history` value (anything else is skipped)."""
    if not isinstance(value, list):
        return ()
    entries = []
    for position, item in enumerate(value):
        try:
            entries.append(Promotion.from_record(item).without_history())
        except InvalidPromotion as exc:
            log.warning("skipping history entry %d of the promotion pointer: %s", position, exc)
    return tuple(entries)


def _json_kind(value: object) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}
    for kind, name in names.items():
        if isinstance(value, kind):
            return name
    return "number" if isinstance(value, int | float) else type(value).__name__


def load_promotion(path: Path) -> Promotion | None:
    """The promotion pointer at `path`; None when there is none. Raises
    DamagedPointer when it cannot be read or does not hold a usable record."""
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        return None
    except UnicodeDecodeError:
        raise DamagedPointer(path, "it is not UTF-8 text") from None
    except OSError as exc:
        raise DamagedPointer(path, f"it cannot be read: {exc.strerror or exc}") from None
    try:
        record = json.loads(text)
    except ValueError as exc:
        raise DamagedPointer(path, f"it is not JSON: {exc}") from None
    try:
        return Promotion.from_record(record)
    except InvalidPromotion as exc:
        salvage = readable_history(record.get("history")) if isinstance(record, dict) else ()
        raise DamagedPointer(path, str(exc), salvage) from None


@dataclass(frozen=True)
class Repair:
    """What `RepoStore.repair` did: the promotion restored from the damaged
    pointer's history, or None when it was moved aside (the base is served)."""

    restored: Promotion | None
    moved_to: Path | None
    reason: str


@dataclass(frozen=True)
class RepoStore:
    """The artifact folder of one repository."""

    root: Path

    @classmethod
    def for_repo(cls, data_dir: Path, repo: Path) -> RepoStore:
        return cls(data_dir / "repos" / repo_key(repo))

    @property
    def dataset_dir(self) -> Path:
        return self.root / "dataset"

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    @property
    def current_file(self) -> Path:
        return self.root / "current.json"

    @property
    def damaged_file(self) -> Path:
        """Where a damaged pointer is kept when it is replaced."""
        return self.root / "current.json.damaged"

    def new_run_id(self, prefix: str = "run") -> str:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        run_id = f"{prefix}-{stamp}"
        n = 1
        while (self.runs_dir / run_id).exists():
            n += 1
            run_id = f"{prefix}-{stamp}-{n}"
        return run_id

    def run_dir(self, run_id: str) -> Path:
        return self.runs_dir / run_id

    def promotion(self) -> Promotion | None:
        """The promoted model, or None when nothing was promoted yet; raises
        DamagedPointer when `current.json` is unusable."""
        return load_promotion(self.current_file)

    def current(self) -> dict[str, Any] | None:
        """`promotion()` as its JSON record (for callers that copy records)."""
        promotion = self.promotion()
        return promotion.to_record() if promotion is not None else None

    def promote(self, record: dict[str, Any] | Promotion) -> Promotion:
        """Atomically make `record` (run id, model path, figures) the current
        model; the previous one is kept in its history for rollback. A damaged
        pointer is replaced (kept as `current.json.damaged`; its readable
        history carries over)."""
        new = record if isinstance(record, Promotion) else Promotion.from_record(record)
        try:
            previous = self.promotion()
            history = list(previous.history) if previous else []
            if previous is not None:
                history.append(previous.without_history())
        except DamagedPointer as exc:
            log.warning("%s; replacing it with the new promotion", exc)
            history = list(exc.salvage)
            self._move_damaged_aside()
        promoted = Promotion.from_record(
            {
                **new.to_record(),
                "promoted_at": time.time(),
                "history": [entry.to_record() for entry in history[-HISTORY_LIMIT:]],
            }
        )
        write_json_atomic(self.current_file, promoted.to_record())
        return promoted

    def rollback(self) -> Promotion:
        """Restore the previously promoted model; LookupError if there is none,
        DamagedPointer when the pointer must be repaired instead."""
        current = self.promotion()
        if current is None or not current.history:
            raise LookupError("no earlier promoted model to roll back to")
        history = list(current.history)
        previous = history.pop()
        return self._restore(previous, history, rolled_back_from=current.run_id)

    def repair(self) -> Repair:
        """Make a damaged pointer usable again: restore the newest promotion
        still readable in its history, or else move it aside so that the base
        is served. Does nothing (restored = the current one) when it is fine."""
        try:
            current = self.promotion()
        except DamagedPointer as exc:
            moved = self._move_damaged_aside()
            if exc.salvage:
                history = list(exc.salvage)
                previous = history.pop()
                restored = self._restore(previous, history, rolled_back_from=None)
                return Repair(restored, moved, exc.reason)
            return Repair(None, moved, exc.reason)
        return Repair(current, None, "")

    def _restore(
        self, entry: Promotion, history: list[Promotion], rolled_back_from: str | None
    ) -> Promotion:
        record = {
            **entry.to_record(),
            "history": [item.to_record() for item in history],
            "rolled_back_from": rolled_back_from,
        }
        restored = Promotion.from_record(record)
        write_json_atomic(self.current_file, restored.to_record())
        return restored

    def _move_damaged_aside(self) -> Path | None:
        try:
            os.replace(self.current_file, self.damaged_file)
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("could not keep the damaged pointer aside: %s", exc)
            return None
        return self.damaged_file


def rollback_or_repair(store: RepoStore) -> str:
    """`shoptalk models rollback`: restore the previously promoted model, or
    repair a damaged pointer; returns what happened. LookupError when a sound
    pointer has nothing earlier to roll back to."""
    try:
        restored = store.rollback()
    except DamagedPointer:
        repair = store.repair()
        kept = f" (the damaged file is kept as {repair.moved_to})" if repair.moved_to else ""
        if repair.restored is None:
            return (
                f"the promotion pointer was damaged ({repair.reason}) and held no earlier model; "
                f"removed it{kept}, so the base model is served now"
            )
        restored = repair.restored
        return (
            f"the promotion pointer was damaged ({repair.reason}); restored the newest earlier "
            f"model from its history: now serving {restored.run_id} "
            f"({restored.adapter or restored.model}){kept}"
        )
    return f"rolled back: now serving {restored.run_id} ({restored.adapter or restored.model})"
