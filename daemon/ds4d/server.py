"""`ds4d serve`: the asyncio (uvloop) Unix-socket daemon in front of the engine.

Owns the daemon's life and its clients: the listening socket (path, 0700 directory, 0600 file, a lock against a
second daemon, stale-file replacement, systemd socket activation), peer-uid checks, the method table with each
method's parameter schema, the bridge that carries the engine's callbacks into the event loop and out as
`stream` notifications and responses, cancellation (by id, by a newer `complete`, on disconnect, after a stall),
idle exit, graceful shutdown and logging. It never touches tensors and never waits on the engine from the
loop: generation and session work go to the engine's queue (`Engine.submit`), tokenizer calls to one helper
thread, and the loop only parses, validates, packs and writes. Framing and the validation helpers are
`rpc.py`; the contract's constants come from `ds4c.protocol`. Called by `cli.py` (`serve(ServeOptions)`).

Pipeline: bytes -> `rpc.Decoder` -> `Daemon.dispatch` (schema, handler) -> `Engine.submit(Job)` -> engine
thread calls `on_event` / `on_done` -> `Daemon._post` (a deque plus one wake-up per burst) -> `Daemon._drain` on
the loop -> one `transport.write` per connection per burst.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import ctypes
import ctypes.util
import fcntl
import functools
import logging
import logging.handlers
import os
import signal
import socket
import stat
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ds4c.protocol import MAX_MESSAGE_BYTES, METHODS, PROTOCOL_VERSION, socket_path

from . import __version__
from .chat import THINKING_MODES
from .engine import THINK_MAX_MIN_CTX, Engine, EngineError, Job
from .ops import resolve_backend
from .rpc import (U32, Bool, Decoder, Fields, Int, Json, ListOf, Num, RpcError, Spec, Str, bad, error_map,
                  pack_notification, pack_response, parse_request)
from .session import SessionNameError, check_name

log = logging.getLogger("ds4d.server")

STALL_TIMEOUT_S = 30.0          # a client whose socket stays full this long has its requests cancelled
WRITE_HIGH_WATER = 256 * 1024   # bytes queued for one client above which it counts as not reading
WRITE_LOW_WATER = 64 * 1024
MAX_QUEUE = 256                 # requests the daemon holds at once before answering `busy`
SOCKET_PATH_MAX = 107           # sun_path is 108 bytes with the terminating NUL
SD_LISTEN_FDS_START = 3


class ServeError(Exception):
    """The daemon cannot start (socket taken, not enough memory, ...); str(e) is one line for the user."""


# ---------------------------------------------------------------------------------------------------------------
# Parameter schemas
#
# Types and shapes are checked here, on the loop, so a malformed request never reaches the engine's thread and
# every message names its field. Value ranges that the engine's own types already check (sampling parameters in
# `SamplingParams`, chat message contents in the template renderer) are left to them: one rule, one place, and
# their messages name the field too.
# ---------------------------------------------------------------------------------------------------------------

class SessionName(Spec):
    def __init__(self, required: bool = False):
        self.required = required

    def check(self, v, where):
        try:
            return check_name(v)
        except SessionNameError as e:
            raise bad(where, str(e)) from None


SAMPLING = {"max_tokens": Int(), "temperature": Num(), "top_k": Int(), "top_p": Num(), "min_p": Num(),
            "seed": Int(), "stop": ListOf(Str(nonempty=True)), "logprobs": Int(), "session": SessionName(),
            "stream": Bool()}


def schemas(n_vocab: int) -> dict[str, Fields]:
    token = Int(0, n_vocab - 1)
    name = {"name": SessionName(required=True)}
    return {
        "hello": Fields({"client": Str(), "protocol": Str(required=True)}),
        "status": Fields(),
        "tokenize": Fields({"text": Str(required=True), "specials": Bool()}),
        "detokenize": Fields({"tokens": ListOf(token, required=True)}),
        "session.open": Fields({"name": SessionName(), "create": Bool()}),
        "session.list": Fields(),
        "session.info": Fields(name),
        "session.history": Fields(name),
        "session.fork": Fields({**name, "new_name": SessionName()}),
        "session.close": Fields(name),
        "session.delete": Fields(name),
        "generate": Fields({"prompt": Str(), "tokens": ListOf(token), **SAMPLING}),
        "chat": Fields({"messages": ListOf(Fields({"role": Str(required=True)}, extra=Json()), required=True,
                                           nonempty=True),
                        "tools": ListOf(Fields(extra=Json())), "thinking": Str(*THINKING_MODES),
                        **SAMPLING}),
        "complete": Fields({"prefix": Str(required=True), "suffix": Str(),
                            "context": ListOf(Fields({"path": Str(required=True), "text": Str(required=True)})),
                            "time_budget_ms": Int(1, 3_600_000), **SAMPLING}),
        "cancel": Fields({"id": Int(0, U32 - 1, required=True)}),
        "shutdown": Fields(),
    }


def pack_result(msgid: int, result: Any) -> bytes:
    """A success response, or too_large when the result would not fit the 16 MiB a message may hold (a client
    decoder enforces the cap too): tokenize / detokenize of a near-cap input can get there."""
    data = pack_response(msgid, None, result)
    if len(data) > MAX_MESSAGE_BYTES:
        return pack_response(msgid, error_map("too_large", f"the result would be {len(data) / 2**20:.1f} MiB, more "
                                                           f"than the {MAX_MESSAGE_BYTES >> 20} MiB a message may "
                                                           f"hold"), None)
    return data


def model_info(model, engine: Engine, path: Path, demo: bool) -> dict:
    """The `model` map of `hello`."""
    s = model.shape
    routed = model.weights.routed_type.name
    quant = {"IQ2_XXS": "q2", "Q4_K": "q4"}.get(routed, routed.lower())
    return {"name": str(model.gguf.get("general.name", path.stem)), "path": str(path), "n_layer": s.n_layer,
            "n_embd": s.n_embd, "n_vocab": s.n_vocab, "quant": quant, "demo": demo,
            "fingerprint": engine.fingerprint}


# ---------------------------------------------------------------------------------------------------------------
# Requests in flight and connections
#
# Backpressure: a connection whose transport holds more than WRITE_HIGH_WATER unsent bytes is `paused`. Its
# requests keep running in the engine (the engine never blocks on a client; a decode step costs the same with one
# more session in the batch, so other clients keep their rate), but their stream events are no longer written:
# they are merged into the request's `pending` list instead (consecutive pieces of one kind become one event,
# progress keeps only its latest), so what a stalled request holds is at most the text it has generated, which its
# final result carries anyway. When the client reads again (`resume_writing`) the merged events go out in order;
# a final response always goes out right after its own pending events. A connection paused for STALL_TIMEOUT_S
# has all its requests cancelled; it stays open, and a client that wakes up reads their results.
# ---------------------------------------------------------------------------------------------------------------

@dataclass(eq=False)
class InFlight:
    conn: "Connection"
    msgid: int
    method: str
    stream: bool = False
    job: Job | None = None
    future: asyncio.Future | None = None            # tokenize / detokenize on the text thread
    pending: list[dict] = field(default_factory=list)
    session_key: object = None                      # complete: supersede key
    budget: asyncio.TimerHandle | None = None       # complete: time_budget_ms timer
    budget_hit: bool = False

    def cancel(self) -> bool:
        """Ask the work to stop; True when there was something cancellable."""
        if self.job is not None:
            self.job.cancel()
            return True
        if self.future is not None:
            return self.future.cancel()
        return False


def merge_event(pending: list[dict], ev: dict) -> None:
    """Append a stream event to a paused request's backlog, merged into the last one where the kinds allow."""
    last = pending[-1] if pending else None
    kind = ev["kind"]
    if last is None or last["kind"] != kind or (kind == "tool_call" and last.get("name") != ev.get("name")):
        pending.append(ev)
    elif kind == "progress":
        pending[-1] = ev
    elif kind == "tool_call":
        last["arguments_delta"] = (last.get("arguments_delta") or "") + (ev.get("arguments_delta") or "")
    else:
        last["text"] = last.get("text", "") + ev.get("text", "")
        for key in ("tokens", "logprobs"):
            if ev.get(key):
                last[key] = (last.get(key) or []) + ev[key]


