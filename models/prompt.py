"""The one prompt builder shared by training, evaluation and serving.

Training cuts instances exactly as the server cuts a document at the cursor, so
the model sees at serve time what it saw in training. Contexts are clipped in
characters at line boundaries, and the prefix's start moves in steps of
`PREFIX_LINE_STEP` lines so that it stays put while the user types (the
server's KV cache then reuses the evaluated prompt).
"""

from __future__ import annotations

from dataclasses import dataclass

from shoptalk.models.catalog import FimTemplate

PREFIX_LINE_STEP = 8

# Default context sizes in characters (~3.5 characters per token for code).
DEFAULT_PREFIX_CHARS = 1600
DEFAULT_SUFFIX_CHARS = 400


@dataclass(frozen=True)
class PromptParts:
    """What the model is shown: the clipped prefix and suffix around the cursor."""

    prefix: str
    suffix: str


def clip_prefix(prefix: str, max_chars: int) -> str:
    """The tail of `prefix` of at most `max_chars` characters, starting at the
    beginning of a line whose number is a multiple of PREFIX_LINE_STEP
    (counted from the start of the document), so the cut is stable while the
    user types near the cursor. A single line longer than the budget is cut
    mid-line as a last resort."""
    if len(prefix) <= max_chars:
        return prefix
    earliest = len(prefix) - max_chars
    line_starts = [0]
    pos = prefix.find("\n")
    while pos != -1:
        line_starts.append(pos + 1)
        pos = prefix.find("\n", pos + 1)
    for index, start in enumerate(line_starts):
        if start >= earliest and index % PREFIX_LINE_STEP == 0:
            return prefix[start:]
    for start in line_starts:
        if start >= earliest:
            return prefix[start:]
    return prefix[earliest:]


def clip_suffix(suffix: str, max_chars: int) -> str:
    """The head of `suffix` of at most `max_chars` characters, ending at a line end."""
    if len(suffix) <= max_chars:
        return suffix
    head = suffix[:max_chars]
    cut = head.rfind("\n")
    return head[: cut + 1] if cut > 0 else head


def clip_context(
    prefix: str,
    suffix: str,
    prefix_chars: int = DEFAULT_PREFIX_CHARS,
    suffix_chars: int = DEFAULT_SUFFIX_CHARS,
) -> PromptParts:
    return PromptParts(clip_prefix(prefix, prefix_chars), clip_suffix(suffix, suffix_chars))


def fim_prompt(template: FimTemplate, prefix: str, suffix: str) -> str:
    """PSM fill-in-the-middle prompt; the model's answer follows it, then `template.end`."""
    return f"{template.prefix}{prefix}{template.suffix}{suffix}{template.middle}"


def prefix_prompt(prefix: str) -> str:
    """Prompt for a base that was never trained on FIM: the code before the cursor."""
    return prefix


def completion_prompt(template: FimTemplate, parts: PromptParts, use_fim: bool) -> str:
    return (
        fim_prompt(template, parts.prefix, parts.suffix) if use_fim else prefix_prompt(parts.prefix)
    )


# How completions are prompted: fill-in-the-middle with the base's template,
# or the code before the cursor only. A tuned model is served with the format
# it was trained on (its export manifest says which); an untuned base with FIM
# only when it learned FIM in pre-training.
PROMPT_FIM = "fim"
PROMPT_PREFIX = "prefix"
PROMPT_FORMATS = (PROMPT_FIM, PROMPT_PREFIX)


def training_prompt_format(setting: str, template: FimTemplate) -> str:
    """The completion format a training run uses. `auto`: FIM for bases that
    were pre-trained on it; prefix-only for the others, whose borrowed
    reserved-token template a CPU-budget run cannot teach (docs/benchmarks.md:
    17 FIM steps took the default base from 5% to 0% exact match)."""
    if setting == "auto":
        return PROMPT_FIM if template.trained else PROMPT_PREFIX
    if setting not in PROMPT_FORMATS:
        raise ValueError(f"unknown completion format {setting!r}; use auto, fim or prefix")
    return setting


def served_with_fim(prompt_format: str | None) -> bool:
    """Whether a tuned model whose manifest records `prompt_format` is prompted
    with FIM (runs from before the format was recorded were all FIM-trained)."""
    return (prompt_format or PROMPT_FIM) == PROMPT_FIM


MODULE_LOOKUP_HEADER = "# Which module implements this?\n"


def module_lookup_prompt(query: str) -> str:
    """Prompt asking which module implements `query`; the answer is module ids,
    one per line."""
    text = " ".join(query.split())
    return f"{MODULE_LOOKUP_HEADER}# Request: {text}\n# Module:"
