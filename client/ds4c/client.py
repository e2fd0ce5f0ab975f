"""The ds4 client library: `Client` (blocking) and `AsyncClient` (asyncio) on one wire core, and auto-start.

Owns the client side of docs/PROTOCOL.md: msgpack-rpc framing on the daemon's Unix socket, msgid allocation, the
demultiplexing of responses and `stream` notifications to the request they belong to, one exception class per
error code, typed stream events and results, timeouts, and starting `ds4d serve` when nobody answers
(`connect(autostart=True)`). It renders nothing (`repl.py` does) and never imports numpy or `ds4d`: the daemon is
started as a program. Callers: `ds4c` (repl.py), scripts, anything in Python that talks to the daemon.

    from ds4c.client import Client
    with Client() as c:                                  # socket: the argument, else protocol.socket_path()
        print(c.chat([{"role": "user", "content": "Hi"}], thinking="none", max_tokens=32).text)
        for item in c.chat(messages, stream=True):       # Event, Event, ..., then the Result
            ...

The two clients differ only in how they wait for bytes: `_Wire` is sans-I/O (requests out as bytes, bytes in
updating the calls they answer), `_Methods` turns each method's arguments into a request once for both, and
`Client` / `AsyncClient` move the bytes over a blocking socket or an asyncio stream.
"""

from __future__ import annotations

import asyncio
import collections
import fcntl
import os
import re
import selectors
import socket as socketlib
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator

import msgpack

from .protocol import ERROR_CODES, MAX_MESSAGE_BYTES, NOTIFICATION, PROTOCOL_VERSION, REQUEST, RESPONSE, socket_path

RECV_BYTES = 64 * 1024
CANCELLABLE = ("generate", "chat", "complete", "tokenize", "detokenize")
TICK_S = 0.2                  # how often a waiting `hello` lets `while_waiting` run


# ---------------------------------------------------------------------------------------------------------------
# Errors: one class per protocol error code, all DaemonError; DaemonUnreachable when there is nobody to ask
# ---------------------------------------------------------------------------------------------------------------

class Ds4Error(Exception):
    """Everything this library raises about the daemon."""


class DaemonError(Ds4Error):
    """The daemon answered with an error: `code` (a protocol error code) and `message` (one line, also str(e))."""

    code = ""

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class BadRequest(DaemonError):
    code = "bad_request"


class UnknownMethod(DaemonError):
    code = "unknown_method"


class VersionMismatch(DaemonError):
    code = "version_mismatch"


class NotFound(DaemonError):
    code = "not_found"


class Exists(DaemonError):
    code = "exists"


class Busy(DaemonError):
    code = "busy"


class Cancelled(DaemonError):
    code = "cancelled"


class ContextFull(DaemonError):
    code = "context_full"


class OutOfMemory(DaemonError):
    code = "out_of_memory"


class TooLarge(DaemonError):
    code = "too_large"


class ShuttingDown(DaemonError):
    code = "shutting_down"


class InternalError(DaemonError):
    code = "internal"


ERRORS: dict[str, type[DaemonError]] = {cls.code: cls for cls in DaemonError.__subclasses__()}
assert set(ERRORS) == set(ERROR_CODES), "one exception class per protocol error code"


def error_from(err: Any) -> DaemonError:
    """The exception for a response's `error` map; a code from a newer daemon becomes a plain DaemonError."""
    if not isinstance(err, dict):
        return DaemonError(f"malformed error {err!r}", "internal")
    code, message = str(err.get("code", "")), str(err.get("message", ""))
    return ERRORS.get(code, DaemonError)(message, code)


class DaemonUnreachable(Ds4Error):
    """Nobody answers on the socket, or the connection was lost. `absent` is true when nothing listens there at
    all (no socket file, or a stale one): the case auto-start handles."""

    def __init__(self, message: str, socket: str | os.PathLike[str] | None = None, absent: bool = False):
        super().__init__(message)
        self.socket, self.absent = socket, absent


class DaemonTimeout(DaemonUnreachable):
    """No answer within the client's timeout (the request is cancelled and its answer dropped)."""


