"""The wire contract between ds4 clients and the daemon, in code (normative text: docs/PROTOCOL.md).

Owns the protocol version, the method names, the closed set of error codes, the session-name rule and the
socket-path resolution that every client and the daemon share. It does not frame or send anything (that is
`client.py` on this side and `ds4d.rpc` on the daemon's). The daemon imports this module: there is one copy of
the contract.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

PROTOCOL_VERSION = "1.0"
MAX_MESSAGE_BYTES = 16 * 1024 * 1024

# msgpack-rpc message kinds, as Neovim uses them.
REQUEST, RESPONSE, NOTIFICATION = 0, 1, 2

METHODS = (
    "hello", "status", "tokenize", "detokenize",
    "session.open", "session.list", "session.info", "session.history", "session.fork", "session.close",
    "session.delete", "generate", "chat", "complete", "cancel", "shutdown",
)

ERROR_CODES = (
    "bad_request", "unknown_method", "version_mismatch", "not_found", "exists", "busy", "cancelled",
    "context_full", "out_of_memory", "too_large", "shutting_down", "internal",
)

# Session names: 1-64 of [A-Za-z0-9_.-], not starting with '.' or '-', no "..": always a plain file name.
SESSION_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")


def valid_session_name(name: str) -> bool:
    return SESSION_NAME_RE.fullmatch(name) is not None and ".." not in name


def socket_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Resolve the daemon socket: explicit option, $DS4_SOCKET, $XDG_RUNTIME_DIR/ds4/ds4.sock, /tmp/ds4-<uid>/ds4.sock."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("DS4_SOCKET")
    if env:
        return Path(env)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and Path(runtime).is_dir():
        return Path(runtime) / "ds4" / "ds4.sock"
    return Path("/tmp") / f"ds4-{os.getuid()}" / "ds4.sock"
