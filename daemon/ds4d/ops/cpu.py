"""The CPU backend: float32, with the native kernels of `ds4d._cpu` for everything that reads weights.

Owns the choice of kernel per op and the activation handling: matrix products run on the weights as the file
stores them (no dequantized copies), with 8-bit activations for quantized weights when `act8` is on (the
default under faithful numerics, as ds4's CPU path does; exact numerics keep float32 activations so the model
can be compared with HF transformers). The routed experts, attention and the indexer's top-k are fused native
ops (one call per layer and op, rows read in place from the state's pages). Every op not overridden here is the
reference implementation (`reference.py`) run in float32: the reference stays beside every fast path.
"""

from __future__ import annotations

import numpy as np

from ..state import RowStore
from ..weights import Weight
from .reference import Reference

_ROW_DTYPES = (np.dtype(np.float16), np.dtype(np.float32))


def _pages(store: RowStore) -> list[np.ndarray]:
    """A row store's pages as the native ops read them: float16 / float32 in place, anything else converted."""
    if store.dtype in _ROW_DTYPES:
        return store.pages
    return [np.asarray(p, np.float32) for p in store.pages]


class CPU(Reference):
    name = "cpu"

    def __init__(self, numerics: str = "faithful", act8: bool | None = None, threads: int | None = None):
        super().__init__(np.float32)
        from .. import _cpu
        self._cpu = _cpu
        self.act8 = (numerics == "faithful") if act8 is None else bool(act8)
        if threads:
            _cpu.set_threads(int(threads))
        self.weight_calls = 0      # native weight-kernel launches, for the engine's counters

    # --- matrices -------------------------------------------------------------------------------------------
    def matmul(self, w: Weight, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        self.weight_calls += 1
        x = np.asarray(x, dtype=np.float32)
        if x.strides[-1] != 4:
            x = np.ascontiguousarray(x)
        return self._cpu.matmul(w.raw, int(w.type), w.cols, x, out=out, act8=self.act8)

    def matmul_grouped(self, w: Weight, x: np.ndarray, groups: int) -> np.ndarray:
        """Each group's slice of x times its block of rows, written straight into its slice of the output."""
        per, n_in = w.rows // groups, x.shape[1] // groups
        x = np.asarray(x, dtype=np.float32)
        out = np.empty((len(x), w.rows), np.float32)
        for g in range(groups):
            self.matmul(w.row_slice(g * per, (g + 1) * per), x[:, g * n_in:(g + 1) * n_in],
                        out=out[:, g * per:(g + 1) * per])
        return out

    def embed(self, w: Weight, tokens: np.ndarray, n_hc: int) -> np.ndarray:
        rows = self._cpu.dequantize(np.ascontiguousarray(w.raw[np.asarray(tokens)]), int(w.type), w.cols)
        return np.repeat(rows[:, None, :], n_hc, axis=1)

    # --- fused ops ------------------------------------------------------------------------------------------
    def moe(self, h: np.ndarray, ids: np.ndarray, weights: np.ndarray, experts: tuple[Weight, Weight, Weight],
            clamp: float, shared: np.ndarray) -> np.ndarray:
        """Routed experts in one native call (each used expert's weights read once for all its tokens), added
        onto the shared expert's output. One weight-kernel call, whatever the batch: the engine counts it so."""
        gate, up, down = experts
        self.weight_calls += 1
        routed = self._cpu.moe(np.ascontiguousarray(h, dtype=np.float32), ids,
                               np.ascontiguousarray(weights, dtype=np.float32), gate.raw, int(gate.type), up.raw,
                               int(up.type), down.raw, int(down.type), gate.rows, float(clamp), self.act8)
        return shared + routed

    def attention(self, q: np.ndarray, raw: np.ndarray, raw_lo: np.ndarray, raw_hi: np.ndarray, comp: RowStore,
                  comp_sel: np.ndarray | None, comp_n: np.ndarray, sinks: np.ndarray, scale: float) -> np.ndarray:
        """All tokens and heads in one native call; compressed rows are read in place from the store's pages."""
        pages = _pages(comp)
        # the native op reads one row dtype (float16 or float32): the pages' if any, else the window's
        row_dtype = pages[0].dtype if pages else raw.dtype if raw.dtype in _ROW_DTYPES else np.dtype(np.float32)
        if raw.dtype != row_dtype:
            raw = raw.astype(row_dtype)
        return self._cpu.attention(np.ascontiguousarray(q, dtype=np.float32), np.ascontiguousarray(raw), raw_lo,
                                   raw_hi, pages, comp.n, comp_sel, comp_n,
                                   np.ascontiguousarray(sinks, dtype=np.float32), float(scale))

    def indexer_topk(self, q: np.ndarray, w: np.ndarray, keys: RowStore, n_visible: np.ndarray, top_k: int,
                     w_scale: float) -> np.ndarray:
        """Native scores over the key pages in place, and an exact top-k with the reference's tie rule."""
        return self._cpu.indexer_topk(np.ascontiguousarray(q, dtype=np.float32),
                                      np.ascontiguousarray(w, dtype=np.float32), _pages(keys), keys.n,
                                      np.asarray(n_visible), int(top_k), float(w_scale))
