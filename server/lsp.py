"""The language server: thin pygls handlers over the completion engine,
module lookup and the model registry.

Inference runs on one worker thread, never on the JSON-RPC loop. A new
completion request makes every older one stale (newest wins): a stale request
still queued is answered empty without touching the model, a running one
stops at its next token. `$/cancelRequest` sets the same flag. Suggestions the
user is typing through are answered from the engine's cache on the loop
itself. Problems the user must act on (a bad setting, a damaged model) are
shown once with `window/showMessage`; everything else goes to the log
(stderr or a file), never to stdout, which carries the protocol.

The bytes under the handlers are read by `shoptalk.server.protocol` (framing
that survives a hostile client, one answer per request, the protocol's
order). One process loads one model: `initialize` is accepted once, and a
TCP server serves one client (a second connection is refused, the first
keeps working).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

from lsprotocol import types
from pydantic import ValidationError
from pygls.io_ import StdoutWriter
from pygls.lsp.server import LanguageServer
from pygls.uris import to_fs_path

from shoptalk.models.completion import Suggestion, offset_to_utf16, utf16_to_offset
from shoptalk.models.context import Workspace
from shoptalk.models.errors import ShopTalkError
from shoptalk.models.jobs import Job
from shoptalk.models.module_lookup import (
    LookupAnswer,
    ModuleIndex,
    lookup_modules,
    retriever_changed,
    served_module_index,
)
from shoptalk.models.module_map import ModuleMap, language_for, module_map_from_tree
from shoptalk.models.prompt import PromptPlan
from shoptalk.models.registry import ModelChoice, ModelRegistry, build_backend
from shoptalk.models.settings import PersonalSettings, ServeSettings, Settings
from shoptalk.server.answer_notes import AnswerNotes
from shoptalk.server.document_exclusion import EXCLUSION_METHOD, DocumentExclusion
from shoptalk.server.protocol import (
    CHUNK_BYTES,
    FrameReader,
    ListenError,
    Message,
    ShopTalkProtocol,
    serve_frames,
    stdin_chunks,
)
from shoptalk.server.repository import LoadSettings, find_repository, repository_settings
from shoptalk.server.workspace_sync import WorkspaceSync, relative_path

if TYPE_CHECKING:
    from shoptalk.server.continuous import ContinuousLearner

log = logging.getLogger(__name__)

SERVER_NAME = "shoptalk"
SERVER_VERSION = "0.1.0"
FIND_MODULE_METHOD = "shoptalk/findModule"
FIND_MODULE_COMMAND = "shoptalk.findModule"
STATUS_METHOD = "shoptalk/status"
PREFILL_METHOD = "shoptalk/prefill"
LAST_PROMPT_METHOD = "shoptalk/lastPrompt"
PROMOTION_POLL_S = 2.0

T = TypeVar("T")


@dataclass
class ServerConfig:
    """How `shoptalk serve` was started (the CLI fills it)."""

    settings: Settings
    repo: Path | None = None  # None: the workspace root sent by the client
    model: Path | None = None  # served instead of the default base when nothing is promoted
    poll_s: float = PROMOTION_POLL_S
    # The settings of a repository found from the workspace (`--repo`'s layers);
    # None: `settings` as they are.
    load_settings: LoadSettings | None = None


@dataclass
class _Request:
    cancelled: threading.Event = field(default_factory=threading.Event)
    received: float = field(default_factory=time.monotonic)


def _field(params: Any, name: str, default: Any = None) -> Any:
    """A field of custom-request params, which arrive as an object or a dict."""
    if params is None:
        return default
    if isinstance(params, dict):
        return params.get(name, default)
    return getattr(params, name, default)


def _plain(value: Any) -> Any:
    """Custom-request params as plain JSON values."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        if hasattr(value, "_fields"):
            return {k: _plain(getattr(value, k)) for k in value._fields}
        return [_plain(v) for v in value]
    if hasattr(value, "__dict__"):
        return {k: _plain(v) for k, v in vars(value).items() if not k.startswith("_")}
    return value


def parse_client_options(options: Any, base: Settings) -> tuple[Settings, list[str]]:
    """Settings with the client's options applied (the `[serve]` keys, flat or
    under `serve`/`shoptalk`, plus `personal`), and one problem per bad key;
    a bad key keeps its previous value."""
    data = _plain(options) or {}
    problems: list[str] = []
    if not isinstance(data, dict):
        return base, [f"options must be an object, got {type(data).__name__}"]
    if isinstance(data.get("shoptalk"), dict):
        data = data["shoptalk"]
    serve_values = dict(data.get("serve") or {}) if isinstance(data.get("serve"), dict) else {}
    for key, value in data.items():
        if key in ServeSettings.model_fields:
            serve_values[key] = value
        elif key not in ("serve", "personal"):
            problems.append(f"{key}: unknown option")
    serve = base.serve.model_copy()
    for key, value in serve_values.items():
        if key not in ServeSettings.model_fields:
            problems.append(f"serve.{key}: unknown option")
            continue
        try:
            candidate = ServeSettings.model_validate({**serve.model_dump(), key: value})
        except ValidationError as exc:
            message = exc.errors()[0]["msg"]
            problems.append(f"{key}: {message} (got {value!r}); keeping {getattr(serve, key)!r}")
            continue
        serve = candidate
    personal = base.personal
    if "personal" in data:
        try:
            personal = PersonalSettings.model_validate(
                {**base.personal.model_dump(), **(data["personal"] or {})}
            )
        except (ValidationError, TypeError) as exc:
            problems.append(f"personal: {exc.__class__.__name__}: {str(exc).splitlines()[0]}")
    return base.model_copy(update={"serve": serve, "personal": personal}), problems


