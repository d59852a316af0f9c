"""The wire under the language server: LSP framing read defensively, and the
JSON-RPC rules pygls leaves out.

pygls trusts its client: it allocates whatever `Content-Length` says, loses
its place in the stream after one wrong length, and answers nothing when a
request's params do not fit the method's type. Here every byte from the
client is untrusted input:

- `FrameReader` splits the stream into messages. A line is at most
  `MAX_HEADER_LINE` bytes and a body at most `MAX_MESSAGE_BYTES`; a bigger
  body is never read into memory but skipped. Anything that is not a frame
  (a wrong length's leftovers, a body without a header, noise) is junk up to
  the next valid `Content-Length` header, where the stream re-synchronises.
  A body that holds one whole JSON value followed by more bytes (a length
  that was too long) yields the value, and the rest is read again.
- `ShopTalkProtocol` answers every request exactly once: -32700 for a body
  that is not JSON, -32600 for one that is not a JSON-RPC 2.0 request (a
  batch, a non-object, a bad id, an over-size or header-less frame whose id
  can be read), -32602 when the params do not fit the method, -32002 before
  `initialize`, -32600 for a second `initialize` and after `shutdown`. `exit`
  sets the process's exit code (0 after `shutdown`, else 1).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import threading
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from typing import Any, BinaryIO

import cattrs
from lsprotocol import types
from pygls.protocol import LanguageServerProtocol, lsp_method
from pygls.protocol.json_rpc import (
    JsonRPCNotification,
    JsonRPCRequestMessage,
    JsonRPCResponseMessage,
    RPCRequest,
)

from shoptalk.models.errors import ShopTalkError

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # a 10 MB document, JSON-escaped, fits with room
MAX_HEADER_LINE = 8 * 1024
CHUNK_BYTES = 64 * 1024
SNIFF_BYTES = 4096
SEGMENT_BYTES = 64 * 1024
_TAIL_KEPT = 64  # bytes of an over-long line kept: a header may start there

_HEADER = re.compile(rb"content-length[ \t]*:[ \t]*(\d{1,30})[ \t]*\r?\n", re.IGNORECASE)
_OTHER_HEADER = re.compile(rb"[A-Za-z][A-Za-z0-9-]*[ \t]*:[^\r\n]*\r?\n")
_ID = re.compile(rb'"id"\s*:\s*(-?\d+(?![.\deE])|"(?:[^"\\]|\\.)*")')

ReadChunk = Callable[[], Awaitable[bytes]]
MsgId = int | str


class ListenError(ShopTalkError):
    """The TCP server cannot listen where it was told to."""


# ---- framing -----------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    """One framed body: its JSON value, or why it is not JSON."""

    value: Any
    error: str | None
    body: bytes


@dataclass(frozen=True)
class Oversize:
    """A frame whose declared length is over the limit (skipped unread)."""

    length: int
    head: bytes  # what had arrived of its body, for the request id


@dataclass(frozen=True)
class Junk:
    """Bytes between frames that are not a frame. `segment` is the last run of
    them after a blank or header line (a body sent without its length), kept
    whole when it is small, so that a request in it can still be answered."""

    size: int
    segment: bytes


Frame = Message | Oversize | Junk


class _JunkTracker:
    def __init__(self) -> None:
        self.size = 0
        self.segment = bytearray()
        self.overflow = False
        self.meaningful = False

    def add(self, data: bytes) -> None:
        self.size += len(data)
        if len(self.segment) + len(data) > SEGMENT_BYTES:
            self.overflow = True
        elif not self.overflow:
            self.segment += data
        if data.strip():
            self.meaningful = True

    def boundary(self) -> None:
        self.segment.clear()
        self.overflow = False

    def take(self) -> Junk | None:
        junk = None
        if self.meaningful:
            junk = Junk(self.size, b"" if self.overflow else bytes(self.segment))
        self.size, self.meaningful = 0, False
        self.boundary()
        return junk


class FrameReader:
    """LSP frames from a byte stream (`read_chunk()` returns b"" at its end)."""

    def __init__(self, read_chunk: ReadChunk, max_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self._read_chunk = read_chunk
        self.max_bytes = max_bytes
        self._buffer = bytearray()
        self._eof = False
        self._pending_length: int | None = None  # a header found right after junk
        self._skipping = False  # after an over-size frame: its body is junk, silently

    async def next(self) -> Frame | None:
        """The next frame, or None at the end of the stream."""
        length = self._pending_length
        self._pending_length = None
        junk = _JunkTracker()
        while length is None or not await self._at_blank_line():
            line = await self._line()
            if line is None:
                return self._report(junk)
            header = _HEADER.search(line)
            if header is not None and header.end() == len(line):
                junk.add(line[: header.start()])
                length = int(header.group(1))
                found = self._report(junk)
                if found is not None:
                    self._pending_length = length
                    return found
            elif length is not None and _OTHER_HEADER.fullmatch(line):
                continue  # another header of the block (Content-Type)
            else:
                junk.add(line)
                if not line.strip() or _OTHER_HEADER.fullmatch(line):
                    junk.boundary()
                length = None
        self._skipping = False
        return await self._body(length)

    async def _at_blank_line(self) -> bool:
        """Consume the blank line ending a header block if it is next."""
        while True:
            index = self._buffer.find(b"\n")
            if index >= 0 or len(self._buffer) > MAX_HEADER_LINE:
                break
            if not await self._fill():
                return False
        if index >= 0 and not self._buffer[:index].strip():
            del self._buffer[: index + 1]
            return True
        return False

    async def _body(self, length: int) -> Frame | None:
        if length > self.max_bytes:
            if not self._buffer:
                await self._fill()
            self._skipping = True
            log.warning("skipping a message of %d bytes (the limit is %d)", length, self.max_bytes)
            return Oversize(length, bytes(self._buffer[:SNIFF_BYTES]))
        while len(self._buffer) < length:
            if not await self._fill():
                return None
        body = bytes(self._buffer[:length])
        del self._buffer[:length]
        return self._decode(body)

    def _decode(self, body: bytes) -> Message:
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            return Message(
                None, f"the message is not UTF-8 ({exc.reason} at byte {exc.start})", body
            )
        try:
            return Message(json.loads(text), None, body)
        except RecursionError:
            return Message(None, "the message is nested too deeply", body)
        except ValueError as exc:
            whole = _leading_value(text)
            if whole is None:
                return Message(None, f"the message is not JSON: {exc}", body)
        value, end = whole
        surplus = text[end:].encode("utf-8")
        log.warning(
            "Content-Length was %d bytes longer than the message; reading them again",
            len(surplus),
        )
        self._buffer[:0] = surplus
        return Message(value, None, body[: len(body) - len(surplus)])

    def _report(self, junk: _JunkTracker) -> Junk | None:
        found = junk.take()
        if found is None:
            return None
        if self._skipping:
            log.debug("skipped %d bytes of an over-size message", found.size)
            return None
        log.warning("skipped %d bytes that were not a message: %r", found.size, found.segment[:80])
        return found

    async def _line(self) -> bytes | None:
        """The next line (with its newline), or at most MAX_HEADER_LINE bytes
        of a longer one (without), or None at the end of the stream."""
        while True:
            index = self._buffer.find(b"\n")
            if index >= 0:
                line = bytes(self._buffer[: index + 1])
                del self._buffer[: index + 1]
                return line
            if len(self._buffer) > MAX_HEADER_LINE:
                cut = len(self._buffer) - _TAIL_KEPT
                part = bytes(self._buffer[:cut])
                del self._buffer[:cut]
                return part
            if not await self._fill():
                if not self._buffer:
                    return None
                rest = bytes(self._buffer)
                self._buffer.clear()
                return rest

    async def _fill(self) -> bool:
        if self._eof:
            return False
        data = await self._read_chunk()
        if not data:
            self._eof = True
            return False
        self._buffer += data
        return True


def _leading_value(text: str) -> tuple[Any, int] | None:
    """(value, end) when `text` starts with one whole JSON value followed by
    something else; None otherwise."""
    stripped = len(text) - len(text.lstrip())
    try:
        value, end = json.JSONDecoder().raw_decode(text, stripped)
    except (ValueError, RecursionError):
        return None
    return value, end


def sniff_id(head: bytes) -> MsgId | None:
    """The request id at the top level of the start of a message that could
    not be read as a whole, when it can be told."""
    text = head.lstrip()
    if not text.startswith(b"{"):
        return None
    top = text[1:]
    nested = top.find(b"{")
    if nested >= 0:
        top = top[:nested]  # stop at params: ids in there are not the request's
    match = _ID.search(top)
    if match is None:
        return None
    try:
        value = json.loads(match.group(1))
    except ValueError:
        return None
    return value if isinstance(value, int | str) and not isinstance(value, bool) else None


def _request_id(segment: bytes) -> MsgId | None:
    """The id of the request `segment` holds whole, if it does."""
    try:
        value = json.loads(segment)
    except (ValueError, RecursionError):
        return None
    if isinstance(value, dict) and "method" in value and _valid_id(value.get("id")):
        return value["id"]
    return None


def stdin_chunks(stream: BinaryIO) -> ReadChunk:
    """Chunks of `stream`, read on a daemon thread, at most a few chunks
    ahead. The thread reads the file descriptor itself: a read blocked in a
    buffered reader's lock would abort the interpreter's exit after `exit`."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=4)
    try:
        fd: int | None = stream.fileno()
    except (OSError, ValueError):
        fd = None  # an in-memory stream

    def read() -> bytes:
        if fd is not None:
            return os.read(fd, CHUNK_BYTES)
        return stream.read(CHUNK_BYTES)

    def pump() -> None:
        while True:
            try:
                data = read()
            except (OSError, ValueError):
                data = b""
            try:
                asyncio.run_coroutine_threadsafe(queue.put(data), loop).result()
            except RuntimeError:
                return  # the loop is gone
            if not data:
                return

    threading.Thread(target=pump, name="shoptalk-stdin", daemon=True).start()
    return queue.get


