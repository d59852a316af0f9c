"""Completion prompt formats: FIM or prefix-only, healed at the cursor exactly
as the server heals its prompt."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from shoptalk.models.catalog import GEMMA3_FIM, QWEN_CODER_FIM, resolve_base
from shoptalk.models.context import PromptConfig
from shoptalk.models.prompt import served_with_fim, training_prompt_format

PREFIX = "def area(width, height):\n    return wid"
TARGET = "th * height"
SUFFIX = "\n\n\ndef perimeter(width, height):\n"


def test_auto_format_is_fim_only_for_bases_that_learned_it() -> None:
    assert training_prompt_format("auto", QWEN_CODER_FIM) == "fim"
    assert training_prompt_format("auto", GEMMA3_FIM) == "prefix"
    assert training_prompt_format("fim", GEMMA3_FIM) == "fim"
    assert training_prompt_format("prefix", QWEN_CODER_FIM) == "prefix"
    with pytest.raises(ValueError, match="auto, fim or prefix"):
        training_prompt_format("psm", GEMMA3_FIM)
    # Manifests from before the format was recorded are FIM-trained runs.
    assert served_with_fim(None) and served_with_fim("fim") and not served_with_fim("prefix")


def _builder(tiny_hf: Any, arch: str, prompt_format: str) -> Any:
    from transformers import AutoTokenizer

    from shoptalk.trainer.formats import SequenceBuilder

    path = tiny_hf(arch)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return SequenceBuilder(tokenizer, resolve_base(str(path)).fim, 256, prompt_format)


@pytest.mark.parametrize("arch", ["gemma3", "llama"])
def test_prefix_only_example_is_the_healed_prefix_then_target_and_line_break(
    tiny_hf: Any, arch: str
) -> None:
    from shoptalk.trainer.formats import completion_item

    builder = _builder(tiny_hf, arch, "prefix")
    tok = builder.tokenizer
    # Layout `none`: the prefix alone (the default `before` also shows SUFFIX's lines).
    item = completion_item(
        builder.template,
        PREFIX,
        TARGET,
        SUFFIX,
        use_fim=False,
        config=PromptConfig(suffix_layout="none"),
    )
    example = builder.build(item, "completion")
    assert example is not None
    head = 1 if builder.bos is not None else 0
    prefix_ids = tok.encode(PREFIX, add_special_tokens=False)
    # The prompt is the prefix less its last token: what the server keeps
    # after backing off the cursor's partial word (models.backends.heal_split).
    assert list(example.input_ids[head : example.answer_start]) == prefix_ids[:-1]
    # Prompt and answer together are the natural tokenization of the text
    # up to the end of the line; no FIM marker anywhere.
    whole = tok.encode(PREFIX + TARGET + "\n", add_special_tokens=False)
    assert list(example.input_ids[head:]) == whole
    specials = {builder.special_id(t) for t in builder.template.special_tokens()}
    assert not specials & set(example.input_ids)
    answer = tok.decode(list(example.input_ids[example.answer_start :]))
    assert answer.endswith(TARGET + "\n")
    assert len(answer) > len(TARGET + "\n")  # the healed piece of the prefix leads it


def test_prefix_only_answer_has_no_line_break_at_the_end_of_a_file(tiny_hf: Any) -> None:
    from shoptalk.trainer.formats import completion_item

    builder = _builder(tiny_hf, "gemma3", "prefix")
    example = builder.build(
        completion_item(builder.template, PREFIX, TARGET, "", use_fim=False), "completion"
    )
    assert example is not None
    assert not builder.tokenizer.decode(list(example.input_ids[-1:])).endswith("\n")


def test_fim_example_is_healed_at_the_cursor_and_ends_with_the_end_token(tiny_hf: Any) -> None:
    from shoptalk.trainer.formats import completion_item

    builder = _builder(tiny_hf, "qwen2", "fim")
    tok = builder.tokenizer
    t = builder.template
    example = builder.build(completion_item(t, PREFIX, TARGET, SUFFIX), "completion")
    assert example is not None
    prefix_ids = tok.encode(PREFIX, add_special_tokens=False)
    prompt = list(example.input_ids[: example.answer_start])
    start = prompt.index(builder.special_id(t.prefix)) + 1
    assert prompt[start : start + len(prefix_ids) - 1] == prefix_ids[:-1]
    assert prompt[start + len(prefix_ids) - 1] == builder.special_id(t.suffix)
    assert prompt[-1] == builder.special_id(t.middle)
    answer = list(example.input_ids[example.answer_start :])
    assert answer[-1] == builder.special_id(t.end)
    # This tokenizer cuts "wid|th" differently from "width": the answer is then
    # the backed-off piece and the target tokenized on their own, as the
    # server generates them after healing.
    assert tok.decode(answer[:-1]) == PREFIX[len(tok.decode(prefix_ids[:-1])) :] + TARGET


def test_build_examples_follow_the_builder_format(tiny_hf: Any) -> None:
    from shoptalk.trainer.formats import build_examples

    record = {"id": "r", "kind": "completion", "prefix": PREFIX, "target": TARGET}
    record["suffix"] = SUFFIX
    for fmt, has_marker in (("fim", True), ("prefix", False)):
        builder = _builder(tiny_hf, "gemma3", fmt)
        (example,) = build_examples([record], builder)
        marker = builder.special_id(builder.template.prefix)
        assert (marker in example.input_ids) is has_marker


def test_a_continued_adapter_keeps_the_format_it_learned(tmp_path: Path) -> None:
    from shoptalk.trainer.train import _prompt_format

    gemma = resolve_base("gemma3-270m")
    parent = tmp_path / "run-1"
    (parent / "adapter").mkdir(parents=True)
    assert _prompt_format("auto", gemma, None) == "prefix"
    (parent / "record.json").write_text(json.dumps({"prompt_format": "fim"}))
    assert _prompt_format("auto", gemma, parent / "adapter") == "fim"
    (parent / "record.json").write_text(json.dumps({"status": "complete"}))
    assert _prompt_format("prefix", gemma, parent / "adapter") == "fim"  # recorded before formats
