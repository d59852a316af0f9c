"""The completion engine: from a document and a cursor to a suggestion.

Pure of pygls so that evaluation can run exactly the serving path:
`CompletionEngine.complete(text, offset)` clips the context with the shared
prompt builder (`shoptalk.models.prompt`), asks a backend
(`shoptalk.models.backends`) for a healed generation that stops at the end of
the line or block, and post-filters it. Recent suggestions that still match
what the user typed since are answered from a small cache.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from shoptalk.models.catalog import FimTemplate
from shoptalk.models.prompt import PREFIX_LINE_STEP, clip_context

log = logging.getLogger(__name__)

Multiline = Literal["auto", "always", "never"]
MAX_BLOCK_LINES = 8
CACHE_SIZE = 16
CACHE_PREFIX_TAIL = 4000  # characters of the prefix a cache entry remembers


@dataclass(frozen=True)
class PromptPlan:
    """A prompt split at the cursor. The backend tokenizes `lead` and `trail`
    with special tokens parsed (FIM markers) and `prefix` as plain text; token
    healing backs off the end of `prefix`."""

    lead: str
    prefix: str
    trail: str
    end_markers: tuple[str, ...]  # texts that end the answer (FIM end token)


@dataclass(frozen=True)
class GenerationRequest:
    plan: PromptPlan
    max_tokens: int
    deadline: float  # time.monotonic() after which generation stops
    heal: bool = True
    # Given the text generated so far, where the suggestion ends (None: go on).
    stop_at: Callable[[str], int | None] | None = None


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


class Backend(Protocol):
    """What the engine needs from a model: llama.cpp in-process or an
    OpenAI-compatible server (`shoptalk.models.backends`)."""

    def generate(
        self, request: GenerationRequest, cancelled: threading.Event | None = None
    ) -> Generation: ...

    def prefill(self, plan: PromptPlan, cancelled: threading.Event | None = None) -> int: ...

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


def stable_tail(prefix: str, max_chars: int) -> str:
    """A tail of `prefix` on which `clip_prefix` cuts exactly where it cuts the
    whole prefix (it starts at a line whose number is a multiple of
    PREFIX_LINE_STEP, well before the budget), so a huge document costs no
    more than a small one."""
    if len(prefix) <= 4 * max_chars:
        return prefix
    window_start = len(prefix) - 2 * max_chars
    line_index = prefix.count("\n", 0, window_start)
    steps_back = line_index % PREFIX_LINE_STEP
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
) -> PromptPlan:
    """The prompt for a cursor between `prefix` and `suffix`, clipped exactly as
    mining clips instances (`clip_context`) so the model sees what it was trained
    on. The clipped prefix starts at a stable line, so the KV cache is reused
    while the user types."""
    parts = clip_context(stable_tail(prefix, prefix_chars), suffix, prefix_chars, suffix_chars)
    if use_fim:
        return PromptPlan(
            lead=template.prefix,
            prefix=parts.prefix,
            trail=f"{template.suffix}{parts.suffix}{template.middle}",
            end_markers=(template.end,),
        )
    return PromptPlan(lead="", prefix=parts.prefix, trail="", end_markers=())


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


@dataclass(frozen=True)
class EngineOptions:
    """The serve settings the engine reads (`ServeSettings` has them all)."""

    max_tokens: int = 48
    max_latency_ms: int = 1500
    multiline: Multiline = "auto"
    prefix_chars: int = 1600
    suffix_chars: int = 400
    heal: bool = True


@dataclass(frozen=True)
class Suggestion:
    text: str
    source: Literal["model", "cache", "none"]
    generation: Generation | None = None
    elapsed_s: float = 0.0


class CompletionEngine:
    """Suggestions for a cursor in a document, from one backend."""

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

    def plan(self, text: str, offset: int) -> PromptPlan:
        offset = max(0, min(offset, len(text)))
        return plan_prompt(
            self.template,
            text[:offset],
            text[offset:],
            self.use_fim,
            self.options.prefix_chars,
            self.options.suffix_chars,
        )

    def prefill(self, text: str, offset: int, cancelled: threading.Event | None = None) -> int:
        """Evaluate the prompt for this cursor ahead of the first request (stops
        early, keeping what it evaluated, when `cancelled` is set)."""
        return self.backend.prefill(self.plan(text, offset), cancelled)

    def complete(
        self,
        text: str,
        offset: int,
        cancelled: threading.Event | None = None,
        budget_ms: int | None = None,
        use_cache: bool = True,
    ) -> Suggestion:
        started = time.monotonic()
        offset = max(0, min(offset, len(text)))
        prefix, suffix = text[:offset], text[offset:]
        if use_cache:
            cached = self.cache.get(prefix, suffix)
            if cached is not None:
                return Suggestion(cached, "cache", None, time.monotonic() - started)
        multiline = allows_multiline(prefix, suffix, self.options.multiline)
        stop = stop_rule(prefix, multiline)
        budget = (budget_ms or self.options.max_latency_ms) / 1000.0
        request = GenerationRequest(
            plan=self.plan(text, offset),
            max_tokens=self.options.max_tokens,
            deadline=started + budget,
            heal=self.options.heal,
            stop_at=stop,
        )
        generation = self.backend.generate(request, cancelled)
        if generation.stop_reason == "cancelled":
            return Suggestion("", "none", generation, time.monotonic() - started)
        suggestion = postfilter(finish_text(generation.text, stop), prefix, suffix)
        log.debug(
            "completion: %s after %d generated / %d evaluated of %d prompt tokens in %.0f ms",
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
            suggestion, "model" if suggestion else "none", generation, time.monotonic() - started
        )
