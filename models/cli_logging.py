"""Where the command line's logs go.

A person reads stderr: ShopTalk's own messages go there, and with `-v`
everything, debug included. The libraries' own output — llama.cpp's
quantizer log (~360 lines per export), transformers' FutureWarnings and
weight-loading bars — is not for them: it goes to the log file,
`<data dir>/logs/shoptalk.log` (opened on the first record, rotated at
5 MB), and to stderr only with `-v` (or when it is an error).

`configure_cli_logging` runs once per command, before any library is
imported; `route_llama_logs` is called where llama.cpp is about to talk on
its own (the quantizer), since llama-cpp-python prints through its own
callback rather than Python's logging.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import logging.handlers
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

LOG_FILE = Path("logs") / "shoptalk.log"
OWN_LOGGERS = ("shoptalk", "__main__")
LLAMA_LOGGER = "llama_cpp"
_FORMAT = "%(levelname)s %(name)s: %(message)s"
_MARK = "_shoptalk_cli"  # set on the handlers installed here


class _OwnRecords(logging.Filter):
    """ShopTalk's records at any level, the libraries' only from ERROR up."""

    def filter(self, record: logging.LogRecord) -> bool:
        own = record.name.split(".", 1)[0] in OWN_LOGGERS or record.name == "root"
        return own or record.levelno >= logging.ERROR


class _LogFile(logging.handlers.RotatingFileHandler):
    """The rotating log file; a write that fails (a full disk) closes it for
    the rest of the command instead of printing logging's traceback over the
    message the command itself gives."""

    failed = False

    def handleError(self, record: logging.LogRecord) -> None:
        self.failed = True


class LazyFileHandler(logging.Handler):
    """A rotating log file whose path is found and opened on the first record
    (most commands log nothing, and the data dir is known only then)."""

    def __init__(self, path: Callable[[], Path | None]) -> None:
        super().__init__(logging.DEBUG)
        self._path = path
        self._file: logging.Handler | None = None
        self._failed = False
        self.setFormatter(logging.Formatter("%(asctime)s " + _FORMAT))

    @property
    def path(self) -> Path | None:
        return (
            Path(self._file.baseFilename) if isinstance(self._file, logging.FileHandler) else None
        )

    def emit(self, record: logging.LogRecord) -> None:
        if self._file is None and not self._failed:
            self._file = self._open()
        if self._file is not None:
            self._file.emit(record)
            if isinstance(self._file, _LogFile) and self._file.failed:
                self._failed = True
                file, self._file = self._file, None
                with contextlib.suppress(Exception):  # flushing fails again on a full disk
                    file.close()

    def _open(self) -> logging.Handler | None:
        try:
            path = self._path()
            if path is None:
                raise OSError("no data dir")
            path.parent.mkdir(parents=True, exist_ok=True)
            handler = _LogFile(path, maxBytes=5_000_000, backupCount=2, encoding="utf-8")
        except Exception:  # a broken data dir is reported by the command itself
            self._failed = True
            return None
        handler.setFormatter(self.formatter)
        return handler

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        super().close()


def configure_cli_logging(verbose: bool, data_dir: Callable[[], Path | None]) -> None:
    """Root logging for one command: stderr (own records; all with `verbose`)
    and the lazily opened log file under `data_dir()` (everything)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _MARK, False):
            root.removeHandler(handler)
            handler.close()
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setFormatter(logging.Formatter(_FORMAT))
    if not verbose:
        stderr.addFilter(_OwnRecords())
    log_file = LazyFileHandler(lambda: _log_path(data_dir))
    for handler in (stderr, log_file):
        setattr(handler, _MARK, True)
        root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.captureWarnings(True)  # FutureWarnings & co. become records of "py.warnings"
    _quiet_libraries(verbose)


def _log_path(data_dir: Callable[[], Path | None]) -> Path | None:
    folder = data_dir()
    return folder / LOG_FILE if folder is not None else None


def _quiet_libraries(verbose: bool) -> None:
    """What the libraries read from the environment when they are imported:
    no progress bars of their own (ShopTalk draws its own; tqdm's none when
    stderr is not a terminal), transformers' logger at errors only,
    llama-cpp-python's printing callback at errors."""
    if verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "info")
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if not sys.stderr.isatty():
        # tqdm bars (the GGUF → HF conversion's) written to a file are one
        # long line of carriage returns; ShopTalk prints its own lines there.
        os.environ.setdefault("TQDM_DISABLE", "1")
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)


# llama.cpp's ggml_log_level (ggml.h: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4,
# CONT 5) → logging levels (CONT continues the previous line). llama-cpp-python's
# own table predates DEBUG and shows every warning as an error: "using
# full-size SWA cache" reached the demo's screen as `ERROR llama_cpp`.
_LLAMA_LEVELS = {
    0: logging.INFO,
    1: logging.DEBUG,
    2: logging.INFO,
    3: logging.WARNING,
    4: logging.ERROR,
}
_LLAMA_CONT = 5
_llama_state: dict[str, Any] = {}


def route_llama_logs() -> None:
    """Send llama.cpp's own log (model loader, quantizer) to the logger
    `llama_cpp` line by line, instead of llama-cpp-python printing it to
    stderr. Idempotent; does nothing when llama-cpp-python is missing."""
    if "callback" in _llama_state:
        return
    try:
        import llama_cpp
    except ImportError:
        return
    logger = logging.getLogger(LLAMA_LOGGER)
    pending: list[str] = []
    last_level = [logging.INFO]

    def forward(level: int, text: bytes | None, _user_data: ctypes.c_void_p) -> None:
        if level != _LLAMA_CONT:
            last_level[0] = _LLAMA_LEVELS.get(level, logging.DEBUG)
        pending.append((text or b"").decode("utf-8", errors="replace"))
        joined = "".join(pending)
        if "\n" not in joined:
            return
        *lines, rest = joined.split("\n")
        pending[:] = [rest] if rest else []
        for line in lines:
            if line.strip():
                logger.log(last_level[0], "%s", line.rstrip())

    callback = llama_cpp.llama_log_callback(forward)
    _llama_state["callback"] = callback  # the C side keeps only a pointer
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
