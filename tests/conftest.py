"""Shared pytest fixtures. Fixture modules of each area are listed in
`pytest_plugins` so that every test can use them."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

pytest_plugins: list[str] = ["git_repos", "tiny_models"]


@pytest.fixture(autouse=True)
def _isolated_user_dirs(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tests never read or write the real user's config or data dir."""
    home = tmp_path_factory.mktemp("home")
    (home / "config.toml").touch()  # a SHOPTALK_CONFIG that names no file is an error
    monkeypatch.setenv("SHOPTALK_CONFIG", str(home / "config.toml"))
    monkeypatch.setenv("SHOPTALK_DATA_DIR", str(home / "data"))
    for name in list(os.environ):
        if name.startswith("SHOPTALK_") and name not in ("SHOPTALK_CONFIG", "SHOPTALK_DATA_DIR"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def default_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The packaged default GGUF assembled once per session (no network)."""
    from shoptalk.models.catalog import CATALOG, DEFAULT_BASE
    from shoptalk.models.provision import ensure_gguf

    data = tmp_path_factory.mktemp("default-model")
    return ensure_gguf(data, CATALOG[DEFAULT_BASE], lambda _msg: None)


@pytest.fixture
def model(tiny_gguf: Callable[..., Path], tmp_path: Path) -> Path:
    """The tiny GGUF as an exported model a server serves with `--model`
    (copied, with its manifest)."""
    import shutil

    from shoptalk.models.manifest import write_manifest

    target = tmp_path / "models" / "model-a.gguf"
    target.parent.mkdir(parents=True)
    shutil.copy(tiny_gguf("gemma3"), target)
    write_manifest(target, kind="model", base="gemma3-270m", run_id="run-a")
    return target
