"""Which open documents never reach a model, whatever the settings.

The rules are the shared core's (`shoptalk.models.exclusion.Exclusion`):
the never-send globs (`.env*`, `*.pem`, `id_rsa*`, `*secret*`, ...), the
repository's `.shoptalkignore` and the user's `[mine] ignore_globs`. The
server applies them to every completion request — with or without the
workspace index — and answers `shoptalk/exclusion` so that the editors can
say "off for this file" and not ask at all. A document outside the
repository is judged by its name (the never-send globs still apply).
"""

from __future__ import annotations

import threading
from pathlib import Path

from pygls.uris import to_fs_path

from shoptalk.models.exclusion import IGNORE_FILE, Exclusion

EXCLUSION_METHOD = "shoptalk/exclusion"

# What an editor shows for each reason (`Exclusion.reason`).
REASON_TEXT = {
    "never_send": "never sent (keys, secrets, environment files)",
    "shoptalkignore": "listed in .shoptalkignore",
    "ignore_glob": "matched by [mine] ignore_globs",
}


class DocumentExclusion:
    """The rules of one repository root, read again when its `.shoptalkignore` changes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: tuple[Path | None, tuple[str, ...], float | None] | None = None
        self._rules = Exclusion()

    def _rules_for(self, root: Path | None, globs: tuple[str, ...]) -> Exclusion:
        stamp: float | None = None
        if root is not None:
            try:
                stamp = (root / IGNORE_FILE).stat().st_mtime
            except OSError:
                stamp = None
        key = (root, globs, stamp)
        with self._lock:
            if key != self._key:
                self._rules = (
                    Exclusion.for_root(root, globs) if root is not None else Exclusion("", globs)
                )
                self._key = key
            return self._rules

    def reason(self, uri: str, root: Path | None, globs: tuple[str, ...] = ()) -> str | None:
        """Why the document at `uri` never reaches a model, or None."""
        path = to_fs_path(uri)
        if path is None:
            return None
        rules = self._rules_for(root, tuple(globs))
        relative: str | None = None
        if root is not None:
            try:
                relative = Path(path).resolve().relative_to(root.resolve()).as_posix()
            except (ValueError, OSError):
                relative = None
        if relative is None:
            # Outside the repository: only the name can be judged.
            return "never_send" if Exclusion().reason(Path(path).name) else None
        return rules.reason(relative)

    def describe(
        self, uri: str, root: Path | None, globs: tuple[str, ...] = ()
    ) -> dict[str, object]:
        """The `shoptalk/exclusion` answer for one document."""
        reason = self.reason(uri, root, globs)
        return {
            "excluded": reason is not None,
            "reason": reason,
            "message": REASON_TEXT.get(reason or "", reason),
        }