# ---- JSON-RPC ------------------------------------------------------------------


def _valid_id(value: object) -> bool:
    return isinstance(value, int | str) and not isinstance(value, bool)


def _kind(value: object) -> str:
    if isinstance(value, list):
        return "list"
    if isinstance(value, str):
        return "string"
    if value is None:
        return "null"
    return "boolean" if isinstance(value, bool) else "number"


def _params_problem(exc: BaseException) -> str:
    cause = exc.__cause__ or exc
    if isinstance(cause, cattrs.BaseValidationError):
        return "; ".join(cattrs.transform_error(cause)[:3])
    return f"{cause.__class__.__name__}: {cause}"


class ShopTalkProtocol(LanguageServerProtocol):
    """pygls' LSP protocol, fed by `FrameReader` frames, that answers every
    request once and keeps the protocol's order."""

    def __init__(self, server: Any, converter: cattrs.Converter) -> None:
        super().__init__(server, converter)
        self.initialized = False
        self.exit_code = 0
        self.stop_event: threading.Event | None = None

    def structure_message(self, data: dict[str, Any]) -> Any:
        """The message as its LSP type (pygls' own, minus its traceback in the
        log: a value that does not fit is the client's error, answered as such)."""
        if "jsonrpc" not in data:
            return data
        message_type: Any
        if "id" in data and "error" in data:
            message_type = types.ResponseErrorMessage
        elif "id" in data and "method" in data:
            message_type = self.get_message_type(data["method"]) or JsonRPCRequestMessage
        elif "id" in data:
            message_type = self._result_types.pop(data["id"], None) or JsonRPCResponseMessage
        else:
            message_type = self.get_message_type(data.get("method", "")) or JsonRPCNotification
        return self._converter.structure(data, message_type)

    def reply_error(self, msg_id: MsgId | None, code: int, message: str) -> None:
        log.warning("answering %r with error %d: %s", msg_id, code, message)
        self._send_response(msg_id, error=types.ResponseError(code=code, message=message))  # type: ignore[arg-type]

    def handle_frame(self, frame: Frame) -> None:
        if isinstance(frame, Oversize):
            self.reply_error(
                sniff_id(frame.head),
                types.ErrorCodes.InvalidRequest,
                f"the message of {frame.length} bytes is over the limit of "
                f"{MAX_MESSAGE_BYTES} bytes; it was skipped",
            )
        elif isinstance(frame, Junk):
            msg_id = _request_id(frame.segment)
            if msg_id is not None:
                self.reply_error(
                    msg_id,
                    types.ErrorCodes.InvalidRequest,
                    "the message had no valid Content-Length header; it was skipped",
                )
        elif frame.error is not None:
            self.reply_error(
                sniff_id(frame.body[:SNIFF_BYTES]), types.ErrorCodes.ParseError, frame.error
            )
        else:
            self.handle_value(frame.value)

    def handle_value(self, data: Any) -> None:
        """One decoded JSON value from the client."""
        if isinstance(data, list):
            self._refuse_batch(data)
            return
        if not isinstance(data, dict):
            self.reply_error(
                None,
                types.ErrorCodes.InvalidRequest,
                f"a JSON-RPC message is an object, not a {_kind(data)}",
            )
            return
        problem = self._envelope_problem(data)
        if problem is not None:
            if "method" in data and "id" in data:  # a request: answer it
                msg_id = data["id"] if _valid_id(data["id"]) else None
                self.reply_error(msg_id, types.ErrorCodes.InvalidRequest, problem)
            else:
                log.warning("ignoring a message: %s", problem)
            return
        try:
            message = self.structure_message(data)
        except Exception as exc:
            if "method" in data and "id" in data:
                self.reply_error(
                    data["id"],
                    types.ErrorCodes.InvalidParams,
                    f"invalid params for {data['method']}: {_params_problem(exc)}",
                )
            else:
                log.warning("ignoring a malformed message: %s", _params_problem(exc))
            return
        self.handle_message(message)

    def _envelope_problem(self, data: dict[str, Any]) -> str | None:
        if data.get("jsonrpc") != self.VERSION:
            return 'the message is not JSON-RPC 2.0 ("jsonrpc": "2.0" is missing)'
        if "method" in data:
            if not isinstance(data["method"], str):
                return f"the method is a {_kind(data['method'])}, not a string"
            if "id" in data and not _valid_id(data["id"]):
                return f"the id is a {_kind(data['id'])}, not a string or an integer"
        elif not _valid_id(data.get("id")):
            return "a response without a valid id"
        return None

    def _refuse_batch(self, batch: list[Any]) -> None:
        message = (
            "batches are not part of the Language Server Protocol; send each message "
            "in its own frame"
        )
        requests = [
            item["id"]
            for item in batch
            if isinstance(item, dict) and "method" in item and _valid_id(item.get("id"))
        ]
        for msg_id in requests:
            self.reply_error(msg_id, types.ErrorCodes.InvalidRequest, message)
        if not requests:
            self.reply_error(None, types.ErrorCodes.InvalidRequest, message)

    def handle_message(self, message: Any) -> None:
        """Keep the protocol's order: `initialize` first and once; nothing but
        `exit` after `shutdown`."""
        method = getattr(message, "method", None)
        request = isinstance(message, RPCRequest)
        if method is None or method == types.EXIT:
            super().handle_message(message)
            return
        refusal: tuple[int, str] | None = None
        if self._shutdown:
            refusal = (types.ErrorCodes.InvalidRequest, "the server is shutting down")
        elif method == types.INITIALIZE and self.initialized:
            refusal = (
                types.ErrorCodes.InvalidRequest,
                "the server is already initialized (initialize is sent once)",
            )
        elif method != types.INITIALIZE and not self.initialized:
            refusal = (
                types.ErrorCodes.ServerNotInitialized,
                "the server is not initialized: send initialize first",
            )
        if refusal is None:
            if method == types.INITIALIZE and request:
                self.initialized = True
            super().handle_message(message)
        elif request:
            self.reply_error(message.id, *refusal)
        else:
            log.warning("ignoring the notification %s: %s", method, refusal[1])

    @lsp_method(types.EXIT)
    def lsp_exit(self, *args: Any) -> Generator[Any, Any, None]:
        """Stop reading; the process exits with 0 after `shutdown`, else 1."""
        if (user_handler := self.fm.features.get(types.EXIT)) is not None:
            yield user_handler, args, None
        self.exit_code = 0 if self._shutdown else 1
        if self.stop_event is not None:
            self.stop_event.set()
        if self.writer is not None:
            self.writer.close()  # stdout or the TCP stream: closing is immediate


async def serve_frames(
    read_chunk: ReadChunk, protocol: ShopTalkProtocol, stop_event: threading.Event
) -> None:
    """Feed `protocol` the frames of one stream until it ends or `exit`."""
    protocol.stop_event = stop_event
    reader = FrameReader(read_chunk)
    while not stop_event.is_set():
        frame = await reader.next()
        if frame is None:
            break
        try:
            protocol.handle_frame(frame)
        except (BrokenPipeError, ConnectionError):
            raise
        except Exception:
            log.exception("could not handle a message")
        # Let the handlers just started run up to their first wait before the
        # next message (a $/cancelRequest right behind a request finds it running).
        await asyncio.sleep(0)
