"""Typed settings, read in order from: defaults, the user's config file, a
`shoptalk.toml` in the repository, environment variables, CLI flags.

Every source is validated on its own so that an error names the file (or
variable) and key it came from, and all problems are reported at once.

Environment variables: `SHOPTALK_<SECTION>__<KEY>` (e.g.
`SHOPTALK_TRAIN__LORA_RANK=8`) and `SHOPTALK_DATA_DIR`; an empty value counts
as unset. `SHOPTALK_CONFIG` names the user's config file instead of the
platform's default (then it must exist).
"""

from __future__ import annotations

import os
import tempfile
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import platformdirs
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from shoptalk.models.errors import ShopTalkError

REPO_CONFIG_NAME = "shoptalk.toml"
ENV_PREFIX = "SHOPTALK_"
CONFIG_ENV = "SHOPTALK_CONFIG"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class MineSettings(_Section):
    branch: str | None = None  # None: the checked-out branch
    since: str | None = None  # ISO date or git date expression
    until: str | None = None
    cutoff: str | None = None  # ISO date; None: the newest test_instances, see below
    # The held-out windows are as long as the measurement needs, by instances:
    # the newest commits that hold `test_instances` completion instances are the
    # test window, the `validation_instances` before them validation; neither
    # ever longer than its share of all commits (a short history keeps today's
    # 10% / 5%). 0 instances: the share alone (the windows before issue 20).
    test_instances: int = Field(500, ge=0)
    validation_instances: int = Field(300, ge=0)
    test_share: float = Field(0.1, gt=0, lt=1)
    validation_share: float = Field(0.05, ge=0, lt=1)
    test_per_author: int = Field(20, ge=0)
    bot_patterns: list[str] = ["[bot]", "dependabot", "pre-commit-ci", "renovate", "github-actions"]
    mass_change_iqr_factor: float = Field(1.5, ge=0)
    max_file_bytes: int = Field(1_000_000, gt=0)
    max_line_chars: int = Field(1000, gt=0)
    ignore_globs: list[str] = []
    secrets: Literal["scrub", "drop"] = "scrub"
    module_share_cap: float = Field(0.3, gt=0, le=1)
    kinds: list[
        Literal["completion", "module_lookup", "commit_message", "test_pair", "doc_modules"]
    ] = [
        "completion",
        "module_lookup",
        "commit_message",
        "test_pair",
        "doc_modules",
    ]
    max_instances_per_commit: int = Field(50, gt=0)
    # The serve budgets (serve.prefix_chars 6,000): instances are clipped as
    # the server clips a document, so training sees what is served.
    prefix_chars: int = Field(6000, gt=0)
    suffix_chars: int = Field(400, ge=0)
    # Completions carry the repository context the server would have built at
    # the parent commit (candidates stored; rendered for any context budget).
    context: bool = True
    # ...only for the newest this many commits (and the validation and test
    # windows): training reads the newest first, evaluation the windows, and
    # a commit's context costs ~1 CPU-s on sympy (50k commits: hours; 500
    # commits hold ~6k completions, more than a CPU training run reads). None: all.
    context_commits: int | None = Field(500, ge=0)
    # Processes reading commits in a long history (from 256 commits; Linux
    # only, where the workers are forked safely; never more than the CPUs).
    # 1,208 sympy commits, context off, quiet 2-CPU machine: 1 process 50 s,
    # 2 processes 28 s (1.81x); with another job on both cores two were slower.
    workers: int = Field(2, ge=1)
    seed: int = 0
    alias_file: Path | None = None


