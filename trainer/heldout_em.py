"""Greedy exact match of held-out completions on the torch model, cheap
enough for every evaluation of a training run.

A completion is an exact match when greedy decoding reproduces its answer
token for token, the end of the line (or FIM's end token) included. With
the answer known, that is one forward pass: greedy decoding writes the
answer exactly when the most likely next token is the answer's at every
answer position (teacher forcing gives the same prefixes greedy decoding
would have). The prompts are training's (`shoptalk.trainer.formats`), which
are the server's.

Used by training (`shoptalk.trainer.train`) to choose checkpoints and to
measure the chosen one against the base.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shoptalk.trainer.formats import Example, SequenceBuilder
    from shoptalk.trainer.train_model import DevicePlan


def completion_examples(
    records: Iterable[Mapping[str, Any]],
    builder: SequenceBuilder,
    limit: int,
    seed: int | None = None,
) -> list[Example]:
    """Up to `limit` completion examples: the newest records (`seed` None)
    or a seeded sample; never augmented."""
    from shoptalk.trainer.formats import build_examples

    completions = [r for r in records if r.get("kind") == "completion"]
    if seed is None:
        completions.sort(key=lambda r: str(r.get("author_date", "")), reverse=True)
    else:
        random.Random(seed).shuffle(completions)
    examples: list[Example] = []
    for record in completions:
        if len(examples) >= limit:
            break
        examples += build_examples([record], builder)
    return examples[:limit]


def exact_matches(
    loss_module: Any, examples: Sequence[Example], pad_id: int, plan: DevicePlan, batch_size: int
) -> list[bool]:
    """For each example (in order), whether greedy decoding writes its answer."""
    import torch

    from shoptalk.trainer.train_model import autocast, collate

    module = getattr(loss_module, "module", loss_module)  # DDP wraps it
    was_training = module.training
    module.eval()
    outcomes: list[bool] = []
    try:
        with torch.no_grad():
            for start in range(0, len(examples), max(1, batch_size)):
                chunk = examples[start : start + max(1, batch_size)]
                batch = collate(chunk, pad_id, plan.device)
                with autocast(plan):
                    # No mask, as in training's loss (right-padded, causal).
                    hidden = module.decoder(
                        input_ids=batch.input_ids, use_cache=False
                    ).last_hidden_state
                    guesses = module.lm_head(hidden[batch.rows, batch.cols]).argmax(dim=-1)
                right = (guesses == batch.labels).tolist()
                wrong_rows = {
                    int(r) for r, ok in zip(batch.rows.tolist(), right, strict=True) if not ok
                }
                outcomes += [row not in wrong_rows for row in range(len(chunk))]
    finally:
        module.train(was_training)
    return outcomes


def percent(outcomes: Sequence[bool]) -> float:
    return 100.0 * sum(outcomes) / len(outcomes) if outcomes else 0.0
