"""The completion engine: from a document and a cursor to a suggestion.

Pure of pygls so that evaluation can run exactly the serving path:
`CompletionEngine.complete(text, offset)` clips the context with the shared
prompt builder (`shoptalk.models.prompt`), asks a backend
(`shoptalk.models.backends`) for a healed generation that stops at the end of
the line or block, and post-filters it. Recent suggestions that still match
what the user typed since are answered from a small cache.

With a workspace (`shoptalk.models.context`) the prompt starts with a
repository context block that stays put while the user types on a line; the
copy channel offers continuations found verbatim in the repository when the
model scores them above its own answer; an answer the time budget cut is not
shown (the backend goes on from it on the next request for the same prompt).

While the whole prompt is not read yet (a file just opened, a context block
that moved) and reading the rest would take more than half the budget, the
answer comes from a quick prompt, the last lines before the cursor, kept in
its own slot of the backend's KV cache; the whole prompt fills in between
requests (`prefill`) and answers again once it is read.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from shoptalk.models.catalog import FimTemplate
from shoptalk.models.context import (
    CONTEXT_SOURCES,
    ContextOptions,
    Workspace,
    build_context,
    context_anchor,
    copy_candidates,
)
from shoptalk.models.prompt import (
    PromptParts,
    PromptPlan,
    clip_context,
    layout_prompt,
    prefix_line_step,
    resolve_suffix_layout,
)

log = logging.getLogger(__name__)

Multiline = Literal["auto", "always", "never"]
PromptSlot = Literal["main", "quick"]
MAX_BLOCK_LINES = 8
CACHE_SIZE = 16
CACHE_PREFIX_TAIL = 4000  # characters of the prefix a cache entry remembers


@dataclass(frozen=True)
class GenerationRequest:
    plan: PromptPlan
    max_tokens: int
    deadline: float  # time.monotonic() after which generation stops
    heal: bool = True
    # Given the text generated so far, where the suggestion ends (None: go on).
    stop_at: Callable[[str], int | None] | None = None
    # Likely continuations (copy candidates): checked in one batch against
    # greedy decoding, which keeps the tokens that match (lookup decoding).
    drafts: tuple[str, ...] = ()
    # Where the prompt's tokens are cached: the whole prompt ("main") or the
    # short one answered from while the whole one is being read ("quick").
    slot: PromptSlot = "main"


StopReason = Literal["stop", "end", "budget", "max_tokens", "cancelled", "error"]


@dataclass(frozen=True)
class Generation:
    text: str  # the suggestion (healed text already stripped)
    stop_reason: StopReason
    prompt_tokens: int = 0
    evaluated_tokens: int = 0  # prompt tokens that were not in the KV cache
    generated_tokens: int = 0
    healed: str = ""  # the text backed off at the boundary and regenerated
    elapsed_s: float = 0.0
    drafted_tokens: int = 0  # generated tokens taken from a draft (checked in one batch)


@dataclass(frozen=True)
class ContinuationScore:
    """Sum of the token log-probabilities of a continuation, and its tokens."""

    logprob: float
    tokens: int

    @property
    def mean(self) -> float:
        return self.logprob / self.tokens if self.tokens else float("-inf")


class Backend(Protocol):
    """What the engine needs from a model: llama.cpp in-process or an
    OpenAI-compatible server (`shoptalk.models.backends`)."""

    def generate(
        self, request: GenerationRequest, cancelled: threading.Event | None = None
    ) -> Generation: ...

    def prefill(
        self, plan: PromptPlan, cancelled: threading.Event | None = None, slot: str = "main"
    ) -> int: ...

    def score(
        self, plan: PromptPlan, continuation: str, slot: str = "main"
    ) -> ContinuationScore | None:
        """The model's log-probability of `continuation` right after the
        prompt (healed as generation heals it); None when the backend cannot
        score (the copy channel is then off)."""
        ...

    def pending_tokens(self, plan: PromptPlan, slot: str = "main") -> int | None:
        """Prompt tokens of `plan` not in `slot`'s cache (what a request would
        read before answering); None when the backend keeps no such slot."""
        ...

    @property
    def prompt_ms_per_token(self) -> float | None:
        """How long reading one prompt token takes here (None: not known)."""
        ...

    def describe(self) -> dict[str, object]: ...

    def close(self) -> None: ...


# ---- positions --------------------------------------------------------------


def utf16_to_offset(text: str, line: int, character: int) -> int:
    """The string index of an LSP position (UTF-16 code units), clamped to the
    document: a line past the end means the end, a column past the line's end
    means the line's end."""
    if line < 0:
        return 0
    start = 0
    for _ in range(line):
        next_newline = text.find("\n", start)
        if next_newline == -1:
            return len(text)
        start = next_newline + 1
    end = text.find("\n", start)
    if end == -1:
        end = len(text)
    if character <= 0:
        return start
    units = 0
    index = start
    while index < end and units < character:
        units += 2 if ord(text[index]) > 0xFFFF else 1
        index += 1
    return index


