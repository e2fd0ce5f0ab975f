"""The CPU backend: float32, with the native kernels of `ds4d._cpu` for everything that reads weights.

Owns the choice of kernel per op and the activation handling: matrix products run on the weights as the file
stores them (no dequantized copies), with 8-bit activations for quantized weights when `act8` is on (the
default under faithful numerics, as ds4's CPU path does; exact numerics keep float32 activations so the model
can be compared with HF transformers). Every op not overridden here is the reference implementation
(`reference.py`) run in float32: the reference stays beside every fast path.
"""

from __future__ import annotations

import numpy as np

from ..weights import Weight
from .reference import Reference


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
