"""The completion time budget from what this machine achieves.

`[serve] max_latency_ms = "auto"` (the default) measures, once per loaded
model, how long one generated token takes here and gives an answer room for
`max_tokens` of them with some slack. The budget bounds only the answer's
generation (the prompt is read in full; see the backend), so decode speed is
what it must follow: ~1.2 s on a laptop CPU for the default model, less on a
GPU, more on a slow or busy machine — where a fixed 1.5 s would cut most
answers or wait needlessly.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

from shoptalk.models.completion import Backend, GenerationRequest
from shoptalk.models.prompt import PromptPlan

log = logging.getLogger(__name__)

# A short, neutral code prompt; its answer is thrown away.
PROBE_PROMPT = "def add(a, b):\n    return a + b\n\n\ndef multiply(a, b):\n"
PROBE_TOKENS = 16
PROBES = 2
SLACK = 1.5  # answers longer than typical, a busier moment than the probe's
OVERHEAD_MS = 150  # stop rules, healing, the copy channel's scoring
MIN_BUDGET_MS = 500
MAX_BUDGET_MS = 10_000
FALLBACK_MS = 1500  # when the probe cannot measure (no tokens generated)


@dataclass(frozen=True)
class DecodeSpeed:
    """One probe: `tokens` generated in `seconds` from a prompt already read."""

    tokens: int
    seconds: float

    @property
    def ms_per_token(self) -> float | None:
        return 1000 * self.seconds / self.tokens if self.tokens else None


def measure_decode(backend: Backend, tokens: int = PROBE_TOKENS) -> DecodeSpeed:
    """Time `tokens` of greedy generation on a prompt that was read first, so
    the figure is decoding alone."""
    plan = PromptPlan(lead="", prefix=PROBE_PROMPT, trail="", end_markers=())
    backend.prefill(plan)
    request = GenerationRequest(
        plan=plan, max_tokens=tokens, deadline=time.monotonic() + 60.0, heal=False
    )
    started = time.monotonic()
    generation = backend.generate(request)
    return DecodeSpeed(generation.generated_tokens, time.monotonic() - started)


def budget_from_speed(speed: DecodeSpeed, max_tokens: int) -> int:
    """Milliseconds that let an answer of `max_tokens` finish at this speed."""
    per_token = speed.ms_per_token
    if per_token is None:
        return FALLBACK_MS
    wanted = math.ceil(max_tokens * per_token * SLACK) + OVERHEAD_MS
    return max(MIN_BUDGET_MS, min(MAX_BUDGET_MS, wanted))


def auto_budget_ms(backend: Backend, max_tokens: int) -> tuple[int, DecodeSpeed]:
    """The measured budget and the probe it came from: the faster of
    `PROBES` probes, so one moment of load (an indexer, a build) does not set
    the budget for the whole session."""
    speed = min(
        (measure_decode(backend) for _ in range(PROBES)),
        key=lambda s: s.ms_per_token if s.ms_per_token is not None else float("inf"),
    )
    budget = budget_from_speed(speed, max_tokens)
    per_token = speed.ms_per_token
    log.info(
        "time budget: %d ms (auto: %s ms per token measured over %d tokens, max_tokens %d)",
        budget,
        f"{per_token:.1f}" if per_token is not None else "?",
        speed.tokens,
        max_tokens,
    )
    return budget, speed
