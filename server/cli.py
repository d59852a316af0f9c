"""The serving half's commands: `shoptalk serve`, `watch` and `status`.

Plain typed functions that the root (`shoptalk.models.cli`) maps command
names to; pygls, watchdog and llama.cpp are imported only when a command
runs. The server and the watcher never import this module.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from shoptalk.models.cli_support import load_command_settings, root_options, settings_for
from shoptalk.server.serve import LOOPBACK

log = logging.getLogger("shoptalk.server.serve")


def serve(
    ctx: typer.Context,
    stdio: Annotated[
        bool, typer.Option("--stdio", help="Talk LSP over stdin/stdout (default).")
    ] = False,
    tcp: Annotated[bool, typer.Option("--tcp", help="Listen for one LSP client over TCP.")] = False,
    port: Annotated[int, typer.Option(help="TCP port.", min=1, max=65535)] = 2087,
    host: Annotated[
        str,
        typer.Option(help="TCP address; anything but loopback exposes your code to the network."),
    ] = LOOPBACK,
    repo: Annotated[
        Path | None,
        typer.Option(help="Repository whose promoted model to serve (default: the workspace)."),
    ] = None,
    model: Annotated[
        Path | None,
        typer.Option(
            help="GGUF to serve while the repository has no promoted model (default: the base)."
        ),
    ] = None,
    log_file: Annotated[
        Path | None, typer.Option(help="Write the log here instead of stderr.")
    ] = None,
    poll_seconds: Annotated[
        float, typer.Option(help="How often to look for a newly promoted model (0: never).")
    ] = 2.0,
) -> None:
    """Run the language server: inline completions, module lookup and status."""
    from shoptalk.server.serve import ServeError, check_model, configure_logging, protocol_streams

    if stdio and tcp:
        raise ServeError("choose one of --stdio and --tcp")
    check_model(model)
    settings = settings_for(ctx, repo)
    options = root_options(ctx)
    configure_logging(log_file or settings.serve.log_file, options.verbose)
    from shoptalk.server.lsp import ServerConfig, create_server

    config = ServerConfig(
        settings=settings,
        repo=repo.resolve() if repo else None,
        model=model.resolve() if model else None,
        poll_s=poll_seconds,
        load_settings=functools.partial(load_command_settings, options),
    )
    server = create_server(config)
    if tcp:
        if host not in (LOOPBACK, "localhost", "::1"):
            log.warning(
                "listening on %s:%d: anyone who can reach this address can read your code "
                "through the server; use the default loopback address unless you mean it",
                host,
                port,
            )
        server.start_tcp(host, port)
    else:
        stdin, stdout = protocol_streams()
        server.start_io(stdin, stdout)
    if server.exit_code:
        # `exit` came without `shutdown` (the protocol's exit code 1).
        raise typer.Exit(server.exit_code)


def watch(
    ctx: typer.Context,
    repo: Annotated[Path, typer.Option(help="Repository to follow.")] = Path("."),
    branch: Annotated[
        str | None, typer.Option(help="Branch to follow (default: checked out).")
    ] = None,
) -> None:
    """Watch a repository and retrain after new commits (until Ctrl-C)."""
    from shoptalk.server.continuous import ContinuousLearner

    settings = settings_for(ctx, repo)
    console = Console(stderr=True)
    learner = ContinuousLearner(
        repo,
        settings.resolved_data_dir(),
        branch=branch,
        quiet_seconds=settings.watch.quiet_seconds,
        on_job=lambda job: console.print(
            f"job {job.id}: {job.state} {job.step or ''} {job.message or ''}".rstrip()
        ),
    )
    learner.start()
    console.print(f"watching {learner.repo} (branch {learner.watcher.branch}); Ctrl-C to stop")
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        learner.stop()


def status(
    ctx: typer.Context,
    repo: Annotated[Path | None, typer.Option(help="Only this repository.")] = None,
) -> None:
    """Show the job queue, the promoted model and its lineage."""
    from shoptalk.models.jobs import JobQueue
    from shoptalk.models.store import RepoStore
    from shoptalk.models.tables import counts_text, whole_cells
    from shoptalk.server.continuous import print_promotion, status_table

    data_dir = settings_for(ctx, repo).resolved_data_dir()
    # Long paths are left to the terminal to wrap, never broken by rich.
    console = Console(soft_wrap=True)
    table = status_table(data_dir, repo.resolve() if repo else None)
    console.print(whole_cells(table, keys=("id", "repo", "head")))
    if repo is None:
        return
    print_promotion(console, RepoStore.for_repo(data_dir, repo))
    for decision in JobQueue(data_dir).decisions(repo.resolve(), limit=10):
        verdict = "promoted" if decision.promoted else "kept current"
        console.print(
            escape(
                f"  decision {decision.run_id}: {verdict} — {decision.reason}; "
                f"{counts_text(decision.figures)}"
            ),
            highlight=False,
        )
