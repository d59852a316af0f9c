"""What the CLI says when its settings or its data dir cannot be used: a
message naming the source (file, variable or flag), never a traceback,
nothing written, and nothing of the message lost to console markup.
Issue 14, "Clear messages instead of tracebacks"."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from git_repos import ALICE, RepoBuilder, git

from shoptalk.models.settings import load_settings

SHOPTALK = str(Path(sys.executable).with_name("shoptalk"))


def shoptalk(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SHOPTALK, *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        timeout=120,
    )


def assert_refused(done: subprocess.CompletedProcess[str], *phrases: str) -> None:
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert "error: invalid settings:" in done.stderr, done.stderr
    for phrase in phrases:
        assert phrase in done.stderr, done.stderr


@pytest.fixture
def repo(repo_builder: RepoBuilder) -> Path:
    repo_builder.write("app/main.py", "def main() -> int:\n    return run(verbose=True)\n")
    repo_builder.commit("Add main", ALICE)
    return repo_builder.path


def test_an_empty_data_dir_variable_means_unset(repo: Path, tmp_path: Path) -> None:
    """`SHOPTALK_DATA_DIR=` wrote the store into the current folder (inside a
    repository: `git status` showed `repos/`)."""
    default = tmp_path / "xdg-data"
    env = {"SHOPTALK_DATA_DIR": "", "XDG_DATA_HOME": str(default)}
    done = shoptalk("mine", "--repo", ".", env=env, cwd=repo)
    assert done.returncode == 0, done.stderr
    assert git(repo, "status", "--porcelain") == ""
    assert (default / "shoptalk" / "repos").is_dir()
    where = shoptalk("models", "path", env=env, cwd=repo)
    assert where.stdout.startswith(str(default / "shoptalk"))


def test_empty_values_of_other_variables_mean_unset() -> None:
    settings = load_settings(
        environ={"SHOPTALK_DATA_DIR": "", "SHOPTALK_SERVE__LOG_FILE": "", "SHOPTALK_CONFIG": ""}
    )
    assert settings.data_dir is None and settings.serve.log_file is None


def _broken_sources(tmp_path: Path) -> dict[str, tuple[dict[str, str], list[str]]]:
    """Each broken settings source: its environment and what the message says."""
    latin1 = tmp_path / "latin1.toml"
    raw = b'[mine]\nbranch = "caf\xe9"\n'
    latin1.write_bytes(raw)
    folder = tmp_path / "a-folder"
    folder.mkdir()
    missing = tmp_path / "missing.toml"
    return {
        "config not UTF-8": (
            {"SHOPTALK_CONFIG": str(latin1)},
            [f"{latin1}: not UTF-8 text (byte 0xe9 at offset {raw.index(0xE9)}); save it as UTF-8"],
        ),
        "config missing": (
            {"SHOPTALK_CONFIG": str(missing)},
            [f"{missing}: does not exist (named by SHOPTALK_CONFIG)"],
        ),
        "config a folder": (
            {"SHOPTALK_CONFIG": str(folder)},
            [f"{folder}: is a folder, not a settings file; point SHOPTALK_CONFIG at a file"],
        ),
        "variable without __": (
            {"SHOPTALK_MINE": "drop"},
            ["environment: SHOPTALK_MINE: not a setting", "SHOPTALK_MINE__<KEY>"],
        ),
        "variable with one _": (
            {"SHOPTALK_TRAIN_LORA_RANK": "8"},
            ["environment: SHOPTALK_TRAIN_LORA_RANK: not a setting", "SHOPTALK_TRAIN__LORA_RANK"],
        ),
    }


BROKEN = ("config not UTF-8", "config missing", "config a folder", "variable without __")


@pytest.mark.parametrize("case", [*BROKEN, "variable with one _"])
def test_broken_settings_sources_are_reported(repo: Path, tmp_path: Path, case: str) -> None:
    env, phrases = _broken_sources(tmp_path)[case]
    data = tmp_path / "data"
    done = shoptalk("--data-dir", str(data), "mine", "--repo", str(repo), env=env)
    assert_refused(done, *phrases)
    assert not data.exists()


def test_repository_settings_file_that_cannot_be_read(repo: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    raw = b"[serve]\nmax_tokens = 8 # \xff\n"
    (repo / "shoptalk.toml").write_bytes(raw)
    done = shoptalk("--data-dir", str(data), "mine", "--repo", str(repo))
    offset = raw.index(0xFF)
    assert_refused(done, f"{repo / 'shoptalk.toml'}: not UTF-8 text (byte 0xff at offset {offset})")
    (repo / "shoptalk.toml").unlink()
    (repo / "shoptalk.toml").mkdir()
    done = shoptalk("--data-dir", str(data), "mine", "--repo", str(repo))
    assert_refused(done, "shoptalk.toml: is a folder, not a settings file")
    assert not data.exists()


def test_every_broken_source_at_once_and_other_tools_variables_left_alone(
    repo: Path, tmp_path: Path
) -> None:
    (repo / "shoptalk.toml").write_bytes(b"\xff")
    env = {
        "SHOPTALK_CONFIG": str(tmp_path / "missing.toml"),
        "SHOPTALK_MINE": "drop",
        "SHOPTALK_PYTHON": sys.executable,  # the editor plugins' variable, not a setting
    }
    done = shoptalk("mine", "--repo", str(repo), env=env)
    assert_refused(done, "missing.toml: does not exist", "shoptalk.toml: not UTF-8", "MINE")
    assert done.stderr.count("\n  - ") == 3 and "SHOPTALK_PYTHON" not in done.stderr


def test_settings_errors_keep_their_section_names(repo: Path, tmp_path: Path) -> None:
    """Console markup ate `[train]` and `[serve]`: two identical lines
    `shoptalk.toml:  max_tokens: unknown key` for two different sections."""
    (repo / "shoptalk.toml").write_text("[train]\nmax_tokens = 1\n[serve]\nmax_tokenz = 2\n")
    done = shoptalk("mine", "--repo", str(repo))
    assert_refused(done, "[train] max_tokens: unknown key", "[serve] max_tokenz: unknown key")


def test_user_text_in_a_message_is_printed_as_it_is(tmp_path: Path) -> None:
    odd = tmp_path / "[bold]team [red]"
    odd.mkdir()
    done = shoptalk("mine", "--repo", str(odd))
    assert done.returncode == 2, done.stderr
    assert str(odd) in " ".join(done.stderr.split()), done.stderr


@pytest.mark.parametrize("how", ["flag", "variable"])
def test_a_data_dir_that_cannot_be_a_folder(repo: Path, tmp_path: Path, how: str) -> None:
    a_file = tmp_path / "data.txt"
    a_file.write_text("the user's file\n")
    cases = {
        a_file: f"{a_file} is not a folder; point it at a folder",
        a_file / "sub": f"{a_file / 'sub'} is not a folder ({a_file} is a file)",
        Path("/proc/shoptalk-data"): "cannot create or write /proc/shoptalk-data",
    }
    for data_dir, phrase in cases.items():
        if how == "flag":
            done = shoptalk("--data-dir", str(data_dir), "mine", "--repo", str(repo))
            source = "command line: --data-dir:"
        else:
            done = shoptalk("mine", "--repo", str(repo), env={"SHOPTALK_DATA_DIR": str(data_dir)})
            source = "environment: SHOPTALK_DATA_DIR:"
        assert_refused(done, source, phrase)
    assert a_file.read_text() == "the user's file\n"


def test_doctor_reports_a_data_dir_it_cannot_use(tmp_path: Path) -> None:
    a_file = tmp_path / "data.txt"
    a_file.write_text("x\n")
    done = shoptalk("--data-dir", str(a_file), "doctor")
    assert done.returncode == 1, done.stderr  # a failed check
    assert "data dir writable" in done.stdout and "is not a folder" in done.stdout
    assert "failed: data dir writable" in done.stderr