def peer_credentials(sock) -> tuple[int | None, int]:
    """(pid or None, uid) of the process at the other end of a Unix socket."""
    if hasattr(socket, "SO_PEERCRED"):
        pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        return pid, uid
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)     # BSD and macOS: getpeereid(3)
    uid, gid = ctypes.c_uint32(), ctypes.c_uint32()
    if libc.getpeereid(sock.fileno(), ctypes.byref(uid), ctypes.byref(gid)) != 0:
        raise OSError(ctypes.get_errno(), "getpeereid failed")
    return None, uid.value


class Connection(asyncio.Protocol):
    def __init__(self, daemon: "Daemon"):
        self.daemon = daemon
        self.decoder = Decoder()
        self.inflight: dict[int, InFlight] = {}
        self.completes: dict[object, InFlight] = {}      # session (None: no session) -> latest complete
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.paused = False
        self.stall: asyncio.TimerHandle | None = None
        self.peer = self.label = "client"         # label: the peer and, after hello, the client's name

    # --- asyncio.Protocol -------------------------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        try:
            pid, uid = peer_credentials(transport.get_extra_info("socket"))
        except OSError as e:
            log.warning("refused a connection: cannot read its peer credentials (%s)", e)
            return self._drop(transport)
        self.peer = self.label = f"client pid {pid}" if pid else f"client uid {uid}"
        if uid not in (os.getuid(), 0):
            log.warning("refused a connection from uid %d (pid %s): only uid %d and root may connect",
                        uid, pid, os.getuid())
            return self._drop(transport)
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)
        self.daemon.connected(self)
        log.debug("%s connected", self.label)

    def _drop(self, transport) -> None:
        self.closed = True
        transport.abort()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        messages, error = self.decoder.feed(data)
        for msg in messages:
            self.daemon.dispatch(self, msg)
        if error is not None:
            log.warning("%s: %s; closing its connection", self.label, error)
            if error.code:
                self.write(pack_response(error.msgid, error_map(error.code, str(error)), None))
            self.close()

    def connection_lost(self, exc) -> None:
        self.closed = True
        if self.stall is not None:
            self.stall.cancel()
        n = sum(req.cancel() for req in self.inflight.values())
        if n:
            log.info("%s disconnected: cancelled %d request(s)", self.label, n)
        self.daemon.disconnected(self)

    def pause_writing(self) -> None:
        self.paused = True
        self.stall = self.daemon.loop.call_later(self.daemon.stall_timeout, self._stalled)

    def resume_writing(self) -> None:
        self.paused = False
        if self.stall is not None:
            self.stall.cancel()
            self.stall = None
        out = []
        for req in self.inflight.values():
            out += [pack_notification("stream", ev) for ev in req.pending]
            req.pending.clear()
        if out:
            self.write(b"".join(out))

    # --- helpers ----------------------------------------------------------------------------------------------
    def _stalled(self) -> None:
        self.stall = None
        n = sum(req.cancel() for req in self.inflight.values())
        log.warning("%s has not read for %.0f s: cancelled its %d request(s)", self.label,
                    self.daemon.stall_timeout, n)

    def write(self, data: bytes) -> None:
        if not self.closed:
            self.transport.write(data)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.transport.close()       # sends what is queued, then closes


