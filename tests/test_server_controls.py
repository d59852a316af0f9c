"""Why a suggestion is slow or empty, and which files never reach a model:
`shoptalk/status`'s last answer ("loading", "over budget (2.1 s > 1.5 s)")
and its budget counters, the log line, and `shoptalk/exclusion` — against
the real `shoptalk serve --stdio` on a tiny GGUF, plus the notes' rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from shoptalk.server.answer_notes import AnswerNotes, over_budget_message
from shoptalk.server.document_exclusion import DocumentExclusion
from shoptalk.server.lsp import _plain
from tests.test_server_e2e import SOURCE, _make_workspace, start_session, stop_session


def test_over_budget_message_says_how_far_over() -> None:
    assert over_budget_message(2.1, 1500) == "over budget (2.1 s > 1.5 s)"
    assert over_budget_message(1.52, 1500) == "over budget (1.5 s)"  # stopped at the budget
    assert over_budget_message(0.004, 1) == "over budget (4 ms > 1 ms)"


def test_notes_count_budget_hits_and_loading_and_log_state_changes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    notes = AnswerNotes()
    assert notes.status() == {"answer": None, "counters": {"budget_hits": 0, "while_loading": 0}}
    with caplog.at_level("INFO", logger="shoptalk.server.answer_notes"):
        notes.loading()
        notes.loading()
        assert notes.status()["answer"]["message"] == "loading"
        for _ in range(3):
            notes.answered(2.1, 1500, "budget", False)
        answer = notes.status()["answer"]
        assert (
            answer["state"] == "over_budget" and answer["message"] == "over budget (2.1 s > 1.5 s)"
        )
        assert (answer["elapsed_ms"], answer["budget_ms"], answer["shown"]) == (2100, 1500, False)
        notes.answered(0.3, 1500, "stop", True)
    assert notes.status()["answer"]["state"] == "ok"
    assert notes.status()["counters"] == {"budget_hits": 3, "while_loading": 2}
    # One line per change of state, not one per request.
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines
    assert "loading" in lines[0]
    assert "over budget (2.1 s > 1.5 s): nothing shown" in lines[1]
    assert "max_latency_ms" in lines[1]
    assert "within the budget again" in lines[2]


def test_exclusion_rules_apply_inside_and_outside_the_repository(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    (root / "private").mkdir(parents=True)
    (root / ".shoptalkignore").write_text("private/\n")
    rules = DocumentExclusion()
    uri = lambda p: p.as_uri()  # noqa: E731
    assert rules.reason(uri(root / ".env.local"), root) == "never_send"
    assert rules.reason(uri(root / "deploy" / "server.pem"), root) == "never_send"
    assert rules.reason(uri(root / "private" / "notes.py"), root) == "shoptalkignore"
    assert rules.reason(uri(root / "gen" / "x.py"), root, ("gen/*",)) == "ignore_glob"
    assert rules.reason(uri(root / "app.py"), root) is None
    assert rules.reason(uri(tmp_path / "elsewhere" / "id_rsa"), root) == "never_send"
    assert rules.reason(uri(tmp_path / "elsewhere" / "app.py"), root) is None
    # An edited .shoptalkignore is read again.
    (root / ".shoptalkignore").write_text("")
    assert rules.reason(uri(root / "private" / "notes.py"), root) is None


@pytest.mark.e2e
@pytest.mark.asyncio
async def test_status_says_over_budget_and_counts_it(tmp_path: Path, model: Path) -> None:
    workspace = _make_workspace(tmp_path)
    data_dir = tmp_path / "data"
    session = await start_session(workspace, data_dir, model, {"max_latency_ms": 1})
    try:
        await session.wait_loaded()
        uri = await session.open("billing/invoices.py", SOURCE)
        for line in (6, 7, 8):
            assert await session.inline(uri, line, 8) is None  # 1 ms is never enough
        status = await session.status()
        assert status["answer"]["state"] == "over_budget", status["answer"]
        assert status["answer"]["message"].startswith("over budget (")
        assert status["answer"]["message"].endswith("> 1 ms)")
        assert status["counters"]["budget_hits"] == 3
        assert status["counters"]["while_loading"] == 0
        await session.wait_for(lambda: b"over budget (" in session.stderr)
        assert session.stderr.count(b"completion over budget") == 1  # logged once, not per request
    finally:
        await stop_session(session)


@pytest.mark.e2e
@pytest.mark.asyncio
async def test_excluded_files_get_no_completion_and_the_client_is_told(
    tmp_path: Path, model: Path
) -> None:
    workspace = _make_workspace(tmp_path)
    (workspace / ".shoptalkignore").write_text("web/\n")
    data_dir = tmp_path / "data"
    # No context engine (the default): the exclusion holds without the workspace index.
    session = await start_session(workspace, data_dir, model, {"max_latency_ms": 30000})
    try:
        await session.wait_loaded()
        secret = await session.open("billing/secret_keys.py", SOURCE)
        ignored = await session.open("web/routes.py", SOURCE)
        plain = await session.open("billing/invoices.py", SOURCE)
        for uri in (secret, ignored):
            assert await session.inline(uri, 7, 8) is None
        assert await session.inline(plain, 7, 8) is not None
        plain_answers = [
            _plain(await session.request("shoptalk/exclusion", {"textDocument": {"uri": uri}}))
            for uri in (secret, ignored, plain)
        ]
        assert [a["reason"] for a in plain_answers] == ["never_send", "shoptalkignore", None]
        assert plain_answers[0]["excluded"] is True and "never sent" in plain_answers[0]["message"]
        assert plain_answers[2]["excluded"] is False
    finally:
        await stop_session(session)


@pytest.mark.e2e
def test_probe_asks_the_real_server_like_an_editor(tmp_path: Path, model: Path) -> None:
    """The demo's completion step: `python -m shoptalk.server.probe` starts the
    real server through pygls' LanguageClient and prints what it suggested."""
    import json
    import os
    import subprocess
    import sys

    from shoptalk.models.store import RepoStore

    workspace = _make_workspace(tmp_path)
    data_dir = tmp_path / "data"
    RepoStore.for_repo(data_dir, workspace).promote(
        {"run_id": "run-a", "model": str(model), "adapter": None}
    )
    target = workspace / "billing" / "invoices.py"
    typed = SOURCE.splitlines()[7][:16]  # "        result +"
    document = "\n".join([*SOURCE.splitlines()[:7], typed, *SOURCE.splitlines()[8:]]) + "\n"
    text_file = tmp_path / "document.txt"
    text_file.write_text(document)
    env = {**os.environ, "SHOPTALK_SERVE__MAX_LATENCY_MS": "30000", "SHOPTALK_SERVE__THREADS": "1"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "shoptalk.server.probe",
            "--repo",
            str(workspace),
            "--file",
            str(target),
            "--line",
            "7",
            "--character",
            str(len(typed)),
            "--data-dir",
            str(data_dir),
            "--text-file",
            str(text_file),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["suggestion"] and "\n" not in answer["suggestion"].strip("\n")
    assert 0 < answer["seconds"] < 120
