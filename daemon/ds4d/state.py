"""Per-session model state: what a conversation has left behind in every layer (MODEL.md §4).

Owns, per layer: the raw sliding window (the last n_swa K=V rows, a ring indexed by position), the compressed
attention rows and the indexer rows (append-only, in pages), and the compressors' frontiers (the rows of the
block in progress, and for ratio 4 the previous block). Also `snapshot()` / `restore()` and `nbytes`.

Compressed rows never change once written, so they live in fixed-size pages: a snapshot references the full
pages and copies only the partial last page, the raw windows and the frontiers (the "small tail"). Many
snapshots of one growing conversation therefore share almost all of their bytes, which is what the prefix cache
builds on. This module does no arithmetic; `model.py` decides what to write and the ops compute it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .shape import Shape

PAGE_ROWS = 64


class RowStore:
    """Append-only rows of one width, in pages of PAGE_ROWS rows. Full pages are immutable (shared)."""

    def __init__(self, width: int, dtype: np.dtype, pages: list[np.ndarray] | None = None, n: int = 0):
        self.width = width
        self.dtype = np.dtype(dtype)
        self.pages: list[np.ndarray] = pages if pages is not None else []
        self.n = n

    def append(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows)
        i = 0
        while i < len(rows):
            at = self.n % PAGE_ROWS
            if at == 0:
                self.pages.append(np.zeros((PAGE_ROWS, self.width), self.dtype))
            take = min(PAGE_ROWS - at, len(rows) - i)
            self.pages[-1][at:at + take] = rows[i:i + take]
            self.n += take
            i += take

    def array(self) -> np.ndarray:
        """All rows as one contiguous (n, width) array (a copy)."""
        if not self.pages:
            return np.zeros((0, self.width), self.dtype)
        return np.concatenate(self.pages)[:self.n]

    def snapshot(self) -> "RowStore":
        full = self.n // PAGE_ROWS
        pages = self.pages[:full] + [p.copy() for p in self.pages[full:]]
        return RowStore(self.width, self.dtype, pages, self.n)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.pages)


@dataclass
class LayerState:
    raw: np.ndarray                       # (n_swa, D): position p lives in row p mod n_swa
    comp: RowStore | None = None          # compressed attention rows (ratio 4 and 128)
    comp_kv: np.ndarray | None = None     # compressor frontier: (coff·ratio, coff·D)
    comp_score: np.ndarray | None = None
    idx: RowStore | None = None           # indexer rows (ratio 4)
    idx_kv: np.ndarray | None = None      # indexer compressor frontier: (8, 2·128)
    idx_score: np.ndarray | None = None

    def window(self, pos0: int) -> np.ndarray:
        """The stored rows of positions max(0, pos0 - n_swa + 1) .. pos0 - 1, in position order: what the first
        token at pos0 can still see besides itself."""
        n_swa = len(self.raw)
        first = max(0, pos0 - n_swa + 1)
        idx = np.arange(first, pos0) % n_swa
        return self.raw[idx]

    def push_raw(self, rows: np.ndarray, pos0: int) -> None:
        """Store the rows of positions pos0 .. pos0 + len(rows) - 1 (only the last n_swa can matter)."""
        n_swa = len(self.raw)
        keep = min(len(rows), n_swa)
        first_pos = pos0 + len(rows) - keep
        self.raw[(np.arange(keep) + first_pos) % n_swa] = rows[len(rows) - keep:]

    def copy(self) -> "LayerState":
        c = lambda a: None if a is None else a.copy()   # noqa: E731
        return LayerState(self.raw.copy(), None if self.comp is None else self.comp.snapshot(), c(self.comp_kv),
                          c(self.comp_score), None if self.idx is None else self.idx.snapshot(), c(self.idx_kv),
                          c(self.idx_score))

    @property
    def nbytes(self) -> int:
        total = self.raw.nbytes
        for a in (self.comp_kv, self.comp_score, self.idx_kv, self.idx_score):
            total += 0 if a is None else a.nbytes
        for s in (self.comp, self.idx):
            total += 0 if s is None else s.nbytes
        return total


class SessionState:
    """The state of one token timeline: `n_tokens` positions processed, one LayerState per layer."""

    def __init__(self, layers: list[LayerState], n_tokens: int = 0):
        self.layers = layers
        self.n_tokens = n_tokens

    @classmethod
    def new(cls, shape: Shape, store_dtype: np.dtype, work_dtype: np.dtype) -> "SessionState":
        """Fresh state. K=V rows are stored in `store_dtype` (f16 in faithful numerics); compressor frontiers
        hold projections in the backend's `work_dtype`, empty rows as kv 0 / score -inf."""
        layers = []
        for il in range(shape.n_layer):
            r = shape.ratio(il)
            st = LayerState(raw=np.zeros((shape.n_swa, shape.head_dim), store_dtype))
            if r:
                coff = 2 if r == 4 else 1
                st.comp = RowStore(shape.head_dim, store_dtype)
                st.comp_kv = np.zeros((coff * r, coff * shape.head_dim), work_dtype)
                st.comp_score = np.full((coff * r, coff * shape.head_dim), -np.inf, work_dtype)
            if r == 4:
                di = shape.indexer_head_dim
                st.idx = RowStore(di, store_dtype)
                st.idx_kv = np.zeros((8, 2 * di), work_dtype)
                st.idx_score = np.full((8, 2 * di), -np.inf, work_dtype)
            layers.append(st)
        return cls(layers)

    def snapshot(self) -> "SessionState":
        """An independent copy that shares the immutable compressed-row pages with this state."""
        return SessionState([l.copy() for l in self.layers], self.n_tokens)

    def restore(self, snap: "SessionState") -> None:
        """Make this state equal to a snapshot (the snapshot stays usable for further restores)."""
        s = snap.snapshot()
        self.layers, self.n_tokens = s.layers, s.n_tokens

    @property
    def nbytes(self) -> int:
        return sum(l.nbytes for l in self.layers)
