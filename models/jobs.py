"""The persistent job queue of continuous learning: jobs, their steps, and the
promotion decisions with their figures, in one SQLite file in the data dir.

Both halves use it: the watcher (server side) enqueues jobs and reports them
to the editor; the retraining process (trainer side) claims a job, records
each step and the promotion decision. A claim is a single `BEGIN IMMEDIATE`
transaction, so two servers watching the same repository never start the
same job twice, and at most one job runs at a time per data dir.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    repo TEXT NOT NULL,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    head TEXT,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    step TEXT,
    progress REAL,
    message TEXT,
    pid INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    params TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS decisions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id INTEGER,
    repo TEXT NOT NULL,
    run_id TEXT,
    promoted INTEGER NOT NULL,
    reason TEXT NOT NULL,
    figures TEXT NOT NULL,
    at REAL NOT NULL
);
"""

ACTIVE_STATES = ("queued", "running")
MAX_ATTEMPTS = 3


@dataclass(frozen=True)
class Job:
    id: int
    repo: str
    kind: str
    state: str
    head: str | None
    created: float
    started: float | None
    finished: float | None
    step: str | None
    progress: float | None
    message: str | None
    pid: int | None
    attempts: int
    params: dict[str, Any]


@dataclass(frozen=True)
class Decision:
    job_id: int | None
    repo: str
    run_id: str | None
    promoted: bool
    reason: str
    figures: dict[str, Any]
    at: float


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class JobQueue:
    def __init__(self, data_dir: Path):
        data_dir.mkdir(parents=True, exist_ok=True)
        self.path = data_dir / "jobs.sqlite3"
        with self._connect() as db:
            db.executescript(SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        try:
            db.execute("PRAGMA journal_mode=WAL")
            yield db
        finally:
            db.close()

    @staticmethod
    def _job(row: sqlite3.Row) -> Job:
        data = dict(row)
        data["params"] = json.loads(data["params"] or "{}")
        return Job(**data)

    def enqueue(
        self, repo: Path, kind: str, head: str | None, params: dict[str, Any] | None = None
    ) -> Job:
        """Queue a job unless one for the same repo and kind is already
        queued (then that one is updated to the newer head and returned)."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute(
                "SELECT * FROM jobs WHERE repo=? AND kind=? AND state='queued' ORDER BY id LIMIT 1",
                (str(repo), kind),
            ).fetchone()
            if row is not None:
                db.execute("UPDATE jobs SET head=? WHERE id=?", (head, row["id"]))
                job_id = row["id"]
            else:
                cursor = db.execute(
                    "INSERT INTO jobs (repo, kind, state, head, created, params) VALUES (?,?,?,?,?,?)",
                    (str(repo), kind, "queued", head, time.time(), json.dumps(params or {})),
                )
                job_id = cursor.lastrowid
            db.execute("COMMIT")
        return self.get(int(job_id))

    def get(self, job_id: int) -> Job:
        with self._connect() as db:
            row = db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        if row is None:
            raise KeyError(f"no job {job_id}")
        return self._job(row)

    def claim(self, pid: int | None = None) -> Job | None:
        """Take the oldest queued job and mark it running, unless a job is
        already running in a live process. A running job whose process died
        goes back to the queue (up to MAX_ATTEMPTS), so a killed job resumes."""
        pid = pid or os.getpid()
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            for row in db.execute("SELECT * FROM jobs WHERE state='running'").fetchall():
                if _pid_alive(row["pid"]):
                    db.execute("COMMIT")
                    return None
                state = "queued" if row["attempts"] < MAX_ATTEMPTS else "failed"
                db.execute(
                    "UPDATE jobs SET state=?, message=? WHERE id=?",
                    (state, f"process {row['pid']} died during {row['step']}", row["id"]),
                )
            row = db.execute(
                "SELECT * FROM jobs WHERE state='queued' ORDER BY id LIMIT 1"
            ).fetchone()
            if row is None:
                db.execute("COMMIT")
                return None
            db.execute(
                "UPDATE jobs SET state='running', started=?, pid=?, attempts=attempts+1 WHERE id=?",
                (time.time(), pid, row["id"]),
            )
            db.execute("COMMIT")
        return self.get(int(row["id"]))

    def update(
        self,
        job_id: int,
        *,
        step: str | None = None,
        progress: float | None = None,
        message: str | None = None,
    ) -> None:
        fields = {"step": step, "progress": progress, "message": message}
        sets = {k: v for k, v in fields.items() if v is not None}
        if not sets:
            return
        assignments = ", ".join(f"{k}=?" for k in sets)
        with self._connect() as db:
            db.execute(f"UPDATE jobs SET {assignments} WHERE id=?", (*sets.values(), job_id))

    def set_params(self, job_id: int, params: dict[str, Any]) -> None:
        """Remember what a resumed job needs (e.g. its run id)."""
        with self._connect() as db:
            db.execute("UPDATE jobs SET params=? WHERE id=?", (json.dumps(params), job_id))

    def finish(self, job_id: int, state: str, message: str) -> None:
        if state not in ("done", "failed", "cancelled"):
            raise ValueError(f"not a final state: {state}")
        with self._connect() as db:
            db.execute(
                "UPDATE jobs SET state=?, message=?, finished=?, progress=1.0 WHERE id=?",
                (state, message, time.time(), job_id),
            )

    def cancel(self, job_id: int) -> bool:
        """Cancel a queued job, or ask a running one to stop (its process checks)."""
        with self._connect() as db:
            cursor = db.execute(
                "UPDATE jobs SET state='cancelled', finished=? WHERE id=? AND state IN ('queued','running')",
                (time.time(), job_id),
            )
            return cursor.rowcount > 0

    def _newest(self, table: str, repo: Path | None, limit: int) -> list[sqlite3.Row]:
        where, args = ("WHERE repo=?", (str(repo),)) if repo is not None else ("", ())
        with self._connect() as db:
            return db.execute(
                f"SELECT * FROM {table} {where} ORDER BY id DESC LIMIT ?", (*args, limit)
            ).fetchall()

    def jobs(self, repo: Path | None = None, limit: int = 20) -> list[Job]:
        return [self._job(r) for r in self._newest("jobs", repo, limit)]

    def record_decision(self, decision: Decision) -> None:
        with self._connect() as db:
            db.execute(
                "INSERT INTO decisions (job_id, repo, run_id, promoted, reason, figures, at) "
                "VALUES (?,?,?,?,?,?,?)",
                (
                    decision.job_id,
                    decision.repo,
                    decision.run_id,
                    int(decision.promoted),
                    decision.reason,
                    json.dumps(decision.figures),
                    decision.at,
                ),
            )

    def decisions(self, repo: Path | None = None, limit: int = 20) -> list[Decision]:
        rows = self._newest("decisions", repo, limit)
        return [
            Decision(
                r["job_id"],
                r["repo"],
                r["run_id"],
                bool(r["promoted"]),
                r["reason"],
                json.loads(r["figures"]),
                r["at"],
            )
            for r in rows
        ]
