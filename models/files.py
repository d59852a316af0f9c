"""Safe file writing and hashing: everything ShopTalk writes that a user could
lose goes through here (temp file in the same folder, fsync, rename).

Temp names carry the writer's process id (`.<final name>.<pid>.<random>.tmp`
for files, `….partial` for folders and GGUF files), so that a later run can
tell the leftovers of a killed process (`kill -9`, power loss) from the work
of one still running, and remove only the former (`remove_stale_partials`).

`fault_point` is where the fault-injection suite (`tests/faults/`) makes a
write fail for real: see `FAULT_ENV`.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import re
import shutil
import signal
import tempfile
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path
from typing import IO, Any

# `SHOPTALK_FAULT_INJECT=<action>:<moment>:<glob>` makes the write of a final
# path whose name matches <glob> fail at <moment> — begin (before its first
# byte), commit (all bytes in the temp file, before the rename) or swap (a
# folder replacing an older one: between moving the old aside and moving the
# new in). <action> `kill`: the process SIGKILLs itself; `full`: from then on
# every write to a file fails the way a full disk fails it (a file size limit
# of 0 bytes, RLIMIT_FSIZE: the kernel answers EFBIG). Only for tests.
FAULT_ENV = "SHOPTALK_FAULT_INJECT"
FAULT_MOMENTS = ("begin", "commit", "swap")

_TEMP_TAIL = r"\.(?P<pid>\d+)(?:\.[^.]+)?\.(?:partial|tmp)$"
_DISK_FULL = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EFBIG: "the file grew past the size limit for files (as on a full disk)",
}


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def fault_point(target: Path, moment: str) -> None:
    """Fail the write of `target` here when `FAULT_ENV` asks for it (tests only)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    action, _, rest = spec.partition(":")
    when, _, pattern = rest.partition(":")
    if when != moment or not fnmatch(target.name, pattern):
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "full":
        import resource

        _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, hard))


def partial_name(final: Path, tag: str = "") -> Path:
    """The temp name of `final` for this process: `.<name>.<pid>[.<tag>].partial`."""
    middle = f".{tag}" if tag else ""
    return final.with_name(f".{final.name}.{os.getpid()}{middle}.partial")


def final_name(path: Path) -> str:
    """The name `path` will have once whole (its own name unless it is a temp)."""
    match = re.match(r"^\.(?P<final>.+?)" + _TEMP_TAIL, path.name)
    return match["final"] if match else path.name


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (unknown counts as alive)."""
    if os.name == "nt":  # os.kill(pid, 0) would end the process there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # e.g. another user's process: it exists
    return True


def remove_stale_partials(folder: Path, final_name: str | None = None) -> list[Path]:
    """Remove the temp files and folders that killed ShopTalk processes left in
    `folder` (for `final_name` only, when given). A temp whose process is still
    running, and anything not named like ShopTalk's temps, is left alone."""
    pattern = f".{glob.escape(final_name)}.*" if final_name else ".*"
    removed: list[Path] = []
    try:
        candidates = sorted(folder.glob(pattern))
    except OSError:
        return removed
    for path in candidates:
        pid = _temp_owner(path.name, final_name)
        if pid is None or pid == os.getpid() or pid_alive(pid):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()
        removed.append(path)
    return removed


def _temp_owner(name: str, final_name: str | None) -> int | None:
    """The pid in a ShopTalk temp name (of `final_name`, when given), else None."""
    if final_name is not None:
        head = f".{final_name}"
        match = re.fullmatch(_TEMP_TAIL, name[len(head) :]) if name.startswith(head) else None
    else:
        match = re.match(r"^\.(?P<final>.+?)" + _TEMP_TAIL, name)
    return int(match["pid"]) if match else None


@contextlib.contextmanager
def atomic_open(path: Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """Open a temp file beside `path`; rename it over `path` only if the block
    finishes. A crash or an exception leaves the old file (or nothing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(path.parent, path.name)
    fault_point(path, "begin")
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent
    )
    tmp = Path(tmp_name)
    try:
        binary = "b" in mode
        with os.fdopen(fd, mode, encoding=None if binary else encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        fault_point(path, "commit")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_open(path, "w") as handle:
        handle.write(text)


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def _restore_interrupted_swap(final: Path) -> None:
    """A process killed between the two renames of `atomic_dir` leaves the
    previous complete folder at `.<name>.old` and none at `final`: put it back."""
    old = final.with_name(f".{final.name}.old")
    if old.is_dir() and not final.exists():
        with contextlib.suppress(OSError):
            os.replace(old, final)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Build a directory under a temp name and rename it into place at the end.

    If `final` exists it is replaced only after the new one is complete."""
    final.parent.mkdir(parents=True, exist_ok=True)
    _restore_interrupted_swap(final)
    remove_stale_partials(final.parent, final.name)
    fault_point(final, "begin")
    tmp = Path(
        tempfile.mkdtemp(
            prefix=f".{final.name}.{os.getpid()}.", suffix=".partial", dir=final.parent
        )
    )
    try:
        yield tmp
        fault_point(final, "commit")
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            fault_point(final, "swap")
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _restore_interrupted_swap(final)
        raise


def write_failure(exc: BaseException) -> str | None:
    """Why writing a file failed, when `exc` says it did: an `OSError`, or the
    errors torch (`RuntimeError` from its stream writer) and safetensors
    (`SafetensorError`) raise instead. None for anything else (a bug keeps its
    traceback)."""
    if isinstance(exc, OSError):
        return _errno_reason(exc.errno, exc.strerror or str(exc))
    text = str(exc)
    if type(exc).__name__ == "SafetensorError":
        code = re.search(r"os error (\d+)|code: (\d+)", text)
        if code:
            return _errno_reason(int(code[1] or code[2]), text)
        if re.search(r"I/O error|IoError", text):
            return f"the file could not be written ({text})"
        return None
    if isinstance(exc, RuntimeError) and re.search(
        r"PytorchStreamWriter|inline_container|unexpected pos|file write failed", text
    ):
        return f"the file could not be written, most likely because the disk is full ({text})"
    return None


def _errno_reason(code: int | None, text: str) -> str:
    if code in _DISK_FULL:
        return _DISK_FULL[code]
    return os.strerror(code) if code else text


def is_disk_full(exc: BaseException) -> bool:
    """True for the errors of a write that ran out of space."""
    if isinstance(exc, OSError):
        return exc.errno in _DISK_FULL
    reason = write_failure(exc)
    return reason is not None and ("disk" in reason or "size limit" in reason)


def free_bytes(path: Path) -> int:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free
