"""The paired exact-match difference of two models on the same held-out
instances, with its 95% interval and McNemar's exact p-value, and the words
a promotion message uses for it.

A difference is a measured gain only when its interval lies above zero and
McNemar's test agrees (p < 0.05); a measured loss the reverse; anything else
is "no measurable difference" (the demo's 5.0 vs 2.5 over 40 lines, p = 1,
is one). Used by training's held-out measurement (`shoptalk.trainer.train`)
and the promotion gate (`shoptalk.trainer.promotion`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from shoptalk.trainer.metrics import mcnemar

SIGNIFICANCE = 0.05
Z_95 = 1.959964

GAIN = "gain"
LOSS = "loss"
NO_DIFFERENCE = "no measurable difference"


@dataclass(frozen=True)
class EmDifference:
    """Candidate minus reference exact match, in points, on `instances`
    paired instances; `low`/`high` bound it at 95% (Wald interval of a
    paired difference of proportions)."""

    candidate: str
    reference: str
    instances: int
    candidate_em: float
    reference_em: float
    points: float
    low: float
    high: float
    p_value: float

    @property
    def verdict(self) -> str:
        if self.instances and self.low > 0 and self.p_value < SIGNIFICANCE:
            return GAIN
        if self.instances and self.high < 0 and self.p_value < SIGNIFICANCE:
            return LOSS
        return NO_DIFFERENCE

    def text(self) -> str:
        """One line for a person: both figures, the difference with its
        interval and p-value, and the verdict."""
        if not self.instances:
            return f"no held-out instances to compare {self.candidate} with {self.reference}"
        verdict = "measured gain" if self.verdict == GAIN else self.verdict
        if self.verdict == LOSS:
            verdict = "measured loss"
        return (
            f"held-out exact match {self.candidate_em:.1f} vs {self.reference} "
            f"{self.reference_em:.1f}: {self.points:+.1f} points (95% interval "
            f"{self.low:+.1f} to {self.high:+.1f}, McNemar p = {self.p_value:.2g}, "
            f"{self.instances} instances): {verdict}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "verdict": self.verdict}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EmDifference:
        fields = {k: data[k] for k in cls.__dataclass_fields__}
        return cls(**fields)


def paired_difference(
    candidate: Sequence[bool], reference: Sequence[bool], names: tuple[str, str]
) -> EmDifference:
    """The difference of two models' exact matches on the same instances
    (`names`: candidate's, reference's)."""
    n = len(candidate)
    test = mcnemar(candidate, reference)
    if n == 0:
        return EmDifference(names[0], names[1], 0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0)
    gained, lost = test.only_a, test.only_b
    share = (gained - lost) / n
    variance = max(0.0, (gained + lost) - (gained - lost) ** 2 / n) / n**2
    margin = Z_95 * math.sqrt(variance)
    return EmDifference(
        names[0],
        names[1],
        n,
        100.0 * sum(candidate) / n,
        100.0 * sum(reference) / n,
        100.0 * share,
        100.0 * (share - margin),
        100.0 * (share + margin),
        test.p_value,
    )