# ---------------------------------------------------------------------------------------------------------------
# The daemon: dispatch, the engine bridge, lifecycle
# ---------------------------------------------------------------------------------------------------------------

class Daemon:
    def __init__(self, engine: Engine, model: dict, *, backend: str, listener: socket.socket,
                 stall_timeout: float = STALL_TIMEOUT_S, idle_exit: float | None = None, max_queue: int = MAX_QUEUE):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.listener = listener
        self.stall_timeout = stall_timeout
        self.idle_exit = idle_exit
        self.max_queue = max_queue
        self.schemas = schemas(model["n_vocab"])
        caps = ["stream", "progress", "cancel", "sessions", "tools", "thinking", "fim", "logprobs"]
        if engine.ctx >= THINK_MAX_MIN_CTX:
            caps.append("think_max")
        self.hello_result = {"protocol": PROTOCOL_VERSION, "daemon": __version__, "model": model,
                             "backend": backend, "ctx": engine.ctx, "capabilities": caps}
        self.handlers: dict[str, Callable[[Connection, int, dict], Any]] = {
            "hello": self._hello, "status": self._status, "tokenize": self._tokenize,
            "detokenize": self._detokenize, "generate": functools.partial(self._generate, "generate"),
            "chat": functools.partial(self._generate, "chat"), "complete": self._complete,
            "cancel": self._cancel, "shutdown": self._shutdown,
            **{m: functools.partial(self._submit_op, m) for m in METHODS if m.startswith("session.")}}
        assert set(self.handlers) == set(METHODS) == set(self.schemas)
        self.conns: set[Connection] = set()
        self.work: set[InFlight] = set()           # every request not yet answered, of all connections
        self.stopping = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self._outbox: collections.deque = collections.deque()
        self._wake = False
        self._idle: asyncio.TimerHandle | None = None
        self._text = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ds4d-text")
        self._stopped: asyncio.Event | None = None
        self._server: asyncio.AbstractServer | None = None

    # --- lifecycle --------------------------------------------------------------------------------------------
    async def run(self) -> None:
        """Serve until `shutdown`, SIGTERM / SIGINT or the idle timeout; then stop the engine (which cancels
        what runs and saves the sessions) and close every connection."""
        self.loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        self.listener.setblocking(False)
        self._server = await self.loop.create_unix_server(lambda: Connection(self), sock=self.listener)
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self._on_signal, sig)
        self._check_idle()
        log.info("ready: serving on %s", self.listener.getsockname() or "an inherited socket")
        await self._stopped.wait()
        self._text.shutdown(wait=False, cancel_futures=True)

    def _on_signal(self, sig: int) -> None:
        if self.stopping:
            log.warning("%s again: exiting now, without waiting for the engine", signal.Signals(sig).name)
            os._exit(1)
        self.begin_shutdown(signal.Signals(sig).name)

    def begin_shutdown(self, why: str) -> None:
        if not self.stopping:
            self.stopping = True
            self.loop.create_task(self._shutdown_task(why))

    async def _shutdown_task(self, why: str) -> None:
        log.info("shutting down (%s): cancelling in-flight work, saving sessions", why)
        try:
            if self._idle is not None:
                self._idle.cancel()
            self._server.close()                # no new connections; the open ones get their answers
            for req in list(self.work):
                if req.future is not None:
                    req.cancel()
            await self.loop.run_in_executor(None, self.engine.stop)
            self._drain()                        # the results stop() produced
            for conn in list(self.conns):
                conn.close()
            for _ in range(200):                 # let the transports flush their last bytes (at most 2 s)
                if not self.conns:
                    break
                await asyncio.sleep(0.01)
            log.info("stopped")
        finally:
            self._stopped.set()

    def connected(self, conn: Connection) -> None:
        self.conns.add(conn)
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def disconnected(self, conn: Connection) -> None:
        self.conns.discard(conn)
        self._check_idle()

    def _check_idle(self) -> None:
        if self.idle_exit is None or self.stopping or self.conns or self.work or self._idle is not None:
            return
        self._idle = self.loop.call_later(self.idle_exit, self._idle_timeout)

    def _idle_timeout(self) -> None:
        self._idle = None
        if not self.conns and not self.work:
            self.begin_shutdown(f"idle for {self.idle_exit / 60:g} min")

    # --- dispatch ---------------------------------------------------------------------------------------------
    def dispatch(self, conn: Connection, msg: Any) -> None:
        msgid = None
        try:
            req = parse_request(msg)
            msgid = req.msgid
            if self.stopping:
                raise RpcError("shutting_down", "the daemon is shutting down")
            if msgid in conn.inflight:
                raise RpcError("bad_request", f"msgid: {msgid} is already in flight on this connection")
            handler = self.handlers.get(req.method)
            if handler is None:
                raise RpcError("unknown_method", f"unknown method {req.method!r}")
            result = handler(conn, msgid, self.schemas[req.method].check(req.params))
        except RpcError as e:
            conn.write(pack_response(e.msgid if msgid is None else msgid, error_map(e.code, e.message), None))
            return
        except Exception:
            log.exception("internal error handling a request")
            conn.write(pack_response(msgid, error_map("internal", "internal error (see the daemon log)"), None))
            return
        if result is not None:
            conn.write(pack_result(msgid, result))

    # Handlers return the result to send now, or None when the answer comes later (engine or text thread).

    def _hello(self, conn: Connection, msgid: int, p: dict) -> dict:
        theirs = p["protocol"]
        major = theirs.split(".")[0]
        if not (major.isascii() and major.isdigit()):          # "²".isdigit() is true, but int() refuses it
            raise bad("protocol", f"must be a version like {PROTOCOL_VERSION!r}, not {theirs!r}")
        if int(major) != int(PROTOCOL_VERSION.split(".")[0]):
            raise RpcError("version_mismatch", f"the daemon speaks protocol {PROTOCOL_VERSION}; the client "
                                               f"speaks {theirs}")
        if p.get("client"):
            conn.label = f"{conn.peer} ({p['client'][:64]!r})"   # quoted: a name cannot forge log lines
        return self.hello_result

    def _status(self, conn: Connection, msgid: int, p: dict) -> None:
        self._submit(conn, msgid, "status", {}, extra={"connections": len(self.conns)})

    def _submit_op(self, method: str, conn: Connection, msgid: int, p: dict) -> None:
        self._submit(conn, msgid, method, p)

    def _tokenize(self, conn: Connection, msgid: int, p: dict) -> None:
        self._text_call(conn, msgid, "tokenize", lambda: {"tokens": self.tokenizer.encode(
            p["text"], specials=p.get("specials", False))})

    def _detokenize(self, conn: Connection, msgid: int, p: dict) -> None:
        self._text_call(conn, msgid, "detokenize", lambda: {"text": self.tokenizer.decode(p["tokens"])})

    def _generate(self, method: str, conn: Connection, msgid: int, p: dict) -> None:
        if method == "generate" and ("prompt" in p) == ("tokens" in p):
            raise bad("prompt", "give either prompt (text) or tokens (ids)")
        self._submit(conn, msgid, method, p, stream=p.pop("stream", True))

    def _complete(self, conn: Connection, msgid: int, p: dict) -> None:
        budget = p.pop("time_budget_ms", None)
        key = p.get("session")
        req = self._submit(conn, msgid, "complete", p, stream=p.pop("stream", True))
        req.session_key = key
        older = conn.completes.get(key)
        if older is not None:
            older.cancel()                        # superseded: the editor moved on
        conn.completes[key] = req
        if budget is not None:
            req.budget = self.loop.call_later(budget / 1000, self._budget_spent, req)

    def _budget_spent(self, req: InFlight) -> None:
        req.budget = None
        if not req.job.cancelled.is_set():
            req.budget_hit = True
            req.job.cancel()

    def _cancel(self, conn: Connection, msgid: int, p: dict) -> dict:
        target = conn.inflight.get(p["id"])
        return {"cancelled": target is not None and target.cancel()}

    def _shutdown(self, conn: Connection, msgid: int, p: dict) -> dict:
        self.loop.call_soon(self.begin_shutdown, f"shutdown requested by {conn.label}")
        return {}

    # --- work in flight ---------------------------------------------------------------------------------------
    def _admit(self, conn: Connection, msgid: int, method: str) -> InFlight:
        if len(self.work) >= self.max_queue:
            raise RpcError("busy", f"the daemon holds {len(self.work)} requests; retry when some have finished")
        req = InFlight(conn, msgid, method)
        conn.inflight[msgid] = req
        self.work.add(req)
        return req

    def _submit(self, conn: Connection, msgid: int, op: str, params: dict, stream: bool = False,
                extra: dict | None = None) -> InFlight:
        req = self._admit(conn, msgid, op)
        req.stream = stream
        req.job = Job(op, params, on_done=functools.partial(self._post, req, True, extra=extra))
        if stream:                 # otherwise the loop is not even woken for the pieces
            req.job.on_event = functools.partial(self._post, req, False)
        self.engine.submit(req.job)
        return req

    def _text_call(self, conn: Connection, msgid: int, op: str, fn: Callable[[], dict]) -> None:
        """Tokenizer work runs on a helper thread so a 16 MiB text never stalls the loop."""
        req = self._admit(conn, msgid, op)
        req.future = self.loop.run_in_executor(self._text, fn)
        req.future.add_done_callback(lambda fut: self._text_done(req, fut))

    def _text_done(self, req: InFlight, fut: asyncio.Future) -> None:
        if fut.cancelled():
            self._finish(req, EngineError("cancelled", f"{req.method} was cancelled"))
        elif fut.exception() is not None:
            e = fut.exception()
            if isinstance(e, ValueError):
                self._finish(req, EngineError("bad_request", str(e)))
            else:
                log.error("internal error in %s", req.method, exc_info=e)
                self._finish(req, EngineError("internal", "internal error (see the daemon log)"))
        else:
            self._finish(req, fut.result())

    # --- the engine bridge ------------------------------------------------------------------------------------
    #
    # on_event / on_done run on the engine's thread. They only append to a deque and, when no wake-up is pending
    # yet, schedule one `_drain` on the loop: a decode step that emits B events costs one wake-up, and `_drain`
    # writes each connection's share of a burst with one transport.write. The flag is cleared before the deque
    # is emptied, so an item appended during a drain is either taken by it or schedules the next one.

    def _post(self, req: InFlight, final: bool, payload: Any, extra: dict | None = None) -> None:
        if final and extra and isinstance(payload, dict):
            payload = {**payload, **extra}
        self._outbox.append((req, final, payload))
        if not self._wake:
            self._wake = True
            try:
                self.loop.call_soon_threadsafe(self._drain)
            except RuntimeError:         # the loop has closed: nobody is left to tell
                pass

    def _drain(self) -> None:
        self._wake = False
        out: dict[Connection, list[bytes]] = {}
        while self._outbox:
            req, final, payload = self._outbox.popleft()
            if final:
                self._finish(req, payload, out)
            elif not req.conn.closed:
                payload["id"] = req.msgid
                if req.conn.paused:
                    merge_event(req.pending, payload)
                else:
                    out.setdefault(req.conn, []).append(pack_notification("stream", payload))
        for conn, parts in out.items():
            conn.write(b"".join(parts))

    def _finish(self, req: InFlight, result: Any, out: dict | None = None) -> None:
        """The final answer of a request: its pending events, then the response."""
        conn = req.conn
        self.work.discard(req)
        conn.inflight.pop(req.msgid, None)
        if req.method == "complete":
            if conn.completes.get(req.session_key) is req:
                del conn.completes[req.session_key]
            if req.budget is not None:
                req.budget.cancel()
        if not conn.closed:
            parts = [pack_notification("stream", ev) for ev in req.pending]
            req.pending.clear()
            if isinstance(result, EngineError):
                parts.append(pack_response(req.msgid, error_map(result.code, result.message), None))
            else:
                if req.budget_hit and result.get("finish_reason") == "cancelled":
                    result["finish_reason"] = "length"       # the time budget is a length limit
                parts.append(pack_result(req.msgid, result))
            if out is None:
                conn.write(b"".join(parts))
            else:
                out.setdefault(conn, []).extend(parts)
        self._check_idle()