def offset_to_utf16(text: str, offset: int) -> tuple[int, int]:
    """The LSP (line, character) of a string index."""
    offset = max(0, min(offset, len(text)))
    line = text.count("\n", 0, offset)
    line_start = text.rfind("\n", 0, offset) + 1
    chars = text[line_start:offset]
    return line, sum(2 if ord(c) > 0xFFFF else 1 for c in chars)


# ---- prompts ------------------------------------------------------------------


def _line_offset(text: str, line: int) -> int:
    """The offset where line `line` (0-based) of `text` starts."""
    position = -1
    for _ in range(line):
        position = text.find("\n", position + 1)
    return position + 1


def stable_tail(prefix: str, max_chars: int) -> str:
    """A tail of `prefix` on which `clip_prefix` cuts exactly where it cuts the
    whole prefix (it starts at a line whose number is a multiple of
    `prefix_line_step`, well before the budget), so a huge document costs no
    more than a small one."""
    if len(prefix) <= 4 * max_chars:
        return prefix
    window_start = len(prefix) - 2 * max_chars
    line_index = prefix.count("\n", 0, window_start)
    steps_back = line_index % prefix_line_step(max_chars)
    position = prefix.rfind("\n", 0, window_start)
    for _ in range(steps_back):
        if position == -1:
            break
        position = prefix.rfind("\n", 0, position)
    return prefix[position + 1 :]


def plan_prompt(
    template: FimTemplate,
    prefix: str,
    suffix: str,
    use_fim: bool,
    prefix_chars: int,
    suffix_chars: int,
    *,
    layout: str | None = None,
    context: str = "",
    path: str | None = None,
) -> PromptPlan:
    """The prompt for a cursor between `prefix` and `suffix`, clipped exactly as
    mining clips instances (`clip_context`) so the model sees what it was trained
    on, laid out by the shared builder (`layout_prompt`; `layout` None: FIM when
    `use_fim`, else prefix only). The clipped prefix starts at a stable line and
    `context` comes first, so the KV cache is reused while the user types."""
    parts = clip_context(stable_tail(prefix, prefix_chars), suffix, prefix_chars, suffix_chars)
    resolved = layout or ("fim" if use_fim else "none")
    return layout_prompt(template, PromptParts(parts.prefix, parts.suffix, context, path), resolved)


# ---- where a suggestion ends --------------------------------------------------


def rest_of_line(suffix: str) -> str:
    newline = suffix.find("\n")
    return suffix if newline == -1 else suffix[:newline]


def allows_multiline(prefix: str, suffix: str, mode: Multiline) -> bool:
    """Several lines only on an empty line: nothing after the cursor and only
    indentation before it (after Enter, or at the start of a block). Typing
    at the end of a line that has code gets the rest of that line: it is what
    the user is writing, and it keeps keystroke latency low."""
    if mode == "never":
        return False
    if mode == "always":
        return True
    line_start = prefix[prefix.rfind("\n") + 1 :]
    return rest_of_line(suffix).strip() == "" and line_start.strip() == ""


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" \t"))


