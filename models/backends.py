"""Model backends of the completion engine.

- `LlamaBackend`: llama.cpp in-process (llama-cpp-python). Keeps the KV cache
  across requests (only the tokens after the longest common prefix with the
  previous prompt are evaluated), heals the prompt boundary on tokens (the
  last prompt token is backed off and the first generated tokens are
  constrained to start with its text), stops as soon as the engine's stop
  rule says the line or block is complete, and honours a deadline and a
  cancel flag between tokens. A generation the deadline cut is kept and
  continued by the next request for the same prompt. `score` gives the
  log-probability of a given continuation (the copy channel), evaluated in
  one batch on the cached prompt. The KV cache holds two sequences: the
  whole prompt (`main`) and the engine's quick prompt (`quick`), so reading
  one never evicts the other.
- `OpenAIBackend`: any OpenAI-compatible `/v1/completions` server
  (llama-cpp-python's server, vLLM), streamed so that the same stop rule,
  deadline and cancel apply; the boundary is healed on characters with a
  grammar (llama.cpp servers) and checked on the answer.

Both implement `shoptalk.models.completion.Backend`.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import http.client
import json
import logging
import os
import re
import threading
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from shoptalk.models.completion import (
    ContinuationScore,
    Generation,
    GenerationRequest,
    PromptPlan,
    StopReason,
)
from shoptalk.models.errors import ShopTalkError

log = logging.getLogger(__name__)


class BackendError(ShopTalkError):
    """A model could not be loaded or a completion server could not be used."""


# ---- token healing on a vocabulary -----------------------------------------------


def _successor(prefix: bytes) -> bytes | None:
    """The smallest byte string greater than every string starting with `prefix`."""
    trimmed = prefix.rstrip(b"\xff")
    if not trimmed:
        return None
    return trimmed[:-1] + bytes([trimmed[-1] + 1])


class VocabPieces:
    """The text (bytes) of every token, indexed for token healing: which tokens
    may come next when the generated text must begin with some bytes.

    One sorted list of the non-empty pieces (and their ids, numpy) answers
    both questions by bisection; a dict of token lists per piece cost ~40 MB
    more on a 262k vocabulary (the default base) for the same answers."""

    def __init__(self, pieces: Sequence[bytes]) -> None:
        import numpy as np

        self.pieces = list(pieces)
        # Control tokens have no text: they can never stand for typed text.
        order = sorted((t for t, p in enumerate(self.pieces) if p), key=self.pieces.__getitem__)
        self._sorted = [self.pieces[i] for i in order]
        self._sorted_ids = np.asarray(order, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.pieces)

    def _exact(self, piece: bytes) -> Any:
        lo = bisect.bisect_left(self._sorted, piece)
        hi = bisect.bisect_right(self._sorted, piece, lo)
        return self._sorted_ids[lo:hi]

    def candidates(self, required: bytes) -> Any:
        """Ids (numpy int64) of the tokens that can start text beginning with
        `required`: tokens whose text starts with it, and non-empty tokens whose
        text is a proper prefix of it (healing then goes on with the rest)."""
        import numpy as np

        lo = bisect.bisect_left(self._sorted, required)
        upper = _successor(required)
        hi = len(self._sorted) if upper is None else bisect.bisect_left(self._sorted, upper)
        starting = self._sorted_ids[lo:hi]
        partial = [self._exact(required[:size]) for size in range(1, len(required))]
        partial = [ids for ids in partial if len(ids)]
        if not partial:
            return starting
        return np.concatenate([starting, *partial])


def heal_split(tokens: list[int], pieces: VocabPieces, text: bytes) -> tuple[list[int], bytes]:
    """Back off the last token of `tokens` (the tokenization of `text`): the
    tokens to keep and the bytes the generation must begin with."""
    if not tokens:
        return tokens, b""
    last = pieces.pieces[tokens[-1]] if tokens[-1] < len(pieces) else b""
    if not last or not text.endswith(last):
        return tokens, b""
    return tokens[:-1], last


def _valid_utf8_prefix(data: bytes) -> str:
    """The longest decodable prefix: a token may end inside a UTF-8 character."""
    for trim in range(0, 4):
        try:
            return data[: len(data) - trim].decode("utf-8")
        except UnicodeDecodeError:
            continue
    return data.decode("utf-8", errors="replace")


# ---- llama.cpp in-process -------------------------------------------------------


# Prompt tokens evaluated between two checks of the cancel flag and deadline.
EVAL_CHUNK = 64


def default_threads() -> int:
    """One llama.cpp thread per physical core this process may use.

    Hyper-threads share a core's arithmetic units, so llama-cpp-python's
    default is half the logical CPUs; where the CPUs are real cores that
    halves the speed (2-core machine, quiet: keystroke p95 220 ms with 2
    threads, 423 ms with 1; docs/benchmarks.md). On a machine whose cores are
    all busy, fewer threads than cores does better: set serve.threads."""
    try:
        logical = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        logical = os.cpu_count() or 1
    physical = _physical_cores()
    return max(1, min(logical, physical) if physical else logical // 2)


def _physical_cores() -> int | None:
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        count = psutil.cpu_count(logical=False)
        if count:
            return int(count)
    siblings = set()
    for path in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/topology/thread_siblings_list"):
        with contextlib.suppress(OSError):
            siblings.add(path.read_text().strip())
    return len(siblings) or None


def _log_softmax_at(logits: Any, token: int) -> float:
    import numpy as np

    top = float(np.max(logits))
    return float(logits[token]) - top - float(np.log(np.sum(np.exp(logits - top))))


@dataclass
class _Decoding:
    """A greedy generation in progress: the prompt it follows (in `slot`), the
    healed bytes it must start with (what is still `required`), its tokens
    and text."""

    prompt: list[int]
    healed: bytes
    required: bytes
    slot: str = "main"
    ids: list[int] = field(default_factory=list)
    out: bytes = b""
    text: str = ""
    drafted: int = 0  # tokens taken from a draft


# The quick prompt's KV cells (on top of `context_tokens`): ~1,200 characters
# of code (~350 tokens on the default base), the answer and a draft.
QUICK_SLOT_TOKENS = 512
# Tokens dropped at a time from a prompt longer than its slot.
OVERFLOW_STEP = 64
# Tokens evaluated per batch when every token's logits are read (scoring a
# copy candidate, checking a draft): each such token holds a full-vocabulary
# row (1 MB on a 262k vocabulary) in llama.cpp's output buffer, which keeps
# its largest size. Unchunked, three scored candidates added 34 MB to the
# server's RSS (issue 19's 600 MB target).
ROW_CHUNK = 8
# Prompt reading shorter than this says little about the speed (overheads).
SPEED_MIN_TOKENS = 16


@dataclass(frozen=True)
class LlamaOptions:
    context_tokens: int = 1024
    threads: int | None = None
    gpu_layers: int = -1
    batch: int = 256
    # KV cells of the `quick` prompt, a second sequence beside the whole
    # prompt's (0: none, every prompt is read in full).
    quick_tokens: int = QUICK_SLOT_TOKENS
    # Milliseconds per prompt token the engine plans with (None: measured on
    # the prompts this backend reads).
    prompt_ms_per_token: float | None = None


@dataclass
class _Slot:
    """One sequence of llama.cpp's KV cache and the tokens its cells hold, in
    order (positions 0..len-1)."""

    name: str
    seq: int
    capacity: int
    tokens: list[int] = field(default_factory=list)


def _common_prefix(cached: list[int], tokens: list[int]) -> int:
    common = 0
    for a, b in zip(cached, tokens, strict=False):
        if a != b:
            break
        common += 1
    return common


def llama_supports_gpu() -> bool:
    try:
        import llama_cpp

        return bool(llama_cpp.llama_supports_gpu_offload())
    except Exception:
        return False


class LlamaBackend:
    """A GGUF model loaded with llama-cpp-python, shared by completion and module lookup.

    The KV cache holds two sequences in one pool of cells: `main`, the whole
    prompt (`context_tokens`), and `quick`, a short prompt the engine answers
    from while `main` is still being read (`quick_tokens`; see
    `CompletionEngine.complete`). Reading one never evicts the other, so a
    prefill of the whole prompt interrupted by requests keeps what it read."""

    def __init__(
        self,
        model_path: Path,
        options: LlamaOptions | None = None,
        adapter: Path | None = None,
    ) -> None:
        self.model_path = model_path
        self.options = options or LlamaOptions()
        self.adapter: Path | None = None
        # One llama context: one user at a time. Every use of `self.llm`
        # (tokenizing included) holds the lock, so `close` cannot free the
        # model under a running request; a closed backend answers nothing.
        self.lock = threading.RLock()
        self._closed = False
        try:
            from llama_cpp import Llama
        except ImportError as exc:
            raise BackendError(
                "llama-cpp-python is not installed: pip install 'shoptalk[serve]'"
            ) from exc
        gpu = llama_supports_gpu()
        threads = self.options.threads or default_threads()
        quick = max(0, self.options.quick_tokens)
        try:
            self.llm = Llama(
                model_path=str(model_path),
                n_ctx=self.options.context_tokens + quick,
                n_batch=self.options.batch,
                n_threads=threads,
                n_threads_batch=threads,
                n_gpu_layers=self.options.gpu_layers if gpu else 0,
                logits_all=False,
                verbose=False,
            )
            if quick:
                self._open_shared_context(2)
        except (ValueError, RuntimeError, OSError) as exc:
            raise BackendError(
                f"llama.cpp cannot load {model_path}: {exc}. The file may be damaged or "
                "not a GGUF model; export it again or roll back (`shoptalk models rollback`)"
            ) from None
        self.device = "gpu" if gpu and self.options.gpu_layers != 0 else "cpu"
        self.n_vocab = int(self.llm.n_vocab())
        self.pieces = VocabPieces(self._read_pieces())
        self._stop_ids = {t for t, piece in enumerate(self.pieces.pieces) if not piece}
        self._stop_ids.add(int(self.llm.token_eos()))
        self._adapters: Any = None
        self._partial: _Decoding | None = None
        self._slots = {"main": _Slot("main", 0, self.options.context_tokens)}
        if quick:
            self._slots["quick"] = _Slot("quick", 1, quick)
        self._measured_ms: float | None = None
        self._tokenized: OrderedDict[tuple[PromptPlan, bool, str], tuple[list[int], bytes]] = (
            OrderedDict()
        )
        self.adapter = None
        if adapter is not None:
            self.set_adapter(adapter)

    def _open_shared_context(self, sequences: int) -> None:
        """Give the Llama a context whose KV cache holds `sequences` sequences
        in one pool of `n_ctx` cells (llama-cpp-python opens one sequence)."""
        from llama_cpp import _internals

        llm = self.llm
        params = llm.context_params
        params.n_seq_max = sequences
        params.kv_unified = True
        llm._ctx.close()
        context = _internals.LlamaContext(model=llm._model, params=params, verbose=False)
        llm._ctx = llm._stack.enter_context(contextlib.closing(context))

    def set_adapter(self, adapter: Path | None) -> None:
        """Apply a GGUF LoRA adapter (replacing the current one), or with None
        serve the plain model, without reloading the weights. The KV cache is
        dropped: it was computed with the previous weights."""
        from shoptalk.models.lora import LoraAdapters

        with self.lock:
            if self._closed:
                return
            if self._adapters is None:
                self._adapters = LoraAdapters(self.llm)
            if adapter is None:
                self._adapters.remove()
            else:
                self._adapters.apply(adapter)
            self.adapter = adapter
            self._partial = None
            for slot in self._slots.values():
                slot.tokens.clear()

    def _read_pieces(self) -> list[bytes]:
        import llama_cpp

        vocab = self.llm._model.vocab
        size = 64
        buffer = ctypes.create_string_buffer(size)
        pieces: list[bytes] = []
        for token in range(self.n_vocab):
            n = llama_cpp.llama_token_to_piece(vocab, token, buffer, size, 0, False)
            if n < 0:
                big = ctypes.create_string_buffer(-n)
                n = llama_cpp.llama_token_to_piece(vocab, token, big, -n, 0, False)
                pieces.append(big.raw[:n])
            else:
                pieces.append(buffer.raw[:n])
        return pieces

    # -- prompts -------------------------------------------------------------

    def tokenize_plan(
        self, plan: PromptPlan, heal: bool, limit: int | None = None
    ) -> tuple[list[int], bytes]:
        """The prompt's tokens (at most `limit`: the main slot's size less a
        margin) and the healed bytes backed off its end."""
        lead = self.llm.tokenize(plan.lead.encode("utf-8"), add_bos=True, special=True)
        context = (
            self.llm.tokenize(plan.context.encode("utf-8", errors="replace"), False, False)
            if plan.context
            else []
        )
        prefix_bytes = plan.prefix.encode("utf-8", errors="replace")
        body = self.llm.tokenize(prefix_bytes, add_bos=False, special=False)
        healed = b""
        if heal:
            body, healed = heal_split(body, self.pieces, prefix_bytes)
        trail = (
            self.llm.tokenize(plan.trail.encode("utf-8", errors="replace"), False, True)
            if plan.trail
            else []
        )
        limit = (self.options.context_tokens if limit is None else limit) - 16
        overflow = len(lead) + len(context) + len(body) + len(trail) - limit
        if overflow > 0:
            # Budgets larger than the context (or pathological, binary-looking
            # lines): drop the repository context first, then the tokens
            # farthest from the cursor, OVERFLOW_STEP tokens at a time, so the
            # prompt's start stays put while the user types (KV reuse).
            overflow = -(-overflow // OVERFLOW_STEP) * OVERFLOW_STEP
            dropped = min(overflow, len(context))
            context = context[dropped:]
            body = body[overflow - dropped :]
        return lead + context + body + trail, healed

    def _tokens(self, plan: PromptPlan, heal: bool, slot: _Slot) -> tuple[list[int], bytes]:
        """`tokenize_plan` for `slot`, remembered for the last few plans (the
        engine asks what a plan lacks before generating from it)."""
        key = (plan, heal, slot.name)
        known = self._tokenized.get(key)
        if known is None:
            known = self.tokenize_plan(plan, heal, slot.capacity)
            self._tokenized[key] = known
            while len(self._tokenized) > 8:
                self._tokenized.popitem(last=False)
        return list(known[0]), known[1]

    def _slot(self, name: str) -> _Slot:
        slot = self._slots.get(name)
        if slot is None:
            raise ValueError(f"this backend has no {name!r} prompt slot")
        return slot

    def pending_tokens(self, plan: PromptPlan, slot: str = "main") -> int | None:
        """Prompt tokens of `plan` that `slot` has not evaluated (what a
        request would read before answering); None when there is no such slot."""
        if slot not in self._slots:
            return None
        target = self._slots[slot]
        with self.lock:
            if self._closed:
                return None
            tokens, _ = self._tokens(plan, True, target)
            return len(tokens) - _common_prefix(target.tokens, tokens)

    @property
    def prompt_ms_per_token(self) -> float | None:
        """Milliseconds per prompt token read (fixed by the options, else
        measured on the prompts read so far; None before any)."""
        return self.options.prompt_ms_per_token or self._measured_ms

    def _note_speed(self, evaluated: int, started: float) -> None:
        if evaluated < SPEED_MIN_TOKENS:
            return
        rate = 1000 * (time.monotonic() - started) / evaluated
        previous = self._measured_ms
        self._measured_ms = rate if previous is None else (previous + rate) / 2

    # -- the KV cache ------------------------------------------------------------

    def _fill_batch(
        self, tokens: list[int], slot: _Slot, logits_all: bool, n_past: int | None = None
    ) -> None:
        batch = self.llm._batch.batch
        n_past = len(slot.tokens) if n_past is None else n_past
        batch.n_tokens = len(tokens)
        for i, token in enumerate(tokens):
            batch.token[i] = token
            batch.pos[i] = n_past + i
            batch.seq_id[i][0] = slot.seq
            batch.n_seq_id[i] = 1
            batch.logits[i] = logits_all
        batch.logits[len(tokens) - 1] = True

    def _eval(self, slot: _Slot, tokens: list[int]) -> None:
        """Append `tokens` to `slot`'s sequence (logits of the last one)."""
        llm = self.llm
        for start in range(0, len(tokens), self.options.batch):
            chunk = tokens[start : start + self.options.batch]
            self._fill_batch(chunk, slot, logits_all=False)
            llm._ctx.decode(llm._batch)
            slot.tokens.extend(chunk)
        if slot.seq == 0:  # llama-cpp-python's own record (create_completion reads it)
            count = len(slot.tokens)
            llm.input_ids[count - len(tokens) : count] = tokens
            llm.n_tokens = count

    def _truncate(self, slot: _Slot, length: int) -> None:
        """Forget `slot`'s tokens from position `length` on."""
        self.llm._ctx.kv_cache_seq_rm(slot.seq, length, -1)
        del slot.tokens[length:]
        if slot.seq == 0:
            self.llm.n_tokens = len(slot.tokens)

    def _sync(
        self,
        slot: _Slot,
        tokens: list[int],
        cancelled: threading.Event | None = None,
        deadline: float | None = None,
    ) -> tuple[int, bool]:
        """Make `slot` hold `tokens`, evaluating only what is not cached, in
        chunks so that a cancel or the deadline stops it early (what was
        evaluated stays cached for the next request). Returns the number of
        tokens evaluated and whether the prompt is complete."""
        common = _common_prefix(slot.tokens, tokens)
        if common >= len(tokens):
            common = len(tokens) - 1  # the last token's logits are needed again
        self._truncate(slot, common)
        position = common
        started = time.monotonic()
        while position < len(tokens):
            if position > common and (
                (cancelled is not None and cancelled.is_set())
                or (deadline is not None and time.monotonic() > deadline)
            ):
                self._note_speed(position - common, started)
                return position - common, False
            chunk = tokens[position : position + EVAL_CHUNK]
            self._eval(slot, chunk)
            position += len(chunk)
        self._note_speed(len(tokens) - common, started)
        return len(tokens) - common, True

    def _logits(self) -> Any:
        import numpy as np

        pointer = self.llm._ctx.get_logits_ith(-1)
        return np.ctypeslib.as_array(pointer, shape=(self.n_vocab,))

    def prefill(
        self, plan: PromptPlan, cancelled: threading.Event | None = None, slot: str = "main"
    ) -> int:
        target = self._slot(slot)
        with self.lock:
            if self._closed:
                return 0
            tokens, _ = self._tokens(plan, True, target)
            return self._sync(target, tokens, cancelled)[0]

    def generate(
        self, request: GenerationRequest, cancelled: threading.Event | None = None
    ) -> Generation:
        started = time.monotonic()
        slot = self._slot(request.slot)
        with self.lock:
            if self._closed:
                return Generation("", "cancelled", 0, 0, 0, "")
            tokens, healed = self._tokens(request.plan, request.heal, slot)
            end_ids = set(self._stop_ids)
            for marker in request.plan.end_markers:
                marker_tokens = self.llm.tokenize(marker.encode(), add_bos=False, special=True)
                if len(marker_tokens) == 1:
                    end_ids.add(marker_tokens[0])
            if cancelled is not None and cancelled.is_set():
                return Generation(
                    "", "cancelled", len(tokens), 0, 0, healed.decode(errors="replace")
                )
            state = self._resumable(slot, tokens, healed)
            # The budget bounds the answer, not the reading of the prompt: a
            # document seen for the first time (thousands of tokens, seconds
            # on a laptop CPU) is read in full, stopped only by a cancel (a
            # newer request, the editor's $/cancelRequest), and the answer then
            # gets the whole budget. Cut while reading, every first request
            # on a newly opened file would come back empty. (The engine
            # answers from the quick prompt when the whole one would take too
            # long to read.)
            budget_s = max(0.0, request.deadline - started)
            evaluated, complete = self._sync(slot, tokens + state.ids, cancelled)
            if not complete:
                return Generation(
                    "",
                    "cancelled",
                    len(tokens),
                    evaluated,
                    0,
                    healed.decode(errors="replace"),
                    time.monotonic() - started,
                )
            request = replace(request, deadline=max(request.deadline, time.monotonic() + budget_s))
            reason = self._decode(request, slot, tokens, state, end_ids, cancelled)
            # A generation the time budget cut is kept: the next request for
            # the same prompt goes on from it instead of starting over.
            self._partial = state if reason == "budget" else None
        text = state.text
        if not text and not state.required:
            text = _valid_utf8_prefix(state.out[len(healed) :])
        return Generation(
            text=text if reason != "cancelled" else "",
            stop_reason=reason,
            prompt_tokens=len(tokens),
            evaluated_tokens=evaluated,
            generated_tokens=len(state.ids),
            healed=healed.decode("utf-8", errors="replace"),
            elapsed_s=time.monotonic() - started,
            drafted_tokens=state.drafted,
        )

    def _resumable(self, slot: _Slot, tokens: list[int], healed: bytes) -> _Decoding:
        """The generation the budget cut last time, when it was for this very
        prompt and its tokens are still in the KV cache; else a fresh start."""
        partial = self._partial
        self._partial = None
        if (
            partial is not None
            and partial.slot == slot.name
            and partial.prompt == tokens
            and partial.healed == healed
            and slot.tokens[: len(tokens) + len(partial.ids)] == tokens + partial.ids
        ):
            return partial
        return _Decoding(prompt=list(tokens), healed=healed, required=healed, slot=slot.name)

    def _decode(
        self,
        request: GenerationRequest,
        slot: _Slot,
        tokens: list[int],
        state: _Decoding,
        end_ids: set[int],
        cancelled: threading.Event | None,
    ) -> StopReason:
        """Greedy tokens after the evaluated prompt (and `state`'s tokens)
        until the stop rule, an end token, the budget or max_tokens."""
        if request.drafts and not state.ids:
            reason = self._follow_draft(request, slot, tokens, state, end_ids)
            if reason is not None:
                return reason
        while len(state.ids) < request.max_tokens:
            if cancelled is not None and cancelled.is_set():
                return "cancelled"
            if time.monotonic() > request.deadline:
                return "budget"
            token = self._choose(self._logits(), state)
            if token is None:
                return "end"
            reason = self._take(token, request, state, end_ids)
            if reason is not None:
                return reason
            if len(tokens) + len(state.ids) >= slot.capacity:
                return "max_tokens"
            self._eval(slot, [token])
        return "max_tokens"

    def _choose(self, logits: Any, state: _Decoding) -> int | None:
        """The greedy token, among those that fit the healed text still
        required; None when none does."""
        import numpy as np

        if state.required:
            allowed = self.pieces.candidates(state.required)
            if len(allowed) == 0:
                return None
            return int(allowed[int(np.argmax(logits[allowed]))])
        return int(np.argmax(logits))

    def _take(
        self, token: int, request: GenerationRequest, state: _Decoding, end_ids: set[int]
    ) -> StopReason | None:
        """Append a generated token; "end" or "stop" when the answer ends here."""
        if token in end_ids:
            return "end"
        piece = self.pieces.pieces[token]
        state.out += piece
        state.ids.append(token)
        if state.required:
            required = state.required
            state.required = required[len(piece) :] if required.startswith(piece) else b""
        if not state.required:
            state.text = _valid_utf8_prefix(state.out[len(state.healed) :])
            if request.stop_at is not None:
                cut = request.stop_at(state.text)
                if cut is not None:
                    state.text = state.text[:cut]
                    return "stop"
        return None

    def _follow_draft(
        self,
        request: GenerationRequest,
        slot: _Slot,
        tokens: list[int],
        state: _Decoding,
        end_ids: set[int],
    ) -> StopReason | None:
        """Lookup decoding: evaluate the first draft's tokens in batches
        (ROW_CHUNK at a time, the next only while all matched) and keep the
        ones greedy decoding would have chosen anyway (the output is the
        greedy one, up to floating-point differences between batched and
        single-token evaluation); the first token that differs is the greedy
        choice at that point, read from the same batch. Drafts pay off on
        copied lines: their tokens come from batches instead of one by one."""
        draft = self.llm.tokenize(
            state.healed + request.drafts[0].encode("utf-8", errors="replace"), False, False
        )
        room = min(request.max_tokens, slot.capacity - len(tokens) - 1, self.options.batch)
        draft = draft[: max(0, room - 1)]
        if not draft:
            return None
        n_past = len(slot.tokens)
        # The logits before each draft token: the current ones, then those
        # after each token, read where llama.cpp holds them (a chunk is
        # evaluated only once the rows before it matched).
        rows = self._rows_after(slot, draft[:-1])
        row = self._logits().copy()
        accepted = evaluated = 0
        reason: StopReason | None = None
        for index, token in enumerate(draft):
            if index:
                row, evaluated = next(rows)
            if self._choose(row, state) != token:
                break
            accepted += 1
            reason = self._take(token, request, state, end_ids)
            if reason is not None:
                break
        rows.close()
        state.drafted = accepted
        # Keep the taken tokens the reader evaluated; evaluate the rest (the
        # last draft token, or those past the chunk where the answer ended).
        kept = min(accepted, evaluated)
        slot.tokens.extend(draft[:kept])
        if slot.seq == 0:
            self.llm.input_ids[n_past : n_past + kept] = draft[:kept]
        self._truncate(slot, n_past + kept)
        if accepted > kept:
            self._eval(slot, draft[kept:accepted])
        if reason is not None or accepted == len(draft):
            return reason  # all taken: the last evaluation's logits are the current ones
        following = self._choose(row, state)
        if following is None:
            return "end"
        reason = self._take(following, request, state, end_ids)
        if reason is None:
            self._eval(slot, [following])
        return reason

    def score(
        self, plan: PromptPlan, continuation: str, slot: str = "main"
    ) -> ContinuationScore | None:
        """Log-probability of `continuation` after the healed prompt: the
        prompt comes from `slot`'s KV cache, the continuation's tokens are
        evaluated in one batch and dropped again."""
        target = self._slot(slot)
        with self.lock:
            if self._closed:
                return None
            tokens, healed = self._tokens(plan, True, target)
            answer = self.llm.tokenize(
                healed + continuation.encode("utf-8", errors="replace"),
                add_bos=False,
                special=False,
            )
            answer = answer[: self.options.batch - 1]
            if not answer:
                return ContinuationScore(0.0, 0)
            if len(tokens) + len(answer) >= target.capacity:
                return ContinuationScore(float("-inf"), len(answer))
            self._sync(target, tokens)
            total = _log_softmax_at(self._logits(), answer[0])
            for (row, _), token in zip(
                self._rows_after(target, answer[:-1]), answer[1:], strict=True
            ):
                total += _log_softmax_at(row, token)
            self.llm._ctx.kv_cache_seq_rm(target.seq, len(target.tokens), -1)
        return ContinuationScore(total, len(answer))

    def _rows_after(self, slot: _Slot, tokens: list[int]) -> Generator[tuple[Any, int], None, None]:
        """(logits after each of `tokens`, how many of them are evaluated so
        far): evaluated after the prompt cached in `slot`, ROW_CHUNK tokens at
        a time, each row a view of llama.cpp's buffer that is good until the
        next evaluation (use it before asking for the next). The tokens' KV
        cells are not recorded in `slot`: the caller keeps what it keeps or
        drops them."""
        import numpy as np

        llm = self.llm
        n_past = len(slot.tokens)
        llm._ctx.kv_cache_seq_rm(slot.seq, n_past, -1)
        for start in range(0, len(tokens), ROW_CHUNK):
            chunk = tokens[start : start + ROW_CHUNK]
            self._fill_batch(chunk, slot, True, n_past + start)
            llm._ctx.decode(llm._batch)
            for i in range(len(chunk)):
                row = np.ctypeslib.as_array(llm._ctx.get_logits_ith(i), shape=(self.n_vocab,))
                yield row, start + len(chunk)

    def generate_with_grammar(self, prompt: str, grammar: str, max_tokens: int) -> str:
        """Greedy text for `prompt` constrained by a GBNF grammar (module lookup).
        Shares the KV cache with completion under the same lock: llama-cpp-
        python reads and writes the main sequence (and clears cells of every
        sequence past its prompt), so the quick prompt is read again next time."""
        from llama_cpp import LlamaGrammar

        compiled = LlamaGrammar.from_string(grammar, verbose=False)
        with self.lock:
            if self._closed:
                return ""
            try:
                result = self.llm.create_completion(
                    prompt, max_tokens=max_tokens, temperature=0.0, grammar=compiled
                )
            finally:
                main = self._slots["main"]
                main.tokens = self.llm.input_ids[: self.llm.n_tokens].tolist()
                self._truncate(main, len(main.tokens))
                self._partial = None
                quick = self._slots.get("quick")
                if quick is not None:
                    self._truncate(quick, 0)
        choices: Any = result["choices"]  # type: ignore[index]
        return str(choices[0]["text"])

    def describe(self) -> dict[str, object]:
        return {
            "backend": "llama",
            "model": str(self.model_path),
            "adapter": str(self.adapter) if self.adapter else None,
            "device": self.device,
            "context_tokens": self.options.context_tokens,
            "quick_tokens": self.options.quick_tokens,
        }

    def close(self) -> None:
        """Free the model once no request is using it; later requests get
        empty answers (the server is shutting down)."""
        with self.lock:
            if self._closed:
                return
            self._closed = True
            with contextlib.suppress(Exception):
                self.llm.close()


