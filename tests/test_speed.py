"""The "auto" time budget: measured from this machine's decoding speed when
the model loads, on a real llama.cpp backend (tiny GGUF) and through the
real server's status."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from lsprotocol import types

from shoptalk.models.backends import LlamaBackend, LlamaOptions
from shoptalk.models.registry import latency_budget_ms
from shoptalk.models.settings import ServeSettings
from shoptalk.models.speed import (
    FALLBACK_MS,
    MAX_BUDGET_MS,
    MIN_BUDGET_MS,
    DecodeSpeed,
    auto_budget_ms,
    budget_from_speed,
)
from tests.test_server_e2e import _make_workspace, start_session, stop_session


def test_the_budget_gives_max_tokens_room_at_the_measured_speed() -> None:
    # 25 ms per token, 48 tokens, 1.5x slack, 150 ms overhead.
    assert budget_from_speed(DecodeSpeed(16, 0.4), 48) == 48 * 25 * 3 // 2 + 150
    assert budget_from_speed(DecodeSpeed(16, 0.001), 48) == MIN_BUDGET_MS  # a fast GPU
    assert budget_from_speed(DecodeSpeed(16, 60.0), 48) == MAX_BUDGET_MS  # never unbounded
    assert budget_from_speed(DecodeSpeed(0, 0.2), 48) == FALLBACK_MS  # nothing generated


def test_a_fixed_setting_wins_over_the_measurement() -> None:
    speed = DecodeSpeed(16, 0.4)
    assert latency_budget_ms(ServeSettings(max_latency_ms=900), speed) == 900
    assert latency_budget_ms(ServeSettings(), speed) == budget_from_speed(speed, 48)
    assert latency_budget_ms(ServeSettings(), None) == FALLBACK_MS
    with pytest.raises(ValueError):
        ServeSettings(max_latency_ms=0)


def test_the_probe_times_decoding_on_a_real_model(tiny_gguf: Callable[..., Path]) -> None:
    backend = LlamaBackend(tiny_gguf("gemma3"), LlamaOptions(context_tokens=256, threads=1))
    try:
        budget, speed = auto_budget_ms(backend, 48)
    finally:
        backend.close()
    assert speed.tokens > 0 and speed.seconds > 0
    assert budget == budget_from_speed(speed, 48)
    assert MIN_BUDGET_MS <= budget <= MAX_BUDGET_MS


@pytest.mark.e2e
@pytest.mark.asyncio
async def test_the_server_reports_its_budget_and_resizes_its_context(
    tmp_path: Path, model: Path
) -> None:
    workspace = _make_workspace(tmp_path)
    session = await start_session(workspace, tmp_path / "data", model, {})
    try:
        await session.wait_loaded()
        budget = (await session.status())["budget"]
        assert budget["source"] == "measured" and budget["ms_per_token"] > 0
        assert MIN_BUDGET_MS <= budget["ms"] <= MAX_BUDGET_MS
        # A number in the settings is used as it is.
        session.client.workspace_did_change_configuration(
            types.DidChangeConfigurationParams(settings={"shoptalk": {"max_latency_ms": 4321}})
        )
        budget = (await session.status())["budget"]
        assert (budget["ms"], budget["source"]) == (4321, "setting")
        # A budget the llama.cpp context cannot hold loads the model again, larger.
        before = (await session.status())["context_tokens"]
        session.client.workspace_did_change_configuration(
            types.DidChangeConfigurationParams(settings={"shoptalk": {"prefix_chars": 12000}})
        )
        deadline = time.monotonic() + 60
        while (status := await session.status())["context_tokens"] == before:
            assert time.monotonic() < deadline, status
            await asyncio.sleep(0.1)
        assert status["context_tokens"] > 12000 / 3 > before and status["swaps"] == 1
    finally:
        await stop_session(session)
