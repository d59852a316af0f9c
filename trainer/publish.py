"""Publishing a repository's promoted model to the team server
(`shoptalk models publish`, and after a promotion when
`[team] publish_on_promote` is set).

What is published is what the local gate promoted (`current.json`), never a
run by name: a team promotion (the merged GGUF) under `[team] team_model`, a
personal one (an adapter GGUF on its base) under the developer's name. The
handoff (docs/team-server.md):

1. the files are copied into `[team] model_dir/<name>/` (temp file, then
   rename; the base GGUF an adapter runs on once into `model_dir/bases/`);
2. `[team] config_file`, a llama_cpp.server multi-model config, gets the
   name's entry (the team model first: llama_cpp.server answers unknown
   names with its first model), written atomically; older files of the name
   are removed;
3. `[team] reload_command` runs (a restart of llama_cpp.server, which reads
   its config at start; or vLLM's `/v1/load_lora_adapter` call).
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shoptalk.models.errors import ShopTalkError
from shoptalk.models.files import partial_name, write_json_atomic
from shoptalk.models.progress import Report, quiet
from shoptalk.models.settings import TeamSettings
from shoptalk.models.store import Promotion, RepoStore

RELOAD_TIMEOUT_S = 300


class PublishError(ShopTalkError):
    pass


@dataclass(frozen=True)
class Published:
    name: str
    run_id: str | None
    model: Path  # the GGUF the team server loads
    adapter: Path | None  # the LoRA it applies (personal adapters)
    config_file: Path | None
    reloaded: bool


def publish_promotion(
    store: RepoStore, team: TeamSettings, name: str | None = None, report: Report = quiet
) -> Published:
    """Publish the repository's promoted model to the team server; returns
    what was published. Raises `PublishError` when nothing is promoted or
    `[team]` is not set up."""
    if team.model_dir is None:
        raise PublishError(
            "[team] model_dir is not set: set it to the team server's model folder "
            "(docs/team-server.md) in shoptalk.toml"
        )
    promotion = store.promotion()
    if promotion is None or not promotion.model:
        raise PublishError(
            f"nothing is promoted for {store.root.name}: only a model the gate promoted is "
            "published (`shoptalk export RUN --promote`, or the watcher's retrain)"
        )
    name = name or served_name(promotion, team)
    folder = team.model_dir.expanduser() / name
    tag = promotion.run_id or "promoted"
    if promotion.adapter:
        model = _copy_once(Path(promotion.host or ""), team.model_dir.expanduser() / "bases")
        source = Path(promotion.adapter)
        copied = _copy(source, folder / f"{tag}-{source.name}")
        adapter: Path | None = copied
        keep = {copied}
    else:
        source = Path(promotion.model)
        model, adapter = _copy(source, folder / f"{tag}-{source.name}"), None
        keep = {model}
    report(f"published {name}: {adapter or model}")
    if team.config_file is not None:
        write_config(team.config_file.expanduser(), name, model, adapter, team.team_model)
        report(f"{team.config_file} serves {name}")
    reloaded = _reload(team.reload_command, report)
    _remove_older(folder, keep)  # after the reload: until then the server may load them
    return Published(name, promotion.run_id, model, adapter, team.config_file, reloaded)


def served_name(promotion: Promotion, team: TeamSettings) -> str:
    """The name a promotion is served under: the developer's for a personal
    adapter, else the team model's."""
    developer = (promotion.personal or {}).get("developer")
    return str(developer) if developer else team.team_model


def publish_if_configured(store: RepoStore, team: TeamSettings, report: Report = quiet) -> bool:
    """After a promotion: publish it when `[team] publish_on_promote` is set."""
    if not team.publish_on_promote:
        return False
    publish_promotion(store, team, report=report)
    return True


def _copy(source: Path, target: Path) -> Path:
    """`source` (and its manifest) to `target`, each through a temp file
    renamed into place."""
    if not source.is_file():
        raise PublishError(
            f"the promoted file {source} is missing; export and promote the run again"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    for src, dst in ((source, target), (_manifest(source), _manifest(target))):
        if src.is_file():
            partial = partial_name(dst, "publish")
            shutil.copyfile(src, partial)
            partial.replace(dst)
    return target


def _copy_once(source: Path, folder: Path) -> Path:
    """A base GGUF shared by adapters: copied when that name is not there yet."""
    target = folder / source.name
    if target.is_file() and source.is_file() and target.stat().st_size == source.stat().st_size:
        return target
    return _copy(source, target)


def _manifest(path: Path) -> Path:
    return path.with_name(path.name + ".manifest.json")


def write_config(
    config_file: Path, name: str, model: Path, adapter: Path | None, team_model: str
) -> None:
    """Set `name`'s entry of a llama_cpp.server config (JSON), keeping every
    other entry and setting; the team model stays first."""
    config: dict[str, Any] = {}
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text())
        except ValueError as exc:
            raise PublishError(
                f"{config_file} is not JSON ({exc}); fix or remove it, then publish again"
            ) from None
    entries = [m for m in config.get("models", []) if m.get("model_alias") != name]
    entry = _entry_like(entries, name, model, adapter)
    entries.append(entry)
    entries.sort(key=lambda m: m.get("model_alias") != team_model)
    write_json_atomic(config_file, {**config, "models": entries})


def _entry_like(
    entries: list[dict[str, Any]], name: str, model: Path, adapter: Path | None
) -> dict[str, Any]:
    """A new entry with the load settings (context, threads) of the existing ones."""
    shared = {"n_ctx", "n_threads", "n_threads_batch", "n_gpu_layers", "verbose"}
    entry = {k: v for k, v in (entries[0] if entries else {}).items() if k in shared}
    entry.update({"model": str(model), "model_alias": name})
    if adapter is not None:
        entry["lora_path"] = str(adapter)
    return entry


def _remove_older(folder: Path, keep: set[Path]) -> None:
    kept = keep | {_manifest(path) for path in keep}
    for path in folder.iterdir():
        if path.is_file() and path not in kept and not path.name.startswith("."):
            path.unlink(missing_ok=True)


def _reload(command: str | None, report: Report) -> bool:
    if not command:
        return False
    try:
        done = subprocess.run(
            shlex.split(command), capture_output=True, text=True, timeout=RELOAD_TIMEOUT_S
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PublishError(
            f"[team] reload_command {command!r} did not run ({exc}); the files are published: "
            "fix the command and run `shoptalk models publish` again"
        ) from None
    if done.returncode != 0:
        raise PublishError(
            f"[team] reload_command {command!r} failed (exit {done.returncode}): "
            f"{(done.stderr or done.stdout).strip()[-500:]}; the files are published: fix the "
            "command and run `shoptalk models publish` again"
        )
    report(f"reloaded: {command}")
    return True
