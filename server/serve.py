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
from typing import BinaryIO

from shoptalk.models.errors import ShopTalkError

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


class ServeError(ShopTalkError):
    pass


def configure_logging(log_file: Path | None, verbose: bool) -> None:
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


def protocol_streams() -> tuple[BinaryIO, BinaryIO]:
    """The protocol's stdin/stdout; fd 1 then points at stderr."""
    protocol_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    stdout: BinaryIO = os.fdopen(protocol_fd, "wb", buffering=0)
    return sys.stdin.buffer, stdout


def check_model(model: Path | None) -> None:
    if model is None or model.is_file():
        return
    if model.is_dir():
        raise ServeError(
            f"--model {model} is a folder; give the path of a .gguf file "
            "(an export writes <run>/export/model-<quant>.gguf)"
        )
    raise ServeError(f"--model {model} does not exist; give the path of a .gguf file")
