"""The `shoptalk` command line. Each stage lives in its own module and adds
its subcommand here; heavy libraries are imported only when a command runs,
so `shoptalk --help` is instant and the serve-only install works."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from shoptalk.models.catalog import CATALOG, DEFAULT_BASE, resolve_base
from shoptalk.models.cli_logging import configure_cli_logging
from shoptalk.models.errors import ShopTalkError
from shoptalk.models.files import is_disk_full, write_failure
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
    "shoptalk.trainer.runs",
]

# No console markup: messages hold user text ("[train]" of a settings file, a
# path, a branch name) that rich would otherwise take for a style and drop.
# Style a part with `rich.text.Text` instead.
err = Console(stderr=True, soft_wrap=True, markup=False)
out = Console(markup=False)


class _State:
    data_dir: Path | None = None
    verbose: bool = False


state = _State()


def settings_for(
    repo: Path | None = None,
    overrides: dict[str, Any] | None = None,
    *,
    check_data_dir: bool = True,
) -> Settings:
    """Settings for a command, with --data-dir from the root options applied;
    the data dir is created, and refused with a message when it cannot be."""
    merged = dict(overrides or {})
    if state.data_dir is not None:
        merged["data_dir"] = str(state.data_dir)
    settings = load_settings(repo=repo, overrides=merged)
    if check_data_dir:
        settings.writable_data_dir()
    return settings


def _print_version(value: bool) -> None:
    if value:
        import importlib.metadata

        print(f"shoptalk {importlib.metadata.version('shoptalk')}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    data_dir: Annotated[
        Path | None,
        typer.Option(help="Where models, datasets and runs are kept.", envvar="SHOPTALK_DATA_DIR"),
    ] = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Debug logging to stderr.")
    ] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    # From SHOPTALK_DATA_DIR, the settings read it themselves (as "environment").
    # (typer carries its own copy of click: compare the source by name.)
    source = ctx.get_parameter_source("data_dir")
    from_env = getattr(source, "name", None) == "ENVIRONMENT"
    state.data_dir = None if from_env else data_dir
    state.verbose = verbose
    # Libraries' own logs (llama.cpp, transformers) go to the log file; -v shows them.
    configure_cli_logging(verbose, lambda: settings_for(check_data_dir=False).resolved_data_dir())


@models_app.command("list")
def models_list() -> None:
    """Show the catalog of base models and which are present locally."""
    from shoptalk.models.provision import base_paths, gguf_status, hf_status
    from shoptalk.models.tables import whole_cells

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
    out.print(whole_cells(table, keys=("key",)))  # a key is typed next: never cut


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
    err.print(message)


class _RollbackError(ShopTalkError):
    pass


@app.command()
def doctor() -> None:
    """Report Python, torch device, bf16, llama.cpp build, the default model and
    disk; exits 1 when a check fails."""
    from shoptalk.models.doctor import Check, print_checks, run_checks
    from shoptalk.models.settings import data_dir_problem
    from shoptalk.trainer.doctor import torch_checks

    data_dir = settings_for(check_data_dir=False).resolved_data_dir()
    checks = run_checks(data_dir, torch_checks())
    problem = data_dir_problem(data_dir)
    if problem is not None:
        checks.append(Check("data dir writable", problem, False))
    if not print_checks(out, checks):
        failed = ", ".join(check.name for check in checks if not check.ok)
        err.print(Text.assemble(("error:", "red"), f" failed: {failed} (✗ above)"))
        raise typer.Exit(1)


def _register_commands() -> None:
    for module_name in COMMAND_MODULES:
        module = importlib.import_module(module_name)
        module.register(app)


def main(argv: list[str] | None = None) -> None:
    _register_commands()
    try:
        app(args=argv, standalone_mode=True)
    except ShopTalkError as exc:
        print_error(str(exc))
        raise SystemExit(exc.exit_code) from None
    except KeyboardInterrupt:
        err.print("interrupted")
        raise SystemExit(130) from None
    except ModuleNotFoundError as exc:
        print_error(
            f"this command needs {exc.name!r}, which is not installed. "
            "Install the extra it belongs to: pip install 'shoptalk[train]' (mine, train, export, eval) "
            "or 'shoptalk[serve]' (serve, watch)."
        )
        raise SystemExit(3) from None
    except Exception as exc:
        message = _write_failure_message(exc)
        if message is None or state.verbose:
            raise
        print_error(message)
        raise SystemExit(1) from None


def print_error(message: str) -> None:
    """`error: <message>` on stderr, the message exactly as given (no markup)."""
    err.print(Text.assemble(("error:", "red"), " ", message))


def print_warning(message: str) -> None:
    """`warning: <message>` on stderr, the message exactly as given (no markup)."""
    err.print(Text.assemble(("warning:", "yellow"), " ", message))


def _write_failure_message(exc: BaseException) -> str | None:
    """The message for a write that a full disk failed where no stage caught
    it (the dataset, a report, the promoted pointer); None for any other
    error, which keeps its traceback."""
    reason = write_failure(exc)
    if reason is None or not is_disk_full(exc):
        return None
    where = getattr(exc, "filename", None)
    target = f" {where}" if where else " a file"
    return (
        f"could not write{target}: {reason}. Nothing was half-written: ShopTalk writes every "
        "file under a temporary name and renames it into place only when it is whole, so "
        "the earlier version (if any) is intact. Free some space and run the command again "
        "(--verbose shows the traceback)."
    )


if __name__ == "__main__":
    # `python -m shoptalk.models.cli` runs this file as `__main__`; commands
    # import `shoptalk.models.cli`, a second copy. Run that copy so that they
    # see the root options (--data-dir, --verbose).
    from shoptalk.models import cli as importable

    importable.main()
