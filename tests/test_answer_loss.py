"""The training loss of a right-padded batch is the sum of its sequences'
losses alone: the forward runs without an attention mask (causal attention
never lets a real position see the pads after it)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from shoptalk.trainer.formats import Example
from shoptalk.trainer.train_model import AnswerLoss, choose_device, collate, load_causal_lm


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_a_padded_batch_scores_each_sequence_as_alone(tiny_hf: Any, arch: str) -> None:
    plan = choose_device("cpu", 1, "fp32")
    model = load_causal_lm(str(tiny_hf(arch)), plan).eval()
    loss = AnswerLoss(model)
    generator = torch.Generator().manual_seed(0)
    examples = [
        Example(tuple(torch.randint(3, 200, (n,), generator=generator).tolist()), start, "t")
        for n, start in ((40, 30), (17, 9), (29, 5))
    ]
    pad_id = 0

    def summed(batch_examples: list[Example]) -> float:
        batch = collate(batch_examples, pad_id, plan.device)
        with torch.no_grad():
            return float(loss(batch.input_ids, batch.rows, batch.cols, batch.labels))

    together = summed(examples)
    alone = sum(summed([e]) for e in examples)
    assert together == pytest.approx(alone, rel=1e-4)
