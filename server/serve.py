"""`shoptalk serve`: start the language server over stdio or TCP.

Stdout belongs to the protocol: before the server starts, file descriptor 1
is moved aside for the protocol and pointed at stderr, so a stray print (or a
native library writing to stdout) can never corrupt a message.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated, BinaryIO

import typer

from shoptalk.models.errors import ShopTalkError

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


class ServeError(ShopTalkError):
    pass


def _configure_logging(log_file: Path | None, verbose: bool) -> None:
    handler: logging.Handler
    if log_file is not None:
        try:
            log_file.parent.mkdir(parents=True, exist_ok=True)
            handler = logging.FileHandler(log_file, encoding="utf-8")
        except OSError as exc:
            raise ServeError(
                f"cannot write the log file {log_file}: {exc.strerror or exc}; "
                "give --log-file a file in a folder you can write to"
            ) from None
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    # pygls logs every message at INFO; keep our own log readable.
    logging.getLogger("pygls").setLevel(logging.DEBUG if verbose else logging.WARNING)


def _protocol_streams() -> tuple[BinaryIO, BinaryIO]:
    """The protocol's stdin/stdout; fd 1 then points at stderr."""
    protocol_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    stdout: BinaryIO = os.fdopen(protocol_fd, "wb", buffering=0)
    return sys.stdin.buffer, stdout


def register(app: typer.Typer) -> None:
    @app.command()
    def serve(
        stdio: Annotated[
            bool, typer.Option("--stdio", help="Talk LSP over stdin/stdout (default).")
        ] = False,
        tcp: Annotated[
            bool, typer.Option("--tcp", help="Listen for one LSP client over TCP.")
        ] = False,
        port: Annotated[int, typer.Option(help="TCP port.", min=1, max=65535)] = 2087,
        host: Annotated[
            str,
            typer.Option(
                help="TCP address; anything but loopback exposes your code to the network."
            ),
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
        from shoptalk.models.cli import settings_for

        if stdio and tcp:
            raise ServeError("choose one of --stdio and --tcp")
        _check_model(model)
        settings = settings_for(repo)
        # The root command set the level from --verbose (read it here: under
        # `python -m` the CLI module's globals are a second copy).
        verbose = logging.getLogger().getEffectiveLevel() <= logging.DEBUG
        _configure_logging(log_file or settings.serve.log_file, verbose)
        from shoptalk.server.lsp import ServerConfig, create_server

        config = ServerConfig(
            settings=settings,
            repo=repo.resolve() if repo else None,
            model=model.resolve() if model else None,
            poll_s=poll_seconds,
            load_settings=settings_for,
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
            stdin, stdout = _protocol_streams()
            server.start_io(stdin, stdout)
        if server.exit_code:
            # `exit` came without `shutdown` (the protocol's exit code 1).
            raise typer.Exit(server.exit_code)


def _check_model(model: Path | None) -> None:
    if model is None or model.is_file():
        return
    if model.is_dir():
        raise ServeError(
            f"--model {model} is a folder; give the path of a .gguf file "
            "(an export writes <run>/export/model-<quant>.gguf)"
        )
    raise ServeError(f"--model {model} does not exist; give the path of a .gguf file")