class ShopTalkServer(LanguageServer):
    """The pygls server and the state behind its handlers."""

    protocol: ShopTalkProtocol

    def __init__(self, config: ServerConfig) -> None:
        super().__init__(SERVER_NAME, SERVER_VERSION, protocol_cls=ShopTalkProtocol)
        self.config = config
        self.settings = config.settings
        self.registry: ModelRegistry | None = None
        self.module_map: ModuleMap | None = None
        self.module_index: ModuleIndex | None = None
        self.workspace_root: Path | None = None
        self.repo: Path | None = None  # whose promoted model and shoptalk.toml are used
        self._client_options: Any = None
        self._looked_for_repo = False
        self.workspace_sync: WorkspaceSync | None = None  # the index for prompt context
        self._lookup_loading = False  # the served retriever is being loaded
        self._lookup_loading_lock = threading.Lock()
        self.last_completion: dict[str, Any] | None = None  # `shoptalk/lastPrompt`
        self.worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="shoptalk-infer")
        self._background = concurrent.futures.ThreadPoolExecutor(
            2, thread_name_prefix="shoptalk-bg"
        )
        self._latest: _Request | None = None
        self._prefill_cancel = threading.Event()
        self._requests: dict[int, _Request] = {}
        self._shown: set[str] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle_handle: asyncio.TimerHandle | None = None
        self._poll_task: asyncio.Task[None] | None = None
        self._ready = threading.Event()
        self.learner: ContinuousLearner | None = None
        self._job_tokens: dict[int, str] = {}
        self._has_client = False
        self.counters: dict[str, int] = {
            "requests": 0,
            "cache_hits": 0,
            "stale": 0,
            "cancelled": 0,
            "answered": 0,
            "quick_answers": 0,  # answered before the whole prompt was read
        }
        self.answer_notes = AnswerNotes()  # loading / over budget: status, status bars, log
        self.exclusion = DocumentExclusion()  # never-send files, whatever the settings

    # -- transports ----------------------------------------------------------

    @property
    def exit_code(self) -> int:
        """0, or 1 when the client sent `exit` without `shutdown` first."""
        return self.protocol.exit_code

    def start_io(self, stdin: BinaryIO | None = None, stdout: BinaryIO | None = None) -> None:
        """Serve one client over a pair of pipes until `exit` or the end of input."""
        self._stop_event = stop_event = threading.Event()
        self.protocol.set_writer(StdoutWriter(stdout or sys.stdout.buffer))
        source = stdin or sys.stdin.buffer

        async def serve() -> None:
            await serve_frames(stdin_chunks(source), self.protocol, stop_event)

        try:
            asyncio.run(serve())
        except BrokenPipeError:
            log.error("the client closed its end of the connection; shutting down")
        except KeyboardInterrupt:
            pass
        finally:
            self.shutdown()

    def start_tcp(self, host: str, port: int) -> None:
        """Serve one client over TCP; the server ends when that client leaves.
        Another connection meanwhile is answered with an error and closed."""
        self._stop_event = stop_event = threading.Event()

        async def serve() -> None:
            done = asyncio.Event()

            async def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                if self._has_client:
                    await _refuse_client(reader, writer)
                    return
                self._has_client = True
                log.info("a client connected from %s", writer.get_extra_info("peername"))
                self.protocol.set_writer(writer)
                try:
                    await serve_frames(lambda: reader.read(CHUNK_BYTES), self.protocol, stop_event)
                except ConnectionError as exc:
                    log.error("the client's connection broke: %s", exc)
                finally:
                    writer.close()
                    done.set()

            try:
                tcp = await asyncio.start_server(connected, host, port)
            except OSError as exc:
                raise ListenError(
                    f"cannot listen on {host}:{port}: {exc.strerror or exc}; "
                    "choose a free --port (1-65535) and an address of this machine for --host"
                ) from None
            self._server = tcp
            addresses = ", ".join(str(sock.getsockname()) for sock in tcp.sockets)
            log.info("Serving on %s", addresses)
            async with tcp:
                await done.wait()

        try:
            asyncio.run(serve())
        except KeyboardInterrupt:
            pass
        finally:
            self.shutdown()

    # -- messages ------------------------------------------------------------

    def show_once(self, message: str, kind: types.MessageType = types.MessageType.Warning) -> None:
        """Tell the user once (per distinct message) and log it."""
        log.warning("%s", message)
        if message in self._shown:
            return
        self._shown.add(message)
        self._call_on_loop(
            lambda: self.window_show_message(types.ShowMessageParams(type=kind, message=message))
        )

    def _call_on_loop(self, action: Callable[[], None]) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            action()
        else:
            loop.call_soon_threadsafe(action)

    def report_server_error(self, error: Exception, source: Any) -> None:
        # pygls shows every protocol error to the user by default; a malformed
        # message or an unknown method is the client's problem: log it only.
        log.error("protocol error (%s): %s", getattr(source, "__name__", source), error)

    # -- model loading -------------------------------------------------------

    def start_loading(self, root: Path | None, repo: Path | None) -> None:
        if self.registry is not None:
            log.warning("the model is loaded already; one model per process")
            return
        self._loop = asyncio.get_running_loop()
        self.workspace_root = root
        self.repo = repo
        self.registry = ModelRegistry(
            repo,
            self.settings,
            notify=lambda event: self.show_once(str(event)),
            backend_factory=self._backend_factory,
            fallback=self.config.model,
        )
        self._background.submit(self._load_then_map, root)
        self.sync_workspace(root)
        self._follow(repo)

    def _load_then_map(self, root: Path | None) -> None:
        """The model first, then the module map: the auto time budget is
        measured as the model loads, and Python work beside it (the map, the
        workspace index) held the interpreter lock often enough to measure
        146 ms per token instead of 13 (a 10 s budget)."""
        self._load_model()
        if root is not None:
            self._build_module_map(root)

    def _follow(self, repo: Path | None) -> None:
        """Poll for promotions of `repo` and, with serve.watch, retrain on its commits."""
        if repo is None:
            return
        if self.config.poll_s > 0 and self._poll_task is None:
            self._poll_task = asyncio.ensure_future(self._poll_promotions())
        if self.settings.serve.watch and self.learner is None:
            self._start_watching(repo)

    # -- the repository and its settings ------------------------------------------

    def settings_for(self, repo: Path | None) -> Settings:
        """The settings for `repo` (its shoptalk.toml in the usual layers when
        the server found it itself) with the client's options on top."""
        base = self.config.settings
        loader = self.config.load_settings
        if repo is not None and self.config.repo is None and loader is not None:
            base, problem = repository_settings(repo, loader, base)
            if problem is not None:
                self.show_once(problem, types.MessageType.Error)
        settings, problems = parse_client_options(self._client_options, base)
        if problems:
            self.show_once(
                "ShopTalk: some settings were ignored (defaults used): " + "; ".join(problems)
            )
        return settings

    def repository_of(self, root: Path | None) -> Path | None:
        """`--repo`, else the work tree around the workspace folder, else the folder."""
        if self.config.repo is not None or root is None:
            return self.config.repo
        return find_repository(root) or root

    def adopt_repository(self, uri: str) -> None:
        """With no workspace folder, the first opened document's repository
        becomes the served one: its settings, promoted model and module map."""
        self._looked_for_repo = True
        path = to_fs_path(uri)
        repo = find_repository(Path(path)) if path else None
        registry = self.registry
        if repo is None or registry is None:
            return
        log.info("serving the repository %s (of %s)", repo, path)
        self.settings = self.settings_for(repo)
        self.repo = self.workspace_root = repo
        registry.repo = repo
        registry.update_settings(self.settings)

        def reload() -> None:
            self._ready.wait()  # after the first load, never beside it
            registry.load()

        self._background.submit(reload)
        self._background.submit(self._build_module_map, repo)
        self.sync_workspace(repo)
        self._follow(repo)

    # -- continuous learning -----------------------------------------------------

    def _start_watching(self, repo: Path) -> None:
        """Retrain after new commits (serve.watch); the job runs in its own
        low-priority process while this server keeps serving the current
        model, and its steps are shown as `$/progress`."""
        from shoptalk.server.continuous import ContinuousLearner

        try:
            self.learner = ContinuousLearner(
                repo,
                self.settings.resolved_data_dir(),
                quiet_seconds=self.settings.watch.quiet_seconds,
                on_job=self._on_job,
            )
            self.learner.start()
        except ShopTalkError as exc:
            self.show_once(f"ShopTalk cannot watch {repo}: {exc}")

    def _on_job(self, job: Job) -> None:
        token = self._job_tokens.get(job.id)
        if job.state == "running" and token is None:
            token = f"shoptalk-job-{job.id}"
            title = "ShopTalk: retraining on new commits"
            if self._begin_progress(token, title, job.step, _percent(job.progress)):
                self._job_tokens[job.id] = token
            return
        if token is None:
            return
        if job.state == "running":
            report = types.WorkDoneProgressReport(
                message=job.step or "", percentage=_percent(job.progress)
            )
            self._call_on_loop(lambda: self.work_done_progress.report(token, report))
        else:
            del self._job_tokens[job.id]
            message = f"{job.state}: {job.message or ''}".strip()
            self._call_on_loop(
                lambda: self.work_done_progress.end(
                    token, types.WorkDoneProgressEnd(message=message)
                )
            )

    def _backend_factory(self, choice: ModelChoice, serve: ServeSettings) -> Any:
        return build_backend(choice, serve)

    def _load_model(self) -> None:
        registry = self.registry
        if registry is None:
            return
        token = str(uuid.uuid4())
        progress = self._begin_progress(token, "ShopTalk: loading the model")
        try:
            registry.load(progress=lambda message: self._report_progress(token, message, progress))
        finally:
            self._end_progress(token, progress, registry)
            self._ready.set()

    def _supports_progress(self) -> bool:
        try:
            window = self.client_capabilities.window
        except Exception:
            return False
        return bool(window and window.work_done_progress)

    def _begin_progress(
        self, token: str, title: str, message: str | None = None, percentage: int | None = None
    ) -> bool:
        if not self._supports_progress():
            return False

        def begin() -> None:
            self.work_done_progress.create(token)
            self.work_done_progress.begin(
                token,
                types.WorkDoneProgressBegin(
                    title=title, message=message, percentage=percentage, cancellable=False
                ),
            )

        self._call_on_loop(begin)
        return True

    def _report_progress(self, token: str, message: str, enabled: bool) -> None:
        if enabled:
            self._call_on_loop(
                lambda: self.work_done_progress.report(
                    token, types.WorkDoneProgressReport(message=message)
                )
            )

    def _end_progress(self, token: str, enabled: bool, registry: ModelRegistry) -> None:
        if not enabled:
            return
        loaded = registry.loaded()
        message = f"serving {loaded.choice.model.name}" if loaded else "no model loaded"
        self._call_on_loop(
            lambda: self.work_done_progress.end(token, types.WorkDoneProgressEnd(message=message))
        )

    async def _poll_promotions(self) -> None:
        while True:
            await asyncio.sleep(self.config.poll_s)
            registry = self.registry
            if registry is not None and self._ready.is_set():
                try:
                    registry.check_for_promotion()
                except Exception:
                    log.exception("checking for a promoted model failed")

    # -- module map ------------------------------------------------------------

    def _build_module_map(self, root: Path) -> None:
        started = time.monotonic()
        try:
            module_map = module_map_from_tree(root)
        except Exception:
            log.exception("could not build the module map of %s", root)
            return
        self.module_map = module_map
        # BM25 alone until the first lookup: the served retriever (an embedding
        # model and every module's vector) is loaded by `find_modules`, not
        # beside typing, where it took ~280 MB and both cores for a while after
        # every start (issue 19: server RSS 1,050 MB with context on).
        self.module_index = ModuleIndex(module_map)
        log.info("module map: %d modules in %.1fs", len(module_map), time.monotonic() - started)

    def _load_lookup_index(self) -> None:
        """Load the lookup's served index in the background, once at a time."""
        with self._lookup_loading_lock:
            if self._lookup_loading:
                return
            self._lookup_loading = True
        self._background.submit(self._serve_lookup_index)

    def _serve_lookup_index(self) -> None:
        """The lookup's served index: the repository's module history and its
        served retriever over the current module map (on the first lookup,
        and again when another retriever is promoted)."""
        try:
            module_map = self.module_map
            if module_map is not None:
                store = self._lookup_store()
                self.module_index = served_module_index(module_map, store, self._data_dir())
        except Exception:
            log.exception("could not load the module lookup's retriever; BM25 answers")
        finally:
            with self._lookup_loading_lock:
                self._lookup_loading = False

    def update_module(self, uri: str, text: str | None) -> None:
        root = self.workspace_root
        module_map = self.module_map
        path = to_fs_path(uri)
        if root is None or module_map is None or path is None:
            return
        try:
            relative = Path(path).resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            return
        if language_for(relative) is None:
            return
        updated = module_map.with_file(relative, text)
        self.module_map = updated
        index = self.module_index
        self.module_index = index.with_map(updated) if index else ModuleIndex(updated)

    def _lookup_store(self) -> Path | None:
        """The repository's artifact folder (its module history and served retriever)."""
        from shoptalk.models.store import RepoStore

        repo = self.repo
        return RepoStore.for_repo(self._data_dir(), repo).root if repo is not None else None

    def _data_dir(self) -> Path:
        return self.settings.resolved_data_dir()

    # -- prompt context ----------------------------------------------------------

    def sync_workspace(self, root: Path | None) -> None:
        """Index the workspace in the background once a setting needs it
        (`context_chars` > 0 or `copy_channel`)."""
        serve = self.settings.serve
        wanted = serve.context_chars > 0 or serve.copy_channel
        if root is None or self.workspace_sync is not None or not wanted:
            return
        self.workspace_sync = sync = WorkspaceSync(root, self.settings)

        def build() -> None:
            # After the model's load and its speed probe (see `_load_then_map`).
            while not self._ready.wait(0.2):
                if sync.closed:
                    return
            sync.build(self.module_map)

        self._background.submit(build)

    def completion_context(self, uri: str) -> tuple[str | None, Workspace | None]:
        """The document's path relative to the workspace, and the workspace
        the engine builds the prompt's context from (None: not indexed)."""
        root = self.workspace_root
        path = relative_path(root, uri) if root is not None else None
        sync = self.workspace_sync
        workspace = sync.workspace if sync is not None else None
        if workspace is not None:
            workspace.module_map = self.module_map
        return path, workspace

    # -- completions -----------------------------------------------------------

    def document_text(self, uri: str) -> str | None:
        try:
            document = self.workspace.get_text_document(uri)
            return document.source
        except Exception:
            return None

    async def run_inference(self, request: _Request, job: Callable[[], T]) -> T | None:
        loop = asyncio.get_running_loop()

        def guarded() -> T | None:
            if request.cancelled.is_set():
                self.counters["stale"] += 1
                return None
            return job()

        future = loop.run_in_executor(self.worker, guarded)
        try:
            return await future
        except asyncio.CancelledError:
            request.cancelled.set()
            self.counters["cancelled"] += 1
            raise

    def new_request(self) -> _Request:
        request = _Request()
        previous = self._latest
        if previous is not None:
            previous.cancelled.set()  # newest wins
        self._prefill_cancel.set()  # a request evaluates its own prompt
        self._latest = request
        return request

    async def suggest(self, uri: str, position: types.Position) -> tuple[str, int, str] | None:
        """(suggestion, cursor offset, document text), or None."""
        self.counters["requests"] += 1
        request = self.new_request()
        text = self.document_text(uri)
        registry = self.registry
        if text is not None and not self._ready.is_set():
            self.answer_notes.loading()
        if text is None or registry is None:
            return None
        engine = registry.engine()
        if engine is None:
            return None
        if self.excluded(uri) or (
            self.workspace_sync is not None and self.workspace_sync.excludes(uri)
        ):
            return None  # an excluded file never enters a prompt
        path, workspace = self.completion_context(uri)
        offset = utf16_to_offset(text, position.line, position.character)
        prefix, suffix = text[:offset], text[offset:]
        cached = engine.cache.get(prefix, suffix)
        if cached is not None:
            self.counters["cache_hits"] += 1
            self.counters["answered"] += 1
            return cached, offset, text
        budget = engine.options.max_latency_ms  # measured when "auto"

        def job() -> Suggestion | None:
            # A request that waited is not dropped for it: a newer request or
            # the editor's cancel makes it stale; the budget bounds its answer.
            try:
                suggestion = engine.complete(
                    text,
                    offset,
                    cancelled=request.cancelled,
                    budget_ms=budget,
                    path=path,
                    workspace=workspace,
                )
                self.last_completion = _last_completion(engine.last_plan, path, suggestion)
                stop = suggestion.generation.stop_reason if suggestion.generation else None
                elapsed = time.monotonic() - request.received
                self.answer_notes.answered(elapsed, budget, stop, bool(suggestion.text))
            except ShopTalkError as exc:
                self.show_once(f"ShopTalk: {exc}", types.MessageType.Error)
                return None
            except Exception as exc:
                log.exception("completion failed")
                self.show_once(
                    f"ShopTalk: completion failed ({exc.__class__.__name__}: {exc}); "
                    "see the server log",
                    types.MessageType.Error,
                )
                return None
            return suggestion

        result = await self.run_inference(request, job)
        if result is not None and result.slot == "quick":
            # Answered before the whole prompt was read: go on reading it now
            # (a newer request interrupts, keeping what was read).
            self.counters["quick_answers"] += 1
            self.schedule_prefill(uri, offset, 0.0)
        if result is None or not result.text:
            return None
        self.counters["answered"] += 1
        return result.text, offset, text

    def exclusion_root(self) -> Path | None:
        return self.repo or self.workspace_root

    def excluded(self, uri: str) -> bool:
        """Never-send files, `.shoptalkignore`, `[mine] ignore_globs` (see
        `shoptalk.server.document_exclusion`)."""
        globs = tuple(self.settings.mine.ignore_globs)
        return self.exclusion.reason(uri, self.exclusion_root(), globs) is not None

    def schedule_prefill(self, uri: str, offset: int | None, delay_s: float) -> None:
        """Evaluate the prompt at `offset` (None: end of document) after a quiet
        pause, unless a request comes first."""
        loop = self._loop
        if loop is None:
            return
        if self._idle_handle is not None:
            self._idle_handle.cancel()
        self._idle_handle = loop.call_later(delay_s, self._prefill_now, uri, offset)

    def _prefill_now(self, uri: str, offset: int | None) -> None:
        registry = self.registry
        text = self.document_text(uri)
        if registry is None or text is None:
            return
        if self.workspace_sync is not None and self.workspace_sync.excludes(uri):
            return
        path, workspace = self.completion_context(uri)
        self._prefill_cancel.set()  # an older prefill (another cursor) is moot now
        self._prefill_cancel = cancel = threading.Event()

        def job() -> None:
            engine = registry.engine()
            if engine is None or cancel.is_set():
                return  # a request came in meanwhile: it evaluates the prompt itself
            where = len(text) if offset is None else max(0, min(offset, len(text)))
            try:
                engine.prefill(text, where, cancel, path=path, workspace=workspace)
            except Exception:
                log.exception("prefill failed")

        self.worker.submit(job)

    # ---- what the handlers use (they never reach into the server's state) ----

    def begin_session(self, client_options: Any) -> None:
        """At `initialize`: the event loop the handlers run on (work done on
        other threads reports back through it) and the client's
        initializationOptions (the top settings layer)."""
        self._loop = asyncio.get_running_loop()
        self._client_options = client_options

    @property
    def looked_for_repo(self) -> bool:
        """Whether the repository was already looked for from a document."""
        return self._looked_for_repo

    @property
    def loading(self) -> bool:
        """True until the first model load has finished (or failed)."""
        return not self._ready.is_set()

    def in_background(self, action: Callable[..., Any], *args: Any) -> None:
        """Run `action(*args)` on the server's worker (model and index work)."""
        self._background.submit(action, *args)

    async def find_modules(self, query: str, limit: int) -> dict[str, Any]:
        """The findModule answer: the modules that implement `query`, best
        first, with their ranges, reasons and the lookup's confidence."""
        index = self.module_index
        if index is None:
            if self.workspace_root is None:
                return {"modules": [], "error": "no workspace folder is open"}
            await asyncio.get_running_loop().run_in_executor(
                self._background, self._build_module_map, self.workspace_root
            )
            index = self.module_index
            if index is None:
                return {"modules": [], "error": "the module map could not be built; see the log"}
        if not index.served or retriever_changed(index, self._lookup_store()):
            # BM25 answers while the retriever loads (on a first start it
            # embeds every module: ~2 minutes for textual's 960 on a busy
            # 2-core machine; its vectors are cached for the next start).
            self._load_lookup_index()
        # BM25 + the retriever (numpy, tens of ms): off the model's worker, so a
        # running completion never delays it; the language model is left out
        # (35-80 s per query on CPU for no gain, docs/benchmarks.md).
        answer: LookupAnswer = await asyncio.get_running_loop().run_in_executor(
            None, lookup_modules, query, index, None, limit
        )
        root = self.workspace_root
        modules = []
        for hit in answer.hits:
            uri = (root / hit.path).as_uri() if root is not None else hit.path
            modules.append(
                {
                    "id": hit.id,
                    "uri": uri,
                    "range": {
                        "start": {"line": hit.start_line, "character": 0},
                        "end": {"line": hit.end_line, "character": 0},
                    },
                    "score": hit.score,
                    "reason": hit.reason,
                    "confidence": hit.confidence,
                }
            )
        verdict = {"confidence": answer.confidence, "abstained": answer.abstained}
        return {"modules": modules, **verdict, "message": answer.message}

    def shutdown(self) -> None:
        # Also reached when the client vanishes (stdin closed): stop the model
        # work first, or the interpreter would wait for queued jobs to finish.
        self.shutdown_workers()
        super().shutdown()

    def shutdown_workers(self) -> None:
        latest = self._latest
        if latest is not None:
            latest.cancelled.set()
        if self._poll_task is not None:
            self._poll_task.cancel()
        if self.learner is not None:
            self.learner.stop()
        if self.workspace_sync is not None:
            self.workspace_sync.close()
        self.worker.shutdown(wait=False, cancel_futures=True)
        self._background.shutdown(wait=False, cancel_futures=True)
        registry = self.registry
        loaded = registry.loaded() if registry else None
        if loaded is not None:
            loaded.engine.backend.close()