def stop_rule(prefix: str, multiline: bool) -> Callable[[str], int | None]:
    """Where generated text ends: at the end of the line, or (multi-line) at a
    blank line, a line indented less than the block the cursor is in, or
    after MAX_BLOCK_LINES lines."""
    current_line = prefix[prefix.rfind("\n") + 1 :]
    if current_line.strip():
        block_indent = _indent(current_line)
    else:
        # On an empty line the block is the one the previous code line opened.
        previous = [line for line in prefix.split("\n")[:-1] if line.strip()]
        block_indent = _indent(previous[-1]) if previous else 0
        if previous and previous[-1].rstrip().endswith((":", "{", "(", "[")):
            block_indent += 1

    def stop(text: str) -> int | None:
        first_newline = text.find("\n")
        if first_newline == -1:
            return None
        if not multiline:
            return first_newline
        # The first line ends where the cursor's line ends; later lines are whole lines.
        lines = text.split("\n")
        offset = len(lines[0]) + 1
        complete = lines[1:-1]  # the last piece may still be growing
        for index, line in enumerate(complete):
            if not line.strip():
                return offset - 1
            if _indent(line) < block_indent:
                return offset - 1
            if index + 2 > MAX_BLOCK_LINES:
                return offset - 1
            offset += len(line) + 1
        return None

    return stop


def finish_text(text: str, stop: Callable[[str], int | None]) -> str:
    """`text` cut where `stop` says (for generations that ended for another reason)."""
    cut = stop(text)
    return text if cut is None else text[:cut]


# ---- post-filters -----------------------------------------------------------


def postfilter(suggestion: str, prefix: str, suffix: str) -> str:
    """The suggestion, or "" when it is not worth showing: whitespace only, a
    repeat of the code after the cursor or of the line above. Lines that repeat
    an earlier line of the suggestion (a looping model) are cut, and closing
    characters the line already has after the cursor are trimmed."""
    text = suggestion.rstrip()
    if not text.strip():
        return ""
    lines = text.split("\n")
    kept: list[str] = []
    seen: set[str] = set()
    for line in lines:
        stripped = line.strip()
        if stripped and stripped in seen:
            break
        if stripped:
            seen.add(stripped)
        kept.append(line)
    text = "\n".join(kept).rstrip()
    prefix_lines = prefix.split("\n")
    cursor_line = prefix_lines[-1]
    above = next((line.strip() for line in reversed(prefix_lines[:-1]) if line.strip()), "")
    if not cursor_line.strip() and text.split("\n")[0].strip() == above:
        return ""
    line_rest = rest_of_line(suffix)
    if line_rest.strip():
        if text.strip() == line_rest.strip():
            return ""
        for size in range(min(len(line_rest), len(text)), 0, -1):
            overlap = line_rest[:size]
            if overlap.strip() and text.endswith(overlap):
                text = text[:-size]
                break
    following = next((line.strip() for line in suffix.split("\n")[1:] if line.strip()), "")
    if "\n" in text and following:
        body, _, last_line = text.rpartition("\n")
        if last_line.strip() == following:
            text = body.rstrip()
    return text if text.strip() else ""


# ---- the cache of recent suggestions ----------------------------------------


@dataclass(frozen=True)
class _CacheEntry:
    prefix_len: int
    prefix_tail: str
    line_rest: str
    suggestion: str


class SuggestionCache:
    """Recent suggestions, answered again while what the user types since
    matches them (typing the suggestion's first characters costs no inference)."""

    def __init__(self, size: int = CACHE_SIZE) -> None:
        self._entries: deque[_CacheEntry] = deque(maxlen=size)
        self._lock = threading.Lock()

    def put(self, prefix: str, suffix: str, suggestion: str) -> None:
        if not suggestion:
            return
        entry = _CacheEntry(
            len(prefix), prefix[-CACHE_PREFIX_TAIL:], rest_of_line(suffix), suggestion
        )
        with self._lock:
            self._entries.append(entry)

    def get(self, prefix: str, suffix: str) -> str | None:
        line_rest = rest_of_line(suffix)
        with self._lock:
            entries = list(reversed(self._entries))
        for entry in entries:
            typed_len = len(prefix) - entry.prefix_len
            if typed_len < 0 or typed_len >= len(entry.suggestion):
                continue
            if entry.line_rest != line_rest:
                continue
            typed = prefix[entry.prefix_len :]
            if not entry.suggestion.startswith(typed):
                continue
            tail_start = entry.prefix_len - len(entry.prefix_tail)
            if not prefix.startswith(entry.prefix_tail, tail_start):
                continue
            rest = entry.suggestion[typed_len:]
            if rest.strip():
                return rest
        return None

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


# ---- the engine -------------------------------------------------------------

