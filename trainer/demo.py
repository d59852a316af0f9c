"""`shoptalk demo`: the whole chain on the embedded default model, on a
repository's own history (by default ShopTalk's): provision → mine → train →
export → evaluate base vs tuned → a completion through the real language
server → a summary. Budgeted so that it ends within ~20 minutes on a 2-core CPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.table import Table

from shoptalk.models.catalog import CATALOG, DEFAULT_BASE
from shoptalk.models.errors import ShopTalkError
from shoptalk.models.progress import Progress, Report, quiet
from shoptalk.models.settings import Settings
from shoptalk.models.store import RepoStore

DEMO_VAL_LIMIT = 16
DEMO_GENERAL = 10  # general-code instances for the retention figure


class DemoError(ShopTalkError):
    pass


@dataclass
class DemoResult:
    timings: dict[str, float] = field(default_factory=dict)
    facts: dict[str, str] = field(default_factory=dict)
    report: Path | None = None
    # The completion the server gave: what was typed, and what it suggested.
    completion: tuple[str, str] = ("", "")


def sample_point(repo: Path) -> tuple[Path, int, int]:
    """A cursor in a real file of the repository: the middle of the last
    non-trivial line of the largest Python file in the newest commit."""
    changed = subprocess.run(
        ["git", "-C", str(repo), "show", "--name-only", "--format=", "HEAD"],
        capture_output=True,
        text=True,
    ).stdout.split()
    candidates = [repo / p for p in changed if p.endswith(".py") and (repo / p).is_file()]
    if not candidates:
        candidates = sorted(repo.rglob("*.py"))[:50]
    if not candidates:
        raise DemoError(f"{repo} has no Python file to complete in")
    path = max(candidates, key=lambda p: p.stat().st_size)
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for number in range(len(lines) - 1, -1, -1):
        text = lines[number]
        if len(text.strip()) > 20 and not text.strip().startswith("#"):
            cut = len(text) - len(text.lstrip()) + len(text.strip()) // 2
            return path, number, cut
    return path, 0, 0


def complete_through_server(repo: Path, data_dir: Path) -> tuple[str, str, float]:
    """(line before the cursor, suggestion, seconds) from the real `shoptalk
    serve --stdio`, asked as an editor asks (`shoptalk.server.probe`, pygls'
    LanguageClient, run as a process: the training half never imports the
    LSP stack)."""
    path, line, character = sample_point(repo)
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines()
    # The document as the user has it: the rest of the line not yet typed.
    typed = lines[line][:character]
    document = "\n".join([*lines[:line], typed, *lines[line + 1 :]]) + "\n"
    with tempfile.TemporaryDirectory(prefix="shoptalk-demo-") as scratch:
        text_file = Path(scratch) / "document.txt"
        text_file.write_text(document, encoding="utf-8")
        command = [sys.executable, "-m", "shoptalk.server.probe", "--repo", str(repo)]
        command += ["--file", str(path), "--line", str(line), "--character", str(character)]
        command += ["--data-dir", str(data_dir), "--text-file", str(text_file)]
        done = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-3:]
        raise DemoError(
            "asking the language server for a completion failed ("
            + " / ".join(tail)
            + "); run `shoptalk serve --stdio -v` to see why"
        )
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    return typed, str(answer["suggestion"]), float(answer["seconds"])


STAGES = 6


def run_demo(
    repo: Path,
    settings: Settings,
    data_dir: Path,
    train_minutes: float,
    eval_limit: int,
    report: Report = quiet,
) -> DemoResult:
    """The whole chain; `report` gets each stage's heading (a `Progress`
    with `heading`, 1 of 6 to 6 of 6) and what the stages report."""
    from shoptalk.models.provision import ensure_gguf
    from shoptalk.trainer.evaluate import evaluate_models
    from shoptalk.trainer.export import export_run
    from shoptalk.trainer.hf_checkpoint import ensure_hf_checkpoint
    from shoptalk.trainer.mine import mine_repository
    from shoptalk.trainer.promotion import completion_em, gate, promote_run, report_difference
    from shoptalk.trainer.train import train_adapter

    result = DemoResult()
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        result.timings[stage] = now - clock
        clock = now

    def heading(number: int, text: str) -> None:
        report(Progress(number, STAGES, text, heading=True))

    base = CATALOG[DEFAULT_BASE]
    heading(1, "provision the default model")
    ensure_gguf(data_dir, base, report)
    ensure_hf_checkpoint(data_dir, base, report)
    lap("provision")

    heading(2, f"mine {repo}")
    mined = mine_repository(repo, settings.mine, data_dir)
    counts = mined.manifest.get("counts", {})
    result.facts["instances"] = json.dumps(counts)
    lap("mine")

    heading(3, f"train a LoRA adapter ({train_minutes:g} minutes)")
    budget = settings.model_copy(deep=True)
    budget.train.max_minutes = train_minutes
    # Step 5 measures on the test window: the demo's run must not train on it.
    budget.train.final_pass = False
    budget.train.measure_instances = 0
    # A small validation set: each pass over it costs minutes on a 2-core CPU.
    trained = train_adapter(repo, budget, data_dir, val_limit=DEMO_VAL_LIMIT, report=report)
    if trained.adapter_dir is None:
        raise DemoError(f"training did not finish: {trained.stop_reason}")
    result.facts["training"] = (
        f"{trained.steps} steps, {trained.tokens} tokens, val loss "
        f"{trained.base_val_loss} → {trained.best_val_loss}"
    )
    lap("train")

    heading(4, f"export ({settings.export.quant})")
    exported = export_run(trained.run_dir, settings.export.quant, report=report)
    model_file = next(p for p in exported.files if p.suffix == ".gguf")
    lap("export")

    heading(5, "evaluate base vs tuned on the newest commits")
    spec = f"run:{trained.run_id}"
    evaluation = evaluate_models(
        repo,
        ["base", spec],
        settings,
        data_dir,
        eval_limit,
        general_instances=DEMO_GENERAL,
        report=report,
    )
    result.report = evaluation.html_path
    tuned_em = completion_em(evaluation.data, spec)
    base_em = completion_em(evaluation.data, "base")
    # Over the base only a measured gain promotes (40 lines rarely show one:
    # the demo says so rather than calling noise a promotion).
    difference = report_difference(evaluation.directory, spec, "base")
    promoted, reason = gate(difference, settings.watch.tolerance * 100, require_gain=True)
    if promoted:
        store = RepoStore.for_repo(data_dir, repo)
        promote_run(store, trained.run_id, model_file, trained.adapter_dir, tuned_em, base_em)
    result.facts["promotion"] = ("promoted: " if promoted else "kept the base: ") + reason
    lap("evaluate")

    heading(6, "a completion through the language server")
    typed, suggestion, seconds = complete_through_server(repo, data_dir)
    result.facts["server"] = f"{seconds * 1000:.0f} ms"
    result.completion = (typed, suggestion)
    lap("serve")
    return result


def summary(result: DemoResult) -> Table:
    table = Table(title="shoptalk demo")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    for stage, seconds in result.timings.items():
        table.add_row(stage, f"{seconds:.0f}")
    table.add_row("total", f"{sum(result.timings.values()):.0f}")
    return table
