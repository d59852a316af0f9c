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
import re
import unicodedata
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


def _gambit_row(alias: Alias) -> dict[str, str]:
    """An alias prepared the way `gambit.algorithms.gambit.gambit` prepares
    its data frame rows (cleaned name and email, name parts, email base)."""
    from gambit.algorithms.gambit import (
        clean_email,
        clean_name,
        get_email_base,
        get_first_name,
        get_last_name,
        get_penultimate_name,
    )

    name = clean_name(alias.name) or ""
    email = clean_email(alias.email) or ""
    return {
        "name": name,
        "email": email,
        "first_name": get_first_name(name) or "",
        "last_name": get_last_name(name) or "",
        "penultimate_name": get_penultimate_name(name) or "",
        "email_base": get_email_base(email) or "",
    }


def _gambit_pairs(aliases: list[Alias], cache_file: Path | None) -> list[tuple[int, int]]:
    """Pairs of aliases (indexes) that gambit's rule says are one person.

    `gambit.disambiguate_aliases` walks a pandas frame pair by pair (minutes
    for a thousand aliases, on every run); this applies the same comparison
    (`compare_rows`, gambit's default threshold 0.95 and Levenshtein
    similarity) to plain rows, and keeps the matches on disk so that a later
    run only compares the aliases it has not seen against the others. gambit
    merges matches transitively; so does the caller."""
    from gambit.algorithms.gambit import compare_rows

    known: dict[Alias, int] = {}
    known_pairs: list[tuple[Alias, Alias]] = []
    if cache_file is not None:
        try:
            cached = json.loads(cache_file.read_text())
            old = [Alias(name, email) for name, email in cached["aliases"]]
            known = {alias: index for index, alias in enumerate(old)}
            known_pairs = [(old[a], old[b]) for a, b in cached["pairs"]]
        except (OSError, ValueError, KeyError, IndexError, TypeError):
            known, known_pairs = {}, []
    index_of = {alias: index for index, alias in enumerate(aliases)}
    pairs = {(index_of[a], index_of[b]) for a, b in known_pairs if a in index_of and b in index_of}
    rows = [_gambit_row(alias) for alias in aliases]
    fresh = [index for index, alias in enumerate(aliases) if alias not in known]
    fresh_set = set(fresh)
    for i in fresh:
        for j in range(len(aliases)):
            if j == i or (j in fresh_set and j < i):
                continue  # each pair once
            if compare_rows(i, j, rows[i], rows[j], None, thresh=0.95, sim="lev"):
                pairs.add((min(i, j), max(i, j)))
    result = sorted(pairs)
    if cache_file is not None and (fresh or not cache_file.exists()):
        write_json_atomic(
            cache_file,
            {"aliases": [[a.name, a.email] for a in aliases], "pairs": [list(p) for p in result]},
        )
    return result


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
        for i, j in _gambit_pairs(aliases, cache_file):
            join(i, j)
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