# Characters per prompt token assumed when sizing llama.cpp's context: code
# runs ~3.5 on the default base's tokenizer; 3 leaves room for dense code.
CHARS_PER_TOKEN = 3.0
CONTEXT_TOKEN_MARGIN = 64
# A copied line shown when the model's answer is empty must be this likely
# per token on average (about 0.37).
COPY_MIN_MEAN_LOGPROB = -1.0
# The quick prompt (issue 19: the first request after opening a file within
# 1 s). When the KV cache lacks so much of the whole prompt (context block,
# code after the cursor, 6,000 characters before it: ~2,900 tokens, ~7 s at
# ~2.4 ms per token on two cores) that reading the rest would take more than
# READ_SHARE of the request's budget, the answer comes from the last
# QUICK_PREFIX_CHARS before the cursor alone (~350 tokens), cached in its own
# slot, while the whole prompt keeps filling between requests; once it is
# read, requests answer from it again (the same prompt as always).
QUICK_PREFIX_CHARS = 1200
QUICK_SUFFIX_CHARS = 200  # FIM bases keep a little of the code after the cursor
READ_SHARE = 0.5


@dataclass(frozen=True)
class EngineOptions:
    """The serve settings the engine reads (`ServeSettings` has them all)."""

    max_tokens: int = 48
    max_latency_ms: int = 1500
    multiline: Multiline = "auto"
    prefix_chars: int = 1600
    suffix_chars: int = 400
    heal: bool = True
    suffix_layout: str = "auto"  # auto | fim | before | none (shoptalk.models.prompt)
    context_chars: int = 0  # repository context budget; 0 = off
    context_sources: tuple[str, ...] = CONTEXT_SOURCES
    copy_channel: bool = False


def needed_context_tokens(options: EngineOptions) -> int:
    """The llama.cpp context (tokens) the prompt budgets of `options` need:
    prefix, suffix and repository context at CHARS_PER_TOKEN, the answer, and
    a margin for headers and special tokens."""
    chars = options.prefix_chars + options.suffix_chars + options.context_chars
    return math.ceil(chars / CHARS_PER_TOKEN) + options.max_tokens + CONTEXT_TOKEN_MARGIN


def complete_lines(text: str) -> str:
    """The whole lines of a cut-off generation: a line the time budget cut is
    not a suggestion (issue 19: a lone `[` was shown under load)."""
    newline = text.rfind("\n")
    return text[:newline] if newline != -1 else ""


@dataclass(frozen=True)
class Suggestion:
    text: str
    source: Literal["model", "cache", "copy", "none"]
    generation: Generation | None = None
    elapsed_s: float = 0.0
    slot: PromptSlot = "main"  # "quick": answered before the whole prompt was read


