"""The VS Code extension (editor-clients/vscode): its unit tests (settings,
launcher, status and module logic under node's test runner, launcher checks
against real interpreters), the .vsix build, and the extension in a real VS
Code — code-server from the npm registry on loopback, driven in headless
Chromium by playwright-core — against the real `shoptalk serve --stdio`
serving a tiny GGUF promoted for a real git repository.

Node packages come from `npm ci` (the committed lockfile); code-server from
`e2e/install-code-server.sh` (see there why `npm install -g` does not work
offline); Chromium from Debian. `make test` installs all three.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from shoptalk.models.manifest import write_manifest
from shoptalk.models.store import RepoStore

REPO_ROOT = Path(__file__).resolve().parents[1]
VSCODE_DIR = REPO_ROOT / "editor-clients" / "vscode"
CODE_SERVER_DIR = REPO_ROOT / "build" / "code-server"
CHROMIUM = Path(os.environ.get("SHOPTALK_CHROMIUM", "/usr/bin/chromium"))

APP_PY = """import os


def read_config(path):
    with open(path) as handle:
        return handle.read()


def main():
"""

BILLING_PY = '''"""Invoices: create, total and send invoices to customers."""


def create_invoice(customer, items):
    """Create an invoice for a customer from line items."""
    return {"customer": customer, "items": items}
'''

MAILER_PY = '''"""Outgoing e-mail: render templates and deliver messages over SMTP."""


def send_mail(to, subject, body):
    return (to, subject, body)
'''


def npm(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    npm_path = shutil.which("npm")
    if npm_path is None:
        raise RuntimeError("npm is not installed; install Node.js 20 (see README, VS Code)")
    return subprocess.run(
        [npm_path, *args],
        cwd=VSCODE_DIR,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "SHOPTALK_TEST_PYTHON": sys.executable},
    )


@pytest.fixture(scope="module")
def built_extension() -> Path:
    """node_modules from the lockfile (once), then the compiled extension."""
    if not (VSCODE_DIR / "node_modules" / ".package-lock.json").is_file():
        installed = npm("ci", "--no-audit", "--no-fund")
        assert installed.returncode == 0, installed.stderr[-2000:]
    compiled = npm("run", "compile")
    assert compiled.returncode == 0, compiled.stdout[-2000:] + compiled.stderr[-2000:]
    return VSCODE_DIR / "out" / "extension.js"


def test_unit_tests_of_settings_launcher_status_and_modules(built_extension: Path) -> None:
    result = npm("test", timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "# fail 0" in result.stdout
    passed = int(result.stdout.split("# pass ")[1].split()[0])
    assert passed >= 15, result.stdout[-2000:]


def test_vsix_holds_the_compiled_extension_and_its_runtime_dependency(
    built_extension: Path,
) -> None:
    vsix = VSCODE_DIR / "shoptalk.vsix"
    vsix.unlink(missing_ok=True)
    result = npm("run", "package", timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    names = set(zipfile.ZipFile(vsix).namelist())
    assert "extension/out/extension.js" in names
    assert "extension/package.json" in names
    assert "extension/node_modules/vscode-languageclient/package.json" in names
    assert not any(name.startswith("extension/src/") for name in names)
    manifest = json.loads(zipfile.ZipFile(vsix).read("extension/package.json"))
    properties = manifest["contributes"]["configuration"]["properties"]
    assert {"shoptalk.pythonPath", "shoptalk.maxLatencyMs", "shoptalk.multiline"} <= set(properties)
    assert {"shoptalk.enable", "shoptalk.disabledLanguages"} <= set(properties)
    commands = {c["command"] for c in manifest["contributes"]["commands"]}
    assert {"shoptalk.toggle", "shoptalk.snooze", "shoptalk.toggleLanguage"} <= commands
    # What Open VSX and the Marketplace read: license, icon, changelog, keywords.
    assert {"extension/LICENSE.txt", "extension/changelog.md", "extension/images/icon.png"} <= names
    for key in ("publisher", "name", "version", "license", "repository", "icon", "keywords"):
        assert manifest.get(key), key
    assert manifest["capabilities"]["untrustedWorkspaces"]["restrictedConfigurations"] == [
        "shoptalk.pythonPath",
        "shoptalk.serverCommand",
    ]


def test_make_vsix_builds_the_extension_in_one_command(built_extension: Path) -> None:
    vsix = VSCODE_DIR / "shoptalk.vsix"
    vsix.unlink(missing_ok=True)
    done = subprocess.run(
        ["make", "vsix"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "extension/out/extension.js" in zipfile.ZipFile(vsix).namelist()


@pytest.fixture
def workspace(tmp_path: Path, tiny_gguf: Callable[..., Path]) -> Path:
    """A real git repository with a tiny GGUF promoted for it."""
    root = tmp_path / "workspace"
    (root / "shop").mkdir(parents=True)
    (root / "app.py").write_text(APP_PY)
    (root / "shop" / "__init__.py").write_text("")
    (root / "shop" / "billing.py").write_text(BILLING_PY)
    (root / "shop" / "mailer.py").write_text(MAILER_PY)
    (root / "secret_keys.py").write_text(APP_PY)  # never sent: *secret*
    env = {**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(tmp_path)}
    for args in (
        ["init", "-q", "-b", "main"],
        ["add", "."],
        ["-c", "user.name=T", "-c", "user.email=t@example.com", "commit", "-qm", "start"],
    ):
        subprocess.run(["git", *args], cwd=root, env=env, check=True)
    export = tmp_path / "export"
    export.mkdir()
    model = export / "model-f32.gguf"
    shutil.copyfile(tiny_gguf("gemma3"), model)
    write_manifest(model, kind="model", base="gemma3-270m", quant="f32", run_id="run-tiny")
    store = RepoStore.for_repo(Path(os.environ["SHOPTALK_DATA_DIR"]), root)
    store.promote({"run_id": "run-tiny", "model": str(model), "adapter": None, "metrics": {}})
    return root


@pytest.mark.e2e
def test_extension_in_code_server_completes_accepts_and_finds_modules(
    built_extension: Path, workspace: Path, tmp_path: Path
) -> None:
    if not CHROMIUM.is_file():
        raise RuntimeError(f"{CHROMIUM} is missing: `make editor-deps` installs Debian's chromium")
    installed = subprocess.run(
        ["sh", str(VSCODE_DIR / "e2e" / "install-code-server.sh"), str(CODE_SERVER_DIR)],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert installed.returncode == 0, installed.stdout[-2000:] + installed.stderr[-3000:]
    vsix = VSCODE_DIR / "shoptalk.vsix"
    if not vsix.is_file() or vsix.stat().st_mtime < built_extension.stat().st_mtime:
        packaged = npm("run", "package", timeout=300)
        assert packaged.returncode == 0, packaged.stderr[-2000:]

    out = tmp_path / "e2e"
    run = subprocess.run(
        [
            shutil.which("node") or "node",
            str(VSCODE_DIR / "e2e" / "run.mjs"),
            "--code-server",
            str(CODE_SERVER_DIR),
            "--vsix",
            str(vsix),
            "--workspace",
            str(workspace),
            "--python",
            sys.executable,
            "--chromium",
            str(CHROMIUM),
            "--out",
            str(out),
        ],
        cwd=VSCODE_DIR,
        capture_output=True,
        text=True,
        timeout=600,
    )
    result_file = out / "result.json"
    result = json.loads(result_file.read_text()) if result_file.is_file() else {"steps": []}
    steps = {step["step"]: step for step in result["steps"]}
    assert run.returncode == 0 and "failed" not in steps, (
        json.dumps(result, indent=1)[-4000:] + run.stderr[-3000:]
    )

    assert steps["status-bar"]["text"].startswith("ShopTalk: team")  # the promoted model
    ghost = "".join(steps["ghost-text"]["parts"])
    assert ghost.strip()
    saved = steps["accepted"]["saved"]
    typed = '        path = os.environ.get("APP_'
    last_typed_line = next(line for line in saved.splitlines() if line.startswith(typed))
    # Tab accepted what was shown: the typed line now goes on with the ghost text.
    first_ghost_line = steps["ghost-text"]["parts"][0].replace("\u00a0", " ")
    assert last_typed_line.startswith(typed + first_ghost_line.rstrip()), (
        last_typed_line,
        first_ghost_line,
    )

    modules = [m.strip() for m in steps["module-pick"]["modules"]]
    assert modules and set(modules) <= {"app", "shop", "shop.billing", "shop.mailer", "secret_keys"}
    assert modules[0].split(".")[-1] + ".py" in steps["module-opened"]["tab"]

    details = steps["status-details"]["details"]
    assert any("model-f32.gguf (team, run run-tiny)" in line for line in details), details
    assert "Device: cpu" in details

    # The switches: the status-bar menu offers them, off means nothing is asked.
    menu = steps["switch-menu"]["rows"]
    assert any("Turn suggestions off" in row for row in menu), menu
    assert any("Snooze suggestions" in row for row in menu), menu
    assert any("Turn suggestions off for python" in row for row in menu), menu
    assert steps["switched-off"]["text"] == "ShopTalk: off"
    off = steps["typed-while-off"]
    assert off["before"] == off["after"] and off["ghosts"] == 0, off
    assert steps["switched-on"]["text"].startswith("ShopTalk: team")
    # A settings change went to the running server (no restart, the model
    # stayed loaded): the 1 ms budget shows in the status bar at once.
    assert "over budget (" in steps["over-budget"]["text"]
    log = _extension_log(out)
    assert log.count("starting: ") == 1, log[-3000:]
    assert "settings changed: sent to the server" in log
    # An excluded file: said so, and never asked about.
    assert steps["excluded-file"]["text"] == "ShopTalk: off for this file"
    excluded = steps["typed-in-excluded"]
    assert excluded["before"] == excluded["after"] and excluded["ghosts"] == 0, excluded


def _extension_log(out: Path) -> str:
    """The extension's output channel as code-server wrote it to its logs."""
    logs = sorted((out / "user-data" / "logs").rglob("*ShopTalk*.log"))
    return "\n".join(path.read_text(errors="replace") for path in logs)
