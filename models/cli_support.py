"""What every command line module shares: the consoles (only the CLI
prints), error and warning lines, the root options a command receives
through its `typer.Context`, the settings they make, and options generated
from a settings section's fields.

Imported by the root (`shoptalk.models.cli`) and by each half's commands
(`shoptalk.trainer.cli`, `shoptalk.server.cli`); stage modules never import
it, so it stays light: no torch, no llama.cpp, no pygls.
"""

from __future__ import annotations

import inspect
import time
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.text import Text

from shoptalk.models.progress import Progress
from shoptalk.models.settings import Settings, load_settings

# No console markup: messages hold user text ("[train]" of a settings file, a
# path, a branch name) that rich would otherwise take for a style and drop.
# Style a part with `rich.text.Text` instead.
err = Console(stderr=True, soft_wrap=True, markup=False)
out = Console(markup=False)


@dataclass(frozen=True)
class RootOptions:
    """The root command's options, kept in `ctx.obj` for the commands."""

    data_dir: Path | None = None  # --data-dir on the command line (not from the environment)
    verbose: bool = False


def root_options(ctx: typer.Context) -> RootOptions:
    options = ctx.find_object(RootOptions)
    return options if options is not None else RootOptions()


def load_command_settings(
    options: RootOptions,
    repo: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    check_data_dir: bool = True,
) -> Settings:
    """Settings for a command, with --data-dir from the root options applied;
    the data dir is created, and refused with a message when it cannot be."""
    merged = dict(overrides or {})
    if options.data_dir is not None:
        merged["data_dir"] = str(options.data_dir)
    settings = load_settings(repo=repo, overrides=merged)
    if check_data_dir:
        settings.writable_data_dir()
    return settings


def settings_for(
    ctx: typer.Context,
    repo: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    check_data_dir: bool = True,
) -> Settings:
    """`load_command_settings` with the root options of this command line."""
    return load_command_settings(root_options(ctx), repo, overrides, check_data_dir=check_data_dir)


def print_error(message: str) -> None:
    """`error: <message>` on stderr, the message exactly as given (no markup)."""
    err.print(Text.assemble(("error:", "red"), " ", message))


def print_warning(message: str) -> None:
    """`warning: <message>` on stderr, the message exactly as given (no markup)."""
    err.print(Text.assemble(("warning:", "yellow"), " ", message))


# ---- a stage's report on the console ----------------------------------------------

# Seconds between two plain progress lines of one piece of work (no terminal).
PLAIN_EVERY_S = 60.0


