"""The prompt cache: model-state snapshots keyed by token prefixes, shared across sessions, in RAM and on disk.

Owns a radix tree over token ids whose nodes may hold a snapshot (the state after exactly that prefix), the
byte budgets of its two host tiers (RAM, then disk) and LRU eviction between them. A lookup returns the longest
cached prefix of a token list, as a private copy the caller may extend. Snapshots share the immutable pages of
compressed rows with each other and with live sessions (`state.py`), so RAM use is counted per unique page, not
per entry. Entries being restored are pinned and never evicted mid-use.

Disk entries live under `<cache>/prefix/<fingerprint[:16]>/`: another model's (or numerics mode's) files are in
another directory and never read. A file that fails verification is logged, deleted and never used. Only the
engine's worker calls this (no locking).
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .kvstore import PageStore, SnapshotError, page_refs, read_header, read_snapshot, write_snapshot
from .state import SessionState

log = logging.getLogger("ds4d.cache")


@dataclass
class Entry:
    tokens: tuple[int, ...]
    state: SessionState | None = None    # RAM tier copy (None: on disk only)
    path: Path | None = None             # disk tier file
    disk_bytes: int = 0
    last_used: float = field(default_factory=time.monotonic)
    pins: int = 0


class _Node:
    __slots__ = ("edge", "children", "entry")

    def __init__(self, edge: tuple[int, ...] = ()):
        self.edge = edge                          # token ids on the edge into this node
        self.children: dict[int, _Node] = {}
        self.entry: Entry | None = None


class PrefixCache:
    def __init__(self, root: Path | None, fingerprint: str, template: Callable[[], SessionState],
                 ram_budget: int, disk_budget: int, pages: PageStore | None = None):
        self.fingerprint = fingerprint
        self.template = template
        self.ram_budget = ram_budget
        self.disk_budget = disk_budget if root is not None else 0
        self.root = Path(root) / "prefix" / fingerprint[:16] if root is not None else None
        self.pages = pages
        self.tree = _Node()
        self.entries: dict[tuple[int, ...], Entry] = {}
        self.hits = 0
        if self.root is not None:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._scan_disk()

    # --- tree -----------------------------------------------------------------------------------------------
    def _find(self, tokens: list[int] | tuple[int, ...], limit: int) -> Entry | None:
        """The entry of the longest prefix of tokens[:limit] that has one."""
        node, i, best = self.tree, 0, None
        while True:
            if node.entry is not None and i <= limit:
                best = node.entry
            if i >= limit:
                return best
            child = node.children.get(tokens[i])
            if child is None:
                return best
            edge = child.edge
            if i + len(edge) > limit or tuple(tokens[i:i + len(edge)]) != edge:
                return best
            node, i = child, i + len(edge)

    def _node_for(self, tokens: tuple[int, ...]) -> _Node:
        """The node for exactly `tokens`, splitting an edge if needed."""
        node, i = self.tree, 0
        while i < len(tokens):
            child = node.children.get(tokens[i])
            if child is None:
                new = _Node(tokens[i:])
                node.children[tokens[i]] = new
                return new
            edge = child.edge
            k = 0
            while k < len(edge) and i + k < len(tokens) and edge[k] == tokens[i + k]:
                k += 1
            if k == len(edge):
                node, i = child, i + k
                continue
            mid = _Node(edge[:k])                 # split the edge at the divergence
            child.edge = edge[k:]
            mid.children[child.edge[0]] = child
            node.children[tokens[i]] = mid
            node, i = mid, i + k
        return node

    def _remove(self, e: Entry) -> None:
        self._node_for(e.tokens).entry = None     # empty nodes stay; they cost a few bytes
        self.entries.pop(e.tokens, None)

    # --- public ---------------------------------------------------------------------------------------------
    def lookup(self, tokens: list[int], limit: int) -> tuple[int, SessionState | None]:
        """(n, state) for the longest cached prefix of tokens[:limit]; state is a private copy (or None, n=0)."""
        while True:
            e = self._find(tokens, limit)
            if e is None or not e.tokens:
                return 0, None
            e.pins += 1
            try:
                if e.state is None:
                    e.state = self._load(e)
                if e.state is None:       # the file was bad: it is gone now, look again
                    continue
                e.last_used = time.monotonic()
                self.hits += 1
                return len(e.tokens), e.state.snapshot()
            finally:
                e.pins -= 1
                self.enforce()

    def insert(self, tokens: list[int], state: SessionState) -> None:
        """Remember the state after exactly `tokens` (a snapshot: pages shared, tail copied)."""
        key = tuple(tokens)
        if not key or self.ram_budget <= 0 and self.disk_budget <= 0:
            return
        e = self.entries.get(key)
        if e is None:
            e = self.entries[key] = Entry(key)
            self._node_for(key).entry = e
        if e.state is None:
            e.state = state.snapshot()
        e.last_used = time.monotonic()
        self.enforce()

    def persist(self) -> None:
        """Move the RAM tier to disk (within the disk budget), so a restart keeps the warm prefixes."""
        for e in sorted(self.entries.values(), key=lambda e: e.last_used):
            if e.state is not None:
                self._evict_ram(e)
        self.enforce()

    # --- budgets --------------------------------------------------------------------------------------------
    def ram_bytes(self) -> int:
        """Bytes of the RAM tier, each shared page counted once."""
        seen: set[int] = set()
        total = 0
        for e in self.entries.values():
            if e.state is None:
                continue
            for layer in e.state.layers:
                total += layer.raw.nbytes
                for a in (layer.comp_kv, layer.comp_score, layer.idx_kv, layer.idx_score):
                    total += 0 if a is None else a.nbytes
                for store in (layer.comp, layer.idx):
                    for p in (store.pages if store is not None else ()):
                        if id(p) not in seen:
                            seen.add(id(p))
                            total += p.nbytes
        return total

    def disk_bytes(self) -> int:
        pages = self.pages.nbytes() if self.pages is not None else 0
        return sum(e.disk_bytes for e in self.entries.values()) + pages

    def enforce(self) -> None:
        """LRU: RAM over budget -> oldest unpinned entries move to disk (or go); disk over budget -> oldest go."""
        lru = sorted((e for e in self.entries.values() if e.pins == 0), key=lambda e: e.last_used)
        ram = self.ram_bytes()
        for e in lru:
            if ram <= self.ram_budget:
                break
            if e.state is not None:
                self._evict_ram(e)
                ram = self.ram_bytes()
        if self.root is None:
            return
        if self.disk_budget > 0 and self.disk_bytes() > self.disk_budget:
            for e in sorted((e for e in self.entries.values() if e.pins == 0 and e.path is not None),
                            key=lambda e: e.last_used):
                self._drop_file(e)
                if e.state is None:
                    self._remove(e)
                if self.disk_bytes() <= self.disk_budget:
                    break
            self._collect_pages()

    def _evict_ram(self, e: Entry) -> None:
        if e.path is None and self.root is not None and self.disk_budget > 0:
            try:
                e.path = self.root / (hashlib.sha256(repr(e.tokens).encode()).hexdigest()[:32] + ".snap")
                e.disk_bytes = write_snapshot(e.path, self.fingerprint, list(e.tokens), e.state,
                                              {"kind": "prefix"}, self.pages)
            except OSError as err:
                log.warning("cannot spill a prefix snapshot to disk: %s", err)
                e.path, e.disk_bytes = None, 0
        e.state = None
        if e.path is None:
            self._remove(e)

    def _drop_file(self, e: Entry) -> None:
        if e.path is not None:
            e.path.unlink(missing_ok=True)
            e.path, e.disk_bytes = None, 0

    def _collect_pages(self) -> None:
        """Delete page files no snapshot references any more (session files included)."""
        if self.pages is None:
            return
        with self.pages.lock:              # the writer thread may be between a session's pages and its file
            used: set[bytes] = set()
            for snap in list(self.pages.root.parent.rglob("*.snap")):
                try:
                    used.update(page_refs(snap))
                except SnapshotError:
                    continue
            for digest in self.pages.digests() - used:
                self.pages.remove(digest)

    # --- disk -----------------------------------------------------------------------------------------------
    def _scan_disk(self) -> None:
        for path in sorted(self.root.glob("*.snap")):
            try:
                tokens, _ = read_header(path, self.fingerprint)
            except SnapshotError as err:
                log.warning("ignoring prefix snapshot %s: %s", path, err)
                path.unlink(missing_ok=True)
                continue
            key = tuple(tokens)
            e = Entry(key, path=path, disk_bytes=path.stat().st_size, last_used=path.stat().st_mtime - time.time()
                      + time.monotonic())
            self.entries[key] = e
            self._node_for(key).entry = e

    def _load(self, e: Entry) -> SessionState | None:
        try:
            tokens, state, _ = read_snapshot(e.path, self.fingerprint, self.template(), self.pages)
            if tuple(tokens) != e.tokens:
                raise SnapshotError("token ids changed since the scan")
            return state
        except SnapshotError as err:
            log.warning("ignoring prefix snapshot %s: %s", e.path, err)
            self._drop_file(e)
            self._remove(e)
            return None
