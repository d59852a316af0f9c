"""The module map: ids per language, symbols with line ranges, docs, imports."""

from __future__ import annotations

from pathlib import Path

from shoptalk.models.module_map import (
    build_module_map,
    module_map_from_tree,
    python_module_id,
    source_paths,
)

PY_INIT = '''"""Billing: invoices and payments."""

from .invoices import Invoice
'''

PY_INVOICES = '''"""Invoice records and their totals."""

import decimal
from . import taxes
from ..core.money import Money


class Invoice:
    """An invoice sent to a customer."""

    def total(self) -> int:
        """Sum of the lines."""
        return 0

    @property
    def paid(self) -> bool:
        return False


def render_invoice(invoice):
    def inner():
        return 1
    return inner()
'''

JAVA = """/*
 * Copyright 2024 Example Corp. Licensed under the Apache License.
 */
package com.example.billing;

import java.util.List;
import static java.util.Objects.requireNonNull;

/** Ledger of all payments. */
public class Ledger {
    /** Adds a payment. */
    public void add(int amount) {}

    public Ledger() {}
}

interface Payable {
    int amount();
}
"""

GO = """// Package server answers HTTP requests.
package server

import (
\t"fmt"
\tlog "github.com/example/log"
)

// Handler serves one route.
type Handler struct{}

type Route interface{ Path() string }

// ServeHTTP handles a request.
func (h *Handler) ServeHTTP() {}

func Start() { fmt.Println("x"); log.Print() }
"""

TS = """// Widgets shown on the dashboard.
import { render } from "./render";
export { helper } from "../lib/helper";

export class Widget {
  draw(): void {}
}

export interface Props { id: number }

export type Size = "s" | "m";

export const makeWidget = (props: Props) => new Widget();

function hidden() {}
"""

JS = """/* Entry point of the web client. */
import React from "react";

export default function App() { return null; }
"""


def fixture_contents() -> dict[str, str]:
    return {
        "src/billing/__init__.py": PY_INIT,
        "src/billing/invoices.py": PY_INVOICES,
        "src/billing/taxes.py": "RATE = 0.2\n",
        "scripts/release.py": "'''Cut a release.'''\nimport sys\n",
        "setup.py": "from setuptools import setup\n",
        "java/src/main/java/com/example/billing/Ledger.java": JAVA,
        "go/server/handler.go": GO,
        "web/src/widget.ts": TS,
        "web/src/index.js": JS,
        "README.md": "# not code\n",
    }


def test_python_ids_follow_packages_and_src_layout() -> None:
    paths = set(fixture_contents())
    assert python_module_id("src/billing/__init__.py", paths) == "billing"
    assert python_module_id("src/billing/invoices.py", paths) == "billing.invoices"
    assert python_module_id("scripts/release.py", paths) == "scripts.release"
    assert python_module_id("setup.py", paths) == "setup"
    # Without __init__.py, src/ is still dropped and the path names the module.
    assert python_module_id("src/tool/cli.py", {"src/tool/cli.py"}) == "tool.cli"
    # A package below a non-package folder is named from the package.
    nested = {"project/python/pkg/__init__.py", "project/python/pkg/a.py"}
    assert python_module_id("project/python/pkg/a.py", nested) == "pkg.a"


def test_module_ids_per_language() -> None:
    mm = build_module_map(fixture_contents())
    assert mm.ids() == sorted(
        [
            "billing",
            "billing.invoices",
            "billing.taxes",
            "scripts.release",
            "setup",
            "com.example.billing",
            "go/server",
            "web/src",
        ]
    )
    web = mm.modules["web/src"]
    assert web.files == ("web/src/index.js", "web/src/widget.ts")
    assert web.path == "web/src/index.js"  # index is the folder's main file
    assert mm.module_of("web/src/widget.ts") is web
    assert mm.module_of("README.md") is None


