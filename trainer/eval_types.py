"""The evaluation's data: the test instances, the test set, the models of a
comparison and what each produced, and the module-lookup rankings.

Plain data with no behaviour beyond reading a dataset record: `evaluate`
fills these in and `report` turns them into figures, so both import them
from here (neither imports the other's types).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shoptalk.models.catalog import BaseModel, FimTemplate

# Which test instances: the commits after the cutoff, or the whole test split.
SCOPE_NEWEST, SCOPE_SPLIT = "newest", "split"
SCOPES = (SCOPE_NEWEST, SCOPE_SPLIT)


# ------------------------------------------------------------------ test set


@dataclass(frozen=True)
class CompletionInstance:
    id: str
    commit: str
    author_id: str
    author_date: str
    path: str
    prefix: str
    suffix: str
    target: str
    masked_tokens: int
    # The repository context's candidates mined with the instance (None: a
    # dataset mined without them); rendered for the run's `PromptConfig`.
    context: dict[str, Any] | None = None

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> CompletionInstance:
        target = str(record["target"])
        context = record.get("context")
        return cls(
            id=str(record["id"]),
            commit=str(record.get("commit", "")),
            author_id=str(record.get("author_id", "unknown")),
            author_date=str(record.get("author_date", "")),
            path=str(record.get("path", "")),
            prefix=str(record.get("prefix", "")),
            suffix=str(record.get("suffix", "")),
            target=target,
            masked_tokens=int(record.get("masked_tokens") or len(target.split())),
            context=context if isinstance(context, dict) else None,
        )


@dataclass(frozen=True)
class ModuleLookupInstance:
    id: str
    commit: str
    author_id: str
    query: str
    modules: tuple[str, ...]
    author_date: str = ""

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> ModuleLookupInstance:
        return cls(
            id=str(record["id"]),
            commit=str(record.get("commit", "")),
            author_id=str(record.get("author_id", "unknown")),
            query=str(record["query"]),
            modules=tuple(str(m) for m in record.get("modules", [])),
            author_date=str(record.get("author_date", "")),
        )


@dataclass
class EvalSet:
    """The instances every model is scored on, and where they came from."""

    completion: list[CompletionInstance]
    module_lookup: list[ModuleLookupInstance]
    manifest: dict[str, Any]
    available: int  # completion test instances in scope before --limit
    scope: str = SCOPE_NEWEST

    def commit_range(self) -> dict[str, Any]:
        dates = sorted(i.author_date for i in self.completion if i.author_date)
        return {
            "commits": len({i.commit for i in self.completion}),
            "first_author_date": dates[0] if dates else None,
            "last_author_date": dates[-1] if dates else None,
            "cutoff": self.manifest.get("cutoff"),
            "mined_range": self.manifest.get("commit_range") or self.manifest.get("range"),
        }


# ------------------------------------------------------------------ prompts

# `shoptalk eval --context-config NAME`: the rows of the context ablation
# (issue 19), as serve settings. `today` is the prompt served before it;
# the repository context uses ~2,000 characters, as the naive measurement
# that motivated it. Each key can be set on its own on top of a preset.
CONTEXT_CONFIGS: dict[str, dict[str, Any]] = {
    "today": {"prefix_chars": 1600, "suffix_layout": "none", "context_chars": 0},
    "file6k": {"prefix_chars": 6000, "suffix_layout": "none", "context_chars": 0},
    "suffix": {"prefix_chars": 6000, "suffix_layout": "before", "context_chars": 0},
    "snippets": {
        "prefix_chars": 6000,
        "suffix_layout": "none",
        "context_chars": 2048,
        "context_sources": ["snippets"],
    },
    "all": {
        "prefix_chars": 6000,
        "suffix_layout": "before",
        "context_chars": 2048,
        "context_sources": ["snippets", "imports", "recent"],
    },
}


# ------------------------------------------------------------------ models


@dataclass(frozen=True)
class ResolvedModel:
    """A model of the comparison: the GGUF (and adapter) to load, how to
    prompt it, and what its manifests say it is."""

    spec: str
    model: Path
    adapter: Path | None
    use_fim: bool
    base: BaseModel
    run_id: str | None = None
    manifests: dict[str, Any] = field(default_factory=dict)
    # What of the run is evaluated when it is not simply its served export
    # (the measured checkpoint of a run with a final pass), or why the
    # figures are not held out; the report and its verdict say it.
    note: str | None = None

    @property
    def template(self) -> FimTemplate:
        return self.base.fim


# ------------------------------------------------------------------ results


@dataclass
class ModelRun:
    """What one model produced on the test set (plain data, in instance order)."""

    spec: str
    predictions: list[str]
    latencies: list[float]
    general_instances: int = 0
    general_exact: int = 0
    humaneval_total: int = 0
    humaneval_passed: int = 0


@dataclass
class LookupRankings:
    """Ranked module ids per module-lookup query, per ranking ("retrieval",
    "<model>: hybrid", "<model>: model"); or why there are none."""

    rankings: dict[str, list[list[str]]] = field(default_factory=dict)
    reason: str | None = None
