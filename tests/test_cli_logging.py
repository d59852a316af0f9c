"""llama.cpp's own log, routed to the `llama_cpp` logger at the right levels."""

from __future__ import annotations

import logging

import pytest

from shoptalk.models import cli_logging


def test_llama_cpp_levels_follow_ggml_h(caplog: pytest.LogCaptureFixture) -> None:
    pytest.importorskip("llama_cpp")
    cli_logging.route_llama_logs()
    forward = cli_logging._llama_state["callback"]
    caplog.set_level(logging.DEBUG, logger=cli_logging.LLAMA_LOGGER)
    # ggml.h: DEBUG 1, INFO 2, WARN 3, ERROR 4; CONT 5 goes on with the last level.
    for level, text in ((1, b"a debug line\n"), (2, b"loading "), (5, b"model\n")):
        forward(level, text, None)
    forward(3, b"llama_kv_cache_iswa: using full-size SWA cache\n", None)
    forward(4, b"failed to load model\n", None)
    seen = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert seen == [
        (logging.DEBUG, "a debug line"),
        (logging.INFO, "loading model"),
        (logging.WARNING, "llama_kv_cache_iswa: using full-size SWA cache"),
        (logging.ERROR, "failed to load model"),
    ]