# ---------------------------------------------------------------------------------------------------------------
# Starting and stopping the process
#
# The socket is claimed first (lock, live-daemon probe, stale file replaced, bind), so a second daemon fails in
# milliseconds rather than after reading 80 GB of weights. Then the weights are checked against memory and read
# once into the page cache with progress (the CPU backend computes on the mapped file, so this is what makes them
# resident). Clients that connect meanwhile wait in the listen backlog and are served once the engine runs.
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class ServeOptions:
    model: Path | None                  # None: the generated demo model
    socket: str | None = None           # None: the protocol's resolution order
    backend: str = "auto"
    ctx: int = 32768
    cache_dir: Path | None = None       # None: $XDG_CACHE_HOME/ds4
    ram_cache_mb: int = 1024
    disk_cache_mb: int = 4096
    session_mem_mb: int = 8192
    idle_exit_min: float | None = None
    log_level: str = "info"
    stall_timeout_s: float = STALL_TIMEOUT_S
    max_queue: int = MAX_QUEUE


def serve(o: ServeOptions) -> int:
    """Run the daemon until it is told to stop: 0, or 1 when it cannot start (the reason is logged)."""
    from .gguf_file import ModelError
    os.umask(0o077)           # what the daemon creates (log, caches, sessions) is its user's alone
    # A file-size limit (ulimit -f) then fails the write with EFBIG, handled like a full disk, instead of killing
    # the daemon with every session it holds in memory.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    logfile = setup_logging(o.log_level)
    log.info("ds4d %s starting (pid %d); log file %s", __version__, os.getpid(), logfile or "none")
    previous = signal.signal(signal.SIGTERM, _interrupt)      # until the loop runs: SIGTERM cleans up like ^C
    try:
        _serve(o)
    except (ServeError, ModelError, OSError) as e:     # OSError: a cache or model path we cannot use
        log.error("cannot start: %s", e)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def _serve(o: ServeOptions) -> None:
    from .config import cache_dir
    listener = Listener.activated() or Listener.bind(socket_path(o.socket), explicit=o.socket is not None)
    engine = None
    try:
        backend = resolve_backend(o.backend)
        model, path, demo = load_model(o.model, backend)
        engine = Engine(model, cache_dir=o.cache_dir or cache_dir(), ctx=o.ctx, ram_cache_mb=o.ram_cache_mb,
                        disk_cache_mb=o.disk_cache_mb, session_mem_mb=o.session_mem_mb).start()
        daemon = Daemon(engine, model_info(model, engine, path, demo), backend=backend, listener=listener.sock,
                        stall_timeout=o.stall_timeout_s, max_queue=o.max_queue,
                        idle_exit=o.idle_exit_min * 60 if o.idle_exit_min else None)
        _run(daemon.run())
    finally:
        if engine is not None:
            engine.stop()             # already done after a clean shutdown; after a crash it still saves sessions
        listener.close()


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _run(coro) -> None:
    try:
        import uvloop
        factory = uvloop.new_event_loop
    except ImportError:
        factory = None
        log.info("uvloop is not installed: using asyncio's default event loop")
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(coro)


