"""Ctrl-C in a command ends with a word on stderr and exit 130, not silence."""

from __future__ import annotations

import pytest
import typer

from shoptalk.models import cli


def _app_with(command: typer.models.CommandFunctionType) -> typer.Typer:
    app = typer.Typer()
    app.command("work")(command)
    app.command("other")(lambda: None)
    return app


def test_ctrl_c_in_a_command_says_interrupted(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def work() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "app", _app_with(work))
    monkeypatch.setattr(cli, "_register_commands", lambda: None)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["work"])
    assert exit_.value.code == 130
    assert "interrupted" in capsys.readouterr().err


def test_a_plain_exit_130_is_not_called_an_interruption(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def work() -> None:
        raise typer.Exit(130)

    monkeypatch.setattr(cli, "app", _app_with(work))
    monkeypatch.setattr(cli, "_register_commands", lambda: None)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["work"])
    assert exit_.value.code == 130
    assert "interrupted" not in capsys.readouterr().err
