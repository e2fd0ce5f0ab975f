"""Sessions: named conversation timelines (token ids + model state + chat messages) and their files on disk.

Owns what a session is, how a name maps to a file (names cannot address anything outside the sessions
directory), and `plan_sync`: given the tokens a request needs, how much of the session's current state can be
kept (extend), or which cached snapshot to start from instead (rebuild). The engine's worker is the only caller
that mutates sessions; saving happens on a writer thread from snapshots the worker hands over.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from ds4c.protocol import valid_session_name

from .kvstore import PageStore, SnapshotError, read_header, read_snapshot, write_snapshot
from .state import SessionState

class SessionNameError(ValueError):
    pass


def check_name(name: object) -> str:
    """A session name that is safe as a file name (the protocol's rule: 1-64 of [A-Za-z0-9_.-], not starting
    with '.' or '-', no '..')."""
    if not isinstance(name, str) or not valid_session_name(name):
        raise SessionNameError("session names are 1-64 characters of letters, digits, '_', '.', '-' "
                               "(not starting with '.' or '-')")
    return name


@dataclass
class Session:
    name: str
    tokens: list[int] = field(default_factory=list)     # the timeline `state` has consumed
    messages: list[dict] = field(default_factory=list)  # chat history (chat requests in this session)
    state: SessionState | None = None                   # None: not loaded (closed, or not created yet)
    last_used: float = field(default_factory=time.time)
    named: bool = True                                  # anonymous request sessions are never saved
    busy: bool = False                                  # a job is running on it

    @property
    def nbytes(self) -> int:
        return self.state.nbytes if self.state is not None else 0

    def info(self) -> dict:
        return {"name": self.name, "tokens": len(self.tokens), "bytes": self.nbytes, "last_used": self.last_used}


def encode_continuing(tokenizer, parts: list[tuple[str, bool]], timeline: list[int]) -> list[int]:
    """Token ids of a rendered prompt (`(text, trusted)` parts) that keep the session's own token ids for the
    longest stretch of text they spell exactly, and encode only the rest.

    A model's sampled tokens are not always what the tokenizer would produce for their text, so re-encoding a
    conversation would break the prefix the session's state holds at the first such token and prefill the rest
    of the history again. Keeping the ids the model actually saw makes a follow-up pay only for its new text.
    An added token of the timeline is kept only where the new prompt's text is trusted (rendered template), so
    user text can never inherit a turn marker."""
    data = "".join(t for t, _ in parts).encode("utf-8")
    spans, at = [], 0                             # byte spans of the trusted parts
    for text, trusted in parts:
        n = len(text.encode("utf-8"))
        if trusted:
            spans.append((at, at + n))
        at += n
    off = keep = keep_off = 0
    for i, t in enumerate(timeline):
        b = tokenizer.token_bytes(t)
        if data[off:off + len(b)] != b:
            break
        if tokenizer.is_added(t) and not any(lo <= off and off + len(b) <= hi for lo, hi in spans):
            break
        off += len(b)
        if off == len(data) or data[off] & 0xC0 != 0x80:   # a character boundary: safe to split the text here
            keep, keep_off = i + 1, off
    if keep == 0:
        return tokenizer.encode_parts(parts)
    rest, at = [], 0
    for text, trusted in parts:
        raw = text.encode("utf-8")
        if at + len(raw) > keep_off:
            rest.append((raw[max(0, keep_off - at):].decode("utf-8"), trusted))
        at += len(raw)
    return list(timeline[:keep]) + tokenizer.encode_parts(rest)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class SessionFiles:
    """Named sessions on disk: `<dir>/<name>.snap` (kvstore format, meta = name, messages, last use)."""

    def __init__(self, root: Path, fingerprint: str, pages: PageStore):
        self.root = Path(root)
        self.fingerprint = fingerprint
        self.pages = pages

    def path(self, name: str) -> Path:
        return self.root / f"{check_name(name)}.snap"

    def names(self) -> list[str]:
        return sorted(p.stem for p in self.root.glob("*.snap") if valid_session_name(p.stem))

    def exists(self, name: str) -> bool:
        return self.path(name).exists()

    def save(self, name: str, tokens: list[int], state: SessionState, messages: list[dict], last_used: float) -> int:
        meta = {"name": name, "messages": messages, "last_used": last_used}
        return write_snapshot(self.path(name), self.fingerprint, tokens, state, meta, self.pages)

    def load(self, name: str, template: SessionState) -> Session:
        """Raises SnapshotError (corrupt, foreign, truncated) or FileNotFoundError."""
        path = self.path(name)
        if not path.exists():
            raise FileNotFoundError(name)
        tokens, state, meta = read_snapshot(path, self.fingerprint, template, self.pages)
        return Session(name, tokens, list(meta.get("messages", [])), state, float(meta.get("last_used", 0)))

    def summary(self, name: str) -> dict:
        """tokens / bytes / last_used of a session on disk without loading its state."""
        path = self.path(name)
        try:
            tokens, meta = read_header(path, self.fingerprint)
        except SnapshotError:
            return {"name": name, "tokens": 0, "bytes": 0, "last_used": 0.0, "error": "unreadable"}
        return {"name": name, "tokens": len(tokens), "bytes": path.stat().st_size,
                "last_used": float(meta.get("last_used", 0)), "messages": meta.get("messages", [])}

    def delete(self, name: str) -> None:
        self.path(name).unlink(missing_ok=True)
