"""Run `shoptalk` commands, each in its own process, fast.

A server process imports what the commands import (torch, transformers,
peft, llama.cpp: ~5 s of a 2-core CPU) once, then forks one child per
command; the child runs the CLI's `main` exactly as the `shoptalk` script
does. A `kill -9`, a file size limit or a crash hits only that child, and the
test sees its exit status (-9 when killed) and its output (stdout and stderr
together, through a pipe: a file size limit does not apply to pipes).

Every child also reports each attempt to reach another machine (an audit
hook on socket connects, sends and name look-ups; loopback and Unix sockets
are fine): a line starting with `NETWORK` in its output.

Fork safety: the server process computes nothing before forking, so no
thread pool (OpenMP, llama.cpp) exists yet that a child could inherit.
"""

from __future__ import annotations

import ipaddress
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any

NETWORK = "NETWORK"
_NETWORK_EVENTS = ("socket.connect", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo")


def _is_local(address: Any) -> bool:
    if isinstance(address, str | bytes):  # a Unix socket path
        return True
    host = str(address[0]) if isinstance(address, tuple) and address else str(address)
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def _report_network(event: str, args: tuple[Any, ...]) -> None:
    if event not in _NETWORK_EVENTS:
        return
    if event == "socket.getaddrinfo":
        address: Any = (args[0],)
    else:
        sock, address = args[0], args[1]
        if getattr(sock, "family", None) == socket.AF_UNIX:
            return
    if not _is_local(address):
        os.write(2, f"{NETWORK} {event} {address!r}\n".encode())


class ForkedCli:
    """`run(args, env)` → a CompletedProcess of `shoptalk *args` (output in both
    .stdout and .stderr)."""

    def __init__(self) -> None:
        self._server = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        )

    def run(
        self,
        args: list[str],
        env: dict[str, str],
        *,
        file_limit: int | None = None,
        timeout: int = 300,
    ) -> subprocess.CompletedProcess[str]:
        assert self._server.stdin is not None and self._server.stdout is not None
        job = {"args": args, "env": env, "file_limit": file_limit, "timeout": timeout}
        self._server.stdin.write(json.dumps(job) + "\n")
        self._server.stdin.flush()
        line = self._server.stdout.readline()
        if not line:
            raise RuntimeError(f"the forking server ended (exit code {self._server.wait()})")
        answer = json.loads(line)
        output = answer["output"]
        return subprocess.CompletedProcess(
            ["shoptalk", *args], answer["returncode"], output, output
        )

    def close(self) -> None:
        if self._server.stdin is not None:
            self._server.stdin.close()
        try:
            self._server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._server.kill()
            self._server.wait()


def _child(job: dict[str, Any], write: int) -> None:
    """In the forked child: run the command, then leave without cleanup."""
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(write, 1)
    os.dup2(write, 2)
    os.environ.clear()
    os.environ.update(job["env"])
    if job["file_limit"] is not None:
        _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (job["file_limit"], hard))
    signal.alarm(job["timeout"])  # a hung command ends (SIGALRM) instead of the test
    sys.addaudithook(_report_network)
    from shoptalk.models.cli import main

    code = 0
    try:
        main(job["args"])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def serve() -> None:
    import gguf  # noqa: F401
    import llama_cpp  # noqa: F401
    import peft  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from shoptalk.models import cli

    for module in cli.COMMAND_MODULES:
        __import__(module)
    channel = sys.stdout
    for line in sys.stdin:
        job = json.loads(line)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            _child(job, write)
        os.close(write)
        with os.fdopen(read, "rb") as pipe:
            output = pipe.read().decode("utf-8", "replace")
        _, status = os.waitpid(pid, 0)
        answer = {"returncode": os.waitstatus_to_exitcode(status), "output": output}
        channel.write(json.dumps(answer) + "\n")
        channel.flush()


if __name__ == "__main__":
    serve()
