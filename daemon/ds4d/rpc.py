"""msgpack-rpc on a byte stream: framing, message shapes, and the validation of named parameters.

Owns the wire mechanics of PROTOCOL.md: cutting a stream of bytes into msgpack values (16 MiB cap), telling a
request `[0, msgid, method, [params]]` apart from everything else, packing responses and notifications, and the
small declarative checks (`Str`, `Int`, `ListOf`, `Fields`, ...) that turn a client's named arguments into
validated values or a `bad_request` whose message names the field. It knows no method and no engine: `server.py`
owns the method table, the schemas and what each method does. Both run on the event loop; nothing here blocks.

Two kinds of failure, as the protocol wants them: `FrameError` (undecodable bytes, or a message over the cap)
means the stream cannot be trusted any more and the connection is closed; `RpcError` is a well-framed but
invalid message, answered with an error response while the connection stays open.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import msgpack
from msgpack.exceptions import BufferFull, FormatError, StackError

from ds4c.protocol import MAX_MESSAGE_BYTES, NOTIFICATION, REQUEST, RESPONSE

U32 = 2**32
FEED_CHUNK = 64 * 1024     # bytes fed to the unpacker between drains, so its buffer never outgrows the cap


class RpcError(Exception):
    """A message or parameter the client must hear about: `code` is a protocol error code."""

    def __init__(self, code: str, message: str, msgid: int | None = None):
        super().__init__(message)
        self.code, self.message, self.msgid = code, message, msgid


class FrameError(Exception):
    """The stream is unusable (undecodable bytes or a message over the cap): reply if `code`, then close."""

    def __init__(self, message: str, code: str | None = None, msgid: int | None = None):
        super().__init__(message)
        self.code, self.msgid = code, msgid


# --- framing ---------------------------------------------------------------------------------------------------
#
# One msgpack Unpacker per connection. Bytes are fed in FEED_CHUNK slices and every complete value is taken out
# after each slice, so what stays buffered is one partial message: when that exceeds the cap, or a message a
# slice completes spans more than the cap (its size is the distance between two `tell()`s), it is too large,
# whatever lengths it declares. A header announcing more elements than the cap has bytes is too large as well
# (msgpack raises a plain ValueError for it). The first bytes of the current message are kept so a too_large
# reply can still carry the request's msgid.

class Decoder:
    def __init__(self, max_bytes: int = MAX_MESSAGE_BYTES):
        self.max_bytes = max_bytes
        self._unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=max_bytes + FEED_CHUNK)
        self._fed = 0          # bytes fed so far
        self._mark = 0         # stream offset where the current (partial) message starts
        self._head = b""       # its first bytes

    def feed(self, data: bytes) -> tuple[list[Any], FrameError | None]:
        """The complete messages the bytes finish, and the FrameError that ends the stream (None while it is
        fine): messages decoded before a bad one still count."""
        out: list[Any] = []
        view = memoryview(data)
        for at in range(0, len(view), FEED_CHUNK):
            chunk = view[at:at + FEED_CHUNK]
            start = self._fed
            if len(self._head) < 16:            # the partial message began before this slice
                self._head += bytes(chunk[:16 - len(self._head)])
            try:
                self._unpacker.feed(chunk)
                self._fed += len(chunk)
                for msg in self._unpacker:
                    end = self._unpacker.tell()
                    if end - self._mark > self.max_bytes:      # completed by this slice, but too big all the same
                        return out, self._too_large()
                    out.append(msg)
                    self._mark = end
                    self._head = bytes(chunk[end - start:][:16])
            except BufferFull:
                return out, self._too_large()
            except (FormatError, StackError, UnicodeDecodeError, TypeError) as e:
                # TypeError: an unhashable map key (an array or a map used as a key).
                return out, FrameError(f"undecodable msgpack ({e})")
            except ValueError:
                return out, self._too_large()
            if self._fed - self._mark > self.max_bytes:
                return out, self._too_large()
        return out, None

    def _too_large(self) -> FrameError:
        cap = f"{self.max_bytes >> 20} MiB" if self.max_bytes % (1 << 20) == 0 else f"{self.max_bytes} bytes"
        return FrameError(f"message larger than {cap}", "too_large", peek_msgid(self._head))


def peek_msgid(head: bytes) -> int | None:
    """The msgid of a request from its first bytes, or None."""
    u = msgpack.Unpacker(raw=False)
    u.feed(head)
    try:
        if u.read_array_header() != 4 or u.unpack() != REQUEST:
            return None
        msgid = u.unpack()
    except Exception:               # any partial or odd prefix: there is simply no msgid to report
        return None
    return msgid if _is_msgid(msgid) else None


def _is_msgid(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < U32


@dataclass
class Request:
    msgid: int
    method: str
    params: dict


def parse_request(msg: Any) -> Request:
    """A decoded value as a request, or RpcError (bad_request) carrying the msgid when one could be read.
    `params` is `[{...}]`; `[]` is accepted for no arguments (what Neovim's rpcrequest sends)."""
    if not isinstance(msg, list) or not msg or msg[0] not in (REQUEST, NOTIFICATION, RESPONSE) \
            or isinstance(msg[0], bool):
        raise RpcError("bad_request", "a request is an array [0, msgid, method, params]")
    if msg[0] != REQUEST:
        raise RpcError("bad_request", f"only requests (type {REQUEST}) are accepted, not type {msg[0]}")
    msgid = msg[1] if len(msg) > 1 and _is_msgid(msg[1]) else None
    if len(msg) != 4:
        raise RpcError("bad_request", "a request is an array of 4: [0, msgid, method, params]", msgid)
    if msgid is None:
        raise RpcError("bad_request", "msgid: must be an unsigned 32-bit integer")
    method, params = msg[2], msg[3]
    if not isinstance(method, str):
        raise RpcError("bad_request", "method: must be a string", msgid)
    if params == []:
        params = [{}]
    if not isinstance(params, list) or len(params) != 1 or not isinstance(params[0], dict):
        raise RpcError("bad_request", "params: must be an array holding one map of named arguments", msgid)
    if not all(isinstance(k, str) for k in params[0]):
        raise RpcError("bad_request", "params: argument names must be strings", msgid)
    return Request(msgid, method, params[0])


def pack_response(msgid: int | None, error: dict | None, result: Any) -> bytes:
    return msgpack.packb([RESPONSE, msgid, error, result], use_bin_type=True)


def pack_notification(method: str, params: dict) -> bytes:
    return msgpack.packb([NOTIFICATION, method, [params]], use_bin_type=True)


# Line breaks as str.splitlines() sees them, escaped: an error message is one line even when it quotes a field name
# or a value the client chose.
_ONE_LINE = str.maketrans({c: repr(c)[1:-1] for c in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"})


def error_map(code: str, message: str) -> dict:
    return {"code": code, "message": message.translate(_ONE_LINE)}


# --- parameter validation ----------------------------------------------------------------------------------------
#
# A schema is a `Fields` of name -> Spec. `Fields.check(params)` rejects unknown names (a typo never passes
# silently), requires the required ones, treats nil as absent for optional ones (Lua clients send vim.NIL), and
# returns only the fields that were given: defaults belong to whoever consumes them. Every message starts with
# the field's path (`messages[2].role: ...`).

class Spec:
    required = False

    def check(self, v: Any, where: str) -> Any:
        raise NotImplementedError


def bad(where: str, problem: str) -> RpcError:
    return RpcError("bad_request", f"{where}: {problem}")


class Str(Spec):
    def __init__(self, *choices: str, required: bool = False, nonempty: bool = False):
        self.choices, self.required, self.nonempty = choices, required, nonempty

    def check(self, v, where):
        if not isinstance(v, str):
            raise bad(where, "must be a string")
        if self.choices and v not in self.choices:
            raise bad(where, f"must be one of {', '.join(map(repr, self.choices))}, not {v!r}")
        if self.nonempty and not v:
            raise bad(where, "must not be empty")
        return v


class Int(Spec):
    def __init__(self, lo: int = 0, hi: int = 2**64 - 1, required: bool = False):
        self.lo, self.hi, self.required = lo, hi, required

    def check(self, v, where):
        if isinstance(v, bool) or not isinstance(v, int):
            raise bad(where, "must be an integer")
        if not self.lo <= v <= self.hi:
            raise bad(where, f"must be in [{self.lo}, {self.hi}], not {v}")
        return v


class Num(Spec):
    def __init__(self, required: bool = False):
        self.required = required

    def check(self, v, where):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise bad(where, "must be a finite number")
        return v


class Bool(Spec):
    def check(self, v, where):
        if not isinstance(v, bool):
            raise bad(where, "must be true or false")
        return v


class ListOf(Spec):
    def __init__(self, item: Spec, required: bool = False, nonempty: bool = False):
        self.item, self.required, self.nonempty = item, required, nonempty

    def check(self, v, where):
        if not isinstance(v, list):
            raise bad(where, "must be an array")
        if self.nonempty and not v:
            raise bad(where, "must not be empty")
        return [self.item.check(x, f"{where}[{i}]") for i, x in enumerate(v)]


class Json(Spec):
    """Any value JSON can carry, nested at most MAX_DEPTH deep: what a chat message or a tool holds (a session file
    stores its messages as JSON). Binary and extension values, non-string map keys and deeper nesting are refused
    here with their path, instead of failing later where a session is saved or a prompt rendered."""
    MAX_DEPTH = 64

    def check(self, v, where, depth=0):
        if depth > self.MAX_DEPTH:
            raise bad(where, f"nested deeper than {self.MAX_DEPTH} levels")
        if isinstance(v, dict):
            for k, x in v.items():
                if not isinstance(k, str):
                    raise bad(where, "map keys must be strings")
                self.check(x, f"{where}.{k}", depth + 1)
        elif isinstance(v, list):
            for i, x in enumerate(v):
                self.check(x, f"{where}[{i}]", depth + 1)
        elif not (v is None or isinstance(v, (str, int, float, bool))):
            raise bad(where, "must be a JSON value (binary is not text)")
        return v


class Fields(Spec):
    """A map with named fields; `extra` lets other names through, unchecked (True) or checked by a Spec (chat
    messages carry fields the template renderer reads, like `tool_calls`)."""

    def __init__(self, fields: dict[str, Spec] | None = None, *, required: bool = False,
                 extra: bool | Spec = False):
        self.fields, self.required, self.extra = fields or {}, required, extra

    def check(self, v, where=""):
        if not isinstance(v, dict):
            raise bad(where or "params", "must be a map")
        prefix = f"{where}." if where else ""
        out = {}
        for name, value in v.items():
            spec = self.fields.get(name) if isinstance(name, str) else None
            if spec is None:
                if not self.extra:
                    raise bad(f"{prefix}{name}", "unknown field")
                out[name] = self.extra.check(value, f"{prefix}{name}") if isinstance(self.extra, Spec) else value
            elif value is not None or spec.required:
                out[name] = spec.check(value, prefix + name)
        for name, spec in self.fields.items():
            if spec.required and name not in v:
                raise bad(prefix + name, "required")
        return out
