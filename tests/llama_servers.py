"""A real `python -m llama_cpp.server` on loopback for the tests of the
OpenAI-compatible backend and the team server: started with the given
arguments (one `--model`, or a multi-model `--config_file`), ready when
`/v1/models` answers, stopped at the end."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def served_models(url: str) -> list[str]:
    """The model names (aliases) the server lists."""
    with urllib.request.urlopen(f"{url}/v1/models", timeout=5) as answer:
        return [m["id"] for m in json.load(answer)["data"]]


@contextlib.contextmanager
def llama_server(
    args: list[str], log: Path, port: int | None = None, timeout_s: float = 90
) -> Iterator[str]:
    """Start llama_cpp.server with `args` (plus host and port) on loopback;
    yields its base URL (http://127.0.0.1:PORT). A `--config_file` run takes
    host and port from the file (see `team_config`): pass its `port`."""
    pytest.importorskip("fastapi", reason="llama-cpp-python[server] is not installed")
    port = port or free_port()
    with log.open("ab") as sink:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "llama_cpp.server",
                *args,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                served_models(url)
                break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"llama_cpp.server did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.3)
        yield url
    finally:
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(10)
        if process.poll() is None:
            process.kill()
            process.wait()


def model_entry(alias: str, model: Path, lora: Path | None = None) -> dict[str, Any]:
    """One model of a llama_cpp.server config file (small and one thread, as tests run)."""
    entry: dict[str, Any] = {
        "model": str(model),
        "model_alias": alias,
        "n_ctx": 1024,
        "n_threads": 1,
        "n_threads_batch": 1,
        "verbose": False,
    }
    if lora is not None:
        entry["lora_path"] = str(lora)
    return entry


def team_config(path: Path, models: list[dict[str, Any]], **extra: Any) -> int:
    """Write a llama_cpp.server multi-model config on a free loopback port
    (the file's host and port are the ones the server uses); returns the port."""
    port = free_port()
    path.write_text(json.dumps({"host": "127.0.0.1", "port": port, "models": models, **extra}))
    return port
