"""One id per person: merging the name/email aliases of a repository's authors.

Git's own mailmap handling (`.mailmap` in the repository plus the user's
alias file, which uses the same format) runs first, inside `git log`'s `%aN`
and `%aE`; `gambit-disambig` then merges what is left (name and email
variants). The id of a person is derived from the alias they used first, so
it stays the same while new commits arrive.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import unicodedata
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from shoptalk.models.errors import ShopTalkError
from shoptalk.models.files import write_json_atomic


class AliasFileError(ShopTalkError):
    pass


@dataclass(frozen=True)
class Alias:
    name: str
    email: str


@dataclass
class Author:
    id: str
    names: list[str] = field(default_factory=list)
    emails: list[str] = field(default_factory=list)
    commits: int = 0


def is_bot(alias: Alias, patterns: Iterable[str]) -> bool:
    haystack = f"{alias.name} {alias.email}".lower()
    return any(p.lower() in haystack for p in patterns)


def _slug(text: str) -> str:
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    return slug[:40] or "author"


def author_id_for(alias: Alias) -> str:
    """Readable and stable: the name's slug plus a short hash of the email."""
    digest = hashlib.sha1(alias.email.strip().lower().encode()).hexdigest()[:6]
    return f"{_slug(alias.name or alias.email.split('@')[0])}-{digest}"


def _gambit_clusters(aliases: list[Alias]) -> list[int]:
    """gambit's cluster number for each alias (same number: same person)."""
    # gambit draws a tqdm bar per call on stderr; the mine command has its own.
    os.environ.setdefault("TQDM_DISABLE", "1")
    import pandas as pd
    from gambit import disambiguate_aliases

    frame = pd.DataFrame(
        {"alias_name": [a.name for a in aliases], "alias_email": [a.email for a in aliases]}
    )
    with warnings.catch_warnings():
        # gambit uses pandas APIs that newer pandas deprecates; not ours to fix.
        warnings.simplefilter("ignore")
        result = disambiguate_aliases(frame, method="gambit")
    return [int(x) for x in result["author_id"].tolist()]


def _cached_gambit_clusters(aliases: list[Alias], cache_file: Path | None) -> list[int]:
    """gambit compares every pair of aliases (minutes for a thousand); the
    answer only changes when the alias list does, so it is kept on disk."""
    key = hashlib.sha256(
        json.dumps([[a.name, a.email] for a in aliases], ensure_ascii=False).encode()
    ).hexdigest()
    if cache_file is not None:
        try:
            cached = json.loads(cache_file.read_text())
            if cached.get("key") == key:
                return [int(x) for x in cached["clusters"]]
        except (OSError, ValueError, KeyError):
            pass
    clusters = _gambit_clusters(aliases)
    if cache_file is not None:
        write_json_atomic(cache_file, {"key": key, "clusters": clusters})
    return clusters


def merge_aliases(
    first_seen: dict[Alias, int],
    commit_counts: dict[Alias, int] | None = None,
    cache_file: Path | None = None,
) -> dict[Alias, Author]:
    """Map each alias to its person. `first_seen` gives each alias's earliest
    author time; the earliest alias of a person names them. `cache_file`
    keeps gambit's answer for the same alias list."""
    aliases = sorted(first_seen, key=lambda a: (first_seen[a], a.email.lower(), a.name))
    if not aliases:
        return {}
    # Same email (case-insensitive) is the same person before gambit even looks.
    by_email: dict[str, int] = {}
    union = list(range(len(aliases)))

    def find(i: int) -> int:
        while union[i] != i:
            union[i] = union[union[i]]
            i = union[i]
        return i

    def join(i: int, j: int) -> None:
        a, b = find(i), find(j)
        if a != b:
            union[max(a, b)] = min(a, b)

    for index, alias in enumerate(aliases):
        key = alias.email.strip().lower()
        if key and key in by_email:
            join(index, by_email[key])
        else:
            by_email[key] = index
    if len(aliases) > 1:
        clusters = _cached_gambit_clusters(aliases, cache_file)
        first_of: dict[int, int] = {}
        for index, cluster in enumerate(clusters):
            if cluster in first_of:
                join(index, first_of[cluster])
            else:
                first_of[cluster] = index
    counts = commit_counts or {}
    people: dict[int, Author] = {}
    result: dict[Alias, Author] = {}
    for index, alias in enumerate(aliases):
        root = find(index)
        person = people.get(root)
        if person is None:
            person = people[root] = Author(id=author_id_for(aliases[root]))
        if alias.name not in person.names:
            person.names.append(alias.name)
        if alias.email not in person.emails:
            person.emails.append(alias.email)
        person.commits += counts.get(alias, 0)
        result[alias] = person
    return result
