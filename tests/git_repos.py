"""Real git repositories built with `git` for the tests (registered in
`tests/conftest.py` through `pytest_plugins`).

`RepoBuilder` writes files and commits them with chosen authors and dates;
`history_repo` is a small team history with everything mining must handle:
several authors with aliases (one merged by `.mailmap`, one by a manual alias
file), a bot, a mass-change commit, vendored/generated/lock/binary files,
odd encodings, a NUL byte, a huge one-line file, a symlink out of the repo, a
submodule entry, renames, tests beside code, docs naming modules, and planted
canary secrets. `CANARIES` are substrings of those secrets: none may appear
in any file mining writes.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

DAY = 86_400
START = 1_700_000_000  # 2023-11-14, a fixed origin for author dates

ALICE = ("Alice Smith", "alice@example.com")
ALICE_ALT = ("alice smith", "alice.smith@corp.example")  # merged by gambit
BOB = ("Bob Jones", "bob@example.com")
BOB_ALT = ("bjones", "bob@example.com")  # same email
CAROL = ("Carol King", "carol@example.com")
CAROL_ALT = ("ck", "ck@laptop.local")  # merged by .mailmap
DAVE = ("Dave Miller", "dave@example.com")
DAVE_ALT = ("Mr Pickles", "pickles@home.example")  # merged by the alias file
BOT = ("dependabot[bot]", "49699333+dependabot[bot]@users.noreply.github.com")

AWS_KEY = "AKIAQ7CANARY4Z2L9MBX"
GITHUB_TOKEN = "ghp_Canary0Tok3nZx9Qm2Lk7Vb4Nc8Rt5Yw3Pj6"
PRIVATE_KEY = (
    "-----BEGIN RSA PRIVATE KEY-----\n"
    "MIIEowIBAAKCAQEAcanaryKEYmaterialQ2hhbmdlTWVQbGVhc2VUaGlzSXNGYWtl\n"
    "c2Vjb25kTGluZU9mVGhlQ2FuYXJ5S2V5QmxvY2tUaGF0TXVzdE5ldmVyTGVhaw==\n"
    "-----END RSA PRIVATE KEY-----\n"
)
PASSWORD = "canary-Pa55w0rd-hunter"
YAML_PASSWORD = "canaryYamlSecret42"
ENTROPY_TOKEN = "Zx9Qm2Lk7Vb4Nc8Rt5Yw3Pj6Hs1Df0GaEu"
CANARIES = (
    "Q7CANARY4Z2L9MBX",
    "Canary0Tok3n",
    "canaryKEYmaterial",
    "c2Vjb25kTGluZU9mVGhlQ2FuYXJ5",
    "canary-Pa55w0rd",
    "canaryYamlSecret42",
    "Zx9Qm2Lk7Vb4Nc8Rt5Yw3Pj6",
)


def git(repo: Path, *args: str, env: dict[str, str] | None = None) -> str:
    full_env = {**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(repo.parent)}
    full_env.pop("GIT_DIR", None)
    if env:
        full_env.update(env)
    proc = subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, env=full_env, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed: {proc.stderr}")
    return proc.stdout


def bytes_name(raw: bytes) -> str:
    """A file name from raw bytes (not necessarily UTF-8), usable with `Path`
    and `RepoBuilder.write`: the bytes reach the file system unchanged."""
    return os.fsdecode(raw)


class RepoBuilder:
    """A git repository grown commit by commit with chosen authors and dates."""

    def __init__(self, path: Path, branch: str = "main") -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        git(path, "init", "-q", "-b", branch)
        git(path, "config", "user.name", "Fixture")
        git(path, "config", "user.email", "fixture@example.com")
        git(path, "config", "commit.gpgsign", "false")
        self.day = 0

    def write(self, rel: str, content: str | bytes) -> None:
        target = self.path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.write_text(content, encoding="utf-8")

    def remove(self, rel: str) -> None:
        git(self.path, "rm", "-q", rel)

    def move(self, old: str, new: str) -> None:
        (self.path / new).parent.mkdir(parents=True, exist_ok=True)
        git(self.path, "mv", old, new)

    def commit(
        self,
        message: str,
        author: tuple[str, str] = ALICE,
        day: int | None = None,
        amend: bool = False,
        add_all: bool = True,
    ) -> str:
        self.day = self.day + 1 if day is None else day
        when = f"@{START + self.day * DAY} +0000"
        env = {
            "GIT_AUTHOR_NAME": author[0],
            "GIT_AUTHOR_EMAIL": author[1],
            "GIT_AUTHOR_DATE": when,
            "GIT_COMMITTER_NAME": author[0],
            "GIT_COMMITTER_EMAIL": author[1],
            "GIT_COMMITTER_DATE": when,
        }
        if add_all:
            git(self.path, "add", "-A")
        args = ["commit", "-q", "--allow-empty", "-m", message]
        if amend:
            args.append("--amend")
        git(self.path, *args, env=env)
        return git(self.path, "rev-parse", "HEAD").strip()

    def head(self) -> str:
        return git(self.path, "rev-parse", "HEAD").strip()


ROUNDING = (
    "from decimal import ROUND_HALF_EVEN, Decimal\n\n\n"
    "def round_money(amount: Decimal, places: int = 2) -> Decimal:\n"
    '    """Round an amount of money the way the ledger does."""\n'
    "    quantum = Decimal(1).scaleb(-places)\n"
    "    return amount.quantize(quantum, rounding=ROUND_HALF_EVEN)\n\n\n"
    "def split_evenly(amount: Decimal, parts: int) -> list[Decimal]:\n"
    '    """Split an amount into equal parts that add up exactly."""\n'
    "    share = round_money(amount / parts)\n"
    "    rest = amount - share * (parts - 1)\n"
    "    return [share] * (parts - 1) + [round_money(rest)]\n"
)


def python_module(name: str, functions: int, salt: str = "") -> str:
    """A plausible module: `functions` functions with docstrings and bodies
    whose lines have enough tokens to be masked."""
    parts = [f'"""The {name} module of the fixture service{salt}."""\n\nimport logging\n']
    for i in range(functions):
        parts.append(
            f"\n\ndef {name}_step_{i}(value: int, scale: int = {i + 2}) -> int:\n"
            f'    """Compute step {i} of the {name} pipeline for a value."""\n'
            f"    result = value * scale + {i} - len({name!r})\n"
            f'    logging.getLogger("{name}").debug("step {i} gives %s", result)\n'
            f"    return result if result > {i} else value + scale\n"
        )
    return "".join(parts)


@dataclass
class HistoryRepo:
    path: Path
    alias_file: Path
    shas: dict[str, str]


def build_history_repo(root: Path) -> HistoryRepo:
    repo = RepoBuilder(root / "team")
    shas: dict[str, str] = {}
    repo.write(".mailmap", "Carol King <carol@example.com> ck <ck@laptop.local>\n")
    repo.write("README.md", "# Fixture service\n\nA small service for the mining tests.\n")
    repo.write("src/billing/__init__.py", '"""Billing."""\n')
    repo.write("src/billing/invoices.py", python_module("invoices", 3))
    shas["initial"] = repo.commit("Add the billing package with invoices", ALICE)
    repo.write("src/billing/payments.py", python_module("payments", 2))
    repo.write(
        "tests/test_payments.py",
        "from billing.payments import payments_step_0\n\n\n"
        "def test_payments_step_zero_scales_the_value() -> None:\n"
        "    assert payments_step_0(3, scale=2) == 6 - len('payments') or True\n",
    )
    shas["payments"] = repo.commit("Add payments with a first test (#12)", BOB)
    # Secrets planted in code, config and a commit message.
    repo.write(
        "src/billing/settings.py",
        '"""Settings of the billing service."""\n\n'
        f'AWS_ACCESS_KEY_ID = "{AWS_KEY}"\n'
        f'GITHUB_TOKEN = "{GITHUB_TOKEN}"\n'
        f'DB_PASSWORD = "{PASSWORD}"\n'
        f'SESSION_SALT = "{ENTROPY_TOKEN}"\n'
        f'SIGNING_KEY = """{PRIVATE_KEY}"""\n'
        "TIMEOUT_SECONDS = 30 * 60 + 15\n",
    )
    repo.write("deploy/config.yaml", f"database:\n  user: billing\n  password: {YAML_PASSWORD}\n")
    shas["secrets"] = repo.commit(f"Configure billing (temporary token {GITHUB_TOKEN})", CAROL_ALT)
    # Files that must be skipped and counted.
    repo.write("vendor/left_pad.py", python_module("left_pad", 2))
    repo.write(
        "node_modules/pad/index.js", "module.exports = function pad(a, b) { return a + b; };\n"
    )
    repo.write("poetry.lock", "[[package]]\nname = 'left-pad'\nversion = '1.0'\n")
    repo.write("src/billing/api_pb2.py", "# Generated by the protocol buffer compiler.\nX = 1\n")
    repo.write("assets/logo.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    repo.write("src/billing/latin.py", "# caf\xe9 = 'un caf\xe9 cr\xe8me'\n".encode("latin-1"))
    repo.write("src/billing/nul.py", b"x = 'a b c d e'\x00\nvalue = compute(a, b, c)\n")
    repo.write("static/huge.js", "var x = [" + "1," * 600_000 + "0];\n")
    os.symlink("/etc/passwd", repo.path / "src/billing/outside.py")
    shas["junk"] = repo.commit("Vendor left-pad and add assets", DAVE)
    # A submodule entry (a gitlink), as `git submodule add` would record.
    git(
        repo.path,
        "update-index",
        "--add",
        "--cacheinfo",
        f"160000,{shas['initial']},libs/shared",
    )
    shas["submodule"] = repo.commit(
        "Track the shared library as a submodule", DAVE_ALT, add_all=False
    )
    # A bot and a mass change.
    repo.write("requirements.txt", "requests==2.32.0\n")
    shas["bot"] = repo.commit("Bump requests from 2.31.0 to 2.32.0", BOT)
    for i in range(30):
        repo.write(f"src/generated_docs/page_{i}.py", python_module(f"page{i}", 1))
    shas["mass"] = repo.commit("Reformat everything", BOB_ALT)
    # Renames: a pure one, and one with changes.
    repo.move("src/billing/payments.py", "src/billing/payment_flow.py")
    shas["rename"] = repo.commit("Rename payments to payment_flow", ALICE_ALT)
    repo.move("src/billing/invoices.py", "src/billing/invoicing.py")
    text = (repo.path / "src/billing/invoicing.py").read_text()
    repo.write(
        "src/billing/invoicing.py",
        text
        + '\n\ndef invoice_total(lines: list[int]) -> int:\n    """Sum the lines of an invoice."""\n'
        "    return sum(line for line in lines if line > 0)\n",
    )
    shas["rename_edit"] = repo.commit("Rename invoices and add invoice totals", ALICE)
    repo.write(
        "docs/adr/0001-payments.md",
        "# ADR 1: payments\n\nPayment steps live in billing.payment_flow and totals in "
        "`src/billing/invoicing.py`; keep them apart.\n",
    )
    shas["adr"] = repo.commit("Record the payments decision", CAROL)
    repo.write("src/billing/rounding.py", ROUNDING)
    shas["rounding"] = repo.commit("Add rounding helpers", BOB)
    # Regular work of several people, spread over time (for the splits).
    for step in range(6):
        for author, module in ((ALICE, "ledger"), (BOB, "refunds"), (CAROL, "reports")):
            path = f"src/{module}/{module}.py"
            repo.write(path, python_module(module, step + 1, salt=f" v{step}"))
            shas[f"{module}{step}"] = repo.commit(
                f"Extend {module} with step {step}\n\nCo-authored-by: Dave <dave@example.com>",
                author,
            )
    repo.write("src/billing/audit.py", python_module("audit", 2))
    shas["dave"] = repo.commit("Add audit trail", DAVE)
    repo.write("src/billing/audit.py", python_module("audit", 3))
    shas["pickles"] = repo.commit("Extend the audit trail", DAVE_ALT)
    # The same code again, late: its train twin must be deduplicated away.
    repo.write("src/reports/rounding.py", ROUNDING)
    shas["rounding_copy"] = repo.commit("Copy rounding helpers into reports", CAROL)
    alias_file = root / "aliases.mailmap"
    alias_file.write_text("Dave Miller <dave@example.com> Mr Pickles <pickles@home.example>\n")
    return HistoryRepo(repo.path, alias_file, shas)


@pytest.fixture(scope="session")
def history_repo(tmp_path_factory: pytest.TempPathFactory) -> HistoryRepo:
    """The team history above; read-only for tests (copy it to change it)."""
    return build_history_repo(tmp_path_factory.mktemp("history"))


@pytest.fixture
def repo_builder(tmp_path: Path) -> Iterator[RepoBuilder]:
    yield RepoBuilder(tmp_path / "repo")
