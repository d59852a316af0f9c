"""Data hygiene for mined instances: secrets, duplicates, balance.

- Secrets: `detect-secrets` (its detectors only run inside a settings
  context, which `SecretScrubber` holds open) plus ShopTalk's own rules for
  private-key blocks, high-entropy tokens, password assignments, and
  credentials recognised by their context (`shoptalk.trainer.secret_rules`:
  connect/login call arguments, `-p<password>` and `--password x` flags,
  `password` in any syntax, vendor token shapes). A found secret is replaced
  by a typed placeholder (`<SECRET_…>`) — in code, paths, messages, author
  names and emails alike — and the caller drops or keeps the instance per
  the `secrets` setting.
- Dedup: test instances are removed from train and validation when an
  instance is the same up to whitespace, or nearly the same (MinHash LSH).
- Balance: no single top-level module may fill more than a share of the
  training set.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import math
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from types import TracebackType
from typing import Any

from shoptalk.trainer.secret_rules import (
    call_findings,
    is_distinctive,
    is_placeholder,
    line_findings,
)
from shoptalk.trainer.source_files import LANGUAGES

PLACEHOLDER_PREFIX = "<SECRET_"
_PLACEHOLDER = re.compile(r"<SECRET_[A-Z0-9_]+>")

_PRIVATE_KEY_BLOCK = re.compile(
    r"-----BEGIN[A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----.*?(?:-----END[A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----|\Z)",
    re.DOTALL,
)
_TOKEN = re.compile(r"[A-Za-z0-9+/=_\-]{20,}")
_TOKEN_CHAR = re.compile(r"[A-Za-z0-9+/=_\-]")
_SECRET_NAME = (
    r"[\w.-]*(?:password|passwd|passwort|pwd|secret|token|api[_-]?key|apikey|access[_-]?key"
    r"|private[_-]?key|client[_-]?secret|credentials?)[\w.-]*"
)
_QUOTED_ASSIGNMENT = re.compile(
    rf"(?i)\b{_SECRET_NAME}[\"']?\s*(?:=|:=|:|=>|==)\s*[rbuf]?([\"'])([^\"'\s]{{3,}})\1"
)
_CONFIG_SUFFIXES = {".env", ".ini", ".cfg", ".conf", ".properties", ".yaml", ".yml", ".toml"}
# Where `name: value` assigns too (secret_rules), beyond the files above.
_KEY_VALUE_SUFFIXES = _CONFIG_SUFFIXES | {".json", ".cnf", ".npmrc", ".pypirc", ".netrc", ".pgpass"}
# Program text: an unquoted value there is a name or a call unless it looks
# like a literal (shell scripts and SQL are not counted as such programs).
_CODE_SUFFIXES = frozenset(LANGUAGES) - {".sh", ".sql"}
# Values that are obviously not secrets: templates, references, placeholders.
_NOT_A_SECRET = re.compile(
    r"(?i)^(?:<.*>|\$\{?.*|.*\{.*\}.*|%\(.*|.*%s.*|none|null|nil|true|false|x+|\*+)$"
)


# detect-secrets runs ~25 detectors per line; a line can only give a finding
# if it holds one of their keywords or a long token (every entropy detector
# needs 8+ base64/hex characters with a digit, or 20+ of them), so only such
# lines are scanned. `test_prefilter_passes_every_line_detect_secrets_flags`
# checks this against detect-secrets itself.
_DETECTOR_HINT = re.compile(
    r"(?i)pass|pwd|secret|key|token|auth|cred|priv|contrase|cloudant|ibm|softlayer|"
    r"account|://|sk-|xox|begin|eyj|sq0|akia|glpat|gldt|npm_|pypi-|sg\.|"
    r"\d+\.\d+\.\d+\.\d+|[a-z0-9+/=_\-]{20}"
)
_DIGIT_TOKEN = re.compile(r"[A-Za-z0-9+/=_\-]{8,}")
# The hint without its alternation (tried at every position: ~20 µs a line of
# code): its words looked up in the lowered line, the dotted quad only where
# a dot is, and the 20-character token found with the 8+ ones (a maximal run
# of token characters). ASCII lines only: `(?i)` also folds some non-ASCII
# letters (the Kelvin sign) that `str.lower` keeps apart. Kept equal to the
# regex by `test_fast_hints_agree_with_their_regexes`.
_DETECTOR_WORDS = (
    *("pass", "pwd", "secret", "key", "token", "auth", "cred", "priv", "contrase"),
    *("cloudant", "ibm", "softlayer", "account", "://", "sk-", "xox", "begin", "eyj"),
    *("sq0", "akia", "glpat", "gldt", "npm_", "pypi-", "sg."),
)
_DOTTED_QUAD = re.compile(r"\d+\.\d+\.\d+\.\d+")


def may_hold_secret(line: str) -> bool:
    """Whether a detect-secrets detector may find anything on `line`."""
    if not line.isascii():
        return _may_hold_secret_by_regex(line)
    low = line.lower()
    for word in _DETECTOR_WORDS:
        if word in low:
            return True
    if "." in line and _DOTTED_QUAD.search(line):
        return True
    for match in _DIGIT_TOKEN.finditer(line):
        token = match.group(0)
        if len(token) >= 20 or any(c.isdigit() for c in token):
            return True
    return False


def _may_hold_secret_by_regex(line: str) -> bool:
    """`may_hold_secret` as first written (any line; the fast path's reference)."""
    if _DETECTOR_HINT.search(line):
        return True
    return any(any(c.isdigit() for c in match.group(0)) for match in _DIGIT_TOKEN.finditer(line))


def shannon_entropy(text: str) -> float:
    counts = Counter(text)
    total = len(text)
    return -sum(c / total * math.log2(c / total) for c in counts.values())


def is_high_entropy_token(token: str) -> bool:
    """A random-looking credential: long, mixed letters and digits, and
    high Shannon entropy (hex strings have at most 4 bits per character, so
    they get their own, lower bar)."""
    digits = sum(c.isdigit() for c in token)
    letters = sum(c.isalpha() for c in token)
    if digits < 2 or letters < 4:
        return False
    if re.fullmatch(r"[0-9a-fA-F]+", token):
        return len(token) >= 32 and shannon_entropy(token) >= 3.0
    if _looks_like_words(token):
        return False
    if not (re.search(r"[a-z]", token) and re.search(r"[A-Z]", token)):
        return False  # random base64 of 20+ characters mixes cases almost surely
    return shannon_entropy(token) >= 4.0


def _looks_like_words(token: str) -> bool:
    """Identifiers and paths (`test_HTTP_302_ALLOW_REDIRECT_GET`,
    `github/ribbons/forkme_right_121621`): separated parts that are each a
    word, a word with a number, or a number."""
    parts = [p for p in re.split(r"[_\-/.]+", token) if p]
    if len(parts) < 3:
        return False
    wordy = sum(1 for p in parts if re.fullmatch(r"[A-Za-z][a-z]*[0-9]*|[A-Z]+[0-9]*|[0-9]+", p))
    return wordy == len(parts)


def placeholder_for(secret_type: str) -> str:
    name = re.sub(r"[^A-Z0-9]+", "_", secret_type.upper()).strip("_")
    return f"<SECRET_{name or 'VALUE'}>"


@dataclass(frozen=True)
class Finding:
    """A secret on a line: `value` is replaced wherever it occurs on the
    line (widened to its token), or — when `start` >= 0 — exactly at
    line[start:end] (context rules know where a value begins and ends)."""

    type: str
    value: str
    start: int = -1
    end: int = -1


class SecretScrubber:
    """Finds secrets in text and replaces them with typed placeholders.

    Use as a context manager: detect-secrets configures its detectors in a
    global settings context, which must be open while scanning."""

    def __init__(self) -> None:
        self._stack = contextlib.ExitStack()
        self._cache: dict[tuple[str, str], tuple[Finding, ...]] = {}
        self._known: dict[str, str] = {}  # secret text replaced since `forget` -> type
        # scrub_value's strings, while `_known` is unchanged (a completion's
        # context repeats the same candidates at every cursor of a file).
        self._values: dict[tuple[str, str], str] = {}
        self._detect: Callable[[list[tuple[int, str]], str], Iterable[Any]] | None = None

    def __enter__(self) -> SecretScrubber:
        from detect_secrets.core.scan import _process_line_based_plugins
        from detect_secrets.settings import default_settings

        self._stack.enter_context(default_settings())
        self._detect = _process_line_based_plugins
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._detect = None
        self._stack.close()

    def _line_findings(self, line: str, filename: str, suffix: str) -> tuple[Finding, ...]:
        key = (line, suffix)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        if self._detect is None:
            raise RuntimeError("SecretScrubber must be used inside `with`")
        found: list[Finding] = []
        if line.strip():
            # (on the line as it is: the spans they give are replaced there)
            context = line_findings(
                line,
                code=suffix in _CODE_SUFFIXES,
                config=suffix in _KEY_VALUE_SUFFIXES or suffix.startswith(".env"),
                filename=suffix,
            )
            found += (Finding(kind, line[a:b], a, b) for kind, a, b in context)
        # Placeholders from an earlier pass are not secrets themselves.
        line = _PLACEHOLDER.sub("<>", line) if PLACEHOLDER_PREFIX in line else line
        if line.strip() and may_hold_secret(line):
            scan_name = f"snippet{suffix}" if suffix.startswith(".") else filename
            for secret in self._detect([(1, line)], scan_name):
                value = secret.secret_value
                if value and not (secret.type == "Secret Keyword" and is_placeholder(value)):
                    found.append(Finding(secret.type, value))
            for match in _TOKEN.finditer(line):
                if is_high_entropy_token(match.group(0)):
                    found.append(Finding("High Entropy String", match.group(0)))
            for match in _QUOTED_ASSIGNMENT.finditer(line):
                if not _NOT_A_SECRET.match(match.group(2)):
                    found.append(Finding("Password", match.group(2)))
        result = tuple(found)
        if len(self._cache) > 200_000:
            self._cache.clear()
        self._cache[key] = result
        return result

    def scrub(
        self, text: str, filename: str = "", count_lines: set[int] | None = None
    ) -> tuple[str, Counter[str]]:
        """`text` with every secret replaced by its placeholder, and the
        number of secrets found per type: on every line, or only on
        `count_lines` (1-based) when given, so that a secret is counted by the
        commit that added it, not again in each later version of its file."""
        counts: Counter[str] = Counter()

        def counted(line_number: int) -> bool:
            return count_lines is None or line_number in count_lines

        if "PRIVATE KEY" in text:

            def _block(match: re.Match[str]) -> str:
                first = text.count("\n", 0, match.start()) + 1
                lines_in_block = range(first, first + match.group(0).count("\n") + 1)
                if any(counted(n) for n in lines_in_block):
                    counts["Private Key"] += 1
                # Keep the line breaks: added lines are found by line number.
                return placeholder_for("Private Key") + "\n" * match.group(0).count("\n")

            text = _PRIVATE_KEY_BLOCK.sub(_block, text)
        pure = PurePosixPath(filename)
        suffix = pure.suffix.lower() or pure.name.lower()
        if pure.name.lower().startswith(".env"):
            suffix = ".env"
        lines = text.split("\n")
        calls = _call_findings_by_line(text, lines)
        changed = False
        for index, line in enumerate(lines):
            findings = self._line_findings(line, filename, suffix) + calls.get(index, ())
            if not findings:
                continue
            new_line, hits = _replace_findings(line, findings)
            for kind, secrets in hits:
                if counted(index + 1):
                    counts[kind] += 1
                for secret in secrets:
                    if is_distinctive(secret) and self._known.get(secret) != kind:
                        self._known[secret] = kind
                        self._values.clear()
            if new_line != line:
                lines[index] = new_line
                changed = True
        return ("\n".join(lines) if changed else text), counts

    def forget(self) -> None:
        """Forget the secrets replaced so far (`scrub_known` no longer
        replaces them): called between commits."""
        self._known.clear()
        self._values.clear()

    def scrub_known(self, text: str) -> str:
        """`text` with every secret replaced since `forget` replaced here too,
        wherever it stands (a password found in a config file and also typed
        into the commit message, or into a path)."""
        for secret, kind in self._known.items():
            if secret in text:
                text = text.replace(secret, placeholder_for(kind))
        return text

    def scrub_value(self, value: Any, filename: str = "") -> Any:
        """`value` with every string in it scrubbed (lists and dicts are walked,
        their keys included) — placeholders replace the secrets — and made
        valid UTF-8 (a stray undecodable byte becomes U+FFFD)."""
        if isinstance(value, str):
            key = (value, filename)
            done = self._values.get(key)
            if done is None:
                clean, _ = self.scrub(value, filename, count_lines=set())
                done = _valid_utf8(self.scrub_known(clean))
                if len(self._values) > 20_000:
                    self._values.clear()
                self._values[key] = done  # (scrubbing it again would add no secret)
            return done
        if isinstance(value, list | tuple):
            return [self.scrub_value(item, filename) for item in value]
        if isinstance(value, dict):
            return {
                self.scrub_value(key, filename): self.scrub_value(item, filename)
                for key, item in value.items()
            }
        return value


def _call_findings_by_line(text: str, lines: list[str]) -> dict[int, tuple[Finding, ...]]:
    """Password arguments of connect/login calls (which may span lines, so
    they are found on the whole text), as findings of the lines they are on."""
    spans = call_findings(text)
    if not spans:
        return {}
    starts = [0]
    for line in lines[:-1]:
        starts.append(starts[-1] + len(line) + 1)
    by_line: dict[int, tuple[Finding, ...]] = {}
    for kind, start, end in spans:
        index = bisect.bisect_right(starts, start) - 1
        a, b = start - starts[index], end - starts[index]
        by_line[index] = (*by_line.get(index, ()), Finding(kind, lines[index][a:b], a, b))
    return by_line


def _replace_findings(
    line: str, findings: Iterable[Finding]
) -> tuple[str, list[tuple[str, list[str]]]]:
    """`line` with its findings replaced — those with a place exactly there
    (right to left; one overlapping another is skipped), the others wherever
    their value occurs — and, per finding that replaced anything, its type
    and the texts it replaced."""
    hits: list[tuple[str, list[str]]] = []
    placed = sorted((f for f in findings if f.start >= 0), key=lambda f: (-f.start, f.end))
    limit = len(line)
    for finding in placed:
        if finding.end > limit or finding.start >= finding.end:
            continue
        hits.append((finding.type, [line[finding.start : finding.end]]))
        line = line[: finding.start] + placeholder_for(finding.type) + line[finding.end :]
        limit = finding.start
    for finding in findings:
        if finding.start < 0:
            line, secrets = _replace_secret(line, finding)
            if secrets:
                hits.append((finding.type, secrets))
    return line, hits


def _valid_utf8(text: str) -> str:
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return text


def _replace_secret(line: str, finding: Finding) -> tuple[str, list[str]]:
    """Replace each occurrence of the finding, widened to the whole token it
    sits in (detect-secrets reports only the prefix of some tokens, e.g.
    `ghp` for a GitHub token); also returns the texts replaced."""
    start = line.find(finding.value)
    replaced: list[str] = []
    if start < 0:
        return line, replaced
    placeholder = placeholder_for(finding.type)
    while start >= 0:
        end = start + len(finding.value)
        while start > 0 and _TOKEN_CHAR.match(line[start - 1]):
            start -= 1
        while end < len(line) and _TOKEN_CHAR.match(line[end]):
            end += 1
        replaced.append(line[start:end])
        line = line[:start] + placeholder + line[end:]
        start = line.find(finding.value, start + len(placeholder))
    return line, replaced


def has_placeholder(text: str) -> bool:
    return PLACEHOLDER_PREFIX in text and _PLACEHOLDER.search(text) is not None


# ---- dedup -----------------------------------------------------------------

_WORD = re.compile(r"\w+|[^\w\s]")


def dedup_text(record: dict[str, Any]) -> str:
    """The part of an instance that makes it what it is: for a completion,
    the line being completed with a few lines around it."""
    kind = record["kind"]
    if kind == "completion":
        before = "\n".join(str(record["prefix"]).split("\n")[-4:])
        after = "\n".join(str(record["suffix"]).split("\n")[:3])
        return f"{before}{record['target']}{after}"
    if kind in ("module_lookup", "doc_modules"):
        return f"{record['query']}\n{' '.join(record['modules'])}"
    return f"{record['prompt']}\n{record['target']}"


def exact_key(text: str) -> str:
    return hashlib.sha1(re.sub(r"\s+", "", text).encode()).hexdigest()


def shingles(text: str, size: int = 3) -> set[bytes]:
    words = _WORD.findall(text)
    if len(words) < size:
        return {" ".join(words).encode()}
    return {" ".join(words[i : i + size]).encode() for i in range(len(words) - size + 1)}


@dataclass
class DedupResult:
    kept: list[dict[str, Any]]
    exact: int = 0
    near: int = 0
    by_kind: dict[str, dict[str, int]] = field(default_factory=dict)


def remove_test_overlap(
    candidates: Sequence[dict[str, Any]],
    test: Sequence[dict[str, Any]],
    threshold: float = 0.8,
    num_perm: int = 64,
) -> DedupResult:
    """Drop from `candidates` (train/validation) every instance that equals a
    test instance of the same kind up to whitespace, or whose MinHash Jaccard
    similarity with one is at least `threshold`."""
    from datasketch import MinHash, MinHashLSH

    result = DedupResult(kept=[])
    test_by_kind: dict[str, list[dict[str, Any]]] = {}
    for record in test:
        test_by_kind.setdefault(record["kind"], []).append(record)
    exact_keys = {(r["kind"], exact_key(dedup_text(r))) for r in test}
    indexes: dict[str, MinHashLSH] = {}
    for kind, records in test_by_kind.items():
        lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        hashes = MinHash.bulk([list(shingles(dedup_text(r))) for r in records], num_perm=num_perm)
        for index, minhash in enumerate(hashes):
            lsh.insert(str(index), minhash)
        indexes[kind] = lsh
    texts = [dedup_text(r) for r in candidates]
    minhashes = MinHash.bulk([list(shingles(t)) for t in texts], num_perm=num_perm)
    for record, text, minhash in zip(candidates, texts, minhashes, strict=True):
        kind = record["kind"]
        counts = result.by_kind.setdefault(kind, {"exact": 0, "near": 0})
        if (kind, exact_key(text)) in exact_keys:
            result.exact += 1
            counts["exact"] += 1
            continue
        lsh = indexes.get(kind)
        if lsh is not None and lsh.query(minhash):
            result.near += 1
            counts["near"] += 1
            continue
        result.kept.append(record)
    return result


# ---- balance ---------------------------------------------------------------

_CONTAINER_DIRS = {"src", "lib", "libs", "packages", "services", "apps", "cmd", "internal", "pkg"}


def top_level_module(path: str) -> str:
    """The module/service an instance belongs to for balancing: the first
    folder (the first two under container folders such as `src/`)."""
    parts = PurePosixPath(path).parts
    if len(parts) <= 1:
        return "(root)"
    if parts[0] in _CONTAINER_DIRS and len(parts) > 2:
        return f"{parts[0]}/{parts[1]}"
    return parts[0]


# A module with less than this share of the records does not count towards
# the modules a dominant one is balanced against.
SUBSTANTIAL_SHARE = 0.05


@dataclass
class BalanceResult:
    kept: list[dict[str, Any]]
    distribution: dict[str, dict[str, int]]  # module -> {"before", "after"}
    applied: bool
    reason: str


def cap_module_share(records: list[dict[str, Any]], cap: float, seed: int) -> BalanceResult:
    """Downsample (seeded) any top-level module holding more than `cap` of
    `records`.

    The cap only makes sense against comparable modules: it is applied when
    there are at least 1/cap modules with SUBSTANTIAL_SHARE of the records
    each (a monorepo with many services), and not in a repository that is
    one package plus its tests and docs, where capping the package would
    throw most of the team's code away. The result says which case held."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault(top_level_module(str(record.get("path", ""))), []).append(record)
    sizes = {name: len(items) for name, items in groups.items()}
    targets, substantial = module_cap_targets(sizes, cap)
    if targets is None:
        return BalanceResult(
            kept=list(records),
            distribution={n: {"before": s, "after": s} for n, s in sorted(sizes.items())},
            applied=False,
            reason=f"{substantial} substantial top-level module(s), fewer than 1/cap",
        )
    kept: list[dict[str, Any]] = []
    distribution: dict[str, dict[str, int]] = {}
    for name, items in sorted(groups.items()):
        target = targets[name]
        if target < len(items):
            kept.extend(items[i] for i in module_sample(seed, name, len(items), target))
        else:
            kept.extend(items)
        distribution[name] = {"before": len(items), "after": target}
    return BalanceResult(kept, distribution, True, f"{substantial} substantial top-level modules")


def module_cap_targets(sizes: dict[str, int], cap: float) -> tuple[dict[str, int] | None, int]:
    """How many records each module keeps under the cap (None: the cap does
    not apply, see `cap_module_share`), and how many modules are substantial."""
    total = sum(sizes.values())
    substantial = sum(1 for size in sizes.values() if size >= SUBSTANTIAL_SHARE * total)
    if not sizes or substantial * cap < 1:
        return None, substantial
    targets = dict(sizes)
    # Shrink the largest groups until every group's share is within the cap.
    for _ in range(len(targets)):
        current = sum(targets.values())
        over = [n for n, size in targets.items() if size > cap * current + 1e-9]
        if not over:
            break
        rest = sum(size for n, size in targets.items() if n not in over)
        allowed = cap * rest / (1 - cap * len(over)) if cap * len(over) < 1 else 0
        for name in over:
            targets[name] = max(1, min(targets[name], math.floor(allowed)))
    return targets, substantial


def module_sample(seed: int, module: str, size: int, target: int) -> list[int]:
    """The positions (ascending) of the `target` records a capped module keeps
    of its `size`, seeded by the module's name."""
    rng = random.Random(f"{seed}:{module}")
    return sorted(rng.sample(range(size), target))
