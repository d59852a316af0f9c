"""Training instances → token sequences: a prompt and an answer, loss only on
the answer.

Prompts come from the shared builder (`shoptalk.models.prompt`) so that the
model is trained on exactly what the server and the evaluation show it:

* `completion`: the base's FIM template around the mined prefix/suffix (the
  answer is the masked `target` then the template's `end` token), or the
  prefix alone for a prefix-only run (the answer is the target and its line
  break). Either way the prompt is healed at the cursor as the server heals
  it: the prefix's last token moves into the answer. Split points are
  augmented by moving the cursor inside the target (inside a word, after a
  space), because at serve time the cursor can be anywhere.
* `module_lookup` / `doc_modules`: `module_lookup_prompt(query)`; the answer is
  the module ids, one per line (the first right after "# Module:").
* `commit_message`, `test_pair`: their own short headers (below).
* `code`: a window of raw code (phase 1, continued pre-training, and replay);
  loss on every token after the first.

Token ids are built piece by piece — special FIM tokens by id, text by the
tokenizer without special tokens — so a FIM marker is always one token, as
llama.cpp parses it at serve time.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from shoptalk.models.catalog import FimTemplate
from shoptalk.models.context import PromptConfig, stored_context_block
from shoptalk.models.errors import ShopTalkError
from shoptalk.models.prompt import (
    PROMPT_FIM,
    PromptParts,
    clip_context,
    completion_prompt,
    layout_prompt,
    module_lookup_prompt,
)

INSTANCE_KINDS = ("completion", "module_lookup", "commit_message", "test_pair", "doc_modules")

COMMIT_MESSAGE_HEADER = "# Diff:\n"
COMMIT_MESSAGE_QUESTION = "\n# Commit message:\n"
TEST_PAIR_HEADER = "# Code:\n"
TEST_PAIR_QUESTION = "\n# Tests:\n"

# Completion prompts as served by default (`ServeSettings`' defaults).
DEFAULT_PROMPT = PromptConfig()

# The answer never takes more than this share of a sequence; longer answers
# are cut (their end token then is not learned, which is right: the model
# should not learn to stop there).
MAX_ANSWER_SHARE = 0.5


class FormatError(ShopTalkError):
    pass


class TextTokenizer(Protocol):
    """The part of a HF tokenizer the formats use."""

    bos_token_id: int | None
    unk_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def convert_tokens_to_ids(self, tokens: str) -> int | list[int]: ...


@dataclass(frozen=True)
class Example:
    """One training sequence. The loss counts the prediction of every token at
    index ≥ `answer_start` (from the hidden state of the token before it)."""

    input_ids: tuple[int, ...]
    answer_start: int
    kind: str

    @property
    def answer_tokens(self) -> int:
        return len(self.input_ids) - self.answer_start

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class Segment:
    """A piece of a sequence: text to tokenize, or one special token by name."""

    text: str
    special: bool = False


@dataclass(frozen=True)
class PromptAnswer:
    prompt: tuple[Segment, ...]
    answer: tuple[Segment, ...]
    # Which prompt segment gives up tokens first when the sequence is too
    # long: "left" keeps its tail (a prefix), "right" keeps its head.
    trim: tuple[str | None, ...]
    # Token healing, as the server does it at the cursor: the last token of
    # this prompt segment moves into the answer, which is then tokenized
    # together with it (so the answer starts on a natural token boundary).
    heal: int | None = None


class SequenceBuilder:
    """Turns segments into token ids with one tokenizer, budgeted to
    `max_tokens` per sequence."""

    def __init__(
        self,
        tokenizer: TextTokenizer,
        template: FimTemplate,
        max_tokens: int,
        prompt_format: str = PROMPT_FIM,
        prompt: PromptConfig = DEFAULT_PROMPT,
    ) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.max_tokens = max_tokens
        self.use_fim = prompt_format == PROMPT_FIM
        # What a completion prompt shows: the serve settings' budgets, layout
        # and repository context (`PromptConfig.of(settings.serve)`).
        self.prompt = prompt
        self.bos = _leading_bos(tokenizer)
        self._special: dict[str, int] = {}
        for name in template.special_tokens():
            self._special[name] = self.special_id(name)

    def special_id(self, name: str) -> int:
        if name in self._special:
            return self._special[name]
        found = self.tokenizer.convert_tokens_to_ids(name)
        if isinstance(found, list) or found is None or found == self.tokenizer.unk_token_id:
            raise FormatError(
                f"the tokenizer has no token {name!r}, which the base's FIM template needs: "
                "use a base from the catalog or a checkpoint of a supported architecture "
                "with its own tokenizer"
            )
        return int(found)

    def ids(self, segment: Segment) -> list[int]:
        if segment.special:
            return [self.special_id(segment.text)]
        return list(self.tokenizer.encode(segment.text, add_special_tokens=False))

    def build(self, item: PromptAnswer, kind: str) -> Example | None:
        """The example, or None when nothing of the answer fits."""
        pieces = [self.ids(seg) for seg in item.prompt]
        answer: list[int] = []
        rest = item.answer
        if item.heal is not None and rest and not rest[0].special:
            healed = self._healed(item.prompt[item.heal].text, pieces[item.heal], rest[0].text)
            if healed is not None:
                pieces[item.heal], answer = healed
                rest = rest[1:]
        for seg in rest:
            answer += self.ids(seg)
        if not answer:
            return None
        head = [self.bos] if self.bos is not None else []
        max_answer = max(1, int(self.max_tokens * MAX_ANSWER_SHARE))
        answer = answer[:max_answer]
        budget = self.max_tokens - len(head) - len(answer)
        total = sum(len(p) for p in pieces)
        # Trim "right" segments (suffixes) to a quarter of the budget first,
        # then "left" segments (prefixes) keep their tails.
        for side in ("right", "left"):
            for i, piece in enumerate(pieces):
                if total <= budget or item.trim[i] != side:
                    continue
                keep = max(0, len(piece) - (total - budget))
                if side == "right":
                    keep = max(keep, min(len(piece), budget // 4))
                    keep = min(keep, len(piece))
                    pieces[i] = piece[:keep]
                else:
                    pieces[i] = piece[len(piece) - keep :] if keep else []
                total = sum(len(p) for p in pieces)
        if total > budget:
            return None
        prompt = head + [t for p in pieces for t in p]
        return Example(tuple(prompt + answer), len(prompt), kind)

    def _healed(self, text: str, ids: list[int], answer: str) -> tuple[list[int], list[int]] | None:
        """What the server's token healing prompts and generates: `text`'s
        tokens without the last one, and the tokens of that last token's text
        followed by `answer`. The answer is cut as the tokenizer cuts
        `text + answer` when that keeps the prompt's tokens (the usual case),
        else on its own (the last token's text is then recovered by decoding).
        None when neither works."""
        if not ids:
            return None
        keep = len(ids) - 1
        joint = list(self.tokenizer.encode(text + answer, add_special_tokens=False))
        if joint[:keep] == ids[:keep] and len(joint) > keep:
            return ids[:keep], joint[keep:]
        kept = self.tokenizer.decode(ids[:keep]) if keep else ""
        if not text.startswith(kept) or len(text) == len(kept):
            return None
        tail = list(self.tokenizer.encode(text[len(kept) :] + answer, add_special_tokens=False))
        return ids[:keep], tail


def _leading_bos(tokenizer: TextTokenizer) -> int | None:
    """The BOS id when the tokenizer puts one in front by default (Gemma,
    Llama); llama.cpp does the same at serve time."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    try:
        probe = tokenizer.encode("a", add_special_tokens=True)
    except (TypeError, ValueError):
        return None
    return int(bos) if probe and probe[0] == bos else None


# ---- instances → prompt/answer ---------------------------------------------------------


def completion_item(
    template: FimTemplate,
    prefix: str,
    target: str,
    suffix: str,
    use_fim: bool = True,
    *,
    context: str = "",
    path: str | None = None,
    config: PromptConfig = DEFAULT_PROMPT,
) -> PromptAnswer:
    """The prompt the server builds at the cursor (`layout_prompt` of the
    parts clipped to `config`'s budgets, with the repository `context` block
    and the file's `path`), healed at the cursor as the server heals it.

    Segments follow the server's tokenization: FIM markers as single special
    tokens, the context block, the code before the cursor and the rest each
    tokenized on their own. FIM: the answer is the target and the end token.
    Prefix-only: the answer is the target and the line break after it, where
    the server stops a single-line suggestion. When a sequence is too long,
    the suffix gives way first, then the context block (from its start, the
    weakest pieces), then the far end of the prefix: the server's order."""
    parts = clip_context(prefix, suffix, config.prefix_chars, config.suffix_chars)
    layout = config.layout(use_fim)
    plan = layout_prompt(template, PromptParts(parts.prefix, parts.suffix, context, path), layout)
    assert plan.text() == completion_prompt(
        template,
        PromptParts(parts.prefix, parts.suffix, context, path),
        use_fim,
        config.suffix_layout,
    )
    if layout != "fim":
        line_end = "\n" if suffix.startswith(("\n", "\r\n")) else ""
        return PromptAnswer(
            prompt=(Segment(plan.context), Segment(plan.prefix)),
            answer=(Segment(target + line_end),),
            trim=("left", "left"),
            heal=1,
        )
    return PromptAnswer(
        prompt=(
            Segment(template.prefix, True),
            Segment(plan.context),
            Segment(plan.prefix),
            Segment(template.suffix, True),
            Segment(parts.suffix),
            Segment(template.middle, True),
        ),
        answer=(Segment(target), Segment(template.end, True)),
        trim=(None, "left", "left", None, "right", None),
        heal=2,
    )


def record_context(
    record: Mapping[str, Any], config: PromptConfig, use_fim: bool, prefix: str, suffix: str
) -> str:
    """The repository context block of a mined completion at its cursor, as
    the server builds it under `config` (rendered from the candidates mining
    stored; "" for records mined without them, or with the context off)."""
    data = record.get("context")
    if not isinstance(data, Mapping):
        return ""
    options = config.context_options(use_fim)
    return stored_context_block(str(record.get("path", "")), data, prefix, suffix, options)


def module_lookup_item(template: FimTemplate, query: str, modules: Iterable[str]) -> PromptAnswer:
    answer_text = module_lookup_answer(modules)
    return PromptAnswer(
        prompt=(Segment(module_lookup_prompt(query)),),
        answer=(Segment(answer_text), Segment(template.end, True)),
        trim=("left",),
    )


def module_lookup_answer(modules: Iterable[str]) -> str:
    """What the model answers after `module_lookup_prompt`: " id1\\nid2\\n"."""
    ids = [m for m in modules if m]
    return " " + "\n".join(ids) + "\n" if ids else ""


def artifact_item(
    template: FimTemplate, header: str, question: str, prompt: str, target: str
) -> PromptAnswer:
    return PromptAnswer(
        prompt=(Segment(header), Segment(prompt), Segment(question)),
        answer=(Segment(target), Segment(template.end, True)),
        trim=(None, "right", None),
    )


def shifted_split(prefix: str, target: str, suffix: str, rng: random.Random) -> tuple[str, str]:
    """Move the cursor to a random character inside `target` (inside a word,
    after a space), as a user may stop typing anywhere: (prefix, target)."""
    if len(target) < 2:
        return prefix, target
    cut = rng.randint(1, len(target) - 1)
    return prefix + target[:cut], target[cut:]


def record_items(
    record: Mapping[str, Any],
    template: FimTemplate,
    rng: random.Random | None = None,
    augment_share: float = 0.0,
    use_fim: bool = True,
    config: PromptConfig = DEFAULT_PROMPT,
) -> list[PromptAnswer]:
    """The prompt/answer pairs of one mined record (with `rng`, completions get
    an extra copy with a shifted split point at rate `augment_share`);
    completions are prompted as the server prompts them under `config`."""
    kind = record.get("kind")
    if kind == "completion":
        prefix, target, suffix = (
            str(record["prefix"]),
            str(record["target"]),
            str(record.get("suffix", "")),
        )
        path = str(record["path"]) if record.get("path") else None
        # Typing on the cursor's line never changes the block (it reads only
        # the lines around it), so a shifted split keeps the same one.
        context = record_context(record, config, use_fim, prefix, suffix)

        def item(before: str, answer: str) -> PromptAnswer:
            return completion_item(
                template, before, answer, suffix, use_fim, context=context, path=path, config=config
            )

        items = [item(prefix, target)]
        if rng is not None and augment_share > 0 and rng.random() < augment_share:
            moved_prefix, moved_target = shifted_split(prefix, target, suffix, rng)
            if moved_target != target:
                items.append(item(moved_prefix, moved_target))
        return items
    if kind in ("module_lookup", "doc_modules"):
        modules = [str(m) for m in record.get("modules", [])]
        if not modules:
            return []
        return [module_lookup_item(template, str(record["query"]), modules)]
    if kind == "commit_message":
        return [
            artifact_item(
                template,
                COMMIT_MESSAGE_HEADER,
                COMMIT_MESSAGE_QUESTION,
                str(record["prompt"]),
                str(record["target"]),
            )
        ]
    if kind == "test_pair":
        return [
            artifact_item(
                template,
                TEST_PAIR_HEADER,
                TEST_PAIR_QUESTION,
                str(record["prompt"]),
                str(record["target"]),
            )
        ]
    raise FormatError(
        f"record {record.get('id')!r} has unknown kind {kind!r}; known kinds: "
        + ", ".join(INSTANCE_KINDS)
        + ". Mine the dataset again with this version of shoptalk (`shoptalk mine`)."
    )


def code_windows(
    builder: SequenceBuilder, text: str, kind: str = "code", min_tokens: int = 16
) -> list[Example]:
    """Raw code cut into windows of the builder's length; loss on every token
    after the first of each window (causal LM)."""
    ids = list(builder.tokenizer.encode(text, add_special_tokens=False))
    head = [builder.bos] if builder.bos is not None else []
    width = builder.max_tokens - len(head)
    windows: list[Example] = []
    for start in range(0, len(ids), width):
        chunk = ids[start : start + width]
        if len(chunk) < min_tokens:
            continue
        windows.append(Example(tuple(head + chunk), len(head) + 1, kind))
    return windows


def build_examples(
    records: Iterable[Mapping[str, Any]],
    builder: SequenceBuilder,
    seed: int = 0,
    augment_share: float = 0.0,
    on_skip: Callable[[str], None] | None = None,
) -> list[Example]:
    """Examples of all `records`, in order (augmented copies follow their source)."""
    rng = random.Random(seed)
    examples: list[Example] = []
    for record in records:
        kind = str(record.get("kind"))
        items = record_items(
            record, builder.template, rng, augment_share, builder.use_fim, builder.prompt
        )
        for item in items:
            example = builder.build(item, kind)
            if example is not None:
                examples.append(example)
            elif on_skip is not None:
                on_skip(str(record.get("id")))
    return examples