class TrainSettings(_Section):
    base: str = "gemma3-270m"
    lora_rank: int = Field(16, gt=0)
    lora_alpha: int = Field(32, gt=0)
    # 0: dropout on every adapted projection's input cost ~15% of a CPU step
    # and no run here has had enough data to overfit (docs/benchmarks.md).
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | None = None  # None: per-architecture default
    # LoRA only on the upper (1 - x) of the layers, so backward stops early.
    # None: 0.5 on CPU (5.2x the naive loop's tokens/s instead of 2.9x, see
    # docs/benchmarks.md), 0 (every layer) on CUDA and MPS.
    layers_from: float | None = Field(None, ge=0, lt=1)
    learning_rate: float = Field(2e-4, gt=0)
    batch_size: int = Field(1, gt=0)
    grad_accum: int = Field(4, gt=0)
    max_seq_tokens: int = Field(512, gt=16)
    max_minutes: float | None = Field(None, gt=0)
    max_steps: int | None = Field(None, gt=0)
    replay_share: float = Field(0.1, ge=0, lt=1)
    replay_dirs: list[Path] = []
    pretrain_minutes: float = Field(0.0, ge=0)  # phase 1 (continued pre-training); 0 = off
    # How completion instances are prompted: auto = FIM for bases pre-trained
    # on FIM, prefix-only for the others (the served model uses the same).
    completion_format: Literal["auto", "fim", "prefix"] = "auto"
    # Newest instances first in the first pass over the data, so that a
    # budget that ends early has learned the code closest to today's.
    recent_first: bool = True
    kind_weights: dict[str, float] = {}
    val_every: int = Field(50, gt=0)
    patience: int = Field(4, ge=0)
    # Checkpoints are chosen by greedy exact match on this many validation
    # completions (one line) at each evaluation, ties by validation loss;
    # 0: by validation loss alone.
    select_instances: int = Field(32, ge=0)
    # The chosen checkpoint and the base are measured on this many of the
    # newest test-window completions (paired exact match) before the final
    # pass; promotion reads this measurement. 0: not measured.
    measure_instances: int = Field(200, ge=0)
    # After the checkpoint is chosen and measured, one pass over the held-out
    # windows (validation + test), so the served adapter knows the newest code.
    final_pass: bool = True
    threads: int | None = Field(None, gt=0)
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    seed: int = 0


class ExportSettings(_Section):
    # Q8_0, not Q4_K_M: a LoRA update is ~1% of a weight, below a 4/5-bit
    # quantization step, so Q4_K_M rounds most of it away (trained run on
    # pallets/click: top-1 agreement with the merged model 94.0% for Q4_K_M,
    # 90.7% for the untouched base, 98.8% for Q8_0; docs/benchmarks.md).
    quant: Literal["f32", "f16", "q8_0", "q4_k_m", "q5_k_m"] = "q8_0"


class ServeSettings(_Section):
    backend: Literal["llama", "openai"] = "llama"
    openai_url: str | None = None
    # The name the team server serves the team model under (its first model
    # when unset); a developer who opted in sets openai_personal_model to the
    # name of their own adapter there, and every request asks for that one.
    openai_model: str | None = None
    openai_personal_model: str | None = None
    # The answer's time budget: "auto" measures this machine's decode speed
    # when the model loads (shoptalk.models.speed); a number fixes it.
    max_latency_ms: Annotated[int, Field(gt=0)] | Literal["auto"] = "auto"
    max_tokens: int = Field(48, gt=0)
    multiline: Literal["auto", "always", "never"] = "auto"
    # llama.cpp's context; raised to what the budgets below need (~3 chars/token).
    context_tokens: int = Field(1024, ge=256)
    # 6,000 characters before the cursor: +5 exact-match points over 1,600 on
    # two public repositories' newest commits, untuned base (docs/benchmarks.md).
    prefix_chars: int = Field(6000, gt=0)
    suffix_chars: int = Field(400, ge=0)
    # Where the code after the cursor goes: auto (FIM for FIM models, else
    # before), fim, before (plain text ahead of the prefix, for bases without
    # FIM) or none.
    suffix_layout: Literal["auto", "fim", "before", "none"] = "auto"
    # The repository context block (0 = off) and the copy channel: on, with
    # the `before` layout, +3.0 exact-match points over 6,000 characters alone
    # on 700 newest instances of three public repositories (McNemar p =
    # 0.0015; docs/benchmarks.md, issue 19).
    context_chars: int = Field(2000, ge=0)
    context_sources: list[Literal["snippets", "imports", "recent"]] = [
        "snippets",
        "imports",
        "recent",
    ]
    copy_channel: bool = True  # offer continuations copied from the repository
    threads: int | None = Field(None, gt=0)
    gpu_layers: int = -1  # -1: all, when llama.cpp was built with GPU offload
    idle_prefill_ms: int = Field(300, ge=0)
    watch: bool = False
    log_file: Path | None = None


