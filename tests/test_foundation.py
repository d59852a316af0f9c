"""Packaging, settings, the store and default-model provisioning."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from shoptalk.models.catalog import CATALOG, DEFAULT_BASE, UnknownBaseModel, resolve_base
from shoptalk.models.files import atomic_open
from shoptalk.models.manifest import ManifestError, verify_model_file, write_manifest
from shoptalk.models.provision import ensure_gguf, gguf_status
from shoptalk.models.settings import SettingsError, load_settings
from shoptalk.models.store import RepoStore


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shoptalk.models.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=os.environ.copy(),
        timeout=120,
    )


def test_packages_live_under_the_shoptalk_namespace(tmp_path: Path) -> None:
    code = "import shoptalk.server, shoptalk.trainer, shoptalk.models\nimport server"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path
    )
    assert "No module named 'server'" in result.stderr


def test_cli_help_lists_commands() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    assert "models" in result.stdout and "doctor" in result.stdout


def test_doctor_reports_the_machine() -> None:
    result = run_cli("doctor")
    assert result.returncode == 0, result.stderr
    for label in ("python", "torch device", "bf16", "llama-cpp-python", "free disk"):
        assert label in result.stdout


def test_settings_error_names_every_problem(tmp_path: Path) -> None:
    (tmp_path / "shoptalk.toml").write_text(
        '[train]\nlora_rnak = 8\nlearning_rate = "fast"\n[serve]\nmax_latncy_ms = 10\n'
    )
    with pytest.raises(SettingsError) as info:
        load_settings(repo=tmp_path, environ={})
    message = str(info.value)
    assert "shoptalk.toml" in message
    assert "[train] lora_rnak: unknown key" in message
    assert "[train] learning_rate" in message and "'fast'" in message
    assert "[serve] max_latncy_ms: unknown key" in message
    assert len(info.value.problems) == 3


def test_settings_sources_in_order(tmp_path: Path) -> None:
    user = tmp_path / "user.toml"
    user.write_text("[train]\nlora_rank = 4\nlora_alpha = 4\n")
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "shoptalk.toml").write_text("[train]\nlora_rank = 8\n")
    settings = load_settings(
        repo=repo,
        user_config=user,
        environ={"SHOPTALK_TRAIN__LEARNING_RATE": "0.001", "SHOPTALK_SERVE__MULTILINE": "never"},
        overrides={"train": {"max_steps": 3}},
    )
    assert settings.train.lora_rank == 8  # repo beats user
    assert settings.train.lora_alpha == 4  # user beats default
    assert settings.train.learning_rate == pytest.approx(1e-3)  # env
    assert settings.serve.multiline == "never"
    assert settings.train.max_steps == 3  # CLI


def test_bad_env_value_is_reported() -> None:
    with pytest.raises(SettingsError, match="environment: \\[train\\] lora_rank"):
        load_settings(environ={"SHOPTALK_TRAIN__LORA_RANK": "-1"})


def test_resolve_base() -> None:
    assert resolve_base("gemma3-270m").architecture == "gemma3"
    assert resolve_base("Qwen/Qwen2.5-Coder-0.5B").fim.trained
    with pytest.raises(UnknownBaseModel, match="catalog key"):
        resolve_base("no-such-model")


def test_atomic_open_keeps_old_file_on_error(tmp_path: Path) -> None:
    target = tmp_path / "data.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_open(target) as handle:
        handle.write("half")
        raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]


def test_manifest_detects_tampering(tmp_path: Path) -> None:
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF" + bytes(100))
    write_manifest(model, kind="model", base="tiny")
    assert verify_model_file(model).kind == "model"
    model.write_bytes(b"GGUF" + bytes(99) + b"x")
    with pytest.raises(ManifestError, match="does not match its manifest"):
        verify_model_file(model)


def test_promote_and_rollback(tmp_path: Path) -> None:
    store = RepoStore.for_repo(tmp_path, tmp_path / "myrepo")
    assert store.current() is None
    store.promote({"run_id": "a", "model": "a.gguf"})
    store.promote({"run_id": "b", "model": "b.gguf"})
    assert store.current()["run_id"] == "b"  # type: ignore[index]
    assert store.rollback().run_id == "a"
    with pytest.raises(LookupError):
        store.rollback()


@pytest.mark.e2e
def test_models_pull_is_cached_and_heals(tmp_path: Path) -> None:
    base = CATALOG[DEFAULT_BASE]
    messages: list[str] = []
    gguf = ensure_gguf(tmp_path, base, messages.append)
    assert gguf_status(tmp_path, base) == "verified"
    ensure_gguf(tmp_path, base, messages.append)
    assert "cached and verified" in messages[-1]
    with gguf.open("r+b") as handle:
        handle.truncate(1000)
    assert gguf_status(tmp_path, base) == "corrupt"
    ensure_gguf(tmp_path, base, messages.append)
    assert any("fails its sha256 check; rebuilding" in m for m in messages)
    assert gguf_status(tmp_path, base) == "verified"


def test_models_rollback_cli(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    result = run_cli("models", "rollback", "--repo", str(repo))
    assert result.returncode == 2
    assert "no earlier promoted model" in result.stderr
    store = RepoStore.for_repo(Path(os.environ["SHOPTALK_DATA_DIR"]), repo)
    store.promote({"run_id": "one", "model": "one.gguf"})
    store.promote({"run_id": "two", "model": "two.gguf"})
    result = run_cli("models", "rollback", "--repo", str(repo))
    assert result.returncode == 0, result.stderr
    assert store.current()["run_id"] == "one"  # type: ignore[index]


def test_cli_needs_no_extra_to_start(tmp_path: Path) -> None:
    """A serve-only or base install must still list every command: command
    modules import heavy libraries only when their command runs."""
    heavy = [
        "torch",
        "transformers",
        "peft",
        "llama_cpp",
        "pygls",
        "lsprotocol",
        "watchdog",
        "gguf",
    ]
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {heavy!r}:\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from shoptalk.models.cli import main\n"
        "sys.argv = ['shoptalk', '--help']\n"
        "main()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    assert result.returncode == 0, result.stderr
    for command in ("mine", "train", "export", "eval", "serve", "watch", "retrain", "personal"):
        assert command in result.stdout


def test_root_options_reach_commands_under_python_m(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    data = tmp_path / "elsewhere"
    store = RepoStore.for_repo(data, repo)
    store.promote({"run_id": "one", "model": "one.gguf"})
    store.promote({"run_id": "two", "model": "two.gguf"})
    result = run_cli("--data-dir", str(data), "models", "rollback", "--repo", str(repo))
    assert result.returncode == 0, result.stderr
    assert store.current()["run_id"] == "one"  # type: ignore[index]