SECOND_CLIENT = (
    "this ShopTalk server already serves a client (one client per server); "
    "start another `shoptalk serve --tcp --port N` for this one"
)
REFUSE_WAIT_S = 5.0


async def _refuse_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer a second TCP client's first request with an error and hang up,
    without touching the first client's session."""
    log.warning("refused a second client from %s", writer.get_extra_info("peername"))
    frames = FrameReader(lambda: reader.read(CHUNK_BYTES))
    try:
        frame = await asyncio.wait_for(frames.next(), REFUSE_WAIT_S)
    except (TimeoutError, ConnectionError):
        frame = None
    msg_id = None
    if isinstance(frame, Message) and isinstance(frame.value, dict):
        msg_id = frame.value.get("id")
    if msg_id is not None:
        error = {"code": types.LSPErrorCodes.RequestFailed.value, "message": SECOND_CLIENT}
        answer: dict[str, Any] = {"jsonrpc": "2.0", "id": msg_id, "error": error}
    else:
        answer = {
            "jsonrpc": "2.0",
            "method": types.WINDOW_SHOW_MESSAGE,
            "params": {"type": types.MessageType.Error.value, "message": SECOND_CLIENT},
        }
    body = json.dumps(answer).encode()
    try:
        writer.write(b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()
        await writer.wait_closed()
    except ConnectionError:
        pass


def _root_of(params: types.InitializeParams) -> Path | None:
    uri = None
    if params.workspace_folders:
        uri = params.workspace_folders[0].uri
    elif params.root_uri:
        uri = params.root_uri
    if uri:
        path = to_fs_path(uri)
        return Path(path) if path else None
    if params.root_path:
        return Path(params.root_path)
    return None


def _word_start(text: str, offset: int) -> int:
    start = offset
    while start > 0 and (text[start - 1].isalnum() or text[start - 1] == "_"):
        start -= 1
    return start


# ---- handlers: one per LSP method, over the server's public methods --------------


def initialize(ls: ShopTalkServer, params: types.InitializeParams) -> None:
    ls.begin_session(params.initialization_options)
    root = _root_of(params)
    repo = ls.repository_of(root)
    ls.settings = ls.settings_for(repo)
    ls.start_loading(root, repo)


def did_change_configuration(
    ls: ShopTalkServer, params: types.DidChangeConfigurationParams
) -> None:
    settings, problems = parse_client_options(params.settings, ls.settings)
    if problems:
        ls.show_once(
            "ShopTalk: some settings were ignored (kept the previous values): "
            + "; ".join(problems)
        )
    ls.settings = settings
    registry = ls.registry
    if registry is not None and registry.update_settings(settings):
        ls.in_background(registry.load)
    ls.sync_workspace(ls.workspace_root)


def did_open(ls: ShopTalkServer, params: types.DidOpenTextDocumentParams) -> None:
    if ls.repo is None and not ls.looked_for_repo:
        ls.adopt_repository(params.text_document.uri)
    if ls.workspace_sync is not None:
        ls.workspace_sync.document(params.text_document.uri, params.text_document.text)
    # The end of the document is a guess at the cursor: it waits an idle
    # pause, so the cursor the editor reports after opening (shoptalk/prefill,
    # debounced 250 ms by the clients) replaces it before it reads anything.
    ls.schedule_prefill(params.text_document.uri, None, ls.settings.serve.idle_prefill_ms / 1000.0)


def did_change(ls: ShopTalkServer, params: types.DidChangeTextDocumentParams) -> None:
    text = ls.document_text(params.text_document.uri)
    if text is None or not params.content_changes:
        return
    change = params.content_changes[-1]
    offset: int | None = None
    if isinstance(change, types.TextDocumentContentChangePartial):
        lines = change.text.split("\n")
        end_line = change.range.start.line + len(lines) - 1
        end_char = (
            change.range.start.character + len(lines[0]) if len(lines) == 1 else len(lines[-1])
        )
        offset = utf16_to_offset(text, end_line, end_char)
    if ls.workspace_sync is not None:
        ls.workspace_sync.document(params.text_document.uri, text, debounce=True)
    delay = ls.settings.serve.idle_prefill_ms / 1000.0
    ls.schedule_prefill(params.text_document.uri, offset, delay)


def did_save(ls: ShopTalkServer, params: types.DidSaveTextDocumentParams) -> None:
    ls.update_module(params.text_document.uri, ls.document_text(params.text_document.uri))
    if ls.workspace_sync is not None:
        text = ls.document_text(params.text_document.uri)
        ls.workspace_sync.document(params.text_document.uri, text)


def did_close(ls: ShopTalkServer, params: types.DidCloseTextDocumentParams) -> None:
    if ls.workspace_sync is not None:  # unsaved edits are gone: the file on disk counts
        ls.workspace_sync.document(params.text_document.uri, None)


def did_change_watched_files(ls: ShopTalkServer, params: types.DidChangeWatchedFilesParams) -> None:
    if ls.workspace_sync is not None:
        ls.workspace_sync.files_changed([change.uri for change in params.changes])


def last_prompt(ls: ShopTalkServer, params: Any) -> dict[str, Any] | None:
    """The prompt of the last completion the model answered, its context
    block and token counts (for tests, benchmarks and debugging)."""
    return ls.last_completion


def prefill(ls: ShopTalkServer, params: Any) -> None:
    document = _field(params, "textDocument")
    position = _field(params, "position")
    uri = _field(document, "uri")
    text = ls.document_text(str(uri)) if uri else None
    if text is None:
        return
    offset = utf16_to_offset(
        text, int(_field(position, "line", 0) or 0), int(_field(position, "character", 0) or 0)
    )
    ls.schedule_prefill(str(uri), offset, 0.0)


async def inline_completion(
    ls: ShopTalkServer, params: types.InlineCompletionParams
) -> types.InlineCompletionList | None:
    answer = await ls.suggest(params.text_document.uri, params.position)
    if answer is None:
        return None
    suggestion, offset, text = answer
    line, character = offset_to_utf16(text, offset)
    here = types.Position(line=line, character=character)
    return types.InlineCompletionList(
        items=[
            types.InlineCompletionItem(
                insert_text=suggestion, range=types.Range(start=here, end=here)
            )
        ]
    )


async def completion(
    ls: ShopTalkServer, params: types.CompletionParams
) -> types.CompletionList | None:
    answer = await ls.suggest(params.text_document.uri, params.position)
    if answer is None:
        return types.CompletionList(is_incomplete=True, items=[])
    suggestion, offset, text = answer
    start = _word_start(text, offset)
    word = text[start:offset]
    start_line, start_char = offset_to_utf16(text, start)
    end_line, end_char = offset_to_utf16(text, offset)
    edit_range = types.Range(
        start=types.Position(line=start_line, character=start_char),
        end=types.Position(line=end_line, character=end_char),
    )
    first_line = suggestion.split("\n", 1)[0]
    label = (word + first_line).strip() or suggestion.strip()
    item = types.CompletionItem(
        label=label[:80],
        kind=types.CompletionItemKind.Snippet,
        detail="ShopTalk",
        documentation=suggestion,
        filter_text=word + suggestion,
        sort_text="0",
        preselect=True,
        text_edit=types.TextEdit(range=edit_range, new_text=word + suggestion),
        insert_text_format=types.InsertTextFormat.PlainText,
    )
    return types.CompletionList(is_incomplete=True, items=[item])


def _query_args(query: Any, limit: Any) -> tuple[str, int]:
    text = query if isinstance(query, str) else ""
    try:
        count = int(limit) if limit is not None else 5
    except (TypeError, ValueError):
        count = 5
    return text, max(1, min(count, 50))


async def find_module(ls: ShopTalkServer, params: Any) -> dict[str, Any]:
    query, limit = _query_args(_field(params, "query"), _field(params, "limit"))
    if not query.strip():
        return {"modules": [], "error": "the query is empty"}
    return await ls.find_modules(query, limit)


async def find_module_command(ls: ShopTalkServer, *args: Any) -> dict[str, Any]:
    values = list(args[0]) if len(args) == 1 and isinstance(args[0], list | tuple) else list(args)
    query, limit = _query_args(
        values[0] if values else None, values[1] if len(values) > 1 else None
    )
    if not query.strip():
        return {"modules": [], "error": "the query is empty"}
    return await ls.find_modules(query, limit)


def exclusion(ls: ShopTalkServer, params: Any) -> dict[str, Any]:
    document = _field(params, "textDocument")
    return ls.exclusion.describe(
        str(_field(document, "uri", "")),
        ls.exclusion_root(),
        tuple(ls.settings.mine.ignore_globs),
    )


def status(ls: ShopTalkServer, params: Any) -> dict[str, Any]:
    registry = ls.registry
    info: dict[str, Any] = registry.status() if registry else {"model": None}
    info["loading"] = ls.loading
    info["modules"] = len(ls.module_map) if ls.module_map is not None else None
    info["index"] = ls.workspace_sync.stats() if ls.workspace_sync is not None else None
    info["counters"] = dict(ls.counters)
    notes = ls.answer_notes.status()
    info["answer"] = notes["answer"]  # the last answer: ok, loading, over budget (...)
    info["counters"].update(notes["counters"])
    info["repo"] = str(ls.repo) if ls.repo is not None else None
    info["serve"] = ls.settings.serve.model_dump(mode="json")
    info.update(_training_status(ls))
    return info


def shutdown(ls: ShopTalkServer, params: Any) -> None:
    ls.shutdown_workers()


def create_server(config: ServerConfig) -> ShopTalkServer:
    """The language server with every handler registered (the handlers are
    the top-level functions above, over the server's public methods)."""
    server = ShopTalkServer(config)
    server.feature(types.INITIALIZE)(initialize)
    server.feature(types.WORKSPACE_DID_CHANGE_CONFIGURATION)(did_change_configuration)
    server.feature(types.TEXT_DOCUMENT_DID_OPEN)(did_open)
    server.feature(types.TEXT_DOCUMENT_DID_CHANGE)(did_change)
    server.feature(types.TEXT_DOCUMENT_DID_SAVE)(did_save)
    server.feature(types.TEXT_DOCUMENT_DID_CLOSE)(did_close)
    server.feature(types.WORKSPACE_DID_CHANGE_WATCHED_FILES)(did_change_watched_files)
    server.feature(LAST_PROMPT_METHOD)(last_prompt)
    server.feature(PREFILL_METHOD)(prefill)
    server.feature(types.TEXT_DOCUMENT_INLINE_COMPLETION, types.InlineCompletionOptions())(
        inline_completion
    )
    server.feature(
        types.TEXT_DOCUMENT_COMPLETION,
        types.CompletionOptions(trigger_characters=[".", "(", " "], resolve_provider=False),
    )(completion)
    server.feature(FIND_MODULE_METHOD)(find_module)
    server.command(FIND_MODULE_COMMAND)(find_module_command)
    server.feature(EXCLUSION_METHOD)(exclusion)
    server.feature(STATUS_METHOD)(status)
    server.feature(types.SHUTDOWN)(shutdown)
    return server


def _last_completion(
    plan: PromptPlan | None, path: str | None, suggestion: Suggestion
) -> dict[str, Any]:
    generation = suggestion.generation
    return {
        "path": path,
        "prompt": plan.text() if plan is not None else None,
        "context": plan.context if plan is not None else None,
        "suggestion": suggestion.text,
        "source": suggestion.source,
        "slot": suggestion.slot,
        "stop_reason": generation.stop_reason if generation else None,
        "prompt_tokens": generation.prompt_tokens if generation else None,
        "evaluated_tokens": generation.evaluated_tokens if generation else None,
    }


def _percent(progress: float | None) -> int:
    return round((progress or 0) * 100)


def _training_status(ls: ShopTalkServer) -> dict[str, Any]:
    """The last training job and the queue length from the continuous-learning queue."""
    repo = ls.repo
    try:
        from shoptalk.models.jobs import ACTIVE_STATES, JobQueue

        queue = JobQueue(ls.settings.resolved_data_dir())
        jobs = queue.jobs(repo, limit=20)
    except Exception as exc:
        return {"training": None, "queue": None, "queue_error": str(exc)}
    last = jobs[0] if jobs else None
    training = (
        {
            "id": last.id,
            "state": last.state,
            "step": last.step,
            "progress": last.progress,
            "message": last.message,
            "finished": last.finished,
        }
        if last
        else None
    )
    return {"training": training, "queue": sum(1 for j in jobs if j.state in ACTIVE_STATES)}