# ---------------------------------------------------------------------------------------------------------------
# Stream events and results
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Event:
    """One `stream` notification. kind: progress (done/total prompt tokens), reasoning or content (text, tokens,
    logprobs), tool_call (name, arguments_delta)."""
    kind: str
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list | None = None
    name: str | None = None
    arguments_delta: str = ""
    done: int = 0
    total: int = 0

    @classmethod
    def from_wire(cls, ev: dict) -> Event:
        return cls(kind=str(ev.get("kind", "")), text=ev.get("text") or "", tokens=ev.get("tokens") or [],
                   logprobs=ev.get("logprobs"), name=ev.get("name"), arguments_delta=ev.get("arguments_delta") or "",
                   done=ev.get("done") or 0, total=ev.get("total") or 0)


@dataclass(slots=True)
class Result:
    """The answer of generate / chat / complete. `usage` is {prompt_tokens, cached_tokens, completion_tokens};
    `tokens` comes with generate, `reasoning` and `tool_calls` with chat, `warnings` with any; `raw` is the whole map
    (fields a later minor version adds)."""
    text: str
    finish_reason: str
    usage: dict[str, int]
    reasoning: str = ""
    tool_calls: list[dict] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_wire(cls, r: dict) -> Result:
        return cls(text=r.get("text", ""), finish_reason=r.get("finish_reason", ""), usage=r.get("usage") or {},
                   reasoning=r.get("reasoning") or "", tool_calls=r.get("tool_calls") or [],
                   tokens=r.get("tokens") or [], warnings=r.get("warnings") or [], raw=r)


# ---------------------------------------------------------------------------------------------------------------
# The wire core (no I/O)
#
# Every request gets a msgid not in flight on this connection (1 .. 2**32-1, wrapping) and a `_Call` that collects
# its stream events (only when it asked for a stream) and then its outcome. Bytes from the daemon are fed to one
# Unpacker, drained after every chunk, so its buffer never holds more than one partial message plus a chunk: a
# message over the protocol's 16 MiB cap breaks the connection like undecodable bytes do. A forgotten call (left
# early, timed out, a fire-and-forget cancel) keeps its msgid reserved until its response comes, then vanishes.
# ---------------------------------------------------------------------------------------------------------------

