"""The `shoptalk` command line's root: its options, and a map from command
names to the plain functions of each half's CLI module (`shoptalk.trainer.cli`,
`shoptalk.server.cli`), loaded by name when the command line starts. Stage
modules never import a CLI module; heavy libraries are imported only when a
command runs, so `shoptalk --help` is instant and the serve-only install
works."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from shoptalk.models.catalog import CATALOG, DEFAULT_BASE, resolve_base
from shoptalk.models.cli_logging import configure_cli_logging
from shoptalk.models.cli_support import (
    RootOptions,
    err,
    load_command_settings,
    out,
    print_error,
    settings_for,
)
from shoptalk.models.errors import ShopTalkError
from shoptalk.models.files import is_disk_full, write_failure

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

TRAINER = "shoptalk.trainer.cli"
SERVER = "shoptalk.server.cli"
# The commands, in the order `shoptalk --help` lists them: name -> "module:function".
COMMANDS: dict[str, str] = {
    "doctor": f"{TRAINER}:doctor",
    "mine": f"{TRAINER}:mine",
    "train": f"{TRAINER}:train",
    "export": f"{TRAINER}:export",
    "eval": f"{TRAINER}:evaluate",
    "serve": f"{SERVER}:serve",
    "watch": f"{SERVER}:watch",
    "status": f"{SERVER}:status",
    "retrain": f"{TRAINER}:retrain",
    "demo": f"{TRAINER}:demo",
    "runs": f"{TRAINER}:runs",
}
# `shoptalk models ...` (here unless a half's stack is needed).
MODELS_COMMANDS: dict[str, str] = {
    "list": f"{__name__}:models_list",
    "pull": f"{TRAINER}:models_pull",
    "publish": f"{TRAINER}:models_publish",
    "path": f"{__name__}:models_path",
    "rollback": f"{__name__}:models_rollback",
}
# Command groups: name -> "module:typer app".
GROUPS: dict[str, str] = {"personal": f"{TRAINER}:personal_app"}
COMMAND_MODULES: list[str] = [TRAINER, SERVER]


class _State:
    verbose: bool = False  # for main's error handling: --verbose keeps tracebacks


state = _State()


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
    options = RootOptions(data_dir=None if from_env else data_dir, verbose=verbose)
    ctx.obj = options
    state.verbose = verbose
    # Libraries' own logs (llama.cpp, transformers) go to the log file; -v shows them.
    configure_cli_logging(
        verbose,
        lambda: load_command_settings(options, check_data_dir=False).resolved_data_dir(),
    )


def models_list(ctx: typer.Context) -> None:
    """Show the catalog of base models and which are present locally."""
    from shoptalk.models.provision import base_paths, gguf_status, hf_status
    from shoptalk.models.tables import whole_cells

    data_dir = settings_for(ctx).resolved_data_dir()
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


def models_path(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Catalog key.")] = DEFAULT_BASE,
    hf: Annotated[
        bool, typer.Option("--hf", help="Print the HF checkpoint folder instead.")
    ] = False,
) -> None:
    """Print where a base model's GGUF (or HF checkpoint) is kept."""
    from shoptalk.models.provision import base_paths

    paths = base_paths(settings_for(ctx).resolved_data_dir(), resolve_base(name))
    print(paths.hf if hf else paths.gguf)


def models_rollback(
    ctx: typer.Context,
    repo: Annotated[
        Path, typer.Option(help="Repository whose promoted model to roll back.")
    ] = Path("."),
) -> None:
    """Restore the previously promoted model of a repository (instant; a
    running server picks it up like any promotion)."""
    from shoptalk.models.store import RepoStore, rollback_or_repair

    store = RepoStore.for_repo(settings_for(ctx, repo).resolved_data_dir(), repo)
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


def _load(target: str) -> Any:
    """The object a "module:name" target names."""
    module_name, _, name = target.partition(":")
    return getattr(importlib.import_module(module_name), name)


def _from_interrupt(exc: BaseException) -> bool:
    """Whether a KeyboardInterrupt caused `exc`: typer turns Ctrl-C in a
    command into a silent exit 130."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, KeyboardInterrupt):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _register_commands() -> None:
    if app.registered_commands:
        return  # main() ran before in this process
    for name, target in COMMANDS.items():
        app.command(name)(_load(target))
    for name, target in MODELS_COMMANDS.items():
        models_app.command(name)(_load(target))
    for name, target in GROUPS.items():
        app.add_typer(_load(target), name=name)


def main(argv: list[str] | None = None) -> None:
    _register_commands()
    try:
        app(args=argv, standalone_mode=True)
    except SystemExit as exc:
        if exc.code == 130 and _from_interrupt(exc):
            err.print("interrupted (Ctrl-C)")
        raise
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