class EvalSettings(_Section):
    limit: int | None = Field(None, gt=0)
    bootstrap: int = Field(1000, ge=100)
    max_tokens: int = Field(64, gt=0)


class WatchSettings(_Section):
    min_new_instances: int = Field(20, gt=0)
    quiet_seconds: float = Field(60.0, ge=0)
    tolerance: float = Field(0.01, ge=0)
    # Training budget of a job; with the evaluation and export a job fits in
    # ~10 minutes on a 2-core CPU with the default model (bench_retrain.py).
    train_minutes: float = Field(4.0, gt=0)
    # Newest test instances the gate compares candidate and current on (both
    # models run on each: on a CPU about 1-2 s per instance per model).
    holdout: int = Field(60, gt=0)


class PersonalSettings(_Section):
    enabled: bool = False
    identity: list[str] = []  # emails and/or names of the developer


class TeamSettings(_Section):
    """Where promoted models are published for the team server
    (docs/team-server.md): a llama_cpp.server multi-model config, or any
    server a `reload_command` tells about new files (vLLM's adapter API)."""

    model_dir: Path | None = None  # the team server's model folder (published files)
    config_file: Path | None = None  # llama_cpp.server --config_file (JSON), rewritten
    reload_command: str | None = None  # run after publishing (restart, or an API call)
    team_model: str = "team"  # the name the team model is served under
    publish_on_promote: bool = False  # publish each promotion as it happens


class Settings(_Section):
    data_dir: Path | None = None
    mine: MineSettings = MineSettings()
    train: TrainSettings = TrainSettings()
    export: ExportSettings = ExportSettings()
    serve: ServeSettings = ServeSettings()
    eval: EvalSettings = EvalSettings()
    watch: WatchSettings = WatchSettings()
    personal: PersonalSettings = PersonalSettings()
    team: TeamSettings = TeamSettings()
    # Where `data_dir` was set (a file, "environment", "command line"), for messages.
    _data_dir_source: str = PrivateAttr("default")

    def resolved_data_dir(self) -> Path:
        if self.data_dir is not None:
            return self.data_dir.expanduser()
        return Path(platformdirs.user_data_dir("shoptalk", appauthor=False))

    def writable_data_dir(self) -> Path:
        """The data dir, created if missing; SettingsError (naming where the
        setting came from) when it cannot be a folder ShopTalk writes into."""
        path = self.resolved_data_dir()
        problem = data_dir_problem(path)
        if problem is not None:
            source = self._data_dir_source
            name = {"environment": "SHOPTALK_DATA_DIR", "command line": "--data-dir"}.get(source)
            raise SettingsError([f"{source}: {name or 'data_dir'}: {problem}"])
        return path


def data_dir_problem(path: Path) -> str | None:
    """Why `path` cannot serve as the data dir (None: it can, and now exists)."""
    blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        where = "" if blocker == path else f" ({blocker} is a file)"
        return f"{path} is not a folder{where}; point it at a folder"
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        return (
            f"cannot create or write {path} ({exc.strerror or exc}); "
            "point it at a folder you can write to"
        )
    return None