# ---- OpenAI-compatible server ---------------------------------------------------

_WORD_TAIL = re.compile(r"(?:[A-Za-z0-9_]+|[ \t]+)\Z")


def heal_text(prefix: str) -> tuple[str, str]:
    """Back off a partial identifier or trailing spaces on characters (for
    servers whose tokenizer we do not hold): the prompt to send and the text
    the answer must begin with."""
    match = _WORD_TAIL.search(prefix)
    if not match:
        return prefix, ""
    return prefix[: match.start()], match.group(0)


def _gbnf_literal(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    escaped = escaped.replace("\t", "\\t")
    return f'"{escaped}"'


class OpenAIBackend:
    """Completions from an OpenAI-compatible server (`/v1/completions`, streamed)."""

    def __init__(self, url: str, model: str | None = None, timeout_s: float = 30.0) -> None:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise BackendError(
                f"serve.openai_url {url!r} is not an http(s) URL; set it to the server's "
                "base URL, e.g. http://127.0.0.1:8000"
            )
        self.url = url.rstrip("/")
        self._parsed = parsed
        base_path = parsed.path.rstrip("/")
        self._path = base_path + (
            "/completions" if base_path.endswith("/v1") else "/v1/completions"
        )
        self.model = model
        self.timeout_s = timeout_s
        self.supports_grammar = True

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        cls = (
            http.client.HTTPSConnection
            if self._parsed.scheme == "https"
            else http.client.HTTPConnection
        )
        return cls(self._parsed.hostname or "", self._parsed.port, timeout=timeout)

    def _stream(self, body: dict[str, Any], timeout: float) -> Generator[str, None, None]:
        connection = self._connection(timeout)
        try:
            connection.request(
                "POST",
                self._path,
                body=json.dumps(body).encode(),
                headers={"Content-Type": "application/json", "Accept": "text/event-stream"},
            )
            response = connection.getresponse()
            if response.status != 200:
                detail = response.read(500).decode(errors="replace")
                raise BackendError(
                    f"completion server {self.url} answered {response.status}: {detail}"
                )
            for raw in response:
                line = raw.decode("utf-8", errors="replace").strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                try:
                    event = json.loads(data)
                except ValueError:
                    continue
                choices = event.get("choices") or []
                if choices:
                    yield str(choices[0].get("text") or "")
        except (OSError, http.client.HTTPException) as exc:
            raise BackendError(
                f"cannot reach the completion server at {self.url} ({exc}); start it or fix "
                "serve.openai_url"
            ) from None
        finally:
            connection.close()

    def _body(self, prompt: str, max_tokens: int, healed: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            # llama_cpp.server penalizes repeats by default (1.1); code repeats
            # itself, and the local backend does not penalize (vLLM ignores the key).
            "repeat_penalty": 1.0,
            "stream": True,
        }
        if self.model:
            body["model"] = self.model
        if healed and self.supports_grammar:
            body["grammar"] = f"root ::= {_gbnf_literal(healed)} [^\\x00]*"
        return body

    def generate(
        self, request: GenerationRequest, cancelled: threading.Event | None = None
    ) -> Generation:
        started = time.monotonic()
        plan = request.plan
        prefix, healed = heal_text(plan.prefix) if request.heal else (plan.prefix, "")
        prompt = plan.lead + plan.context + prefix + plan.trail
        remaining = max(0.1, request.deadline - started)
        text = ""
        reason: str = "max_tokens"
        chunks = 0
        stream = self._stream(self._body(prompt, request.max_tokens, healed), remaining + 5.0)
        try:
            for chunk in stream:
                chunks += 1
                text += chunk
                if cancelled is not None and cancelled.is_set():
                    reason = "cancelled"
                    break
                if any(marker in text for marker in plan.end_markers):
                    text = text[: min(text.find(m) for m in plan.end_markers if m in text)]
                    reason = "end"
                    break
                if len(text) >= len(healed) and request.stop_at is not None:
                    cut = request.stop_at(text[len(healed) :])
                    if cut is not None:
                        text = text[: len(healed) + cut]
                        reason = "stop"
                        break
                if time.monotonic() > request.deadline:
                    reason = "budget"
                    break
            else:
                reason = "end"
        finally:
            stream.close()
        if healed:
            if not text.startswith(healed):
                log.debug("server ignored the healing constraint; dropping %r", text[:40])
                text = ""
            else:
                text = text[len(healed) :]
        return Generation(
            text="" if reason == "cancelled" else text,
            stop_reason=reason,  # type: ignore[arg-type]
            prompt_tokens=0,
            evaluated_tokens=0,
            generated_tokens=chunks,
            healed=healed,
            elapsed_s=time.monotonic() - started,
        )

    def prefill(
        self, plan: PromptPlan, cancelled: threading.Event | None = None, slot: str = "main"
    ) -> int:
        # A remote server keeps its own prompt cache; one token primes it.
        prefix, _ = heal_text(plan.prefix)
        body = self._body(plan.lead + plan.context + prefix + plan.trail, 1, "")
        with contextlib.suppress(BackendError):
            for _ in self._stream(body, self.timeout_s):
                pass
        return 0

    def pending_tokens(self, plan: PromptPlan, slot: str = "main") -> int | None:
        return None  # the server's prompt cache is its own: every prompt is read whole

    @property
    def prompt_ms_per_token(self) -> float | None:
        return None

    def score(
        self, plan: PromptPlan, continuation: str, slot: str = "main"
    ) -> ContinuationScore | None:
        # `/v1/completions` gives the log-probabilities of generated tokens
        # only, not of a given text: the copy channel is off on this backend.
        return None

    def generate_with_grammar(self, prompt: str, grammar: str, max_tokens: int) -> str:
        body: dict[str, Any] = {
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "stream": True,
            "grammar": grammar,
        }
        if self.model:
            body["model"] = self.model
        return "".join(self._stream(body, self.timeout_s))

    def describe(self) -> dict[str, object]:
        return {
            "backend": "openai",
            "model": self.model or self.url,
            "adapter": None,
            "device": f"remote ({self.url})",
        }

    def close(self) -> None:
        return None
