"""The one prompt builder shared by training, evaluation and serving.

Training cuts instances exactly as the server cuts a document at the cursor, so
the model sees at serve time what it saw in training. Contexts are clipped in
characters at line boundaries, and the prefix's start moves in steps of
`prefix_line_step(budget)` lines (8 per 1,500 characters of budget: 32 at the
default 6,000) so that it stays put while the user types (the server's KV
cache then reuses the evaluated prompt; each move means reading the whole
prompt again, seconds on a laptop CPU, so it should be rare).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath

from shoptalk.models.catalog import FimTemplate

PREFIX_LINE_STEP = 8
PREFIX_STEP_CHARS = 1500  # one PREFIX_LINE_STEP of lines per this much budget


def prefix_line_step(max_chars: int) -> int:
    """Lines between the starts a prefix of `max_chars` may have: the prompt
    averages ~80% of its budget and moves about once every 30 lines typed at
    6,000 characters, instead of every 8."""
    return PREFIX_LINE_STEP * max(1, max_chars // PREFIX_STEP_CHARS)


# Default context sizes in characters (~3.5 characters per token for code).
DEFAULT_PREFIX_CHARS = 1600
DEFAULT_SUFFIX_CHARS = 400


@dataclass(frozen=True)
class PromptParts:
    """What the model is shown: the clipped prefix and suffix around the
    cursor, the repository context block (`shoptalk.models.context`; "" when
    off) and the file's path (named in the prompt when there is context)."""

    prefix: str
    suffix: str
    context: str = ""
    path: str | None = None


@dataclass(frozen=True)
class PromptPlan:
    """A prompt split at the cursor, in the order the model reads it:
    `lead` and `trail` are tokenized with special tokens parsed (FIM
    markers), `context` (repository context, the code after the cursor for
    bases without FIM, the file's header) and `prefix` as plain text; token
    healing backs off the end of `prefix`. `context` comes first and changes
    rarely, so the KV cache keeps it while the user types."""

    lead: str
    prefix: str
    trail: str
    end_markers: tuple[str, ...]  # texts that end the answer (FIM end token)
    context: str = ""

    def text(self) -> str:
        """The whole prompt as one string (what training and evaluation use)."""
        return self.lead + self.context + self.prefix + self.trail


def clip_prefix(prefix: str, max_chars: int) -> str:
    """The tail of `prefix` of at most `max_chars` characters, starting at the
    beginning of a line whose number is a multiple of `prefix_line_step`
    (counted from the start of the document), so the cut is stable while the
    user types near the cursor. A single line longer than the budget is cut
    mid-line as a last resort."""
    if len(prefix) <= max_chars:
        return prefix
    step = prefix_line_step(max_chars)
    earliest = len(prefix) - max_chars
    line_starts = [0]
    pos = prefix.find("\n")
    while pos != -1:
        line_starts.append(pos + 1)
        pos = prefix.find("\n", pos + 1)
    for index, start in enumerate(line_starts):
        if start >= earliest and index % step == 0:
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


# ---- file headers and the code after the cursor for prefix-only bases ----------

# Line-comment marker by file suffix (anything else: `//`).
_HASH_COMMENT = frozenset(
    {".py", ".pyi", ".sh", ".bash", ".rb", ".pl", ".r", ".toml", ".yaml", ".yml", ".ex", ".exs"}
)
_DASH_COMMENT = frozenset({".lua", ".sql", ".hs", ".elm"})


def comment_marker(path: str) -> str:
    """The line-comment marker of a file's language (`#`, `--` or `//`)."""
    suffix = PurePosixPath(path).suffix.lower()
    if suffix in _HASH_COMMENT:
        return "#"
    if suffix in _DASH_COMMENT:
        return "--"
    return "//"


def file_header(path: str) -> str:
    """The line that names a file in a prompt (`# billing/taxes.py`), as code
    models see files concatenated in pre-training."""
    return f"{comment_marker(path)} {path}\n"


# Where the code after the cursor goes: `fim` (the base's FIM template),
# `before` (for bases without FIM: in plain text ahead of the code before
# the cursor), `none` (not shown); `auto` = fim for FIM models, else
# AUTO_PLAIN_LAYOUT.
SUFFIX_LAYOUTS = ("auto", "fim", "before", "none")
AUTO_PLAIN_LAYOUT = "before"


def resolve_suffix_layout(setting: str, use_fim: bool) -> str:
    """The layout a prompt uses: `fim`, `before` or `none`."""
    if setting == "auto":
        return "fim" if use_fim else AUTO_PLAIN_LAYOUT
    if setting not in SUFFIX_LAYOUTS:
        raise ValueError(f"unknown suffix layout {setting!r}; use one of {SUFFIX_LAYOUTS}")
    return setting


def suffix_block(suffix: str, path: str | None) -> str:
    """The code after the cursor's line, shown before the prefix to a model
    without FIM: the file's header marked `(later in this file)`, then the
    lines themselves as plain code (no comment markers, so the model reads
    them as code), then a blank line. The rest of the cursor's line is left
    out: typing never changes the block, and the post-filter already trims
    closing characters the line has. Empty when nothing follows.

    Default base, 60 lines of ShopTalk's own code (unseen by the base), 1,600
    characters before the cursor: no suffix 13.3% exact match, this header
    16.7%, `(the code that follows)` 13.3%: within noise, no worse."""
    newline = suffix.find("\n")
    following = suffix[newline + 1 :] if newline != -1 else ""
    if not following.strip():
        return ""
    name = path or "this file"
    marker = comment_marker(path or "")
    body = following if following.endswith("\n") else following + "\n"
    return f"{marker} {name} (later in this file)\n{body}\n"


def fim_prompt(template: FimTemplate, prefix: str, suffix: str) -> str:
    """PSM fill-in-the-middle prompt; the model's answer follows it, then `template.end`."""
    return f"{template.prefix}{prefix}{template.suffix}{suffix}{template.middle}"


def prefix_prompt(prefix: str) -> str:
    """Prompt for a base that was never trained on FIM: the code before the cursor."""
    return prefix


def layout_prompt(template: FimTemplate, parts: PromptParts, layout: str) -> PromptPlan:
    """The prompt of clipped `parts` in a resolved suffix layout (`fim`,
    `before`, `none`; see `resolve_suffix_layout`): [context block][code after
    the cursor, `before` only][file header][prefix], inside the FIM template
    for `fim`. With no context and no block this is exactly the plain FIM or
    prefix-only prompt."""
    block = suffix_block(parts.suffix, parts.path) if layout == "before" else ""
    context = parts.context + block
    if context and parts.path:
        context += file_header(parts.path)
    if layout == "fim":
        return PromptPlan(
            lead=template.prefix,
            prefix=parts.prefix,
            trail=f"{template.suffix}{parts.suffix}{template.middle}",
            end_markers=(template.end,),
            context=context,
        )
    return PromptPlan(lead="", prefix=parts.prefix, trail="", end_markers=(), context=context)


def completion_prompt(
    template: FimTemplate, parts: PromptParts, use_fim: bool, suffix_layout: str = "auto"
) -> str:
    """The prompt string of `parts` (training and evaluation); the server
    builds the same through `layout_prompt`."""
    layout = resolve_suffix_layout(suffix_layout, use_fim)
    return layout_prompt(template, parts, layout).text()


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
