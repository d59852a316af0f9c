"""The `shoptalk` command line. Each stage lives in its own module and adds
its subcommand here; heavy libraries are imported only when a command runs,
so `shoptalk --help` is instant and the serve-only install works."""

from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from shoptalk.models.catalog import CATALOG, DEFAULT_BASE, resolve_base
from shoptalk.models.errors import ShopTalkError
from shoptalk.models.settings import Settings, load_settings

app = typer.Typer(
    name="shoptalk",
    help="A local code companion that learns your team's code from its git history.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: docstring paragraphs are re-wrapped, not broken
)
models_app = typer.Typer(help="The base-model catalog and local copies.", no_args_is_help=True)
app.add_typer(models_app, name="models")

# Modules that add subcommands (each has `register(app: typer.Typer)`).
COMMAND_MODULES: list[str] = [
    "shoptalk.trainer.mine",
    "shoptalk.trainer.train",
    "shoptalk.trainer.export",
    "shoptalk.trainer.evaluate",
    "shoptalk.server.serve",
    "shoptalk.server.continuous",
    "shoptalk.trainer.retrain",
    "shoptalk.trainer.personal",
    "shoptalk.trainer.demo",
]

err = Console(stderr=True, soft_wrap=True)
out = Console()


class _State:
    data_dir: Path | None = None
    verbose: bool = False


state = _State()


def settings_for(repo: Path | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Settings for a command, with --data-dir from the root options applied."""
    merged = dict(overrides or {})
    if state.data_dir is not None:
        merged["data_dir"] = str(state.data_dir)
    return load_settings(repo=repo, overrides=merged)


@app.callback()
def root(
    data_dir: Annotated[
        Path | None,
        typer.Option(help="Where models, datasets and runs are kept.", envvar="SHOPTALK_DATA_DIR"),
    ] = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Debug logging to stderr.")
    ] = False,
) -> None:
    state.data_dir = data_dir
    state.verbose = verbose
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@models_app.command("list")
def models_list() -> None:
    """Show the catalog of base models and which are present locally."""
    from shoptalk.models.provision import base_paths, gguf_status, hf_status

    data_dir = settings_for().resolved_data_dir()
    table = Table(title="Base models")
    for column in ("key", "arch", "context", "FIM", "source", "license", "local"):
        table.add_column(column)
    for base in CATALOG.values():
        if base.package:
            local = f"gguf {gguf_status(data_dir, base)}, hf {hf_status(data_dir, base)}"
        else:
            local = "gguf present" if base_paths(data_dir, base).gguf.is_file() else "-"
        fim = "trained" if base.fim.trained else "reserved tokens"
        key = f"{base.key} (default)" if base.key == DEFAULT_BASE else base.key
        table.add_row(
            key, base.architecture, str(base.context_length), fim, base.source, base.license, local
        )
    out.print(table)


@models_app.command("pull")
def models_pull(
    name: Annotated[str, typer.Argument(help="Catalog key.")] = DEFAULT_BASE,
    gguf_only: Annotated[
        bool, typer.Option(help="Skip the HF checkpoint used for training.")
    ] = False,
) -> None:
    """Provision a base model: its GGUF (sha256-verified) and, for training,
    a cached HF checkpoint converted once from it."""
    from shoptalk.models.provision import ensure_gguf
    from shoptalk.trainer.hf_checkpoint import ensure_hf_checkpoint

    base = resolve_base(name)
    data_dir = settings_for().resolved_data_dir()
    ensure_gguf(data_dir, base, err.print)
    if not gguf_only:
        ensure_hf_checkpoint(data_dir, base, err.print)


@models_app.command("path")
def models_path(
    name: Annotated[str, typer.Argument(help="Catalog key.")] = DEFAULT_BASE,
    hf: Annotated[
        bool, typer.Option("--hf", help="Print the HF checkpoint folder instead.")
    ] = False,
) -> None:
    """Print where a base model's GGUF (or HF checkpoint) is kept."""
    from shoptalk.models.provision import base_paths

    paths = base_paths(settings_for().resolved_data_dir(), resolve_base(name))
    print(paths.hf if hf else paths.gguf)


@models_app.command("rollback")
def models_rollback(
    repo: Annotated[
        Path, typer.Option(help="Repository whose promoted model to roll back.")
    ] = Path("."),
) -> None:
    """Restore the previously promoted model of a repository (instant; a
    running server picks it up like any promotion)."""
    from shoptalk.models.store import RepoStore, rollback_or_repair

    store = RepoStore.for_repo(settings_for(repo).resolved_data_dir(), repo)
    try:
        message = rollback_or_repair(store)
    except LookupError:
        raise _RollbackError(
            f"{repo.resolve()} has no earlier promoted model to roll back to "
            "(see `shoptalk status --repo ...`)"
        ) from None
    err.print(escape(message))


class _RollbackError(ShopTalkError):
    pass


@app.command()
def doctor() -> None:
    """Report Python, torch device, bf16, llama.cpp build, the default model and disk."""
    from shoptalk.models.doctor import run_checks
    from shoptalk.trainer.doctor import torch_checks

    checks = run_checks(settings_for().resolved_data_dir(), torch_checks())
    table = Table(title="shoptalk doctor")
    table.add_column("check")
    table.add_column("result")
    for check in checks:
        value = escape(check.value)  # values hold brackets, e.g. shoptalk[train]
        table.add_row(check.name, value if check.ok else f"[red]{value}[/red]")
    out.print(table)
    if not all(c.ok for c in checks):
        err.print("[yellow]Some checks need attention (in red above).[/yellow]")


def _register_commands() -> None:
    for module_name in COMMAND_MODULES:
        module = importlib.import_module(module_name)
        module.register(app)


def main(argv: list[str] | None = None) -> None:
    _register_commands()
    try:
        app(args=argv, standalone_mode=True)
    except ShopTalkError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise SystemExit(exc.exit_code) from None
    except KeyboardInterrupt:
        err.print("interrupted")
        raise SystemExit(130) from None
    except ModuleNotFoundError as exc:
        err.print(
            f"[red]error:[/red] this command needs {exc.name!r}, which is not installed. "
            "Install the extra it belongs to: pip install 'shoptalk[train]' (mine, train, export, eval) "
            "or 'shoptalk[serve]' (serve, watch)."
        )
        raise SystemExit(3) from None


if __name__ == "__main__":
    # `python -m shoptalk.models.cli` runs this file as `__main__`; commands
    # import `shoptalk.models.cli`, a second copy. Run that copy so that they
    # see the root options (--data-dir, --verbose).
    from shoptalk.models import cli as importable

    importable.main()