class CompletionEngine:
    """Suggestions for a cursor in a document, from one backend.

    With a `Workspace` (and `context_chars` > 0) the prompt starts with the
    repository context block, computed again only when the cursor moves to
    another line or on `prefill` (idle, cursor rests), never while the user
    types on a line, so llama.cpp's KV cache keeps it. With `copy_channel`
    on, continuations found verbatim in the document and the workspace are
    scored by the model on its cached prompt and replace its answer when the
    model finds them more likely per token."""

    def __init__(
        self,
        backend: Backend,
        template: FimTemplate,
        use_fim: bool,
        options: EngineOptions | None = None,
    ) -> None:
        self.backend = backend
        self.template = template
        self.use_fim = use_fim
        self.options = options or EngineOptions()
        self.cache = SuggestionCache()
        self.last_plan: PromptPlan | None = None  # what the model saw last (debugging, tests)
        self._context_lock = threading.Lock()
        self._context_key: tuple[object, ...] | None = None
        self._context_block = ""

    @property
    def layout(self) -> str:
        """Where the code after the cursor goes: fim, before or none."""
        return resolve_suffix_layout(self.options.suffix_layout, self.use_fim)

    def context_options(self) -> ContextOptions:
        shows_suffix = self.layout in ("fim", "before")
        return ContextOptions(
            chars=self.options.context_chars,
            sources=self.options.context_sources,
            prefix_chars=self.options.prefix_chars,
            suffix_chars=self.options.suffix_chars if shows_suffix else 0,
        )

    def context_block(
        self,
        text: str,
        offset: int,
        path: str | None,
        workspace: Workspace | None,
        refresh: bool = False,
    ) -> str:
        """The repository context for this cursor: the block built for the
        first cursor of its stretch of lines (`context_anchor`), kept while
        the user types in that stretch and the text above it is unchanged,
        unless `refresh` asks for a new one. The block comes first in the
        prompt, so each change means reading the whole prompt again (seconds
        on a laptop CPU); built for every new line, it changed on every
        Enter. New index content reaches it in the next stretch."""
        if workspace is None or self.options.context_chars <= 0:
            return ""
        head = text[: text.rfind("\n", 0, offset) + 1]
        anchor = context_anchor(head)
        above = head[: _line_offset(head, anchor)]
        key = (id(workspace), path, anchor, hash(above), self.context_options())
        with self._context_lock:
            if not refresh and key == self._context_key:
                return self._context_block
        block = build_context(workspace, path, text[:offset], text[offset:], key[-1])
        with self._context_lock:
            self._context_key, self._context_block = key, block
        return block

    def plan(
        self,
        text: str,
        offset: int,
        path: str | None = None,
        workspace: Workspace | None = None,
        refresh: bool = False,
    ) -> PromptPlan:
        offset = max(0, min(offset, len(text)))
        return plan_prompt(
            self.template,
            text[:offset],
            text[offset:],
            self.use_fim,
            self.options.prefix_chars,
            self.options.suffix_chars,
            layout=self.layout,
            context=self.context_block(text, offset, path, workspace, refresh),
            path=path,
        )

    def quick_plan(self, text: str, offset: int, path: str | None = None) -> PromptPlan:
        """The short prompt answered from while the whole one is being read:
        the last QUICK_PREFIX_CHARS before the cursor (FIM bases: and a little
        after it), no repository context."""
        offset = max(0, min(offset, len(text)))
        return plan_prompt(
            self.template,
            text[:offset],
            text[offset:],
            self.use_fim,
            min(QUICK_PREFIX_CHARS, self.options.prefix_chars),
            min(QUICK_SUFFIX_CHARS, self.options.suffix_chars),
            layout="fim" if self.layout == "fim" else "none",
            path=path,
        )

    def prompts(
        self,
        text: str,
        offset: int,
        path: str | None = None,
        workspace: Workspace | None = None,
        budget_ms: int | None = None,
    ) -> tuple[PromptPlan, PromptPlan | None]:
        """The whole prompt for this cursor, and the quick prompt to answer
        from instead (None: answer from the whole one). The quick one is
        chosen when reading what the cache lacks of the whole prompt would
        take more than READ_SHARE of the budget (at the backend's measured
        reading speed; before it has read anything, the whole prompt) and the
        quick one lacks less."""
        plan = self.plan(text, offset, path, workspace)
        pending = self.backend.pending_tokens(plan, "main")
        budget = budget_ms or self.options.max_latency_ms
        rate = self.backend.prompt_ms_per_token
        if pending is None or rate is None or pending * rate <= READ_SHARE * budget:
            return plan, None
        quick = self.quick_plan(text, offset, path)
        quick_pending = self.backend.pending_tokens(quick, "quick")
        if quick_pending is None or quick_pending >= pending:
            return plan, None
        return plan, quick

    def prefill(
        self,
        text: str,
        offset: int,
        cancelled: threading.Event | None = None,
        path: str | None = None,
        workspace: Workspace | None = None,
    ) -> int:
        """Evaluate the prompt for this cursor ahead of the first request, with
        the context its stretch of lines gets (stops early, keeping what it
        evaluated, when `cancelled` is set). When a request could not read
        the rest of it in time, the quick prompt is read first, so a request
        that comes meanwhile answers from it; then the whole one goes on."""
        started = time.monotonic()
        plan, quick = self.prompts(text, offset, path, workspace)
        quick_read = whole_read = 0
        if quick is not None:
            quick_read = self.backend.prefill(quick, cancelled, "quick")
        if quick is None or cancelled is None or not cancelled.is_set():
            whole_read = self.backend.prefill(plan, cancelled)
        log.debug(
            "prefill: %d quick + %d whole prompt tokens read in %.0f ms%s",
            quick_read,
            whole_read,
            (time.monotonic() - started) * 1000,
            " (interrupted)" if cancelled is not None and cancelled.is_set() else "",
        )
        return quick_read + whole_read

    def complete(
        self,
        text: str,
        offset: int,
        cancelled: threading.Event | None = None,
        budget_ms: int | None = None,
        use_cache: bool = True,
        path: str | None = None,
        workspace: Workspace | None = None,
    ) -> Suggestion:
        """The suggestion at `offset` of `text`; `path` (POSIX, relative to the
        workspace root) and `workspace` give the repository context."""
        started = time.monotonic()
        offset = max(0, min(offset, len(text)))
        prefix, suffix = text[:offset], text[offset:]
        if use_cache:
            cached = self.cache.get(prefix, suffix)
            if cached is not None:
                return Suggestion(cached, "cache", None, time.monotonic() - started)
        budget = (budget_ms or self.options.max_latency_ms) / 1000.0
        whole, quick = self.prompts(text, offset, path, workspace, budget_ms)
        plan = quick or whole
        slot: PromptSlot = "quick" if quick is not None else "main"
        self.last_plan = plan
        # A quick answer is one line: a block of 48 tokens took 3 s to
        # generate on a busy 2-core machine (0.6 s quiet); the whole prompt,
        # read meanwhile, gives the block on the next request.
        multiline = slot == "main" and allows_multiline(prefix, suffix, self.options.multiline)
        stop = stop_rule(prefix, multiline)
        candidates = (
            copy_candidates(workspace, path, prefix, suffix) if self.options.copy_channel else []
        )
        request = GenerationRequest(
            plan=plan,
            max_tokens=self.options.max_tokens,
            deadline=started + budget,
            heal=self.options.heal,
            stop_at=stop,
            drafts=tuple(candidates[:1]),
            slot=slot,
        )
        generation = self.backend.generate(request, cancelled)
        if generation.stop_reason == "cancelled":
            return Suggestion("", "none", generation, time.monotonic() - started, slot)
        answer = finish_text(generation.text, stop)
        if generation.stop_reason == "budget":
            answer = complete_lines(answer)
        suggestion = postfilter(answer, prefix, suffix)
        source: Literal["model", "copy"] = "model"
        # A quick answer is there to be fast: its candidates served as drafts
        # only (scoring them costs a batch each, ~0.1-0.5 s on a busy CPU).
        if candidates and generation.stop_reason != "budget" and slot == "main":
            # The budget bounds the answer, not the reading of the prompt (see the
            # backend): scoring the candidates gets it from when the answer was
            # ready, so a first request on a newly opened file still scores them.
            answered_at = started + generation.elapsed_s
            deadline = max(request.deadline, answered_at + budget)
            copied = self._copy_choice(plan, slot, answer, candidates, deadline, cancelled)
            copied = postfilter(copied, prefix, suffix) if copied else ""
            if copied:
                suggestion, source = copied, "copy"
        log.debug(
            "completion (%s prompt): %s after %d generated / %d evaluated of %d prompt "
            "tokens in %.0f ms",
            slot,
            generation.stop_reason,
            generation.generated_tokens,
            generation.evaluated_tokens,
            generation.prompt_tokens,
            generation.elapsed_s * 1000,
        )
        if suggestion and generation.stop_reason in ("stop", "end"):
            # Only whole lines are worth serving again; a budget cut is partial.
            self.cache.put(prefix, suffix, suggestion)
        return Suggestion(
            suggestion,
            source if suggestion else "none",
            generation,
            time.monotonic() - started,
            slot,
        )

    def _copy_choice(
        self,
        plan: PromptPlan,
        slot: PromptSlot,
        answer: str,
        candidates: list[str],
        deadline: float,
        cancelled: threading.Event | None,
    ) -> str:
        """The candidate the model finds more likely per token than its own
        answer's first line (or, with no answer, likely enough), else ""."""
        first_line = answer.split("\n", 1)[0]
        best: float | None = None
        if first_line.strip():
            own = self.backend.score(plan, first_line, slot) if candidates else None
            if own is None:
                return ""  # nothing to compare, or a backend that cannot score
            best = own.mean
        chosen = ""
        for candidate in candidates:
            if time.monotonic() > deadline or (cancelled is not None and cancelled.is_set()):
                break
            if candidate == first_line:
                continue
            scored = self.backend.score(plan, candidate, slot)
            if scored is None:
                return ""
            floor = COPY_MIN_MEAN_LOGPROB if best is None else best
            if scored.mean > floor:
                best, chosen = scored.mean, candidate
        return chosen