def test_python_symbols_docs_and_imports() -> None:
    mm = build_module_map(fixture_contents())
    invoices = mm.modules["billing.invoices"]
    assert invoices.doc == "Invoice records and their totals."
    assert invoices.language == "python"
    symbols = {s.name: s for s in invoices.symbols}
    assert set(symbols) == {"Invoice", "Invoice.total", "Invoice.paid", "render_invoice"}
    assert symbols["Invoice"].kind == "class"
    assert symbols["Invoice"].doc == "An invoice sent to a customer."
    assert (symbols["Invoice"].start_line, symbols["Invoice"].end_line) == (8, 17)
    assert symbols["Invoice.total"].kind == "method"
    assert symbols["Invoice.total"].doc == "Sum of the lines."
    assert symbols["render_invoice"].kind == "function"
    assert (symbols["render_invoice"].start_line, symbols["render_invoice"].end_line) == (20, 23)
    # Relative imports resolve against the module's package.
    assert invoices.imports == ("decimal", "billing", "core.money")
    assert mm.modules["billing"].imports == ("billing.invoices",)
    assert mm.modules["billing"].summary() == "Billing: invoices and payments."


def test_java_go_typescript_symbols() -> None:
    mm = build_module_map(fixture_contents())
    java = mm.modules["com.example.billing"]
    # The license header is skipped; the class javadoc is the doc.
    assert java.doc == "Ledger of all payments."
    names = {s.name: s for s in java.symbols}
    assert set(names) == {"Ledger", "Ledger.add", "Ledger.Ledger", "Payable", "Payable.amount"}
    assert names["Ledger"].doc == "Ledger of all payments."
    assert names["Ledger.add"].doc == "Adds a payment."
    assert names["Payable"].kind == "interface"
    assert java.imports == ("java.util.List", "java.util.Objects.requireNonNull")

    go = mm.modules["go/server"]
    assert go.doc == "Package server answers HTTP requests."
    go_names = {s.name: s.kind for s in go.symbols}
    assert go_names == {
        "Handler": "type",
        "Route": "interface",
        "Handler.ServeHTTP": "method",
        "Start": "function",
    }
    assert go.imports == ("fmt", "github.com/example/log")

    web = mm.modules["web/src"]
    web_names = {s.name: s.kind for s in web.symbols}
    assert web_names == {
        "App": "function",
        "Widget": "class",
        "Widget.draw": "method",
        "Props": "interface",
        "Size": "type",
        "makeWidget": "function",
        "hidden": "function",
    }
    assert web.doc == "Entry point of the web client."
    assert web.imports == ("react", "./render", "../lib/helper")


def test_with_file_updates_and_deletes() -> None:
    mm = build_module_map(fixture_contents())
    updated = mm.with_file("src/billing/taxes.py", "def vat():\n    return 1\n")
    assert [s.name for s in updated.modules["billing.taxes"].symbols] == ["vat"]
    assert mm.modules["billing.taxes"].symbols == ()  # the old map is unchanged
    removed = updated.with_file("scripts/release.py", None)
    assert "scripts.release" not in removed.modules
    # Removing __init__.py renames the package's modules to their path.
    flat = removed.with_file("src/billing/__init__.py", None)
    assert "billing.invoices" in flat.modules  # src/ is still dropped
    moved = flat.with_file("lib/pkg/__init__.py", "")
    moved = moved.with_file("lib/pkg/core.py", "x = 1\n")
    assert "pkg.core" in moved.modules


def test_tree_skips_hidden_vendored_large_and_binary(tmp_path: Path) -> None:
    for rel, text in fixture_contents().items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    (tmp_path / "node_modules/lib").mkdir(parents=True)
    (tmp_path / "node_modules/lib/index.js").write_text("function x() {}\n")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git/hook.py").write_text("x = 1\n")
    (tmp_path / "big.py").write_text("x = 1\n" * 1000)
    (tmp_path / "latin.py").write_bytes(b"# caf\xe9\nx = 1\n")
    assert "big.py" not in source_paths(tmp_path, max_file_bytes=1000)
    mm = module_map_from_tree(tmp_path, max_file_bytes=1000)
    assert set(mm.ids()) == set(build_module_map(fixture_contents()).ids())


def test_unparseable_text_still_yields_a_module() -> None:
    mm = build_module_map({"pkg/broken.py": "def f(:\n  ???\nclass"})
    assert mm.ids() == ["pkg.broken"]
    assert build_module_map({}).ids() == []
