"""Which repository a server started by an editor serves, and its settings.

Editors start `shoptalk serve --stdio` without `--repo`; the repository is
then the git work tree around the workspace folder (or, with no folder open,
around the first opened document), found the way `--repo` names it: its top
folder. Its `shoptalk.toml` is applied in the usual order (defaults < user
config < the repository's file < environment < the CLI's flags), and the
client's initializationOptions on top. A broken file is reported and the
server goes on with the other layers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from shoptalk.models.errors import ShopTalkError
from shoptalk.models.settings import REPO_CONFIG_NAME, Settings

log = logging.getLogger(__name__)

LoadSettings = Callable[[Path | None], Settings]


def find_repository(start: Path) -> Path | None:
    """The top folder of the git work tree holding `start` (a folder or a
    file): the nearest folder upwards with a `.git` (a folder, or the file
    of a worktree or submodule). None outside any work tree."""
    try:
        start = start.expanduser().resolve()
        folder = start if start.is_dir() else start.parent
        for candidate in (folder, *folder.parents):
            if (candidate / ".git").exists():
                return candidate
    except OSError as exc:
        log.warning("cannot look for the repository of %s: %s", start, exc)
    return None


def repository_settings(
    repo: Path, load: LoadSettings, fallback: Settings
) -> tuple[Settings, str | None]:
    """`repo`'s settings in the usual layers, or `fallback` and why when its
    `shoptalk.toml` cannot be used."""
    try:
        return load(repo), None
    except (ShopTalkError, ValueError, OSError) as exc:
        return fallback, (
            f"ShopTalk: the settings of {repo / REPO_CONFIG_NAME} were not applied "
            f"(the other settings are used): {exc}"
        )