class _Call:
    __slots__ = ("msgid", "method", "stream", "events", "done", "result", "error", "forgotten", "waiter")

    def __init__(self, msgid: int, method: str, stream: bool):
        self.msgid, self.method, self.stream = msgid, method, stream
        self.events: collections.deque[Event] = collections.deque()
        self.done = self.forgotten = False
        self.result: Any = None
        self.error: Ds4Error | None = None
        self.waiter: asyncio.Event | None = None          # AsyncClient: set when the call has news

    def outcome(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.result


class _Wire:
    def __init__(self, where: Path):
        self.where = where
        self.calls: dict[int, _Call] = {}
        self.broken: str | None = None        # why the connection is unusable
        self._unpacker = msgpack.Unpacker(raw=False, max_buffer_size=MAX_MESSAGE_BYTES + RECV_BYTES)
        self._last = 0
        self._orphan: str | None = None       # an error the daemon could not address (it closes right after)

    def request(self, method: str, params: dict, stream: bool = False) -> tuple[_Call, bytes]:
        if self.broken is not None:
            raise DaemonUnreachable(self.broken, self.where)
        msgid = self._last
        while True:
            msgid = msgid % 0xFFFFFFFF + 1
            if msgid not in self.calls:
                break
        data = msgpack.packb([REQUEST, msgid, method, [params]])
        self._last = msgid
        call = self.calls[msgid] = _Call(msgid, method, stream)
        return call, data

    def forget(self, call: _Call) -> None:
        call.forgotten = True
        call.events.clear()

    def feed(self, data: bytes) -> None:
        try:
            self._unpacker.feed(data)
            for msg in self._unpacker:
                self._dispatch(msg)
        except (ValueError, msgpack.UnpackException) as e:     # not msgpack, or over the cap: nothing to trust
            self.fail(f"the daemon sent an unreadable message ({e})")

    def _dispatch(self, msg: Any) -> None:
        if not isinstance(msg, list) or not msg:
            return
        if msg[0] == RESPONSE and len(msg) == 4:
            _, msgid, error, result = msg
            call = self.calls.pop(msgid, None) if isinstance(msgid, int) else None
            if call is None:
                if error is not None:
                    self._orphan = str(error_from(error))
                return
            call.done = True
            if error is not None:
                call.error = error_from(error)
            else:
                call.result = result
            self._touch(call)
        elif msg[0] == NOTIFICATION and len(msg) == 3 and msg[1] == "stream":
            ev = msg[2][0] if isinstance(msg[2], list) and msg[2] and isinstance(msg[2][0], dict) else {}
            call = self.calls.get(ev.get("id"))
            if call is not None and call.stream and not call.forgotten:
                call.events.append(Event.from_wire(ev))
                self._touch(call)
        # anything else (a notification method of a later minor version) is not for us

    def fail(self, reason: str) -> None:
        """The connection is gone: every call in flight ends with DaemonUnreachable."""
        if self.broken is not None:
            return
        self.broken = f"{reason}: {self._orphan}" if self._orphan else reason
        calls = list(self.calls.values())      # a signal handler may add a call meanwhile
        self.calls.clear()
        for call in calls:
            call.done, call.error = True, DaemonUnreachable(self.broken, self.where)
            self._touch(call)

    @staticmethod
    def _touch(call: _Call) -> None:
        if call.waiter is not None:
            call.waiter.set()


def _params(**kw: Any) -> dict:
    """Named arguments for the wire: None means "not given" and is left out."""
    return {k: v for k, v in kw.items() if v is not None}


# ---------------------------------------------------------------------------------------------------------------
# The methods, once for both clients
#
# Each method builds its params and hands them to `_call` (the result, or an awaitable of it, optionally passed
# through a converter) or, for generate / chat / complete with stream=True, to a stream object that sends at once
# and is iterated (sync or async) for its events and result. Sampling options (max_tokens, temperature, top_k,
# top_p, min_p, seed, stop, logprobs) pass through as given: the daemon checks them and names a bad one.
# ---------------------------------------------------------------------------------------------------------------

class _Methods:
    # A client provides `_send(method, params, stream) -> _Call` (never blocks), `_call(method, params, convert)`
    # and `_stream_class`.
    name: str
    info: dict | None
    _wire: _Wire
    _stream_class: type

    def call(self, method: str, **params: Any) -> Any:
        """Any method by name, its result as the daemon sent it (stream events, if any, are dropped)."""
        return self._call(method, params)

    def hello(self) -> Any:
        """Introduce the client, check the protocol's major version; the result is kept in `.info`."""
        return self._call("hello", {"protocol": PROTOCOL_VERSION, "client": self.name}, self._hello_done)

    def _hello_done(self, r: dict) -> dict:
        theirs = str(r.get("protocol", ""))
        if theirs.split(".")[0] != PROTOCOL_VERSION.split(".")[0]:
            raise VersionMismatch(f"the daemon speaks protocol {theirs}; this client speaks {PROTOCOL_VERSION}")
        self.info = r
        return r

    def status(self) -> Any:
        return self._call("status", {})

    def tokenize(self, text: str, specials: bool = False) -> Any:
        return self._call("tokenize", {"text": text, "specials": specials}, lambda r: r["tokens"])

    def detokenize(self, tokens: list[int]) -> Any:
        return self._call("detokenize", {"tokens": list(tokens)}, lambda r: r["text"])

    def session_open(self, name: str | None = None, create: bool = True) -> Any:
        """{name, tokens, messages}: resume `name` (loading it from disk), or create it (a generated name when
        None; `create=False` makes a missing one NotFound)."""
        return self._call("session.open", _params(name=name, create=create))

    def session_list(self) -> Any:
        return self._call("session.list", {}, lambda r: r["sessions"])

    def session_info(self, name: str) -> Any:
        return self._call("session.info", {"name": name})

    def session_history(self, name: str) -> Any:
        return self._call("session.history", {"name": name}, lambda r: r["messages"])

    def session_fork(self, name: str, new_name: str | None = None) -> Any:
        return self._call("session.fork", _params(name=name, new_name=new_name), lambda r: r["name"])

    def session_close(self, name: str) -> Any:
        return self._call("session.close", {"name": name}, lambda r: None)

    def session_delete(self, name: str) -> Any:
        return self._call("session.delete", {"name": name}, lambda r: None)

    def generate(self, prompt: str | None = None, *, tokens: list[int] | None = None, session: str | None = None,
                 stream: bool = False, **sampling: Any) -> Any:
        """Raw continuation of `prompt` (text) or `tokens` (ids): a Result, or a stream with stream=True."""
        return self._generation("generate", _params(prompt=prompt, tokens=tokens, session=session, **sampling),
                                stream)

    def chat(self, messages: list[dict], *, session: str | None = None, tools: list[dict] | None = None,
             thinking: str | None = None, stream: bool = False, **sampling: Any) -> Any:
        """An answer to OpenAI-style `messages` (appended to `session`'s conversation when given); thinking is
        "none", "high" (the daemon's default) or "max". A Result, or a stream with stream=True."""
        return self._generation("chat", _params(messages=messages, session=session, tools=tools, thinking=thinking,
                                                **sampling), stream)

    def complete(self, prefix: str, suffix: str | None = None, *, context: list[dict] | None = None,
                 session: str | None = None, time_budget_ms: int | None = None, stream: bool = False,
                 **sampling: Any) -> Any:
        """Fill in the middle between `prefix` and `suffix` (editor completion). A Result, or a stream."""
        return self._generation("complete", _params(prefix=prefix, suffix=suffix, context=context, session=session,
                                                    time_budget_ms=time_budget_ms, **sampling), stream)

    def cancel(self, msgid: int) -> Any:
        """Stop request `msgid` of this connection; True when one was in flight."""
        return self._call("cancel", {"id": msgid}, lambda r: r["cancelled"])

    def shutdown(self) -> Any:
        """Stop the daemon (it saves the sessions first)."""
        return self._call("shutdown", {}, lambda r: None)

    def _generation(self, method: str, params: dict, stream: bool) -> Any:
        if stream:
            return self._stream_class(self, self._send(method, {**params, "stream": True}, stream=True))
        return self._call(method, {**params, "stream": False}, Result.from_wire)

    def _abandon(self, call: _Call) -> None:
        """Stop caring about a call: drop what still comes for it, and ask the daemon to stop the work."""
        if call.forgotten:
            return
        self._wire.forget(call)
        if call.method in CANCELLABLE and not call.done:
            try:
                self._wire.forget(self._send("cancel", {"id": call.msgid}))
            except Ds4Error:
                pass                           # the connection is gone: the daemon cancels it by itself

    def _timed_out(self, call: _Call, timeout: float) -> DaemonTimeout:
        self._abandon(call)
        return DaemonTimeout(f"no answer from the daemon on {self._wire.where} within {timeout:g} s ({call.method})",
                             self._wire.where)


class _StreamBase:
    def __init__(self, client: _Methods, call: _Call):
        self._client, self._call = client, call
        self.result: Result | None = None

    @property
    def msgid(self) -> int:
        return self._call.msgid

    def cancel(self) -> None:
        """Ask the daemon to stop; iteration goes on to the Result (finish_reason "cancelled"). Never blocks on
        the daemon and never raises, so a signal handler may call it."""
        if not self._call.done:
            try:
                self._client._wire.forget(self._client._send("cancel", {"id": self._call.msgid}))
            except Ds4Error:
                pass                           # the connection is gone: the daemon cancels it by itself


# ---------------------------------------------------------------------------------------------------------------
# The blocking client
# ---------------------------------------------------------------------------------------------------------------

class Stream(_StreamBase):
    """A streamed generate / chat / complete: iterating yields its Events as they arrive, then its Result (also
    kept in `.result`). Leaving the loop early cancels the generation."""

    def __iter__(self) -> Iterator[Event | Result]:
        call, client = self._call, self._client
        try:
            while True:
                while call.events:
                    yield call.events.popleft()
                if call.done:
                    break
                client._wait(call, client.timeout)
            self.result = Result.from_wire(call.outcome())
            yield self.result
        finally:
            if not call.done:
                client._abandon(call)


def _unreachable(e: OSError, path: Path) -> DaemonUnreachable:
    if isinstance(e, (FileNotFoundError, ConnectionRefusedError)):
        why = "no such socket" if isinstance(e, FileNotFoundError) else "nothing listens there"
        return DaemonUnreachable(f"no daemon answers on {path} ({why})", path, absent=True)
    return DaemonUnreachable(f"cannot connect to the daemon on {path} ({e.strerror or str(e) or 'timed out'})", path)


class Client(_Methods):
    """A blocking connection to the daemon; `hello` is sent on connecting (its result in `.info`).

    `timeout` (seconds, None = no limit) bounds each wait: for a whole response, or for the next event of a
    stream; a call that runs out raises DaemonTimeout and is cancelled. Use one thread at a time, except that
    `Stream.cancel` may be called from a signal handler while the main thread reads the stream. `while_waiting`
    is called every 0.2 s while `hello` waits (the daemon answers once its model is loaded)."""

    _stream_class = Stream

    def __init__(self, socket: str | os.PathLike[str] | None = None, *, timeout: float | None = None,
                 connect_timeout: float = 10.0, name: str = "ds4c-python", hello: bool = True,
                 while_waiting: Callable[[], None] | None = None):
        self.path = socket_path(socket)
        self.name, self.timeout, self.info = name, timeout, None
        sock = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
        sock.settimeout(connect_timeout)
        try:
            sock.connect(str(self.path))
        except OSError as e:
            sock.close()
            raise _unreachable(e, self.path) from None
        sock.settimeout(None)       # waits go through the selector, so a send from a signal handler never times out
        self._sock = sock
        self._selector = selectors.DefaultSelector()
        self._selector.register(sock, selectors.EVENT_READ)
        self._wire = _Wire(self.path)
        self._tick: Callable[[], None] | None = None
        if hello:
            self._tick = while_waiting
            try:
                self.hello()
            except BaseException:
                self.close()
                raise
            finally:
                self._tick = None

    def close(self) -> None:
        self._wire.fail("the connection is closed")
        self._selector.close()
        self._sock.close()

    def is_open(self) -> bool:
        """Whether the connection still works, as far as can be told without waiting (the daemon may have
        stopped since the last request)."""
        if self._wire.broken is None:
            self._read(0)
        return self._wire.broken is None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _send(self, method: str, params: dict, stream: bool = False) -> _Call:
        call, data = self._wire.request(method, params, stream)
        try:
            self._sock.sendall(data)
        except OSError as e:
            self._wire.fail(f"lost the connection to the daemon ({e.strerror or e})")
        return call

    def _call(self, method: str, params: dict, convert: Callable[[Any], Any] | None = None) -> Any:
        call = self._send(method, params)
        try:
            self._wait(call, self.timeout)
        except BaseException:            # Ctrl+C in a script: stop the work too
            self._abandon(call)
            raise
        result = call.outcome()
        return convert(result) if convert is not None else result

    def _wait(self, call: _Call, timeout: float | None) -> None:
        """Read from the daemon until `call` has news: an event, or its outcome."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not call.events and not call.done:
            step = None if deadline is None else deadline - time.monotonic()
            if step is not None and step <= 0:
                raise self._timed_out(call, timeout)
            if self._tick is not None:
                step = TICK_S if step is None else min(step, TICK_S)
            if not self._read(step) and self._tick is not None:
                self._tick()

    def _read(self, timeout: float | None) -> bool:
        """Take what the daemon sent within `timeout` s; False when nothing came."""
        if not self._selector.select(timeout):
            return False
        try:
            data = self._sock.recv(RECV_BYTES)
        except OSError as e:
            self._wire.fail(f"lost the connection to the daemon ({e.strerror or e})")
            return True
        if data:
            self._wire.feed(data)
        else:
            self._wire.fail("the daemon closed the connection")
        return True


# ---------------------------------------------------------------------------------------------------------------
# The asyncio client
#
# One reader task feeds the wire; each call's coroutine sleeps on its own asyncio.Event, which the wire sets when
# the call gets news. Sends are `writer.write` (buffered, never blocking), so streams send at creation and
# `cancel` is synchronous, exactly as in the blocking client.
# ---------------------------------------------------------------------------------------------------------------

class AsyncStream(_StreamBase):
    """`async for item in stream`: its Events, then its Result (also in `.result`). Leaving early cancels."""

    def __aiter__(self) -> AsyncIterator[Event | Result]:
        return self._items()

    async def _items(self) -> AsyncIterator[Event | Result]:
        call, client = self._call, self._client
        try:
            while True:
                while call.events:
                    yield call.events.popleft()
                if call.done:
                    break
                await client._wait(call, client.timeout)
            self.result = Result.from_wire(call.outcome())
            yield self.result
        finally:
            if not call.done:
                client._abandon(call)


class AsyncClient(_Methods):
    """The asyncio twin of `Client`: `c = await AsyncClient.connect()` (or `async with await ...`), then
    `await c.chat(...)` or `async for item in c.chat(..., stream=True)`. Any number of requests may be in flight
    at once on one connection; `timeout` works as in `Client`."""

    _stream_class = AsyncStream

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: Path, *,
                 timeout: float | None, name: str):
        self.path, self.name, self.timeout, self.info = path, name, timeout, None
        self._reader, self._writer = reader, writer
        self._wire = _Wire(path)
        self._task = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def connect(cls, socket: str | os.PathLike[str] | None = None, *, timeout: float | None = None,
                      connect_timeout: float = 10.0, name: str = "ds4c-python", hello: bool = True) -> AsyncClient:
        path = socket_path(socket)
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), connect_timeout)
        except OSError as e:                       # TimeoutError included
            raise _unreachable(e, path) from None
        self = cls(reader, writer, path, timeout=timeout, name=name)
        if hello:
            try:
                await self.hello()
            except BaseException:
                await self.close()
                raise
        return self

    async def close(self) -> None:
        self._wire.fail("the connection is closed")       # wakes every coroutine still waiting on a call
        self._task.cancel()
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except OSError:
            pass

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _read(self) -> None:
        try:
            while data := await self._reader.read(RECV_BYTES):
                self._wire.feed(data)
                if self._wire.broken:
                    break
            self._wire.fail("the daemon closed the connection")
        except OSError as e:
            self._wire.fail(f"lost the connection to the daemon ({e.strerror or e})")

    def _send(self, method: str, params: dict, stream: bool = False) -> _Call:
        call, data = self._wire.request(method, params, stream)
        call.waiter = asyncio.Event()
        self._writer.write(data)
        return call

    async def _call(self, method: str, params: dict, convert: Callable[[Any], Any] | None = None) -> Any:
        call = self._send(method, params)
        try:
            await self._writer.drain()
            await self._wait(call, self.timeout)
        except OSError as e:
            self._wire.fail(f"lost the connection to the daemon ({e.strerror or e})")
        except BaseException:           # the task was cancelled: stop the work too
            self._abandon(call)
            raise
        result = call.outcome()
        return convert(result) if convert is not None else result

    async def _wait(self, call: _Call, timeout: float | None) -> None:
        while not call.events and not call.done:
            call.waiter.clear()
            try:
                await asyncio.wait_for(call.waiter.wait(), timeout)
            except TimeoutError:
                raise self._timed_out(call, timeout) from None


# ---------------------------------------------------------------------------------------------------------------
# Auto-start
#
# When nobody answers on the socket, `connect(autostart=True)` starts `ds4d serve --socket PATH --idle-exit MIN`,
# detached (its own session, stdin from /dev/null, stdout and stderr to $XDG_STATE_HOME/ds4/ds4d-autostart.log;
# its log proper is ds4d.log beside it). The daemon claims its socket before it loads the model and serves the
# connections that queued meanwhile, so the client waits until the socket accepts, then for `hello`, passing the
# daemon's start-up lines (model generation, loading, reading progress) to `notify`. A client-side lock
# (autostart.lock beside the output file) is held from "nobody answers" until the socket accepts or the start has
# failed: a racing client waits on it, finds the socket answering and starts nothing. (The daemon's own
# `<socket>.lock` would refuse a second daemon too, but only after it had been started for nothing.)
# ---------------------------------------------------------------------------------------------------------------

DEFAULT_IDLE_EXIT_MIN = 30.0
BIND_TIMEOUT_S = 60.0         # the daemon claims its socket right after its imports: far less than this


def state_dir() -> Path:
    """$XDG_STATE_HOME/ds4 (a relative value is ignored, as the XDG spec says): the daemon's log, the REPL's
    history, the auto-start files."""
    base = os.environ.get("XDG_STATE_HOME")
    return (Path(base) if base and os.path.isabs(base) else Path.home() / ".local" / "state") / "ds4"


def daemon_command() -> list[str]:
    """`ds4d` beside this Python (the same installation or venv), else `python -m ds4d` (a source checkout)."""
    exe = Path(sys.executable).parent / "ds4d"
    return [str(exe)] if os.access(exe, os.X_OK) else [sys.executable, "-m", "ds4d"]


class _DaemonOutput:
    """Follows an auto-started daemon's output file: each new line's message goes to `notify`; a daemon that
    exited before it served is an error that quotes its last line."""

    LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+ \w+ [\w.]+: (.*)$")     # ds4d's log format

    def __init__(self, path: Path, notify: Callable[[str], None], proc: subprocess.Popen | None = None):
        self.path, self.notify, self.proc = path, notify, proc
        self.last = ""
        self.exited = False
        self._offset = 0
        self._partial = b""

    def watch(self) -> None:
        """Pass on the new lines; raise when the daemon has exited."""
        self.poll()
        if self.proc is not None and self.proc.poll() is not None:
            self.poll()                       # its last words
            self.exited = True
            raise DaemonUnreachable(f"ds4d exited with status {self.proc.returncode} while starting: "
                                    f"{self.last or 'no output'} (see {self.path})", absent=True)

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except OSError:
            data = b""
        self._offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        for raw in lines:
            line = raw.decode("utf-8", "replace").rstrip()
            if line:
                m = self.LINE.match(line)
                self.last = m.group(1) if m else line
                self.notify(f"ds4d: {self.last}")


def _accepts(path: Path) -> bool:
    """True when something listens on the socket (a daemon, possibly still loading its model)."""
    with socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM) as s:
        s.settimeout(2)
        try:
            s.connect(str(path))
            return True
        except OSError:
            return False


def start_daemon(path: Path, idle_exit_min: float | None = DEFAULT_IDLE_EXIT_MIN,
                 notify: Callable[[str], None] = lambda line: None) -> _DaemonOutput:
    """Start `ds4d serve` on `path` unless a racing client already has; return once the socket accepts. The
    result follows the daemon's output (its start-up lines) while the caller waits for `hello`."""
    state = state_dir()
    try:
        state.mkdir(parents=True, exist_ok=True)
        lock = os.open(state / "autostart.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise DaemonUnreachable(f"cannot start ds4d: {state}: {e.strerror}", path, absent=True) from None
    out_path = state / "ds4d-autostart.log"
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _accepts(path):                         # a racing client started it: follow its output from the start
            return _DaemonOutput(out_path, notify)
        cmd = daemon_command() + ["serve", "--socket", str(path)]
        if idle_exit_min:
            cmd += ["--idle-exit", f"{idle_exit_min:g}"]
        idle = f"exits after {idle_exit_min:g} min without clients" if idle_exit_min else "runs until stopped"
        notify(f"ds4c: no daemon on {path}: starting ds4d ({idle}; its output: {out_path})")
        try:
            with open(out_path, "ab") as out:     # append mode: a daemon still writing there never leaves a hole
                out.truncate(0)
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                        start_new_session=True, close_fds=True)
        except OSError as e:
            raise DaemonUnreachable(f"cannot start {cmd[0]}: {e.strerror or e}", path, absent=True) from None
        output = _DaemonOutput(out_path, notify, proc)
        deadline = time.monotonic() + BIND_TIMEOUT_S
        while not _accepts(path):
            output.watch()
            if time.monotonic() > deadline:
                raise DaemonUnreachable(f"ds4d (pid {proc.pid}) did not open {path} within {BIND_TIMEOUT_S:g} s "
                                        f"(see {out_path})", path, absent=True)
            time.sleep(0.05)
        return output
    finally:
        os.close(lock)


def connect(socket: str | os.PathLike[str] | None = None, *, autostart: bool = False,
            idle_exit_min: float | None = DEFAULT_IDLE_EXIT_MIN, notify: Callable[[str], None] = lambda line: None,
            timeout: float | None = None, name: str = "ds4c-python") -> Client:
    """A Client with `hello` done. When nothing listens on the socket and `autostart` is set, start `ds4d serve`
    first. `notify(line)` hears what happens while the client waits: the daemon's start-up lines, or that a
    daemon is still loading its model."""
    path = socket_path(socket)
    t0 = time.monotonic()
    said = False

    def loading() -> None:
        nonlocal said
        if not said and time.monotonic() - t0 > 1:
            said = True
            notify(f"ds4c: waiting for the daemon on {path} (loading its model?)")

    try:
        return Client(path, timeout=timeout, name=name, while_waiting=loading)
    except DaemonUnreachable as e:
        if not (autostart and e.absent):
            raise
    output = start_daemon(path, idle_exit_min, notify)
    try:
        return Client(path, timeout=timeout, name=name, while_waiting=output.watch)
    except DaemonUnreachable as e:
        if output.exited or isinstance(e, DaemonTimeout):
            raise
        if output.proc is not None:                # it closed the connection: most likely on its way out
            try:
                output.proc.wait(2)
            except subprocess.TimeoutExpired:
                pass
            output.watch()                         # reports the exit, as when a wait noticed it
        output.poll()                              # the daemon's last words, if it died: a better reason
        raise DaemonUnreachable(f"ds4d did not start: {output.last or e} (see {output.path})", path) from None