class ConsoleReport:
    """A stage's `Report` (shoptalk.models.progress) drawn on stderr: a line
    is printed (in its style from `styles`, if any), a heading is a rule, and
    counted work is a bar. Work with `detail` figures (a training phase) gets
    a bar that stays on screen when the work ends (`final`), with the figures,
    elapsed time and ETA; other counts (evaluation) get a bar with M/N and
    the time left that goes once its count is full. On a console that is not
    a terminal (output sent to a file or a pipe, where bars draw nothing) each
    piece of work is a plain line instead: when it starts, every
    `PLAIN_EVERY_S` seconds with the time elapsed and the ETA, and when it
    ends. Use as a context manager around the stage call, so no bar outlives it:

        with ConsoleReport() as report:
            train_adapter(..., report=report)
    """

    def __init__(
        self,
        console: Console | None = None,
        styles: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.console = console or Console(stderr=True, markup=False)
        self.styles = dict(styles or {})
        self._plain = PlainProgress(self.console, clock) if not self.console.is_terminal else None
        self._kept: Any = None  # the live bar of the current work with figures
        self._kept_label: str | None = None
        self._counts: Any = None  # the live bars of counted work
        self._count_tasks: dict[str, Any] = {}

    def __enter__(self) -> ConsoleReport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __call__(self, event: str | Progress) -> None:
        if isinstance(event, str):
            self.console.print(Text(event, style=self.styles.get(event, "")))
        elif event.heading:
            self.close()
            self.console.rule(str(event))
        elif self._plain is not None:
            self._plain(event)
        elif event.detail:
            self._kept_bar(event)
        else:
            self._count_bar(event)

    def close(self) -> None:
        """Stop every live bar (the kept one stays printed)."""
        if self._kept is not None:
            self._kept.stop()
        if self._counts is not None:
            self._counts.stop()
        self._kept, self._kept_label, self._counts = None, None, None
        self._count_tasks.clear()

    def _kept_bar(self, event: Progress) -> None:
        from rich.progress import BarColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
        from rich.progress import Progress as Bars

        if self._kept is None or event.label != self._kept_label:
            if self._kept is not None:
                self._kept.stop()
            self._kept = Bars(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TextColumn("{task.fields[detail]}", markup=False),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._kept_label = event.label
            self._kept.start()
            self._kept.add_task(
                event.label, total=event.total, completed=event.done, detail=event.detail
            )
        else:
            task = self._kept.task_ids[0]
            self._kept.update(task, total=event.total, completed=event.done, detail=event.detail)
        if event.final:
            self._kept.stop()
            self._kept, self._kept_label = None, None

    def _count_bar(self, event: Progress) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as Bars

        ended = event.final or (event.total is not None and event.done >= event.total)
        task = self._count_tasks.get(event.label)
        if task is None and ended:
            return
        if self._counts is None:
            self._counts = Bars(
                TextColumn("{task.description}", markup=False),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                console=self.console,
                transient=True,
            )
            self._counts.start()
        if task is None:
            task = self._counts.add_task(event.label, total=event.total, completed=event.done)
            self._count_tasks[event.label] = task
        else:
            self._counts.update(task, total=event.total, completed=event.done)
        if ended:  # the live display stays (empty) until close(), as one bar group
            self._counts.remove_task(task)
            del self._count_tasks[event.label]


class PlainProgress:
    """Counted work as plain lines, for a console that draws no bars: the
    first event of a piece of work, one every `PLAIN_EVERY_S` seconds (with
    the share done, the time elapsed and the ETA), and its end."""

    def __init__(self, console: Console, clock: Callable[[], float]):
        self.console = console
        self.clock = clock
        self._started: dict[str, float] = {}
        self._printed: dict[str, float] = {}

    def __call__(self, event: Progress) -> None:
        now = self.clock()
        label = event.label
        # Work with figures (a training phase) ends with its final event; a
        # count (evaluation) when it is full, and one that starts full is skipped.
        full = event.total is not None and event.done >= event.total
        ended = event.final or (full and not event.detail)
        if label not in self._started:
            if ended and not event.detail:
                return
            self._started[label] = self._printed[label] = now
            self.console.print(Text(self.line(event, 0.0)))
        elif ended or now - self._printed[label] >= PLAIN_EVERY_S:
            self._printed[label] = now
            self.console.print(Text(self.line(event, now - self._started[label])))
        if ended:
            del self._started[label], self._printed[label]

    @staticmethod
    def line(event: Progress, elapsed: float) -> str:
        """`fine-tuning 20/60 (33%) loss 1.9 · 5:12 elapsed, ETA 10:24`."""
        text = str(event)
        if event.total:
            share = min(1.0, event.done / event.total)
            text = f"{text} ({share:.0%})"
            if elapsed > 0:
                text += f" · {_clock(elapsed)} elapsed"
                if 0 < share < 1:
                    text += f", ETA {_clock(elapsed * (1 - share) / share)}"
        elif elapsed > 0:
            text += f" · {_clock(elapsed)} elapsed"
        return text


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


# ---- options from a settings section ----------------------------------------------

Command = TypeVar("Command", bound=Callable[..., Any])
# A flag's help, or its help and its option names ("--lr" for learning_rate).
FlagSpec = str | tuple[str, ...]
OVERRIDES = "overrides"  # the parameter that receives the given flags


def _option_type(annotation: Any) -> Any:
    """The option's type for a settings field: None stripped, a Literal
    taken as its values' type (the settings check the value, naming every
    allowed one)."""
    if get_origin(annotation) in (Union, types.UnionType):
        kept = [arg for arg in get_args(annotation) if arg is not type(None)]
        annotation = kept[0] if len(kept) == 1 else Union[tuple(kept)]  # noqa: UP007
    if get_origin(annotation) is Literal:
        annotation = type(get_args(annotation)[0])
    return annotation


def section_flags(
    section: type[BaseModel], flags: Mapping[str, FlagSpec]
) -> Callable[[Command], Command]:
    """Give a command one option per entry of `flags`, typed from the field
    of `section` it sets, in the place of its `overrides` parameter; the
    command receives the options given as `overrides` (field → value), to
    apply as the section's overrides. A field is declared once, in the
    settings; the command only names it and says what it does."""

    def decorate(command: Command) -> Command:
        signature = inspect.signature(command, eval_str=True)
        generated = []
        for field, spec in flags.items():
            help_text, *names = (spec,) if isinstance(spec, str) else spec
            kind = _option_type(section.model_fields[field].annotation)
            option = typer.Option(*names, help=help_text)
            generated.append(
                inspect.Parameter(
                    field,
                    inspect.Parameter.KEYWORD_ONLY,
                    default=None,
                    annotation=Annotated[kind | None, option],
                )
            )
        params: list[inspect.Parameter] = []
        for param in signature.parameters.values():
            if param.name == OVERRIDES:
                params += generated
            else:
                params.append(param.replace(kind=inspect.Parameter.KEYWORD_ONLY))

        def run(**given: Any) -> Any:
            overrides = {f: given.pop(f) for f in flags if given.get(f) is not None}
            for field in flags:
                given.pop(field, None)
            return command(**given, **{OVERRIDES: overrides})

        run.__name__ = command.__name__
        run.__doc__ = command.__doc__
        run.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in params}
        return run  # type: ignore[return-value]

    return decorate