def setup_logging(level: str) -> Path | None:
    """Log to stderr and to $XDG_STATE_HOME/ds4/ds4d.log (rotated); returns the file, or None when it cannot be
    written (the daemon then logs to stderr only)."""
    from .config import log_path
    logger = logging.getLogger("ds4d")
    logger.setLevel(level.upper())
    fmt = logging.Formatter("%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    path = log_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.handlers.RotatingFileHandler(path, maxBytes=10 << 20, backupCount=3))
    except OSError as e:
        print(f"ds4d: cannot write the log file {path} ({e.strerror}); logging to stderr only", file=sys.stderr)
        path = None
    for h in handlers:
        h.setFormatter(fmt)
        logger.addHandler(h)
    return path


def mem_available() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (free memory plus the page cache it can reclaim), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"


def load_model(path: Path | None, backend: str):
    """(model, path, demo): the given model, or the demo model generated once; refuses weights that cannot fit."""
    from .gguf_file import GGUFFile
    from .model import Model
    from .tiny import demo_model
    demo = path is None
    if demo:
        path = demo_model(progress=log.info)
        log.warning("NO MODEL CONFIGURED: serving the tiny RANDOM demo model %s; its output is gibberish. Point "
                    "-m, $DS4_MODEL or `model` in the config file at a real ds4 GGUF for real answers.", path)
    g = GGUFFile(path)
    need = g.tensor_bytes
    if backend == "cuda":                 # the weights live in GPU memory; the file is only read through
        from .ops.cuda import memory_shortfall
        why = memory_shortfall(g)
        if why:
            raise ServeError(why)
        log.info("loading %s: %s of weights into GPU memory", path, _gib(need))
    else:
        avail = mem_available()
        if avail is not None and need > avail:
            raise ServeError(f"{path.name} does not fit: its weights need {_gib(need)} of RAM for the {backend} "
                             f"backend and {_gib(avail)} is available (MemAvailable); free memory or use a smaller "
                             f"file")
        log.info("loading %s: %s of weights, %s of RAM available", path, _gib(need),
                 _gib(avail) if avail is not None else "unknown")
    _read_through(g.path, g.size)
    model = Model(g, backend=backend)
    if backend == "cuda":
        t0 = time.monotonic()
        model.ops.on_upload = _Progress("uploading weights to the GPU", need)
        model.logits([0])                 # one token through every layer: every weight uploaded before serving
        model.ops.on_upload = None
        log.info("weights uploaded to the GPU in %.1f s (%s)", time.monotonic() - t0, _gib(model.ops.uploaded))
    return model, path, demo


class _Progress:
    """A long step's progress in the log: `what: P% (done of total)`, at most every 2 seconds."""

    def __init__(self, what: str, total: int):
        self.what, self.total, self.last = what, max(total, 1), time.monotonic()

    def __call__(self, done: int) -> None:
        if time.monotonic() - self.last > 2:
            self.last = time.monotonic()
            log.info("%s: %d%% (%s of %s)", self.what, 100 * done // self.total, _gib(done), _gib(self.total))


def _read_through(path, size: int) -> None:
    """Read the file once so its pages are in memory before the first request, reporting progress."""
    t0 = time.monotonic()
    done = 0
    report = _Progress("reading weights", size)
    buf = bytearray(64 << 20)
    with open(path, "rb", buffering=0) as f:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        while n := f.readinto(buf):
            done += n
            report(done)
    log.info("weights read in %.1f s", time.monotonic() - t0)


class Listener:
    """The listening socket: inherited from systemd, or bound at a path this process then owns (and removes)."""

    def __init__(self, sock: socket.socket, path: Path | None = None, lock_fd: int | None = None):
        self.sock, self.path, self.lock_fd = sock, path, lock_fd
        self.inode = os.stat(path).st_ino if path is not None else None

    @classmethod
    def activated(cls) -> "Listener | None":
        """The socket systemd passed (LISTEN_PID is us, LISTEN_FDS >= 1: fd 3), or None."""
        if os.environ.get("LISTEN_PID") != str(os.getpid()):
            return None
        n = os.environ.get("LISTEN_FDS", "0")
        for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):    # not for our children
            os.environ.pop(var, None)
        if not n.isdigit() or int(n) < 1:
            return None
        try:
            sock = socket.socket(fileno=SD_LISTEN_FDS_START)
        except OSError as e:
            raise ServeError(f"LISTEN_FDS={n} but fd {SD_LISTEN_FDS_START} is not a socket ({e.strerror})") from None
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            raise ServeError("the socket passed by systemd (LISTEN_FDS) is not a Unix stream socket")
        os.set_inheritable(sock.fileno(), False)
        if int(n) > 1:
            log.warning("%s sockets were passed (LISTEN_FDS); serving on the first", n)
        log.info("socket activation: serving on the inherited socket %s", sock.getsockname())
        return cls(sock)

    @classmethod
    def bind(cls, path: Path, explicit: bool) -> "Listener":
        """Bind `path` (0600, in a 0700 directory created when missing). A lock file beside it keeps a second
        daemon out, even one starting at the same moment; a socket nobody answers on is stale and replaced."""
        if len(os.fsencode(str(path))) > SOCKET_PATH_MAX:
            raise ServeError(f"the socket path {path} is too long for a Unix socket (at most {SOCKET_PATH_MAX} "
                             f"bytes); choose a shorter --socket")
        d = path.parent
        if not d.is_dir():
            try:
                d.mkdir(parents=True, mode=0o700)
            except OSError as e:
                raise ServeError(f"cannot create the socket directory {d}: {e.strerror}") from None
            os.chmod(d, 0o700)                      # mkdir's mode passes through the umask
        elif not explicit:                          # the default directory is ds4's own: it must be private
            st = d.stat()
            if st.st_uid != os.getuid():
                raise ServeError(f"the socket directory {d} belongs to uid {st.st_uid}, not to you (uid "
                                 f"{os.getuid()}); remove it or choose another --socket")
            if st.st_mode & 0o077:
                os.chmod(d, 0o700)
        lock_fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ServeError(f"another ds4d is already starting or serving on {path}") from None
            _replace_stale(path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            umask = os.umask(0o177)                 # the socket is never group/world-accessible, not even briefly
            try:
                sock.bind(str(path))
            except OSError as e:
                sock.close()
                raise ServeError(f"cannot bind {path}: {e.strerror}") from None
            finally:
                os.umask(umask)
            os.chmod(path, 0o600)
            sock.listen(128)
        except BaseException:
            os.close(lock_fd)
            raise
        log.info("listening on %s", path)
        return cls(sock, path, lock_fd)

    def close(self) -> None:
        self.sock.close()
        if self.path is not None:
            try:
                if os.stat(self.path).st_ino == self.inode:    # still ours, not a successor's
                    os.unlink(self.path)
            except FileNotFoundError:
                pass
        if self.lock_fd is not None:
            os.close(self.lock_fd)


def _replace_stale(path: Path) -> None:
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ServeError(f"{path} exists and is not a socket; not replacing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        log.info("replacing the stale socket file %s", path)
        path.unlink(missing_ok=True)
        return
    except TimeoutError:
        pass                                        # a full backlog: someone is serving there
    except OSError as e:
        raise ServeError(f"cannot check the existing socket {path}: {e.strerror}") from None
    finally:
        probe.close()
    raise ServeError(f"a ds4d is already serving on {path}")
