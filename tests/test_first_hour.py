"""A new user's first hour, as a subprocess would see it: the README's path
for your own repository (its command lines, read from the README, run one
after another on a fresh `git clone`), `shoptalk runs`, `latest` as a run id,
`--version` and `doctor`'s exit codes.

The path runs with a tiny random base (given by path through the settings'
environment variables, as a user with a local checkpoint would) and a
two-step budget, so it takes a minute or two, not an hour.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from tiny_models import place_base_gguf

from tests.git_repos import HistoryRepo

pytestmark = [pytest.mark.e2e]

REPO_ROOT = Path(__file__).resolve().parents[1]
SHOPTALK = Path(sys.executable).with_name("shoptalk")
PATH_MARKER = "<!-- first-hour path:"


def readme_path_commands() -> list[str]:
    """The command lines of the README's own-repository path (comments dropped)."""
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split(PATH_MARKER, 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    commands = [line.split("#", 1)[0].strip() for line in block.splitlines()]
    return [command for command in commands if command]


@dataclass
class Done:
    command: str
    returncode: int
    stdout: str
    stderr: str


@dataclass
class FirstHour:
    clone: Path
    env: dict[str, str]
    done: list[Done]

    def run(self, *args: str, cwd: Path | None = None) -> Done:
        result = subprocess.run(
            [str(SHOPTALK), *args],
            cwd=cwd or self.clone,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        return Done(shlex.join(args), result.returncode, result.stdout, result.stderr)


def _environment(home: Path, checkpoint: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOPTALK_")}
    (home / "config.toml").write_text("")
    env.update(
        SHOPTALK_CONFIG=str(home / "config.toml"),
        SHOPTALK_DATA_DIR=str(home / "data"),
        SHOPTALK_TRAIN__BASE=str(checkpoint),
        SHOPTALK_TRAIN__MAX_STEPS="2",
        SHOPTALK_TRAIN__VAL_EVERY="1",
        SHOPTALK_EVAL__MAX_TOKENS="8",
        SHOPTALK_EVAL__BOOTSTRAP="100",
        # The tiny tokenizer spends a token per character or two: shorter
        # prompts keep the default 50 general-code instances of `eval` quick.
        SHOPTALK_SERVE__PREFIX_CHARS="300",
        SHOPTALK_SERVE__SUFFIX_CHARS="100",
        COLUMNS="100",
    )
    return env


@pytest.fixture(scope="module")
def first_hour(
    tmp_path_factory: pytest.TempPathFactory, history_repo: HistoryRepo, tiny_hf, tiny_gguf
) -> FirstHour:
    """The README's path, line by line, on a fresh clone of a team history."""
    home = tmp_path_factory.mktemp("first-hour")
    clone = home / "clone"
    subprocess.run(
        ["git", "clone", "-q", str(history_repo.path), str(clone)],
        check=True,
        env={**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(home)},
    )
    checkpoint = tiny_hf("llama")
    env = _environment(home, checkpoint)
    # What `shoptalk models pull` does for a catalog base; a base given by
    # path has its GGUF put there by its owner.
    place_base_gguf(home / "data", checkpoint, tiny_gguf("llama"))
    hour = FirstHour(clone, env, [])
    for line in readme_path_commands():
        args = shlex.split(line)
        assert args[0] == "shoptalk", line
        hour.done.append(hour.run(*args[1:]))
    return hour


def _step(hour: FirstHour, subcommand: str) -> Done:
    return next(d for d in hour.done if d.command.split()[0] == subcommand)


def test_readme_path_is_mine_train_export_promote_eval_runs() -> None:
    subcommands = [shlex.split(line)[1] for line in readme_path_commands()]
    assert subcommands == ["doctor", "mine", "train", "export", "eval", "runs"]
    export = next(line for line in readme_path_commands() if " export " in f" {line} ")
    assert "latest" in export and "--promote" in export


def test_every_line_of_the_readme_path_succeeds_on_a_fresh_clone(first_hour: FirstHour) -> None:
    for done in first_hour.done:
        assert done.returncode == 0, (done.command, done.stdout[-2000:], done.stderr[-3000:])
    # Two steps on a tiny random model measure no gain over the base: the
    # export is written, and the gate says why it is not served.
    exported = _step(first_hour, "export").stdout
    assert "model-q8_0.gguf" in exported
    decision = next(x for x in exported.splitlines() if "promoted:" in x)
    assert decision.startswith("not promoted: run org-"), decision
    assert "the base stays served" in decision and decision.endswith("--force serves it anyway")
    # The clone is left as it was: nothing is written into the user's repository.
    status = subprocess.run(
        ["git", "status", "--porcelain", "--ignored"],
        cwd=first_hour.clone,
        capture_output=True,
        text=True,
        check=True,
    )
    assert status.stdout == ""


def test_runs_lists_the_run_with_its_figures_and_the_served_one(first_hour: FirstHour) -> None:
    runs = _step(first_hour, "runs").stdout
    run_ids = re.findall(r"\borg-\d{8}-\d{6}\b", runs)
    assert len(set(run_ids)) == 1, runs
    row = next(line for line in runs.splitlines() if run_ids[0] in line)
    assert "complete" in row and " 2 " in row  # two steps, the budget
    assert re.search(r"\d+\.\d{3} →", row), row  # validation loss before → best
    assert "model-q8_0.gguf" in row
    assert not row.rstrip().endswith("yes"), row  # not promoted: the base is served
    # The held-out score comes from the evaluation that just ran (run:latest = this run).
    assert re.search(r"\d+\.\d \(base", runs), runs


def test_force_serves_the_run_the_gate_kept_back(first_hour: FirstHour) -> None:
    forced = first_hour.run("export", "latest", "--promote", "--force")
    assert forced.returncode == 0, forced.stderr[-3000:]
    run_id = re.findall(r"\borg-\d{8}-\d{6}\b", _step(first_hour, "runs").stdout)[0]
    decision = next(x for x in forced.stdout.splitlines() if "promoted:" in x)
    assert decision.startswith(f"promoted: {first_hour.clone} now serves run {run_id} ")
    assert "--force although" in decision
    runs = first_hour.run("runs").stdout
    row = next(line for line in runs.splitlines() if run_id in line)
    assert row.rstrip().endswith("yes"), runs
    evaluated = first_hour.run(
        "eval", "--models", "base,org", "--limit", "2", "--general", "0", "--lookup", "0"
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert evaluated.stdout.strip().splitlines()[-1].startswith("org ")


def test_latest_names_the_newest_complete_run(first_hour: FirstHour) -> None:
    evaluated = first_hour.run(
        "eval", "--models", "run:latest", "--limit", "2", "--general", "0", "--lookup", "0"
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    run_id = re.findall(r"\borg-\d{8}-\d{6}\b", _step(first_hour, "runs").stdout)[0]
    assert f"run:{run_id}" in evaluated.stdout
    again = first_hour.run("export", "latest", "--quant", "f16")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"export of run {run_id}" in again.stdout


def test_latest_without_a_finished_run_says_what_to_do(
    first_hour: FirstHour, tmp_path: Path
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    done = first_hour.run("export", "latest", "--repo", str(empty))
    assert done.returncode == 2
    assert "no complete training run" in done.stderr and "shoptalk train" in done.stderr
    assert "Traceback" not in done.stderr
    listed = first_hour.run("runs", "--repo", str(empty))
    assert listed.returncode == 0 and "no training runs" in listed.stderr


def test_version(first_hour: FirstHour) -> None:
    from importlib.metadata import version

    done = first_hour.run("--version")
    assert done.returncode == 0
    assert done.stdout.strip() == f"shoptalk {version('shoptalk')}"


def _doctor(tmp_path: Path, data_dir: Path) -> subprocess.CompletedProcess[str]:
    (tmp_path / "config.toml").touch()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOPTALK_")}
    env.update(SHOPTALK_CONFIG=str(tmp_path / "config.toml"), SHOPTALK_DATA_DIR=str(data_dir))
    return subprocess.run(
        [str(SHOPTALK), "doctor"], env=env, capture_output=True, text=True, timeout=120
    )


def test_doctor_right_after_install_passes_and_says_not_yet_provisioned(tmp_path: Path) -> None:
    from shoptalk.models.catalog import CATALOG, DEFAULT_BASE
    from shoptalk.models.provision import base_paths

    done = _doctor(tmp_path, tmp_path / "fresh-data")
    assert done.returncode == 0, done.stdout + done.stderr
    line = next(x for x in done.stdout.splitlines() if f"{DEFAULT_BASE} GGUF" in x)
    assert (
        "not yet provisioned (done automatically on first use, or `shoptalk models pull`)" in line
    )
    assert "missing" not in done.stdout and "✗" not in done.stdout
    # The path is printed whole, on a line of its own.
    gguf = base_paths(tmp_path / "fresh-data", CATALOG[DEFAULT_BASE]).gguf
    assert str(gguf) in [x.strip() for x in done.stdout.splitlines()]


def test_doctor_exits_non_zero_when_a_check_fails(tmp_path: Path) -> None:
    from shoptalk.models.catalog import CATALOG, DEFAULT_BASE
    from shoptalk.models.provision import base_paths

    data_dir = tmp_path / "data"
    gguf = base_paths(data_dir, CATALOG[DEFAULT_BASE]).gguf
    gguf.parent.mkdir(parents=True)
    gguf.write_bytes(b"GGUF and then not the model")
    done = _doctor(tmp_path, data_dir)
    assert done.returncode == 1
    assert f"failed: {DEFAULT_BASE} GGUF" in done.stderr
    line = next(x for x in done.stdout.splitlines() if f"{DEFAULT_BASE} GGUF" in x)
    assert "✗" in line and "damaged (sha256 mismatch)" in line and "shoptalk models pull" in line
    assert "Traceback" not in done.stderr


# What libraries print on their own: llama.cpp's loader and quantizer,
# transformers' warnings and progress bars, Python's warnings module.
THIRD_PARTY_MARKERS = (
    "llama_model_loader",
    "llama_model_quantize",
    "converting to q8_0",
    "FutureWarning",
    "warnings.warn(",
    "Loading weights",
    "Writing model shards",
    "it/s]",
)


def test_no_third_party_log_lines_at_default_verbosity(first_hour: FirstHour) -> None:
    for done in first_hour.done:
        for marker in THIRD_PARTY_MARKERS:
            assert marker not in done.stdout + done.stderr, (done.command, marker, done.stderr)
    # They went to the log file instead.
    log = Path(first_hour.env["SHOPTALK_DATA_DIR"]) / "logs" / "shoptalk.log"
    text = log.read_text(encoding="utf-8")
    assert "llama_model_quantize" in text and "llama_cpp" in text


def test_verbose_shows_the_libraries_logs(first_hour: FirstHour) -> None:
    done = first_hour.run("-v", "export", "latest", "--quant", "q8_0")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "llama_model_quantize" in done.stderr


def test_summaries_hold_no_python_reprs(first_hour: FirstHour) -> None:
    mined = _step(first_hour, "mine").stdout
    assert "skipped commits: bot 1, mass change 1" in " ".join(mined.split())
    evaluated = _step(first_hour, "eval")
    printed = (evaluated.stdout + evaluated.stderr).replace("\n", "")
    report = Path(re.search(r"report: *(\S+?report\.html)", printed).group(1))
    page = report.read_text(encoding="utf-8")
    for text in (mined, evaluated.stdout, page):
        assert "{'" not in text and "': " not in text


def test_eval_ends_with_a_one_line_verdict(first_hour: FirstHour) -> None:
    evaluated = _step(first_hour, "eval")
    last = evaluated.stdout.strip().splitlines()[-1]
    assert re.match(r"^run:org-\d{8}-\d{6} (is|and) .*base .*exact match, n=\d+\)", last), last
    assert "significant" in last or "tied" in last
    printed = (evaluated.stdout + evaluated.stderr).replace("\n", "")
    report = Path(re.search(r"(\S+report\.json)", printed).group(1))
    assert json.loads(report.read_text())["verdict"]["text"] == last