class SettingsError(ShopTalkError):
    """All problems found in the settings sources, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__(
            "invalid settings:\n"
            + "\n".join(f"  - {p}" for p in problems)
            + "\nFix these keys (see `shoptalk --help` and README, section Settings)."
        )


def user_config_path(environ: dict[str, str] | None = None) -> Path:
    override = (os.environ if environ is None else environ).get(CONFIG_ENV)
    if override:
        return Path(override)
    return Path(platformdirs.user_config_dir("shoptalk", appauthor=False)) / "config.toml"


def _describe(error: dict[str, Any]) -> str:
    loc = [str(p) for p in error["loc"]]
    where = f"[{loc[0]}] {'.'.join(loc[1:])}" if len(loc) > 1 else loc[0] if loc else "(top)"
    if error["type"] == "extra_forbidden":
        return f"{where}: unknown key"
    value = error.get("input")
    return f"{where}: {error['msg']} (got {value!r})"


def _check(source: str, data: dict[str, Any], problems: list[str]) -> None:
    try:
        Settings.model_validate(data)
    except ValidationError as exc:
        problems.extend(f"{source}: {_describe(e)}" for e in exc.errors())  # type: ignore[arg-type]


def _read_toml(path: Path, problems: list[str], named_by: str | None = None) -> dict[str, Any]:
    """A settings file's table; {} (and a problem) when it cannot be read.
    A file named by a variable (`named_by`) must exist; an optional one may not."""
    if not path.exists() and not path.is_symlink():
        if named_by is not None:
            problems.append(
                f"{path}: does not exist (named by {named_by}); create it, or unset {named_by}"
            )
        return {}
    if path.is_dir():
        fix = f"point {named_by} at a file" if named_by else "remove or rename that folder"
        problems.append(f"{path}: is a folder, not a settings file; {fix}")
        return {}
    try:
        raw = path.read_bytes()
    except OSError as exc:
        problems.append(f"{path}: cannot read: {exc.strerror or exc}")
        return {}
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        problems.append(
            f"{path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
            "save it as UTF-8"
        )
        return {}
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        problems.append(f"{path}: not valid TOML: {exc}")
    return {}


def _env_overrides(environ: dict[str, str], problems: list[str]) -> dict[str, Any]:
    data: dict[str, Any] = {}
    sections = set(Settings.model_fields) - {"data_dir"}
    for name, value in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or name == CONFIG_ENV or value == "":
            continue  # an empty value means unset (`SHOPTALK_DATA_DIR= shoptalk ...`)
        key = name[len(ENV_PREFIX) :].lower()
        if key == "data_dir":
            data["data_dir"] = value
        elif "__" in key:
            section, field = key.split("__", 1)
            data.setdefault(section, {})[field] = _parse_env_value(value)
        elif key.split("_", 1)[0] in sections:
            # Other SHOPTALK_ variables (the editor plugins' SHOPTALK_PYTHON) are not settings.
            section, _, field = key.partition("_")
            example = f"{ENV_PREFIX}{section.upper()}__{(field or '<key>').upper()}"
            problems.append(
                f"environment: {name}: not a setting; a setting is SHOPTALK_<SECTION>__<KEY> "
                f"with two underscores, e.g. {example}"
            )
    return data


def _parse_env_value(value: str) -> Any:
    """Env values are TOML literals when they parse as one (`8`, `true`,
    `["a", "b"]`), else plain strings."""
    try:
        return tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return value


def _merge(into: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value
    return into


def load_settings(
    repo: Path | None = None,
    overrides: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
    user_config: Path | None = None,
) -> Settings:
    """Resolve settings from every source; raise SettingsError listing all problems."""
    problems: list[str] = []
    merged: dict[str, Any] = {}
    env = dict(os.environ if environ is None else environ)
    sources: list[tuple[str, dict[str, Any]]] = []
    user_file = user_config if user_config is not None else user_config_path(env)
    named_by = CONFIG_ENV if user_config is None and env.get(CONFIG_ENV) else None
    sources.append((str(user_file), _read_toml(user_file, problems, named_by)))
    if repo is not None:
        repo_file = repo / REPO_CONFIG_NAME
        sources.append((str(repo_file), _read_toml(repo_file, problems)))
    sources.append(("environment", _env_overrides(env, problems)))
    if overrides:
        sources.append(("command line", overrides))
    data_dir_source = "default"
    for source, data in sources:
        _check(source, data, problems)
        _merge(merged, data)
        if "data_dir" in data:
            data_dir_source = source
    if problems:
        raise SettingsError(problems)
    settings = Settings.model_validate(merged)
    settings._data_dir_source = data_dir_source
    return settings
