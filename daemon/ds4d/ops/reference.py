"""The reference backend: every op of the forward pass in plain numpy, float64 by default (the oracle).

Owns the definition of each op's math (MODEL.md §3): matrix products on dequantized weights, RMSNorm, the
hyper-connection pre/post/head with Sinkhorn, interleaved RoPE with YaRN, the FP8 / Hadamard+FP4 round trips of
the faithful numerics, the KV compressors, the indexer's top-k, attention with sinks over the raw window and the
compressed rows, the sqrt-softplus router and the routed experts. It holds no model state (`state.py` does) and
makes no decisions about what runs when (`model.py` does).

`Reference(dtype=np.float32)` runs the same code in float32: the CPU backend inherits from this class and
replaces the ops that deserve native kernels, so every fast path has its reference beside it.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from ..sampling import pick
from ..state import RowStore, SessionState
from ..weights import HyperConn, Weight

NEG_INF = -np.inf
# ds4 clamps the routed-weight sum at 2^-14 before normalizing (HF adds 1e-20; equal for any real router).
MOE_WEIGHT_FLOOR = 6.103515625e-5


# --- number formats (the faithful numerics) -------------------------------------------------------------------

def round_minifloat(v: np.ndarray, mant_bits: int, min_exp: int) -> np.ndarray:
    """Round to the nearest value of a binary minifloat (ties to even mantissa), no overflow handling.

    A value in the binade [2^e, 2^(e+1)) has spacing 2^(e - mant_bits); below 2^min_exp (the smallest normal)
    the spacing stays 2^(min_exp - mant_bits) (subnormals). E4M3FN: mant_bits=3, min_exp=-6. E2M1: 1, 0.
    Works in the input's float type; every step is exact (scaling by powers of two), so float32 and float64
    give the same result for the same input.
    """
    a = np.abs(v)
    _, e = np.frexp(a)            # a = m·2^e with m in [0.5, 1): the binade exponent is e - 1
    e = np.maximum(e - 1, min_exp)
    step = np.ldexp(np.ones_like(a), e - mant_bits)
    return np.copysign(np.rint(a / step) * step, v)


def pow2_ceil_log2(y: np.ndarray) -> np.ndarray:
    """2^ceil(log2(y)) for y > 0, computed exactly from the binary exponent (no log rounding)."""
    m, e = np.frexp(y)
    return np.ldexp(np.ones_like(y), np.where(m == 0.5, e - 1, e))


def fp8_e4m3_roundtrip(x: np.ndarray, block: int = 64) -> np.ndarray:
    """FP8 E4M3 emulation of KV rows (MODEL.md §3.9): per block of 64, a power-of-two scale that maps the block's
    absolute maximum (at least 1e-4) under 448, values rounded to E4M3FN and scaled back."""
    shape = x.shape
    xb = x.reshape(-1, block)
    amax = np.maximum(np.abs(xb).max(axis=1, keepdims=True), x.dtype.type(1e-4))
    scale = pow2_ceil_log2(amax / x.dtype.type(448.0))
    v = np.clip(xb / scale, -448.0, 448.0)
    return (round_minifloat(v, 3, -6) * scale).reshape(shape)


def fp4_e2m1_roundtrip(x: np.ndarray, block: int = 32) -> np.ndarray:
    """FP4 E2M1 emulation (MODEL.md §3.9): per block of 32 a power-of-two scale mapping the absolute maximum
    under 6, values rounded to {0, 0.5, 1, 1.5, 2, 3, 4, 6} with their sign, scaled back."""
    shape = x.shape
    xb = x.reshape(-1, block)
    amax = np.maximum(np.abs(xb).max(axis=1, keepdims=True), x.dtype.type(7.052966104933725e-38))
    scale = pow2_ceil_log2(amax / x.dtype.type(6.0))
    v = np.clip(xb / scale, -6.0, 6.0)
    return (round_minifloat(v, 1, 0) * scale).reshape(shape)


@functools.lru_cache(maxsize=4)
def hadamard_matrix(n: int) -> np.ndarray:
    """The Sylvester (natural order) Walsh-Hadamard matrix of size n, entries ±1 (cached: do not modify)."""
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


# --- RoPE tables ----------------------------------------------------------------------------------------------

def rope_inv_freq(n_rot: int, base: float, yarn: tuple[float, int, float, float] | None = None) -> np.ndarray:
    """Per-pair angular frequencies (n_rot/2,), float64. `yarn` = (factor, original context, beta_fast,
    beta_slow): the compressed layers' YaRN blend of extrapolated and interpolated frequencies, with no magnitude
    scaling (MODEL.md §3.6)."""
    j = np.arange(n_rot // 2, dtype=np.float64)
    inv = base ** (-2.0 * j / n_rot)
    if yarn is None:
        return inv
    factor, orig_ctx, beta_fast, beta_slow = yarn

    def corr(beta: float) -> float:
        return n_rot * math.log(orig_ctx / (beta * 2 * math.pi)) / (2 * math.log(base))

    low = max(0, math.floor(corr(beta_fast)))
    high = min(n_rot - 1, math.ceil(corr(beta_slow)))
    ramp = np.clip((j - low) / max(0.001, high - low), 0.0, 1.0)   # 0: keep extrapolated, 1: interpolate
    return inv / factor * ramp + inv * (1.0 - ramp)


def softplus(z: np.ndarray) -> np.ndarray:
    return np.where(z > 20, z, np.where(z < -20, np.exp(np.minimum(z, 0)), np.log1p(np.exp(np.minimum(z, 20)))))


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


class Reference:
    """float64 (or float32) numpy implementation of every op. See the module docstring."""

    name = "reference"
    follows_on_device = False  # a step's tokens are on the host (a backend that can, reads them on its device)

    def __init__(self, dtype=np.float64):
        self.dtype = np.dtype(dtype)
        self._dequantized: dict[tuple, tuple] = {}

    # --- matrices -------------------------------------------------------------------------------------------
    def _dense(self, w: Weight) -> np.ndarray:
        """Dequantized weights in the backend dtype, cached by the address of the mapped data. The entry keeps
        the raw array alive, so that its address cannot be reused by other weights while it is cached (a freed
        array's memory going to a new one of the same shape would otherwise return the old weights)."""
        key = (w.raw.__array_interface__["data"][0], w.raw.shape, int(w.type))
        hit = self._dequantized.get(key)
        if hit is None:
            hit = self._dequantized[key] = (w.raw, w.dequantize().astype(self.dtype))
        return hit[1]

    def matmul(self, w: Weight, x: np.ndarray) -> np.ndarray:
        """y = x · Wᵀ: (T, cols) -> (T, rows)."""
        return np.asarray(x, self.dtype) @ self._dense(w).T

    def matmuls(self, ws, x: np.ndarray) -> list[np.ndarray]:
        """x times each of several weights: the products of one input (a backend may join them)."""
        return [self.matmul(w, x) for w in ws]

    def norm_matmul(self, w: Weight, x: np.ndarray, weight: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
        """(W · rms_norm(x), rms_norm(x)): a product of normed rows, and the rows (a backend may norm them inside
        the product)."""
        xn = self.rms_norm(x, weight, eps)
        return self.matmul(w, xn), xn

    def matmul_grouped(self, w: Weight, x: np.ndarray, groups: int) -> np.ndarray:
        """Block-diagonal product: group g of x's columns times rows [g·R/G, (g+1)·R/G) of w, side by side."""
        per = w.rows // groups
        n_in = x.shape[1] // groups
        return np.concatenate([self.matmul(w.row_slice(g * per, (g + 1) * per), x[:, g * n_in:(g + 1) * n_in])
                               for g in range(groups)], axis=1)

    def embed(self, w: Weight, tokens: np.ndarray, n_hc: int) -> np.ndarray:
        """Token embeddings copied into every hyper-connection stream: (T, n_hc, E). Only the needed rows of the
        table are decoded."""
        rows = Weight(w.name, w.type, (len(tokens), w.cols), np.asarray(w.raw[np.asarray(tokens)]))
        e = rows.dequantize().astype(self.dtype)
        return np.repeat(e[:, None, :], n_hc, axis=1)

    # --- norms and activations ------------------------------------------------------------------------------
    def rms_norm(self, x: np.ndarray, weight: np.ndarray | None, eps: float) -> np.ndarray:
        x = np.asarray(x, self.dtype)
        y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.dtype.type(eps))
        return y if weight is None else y * weight.astype(self.dtype)

    def swiglu(self, g: np.ndarray, u: np.ndarray, clamp: float) -> np.ndarray:
        """silu(min(g, clamp)) · clip(u, ±clamp): the gate is clamped from above only (MODEL.md §3.4)."""
        g = np.minimum(g, clamp)
        u = np.clip(u, -clamp, clamp)
        return g * sigmoid(g) * u

    # --- hyper-connections ----------------------------------------------------------------------------------
    def _hc_mix(self, X: np.ndarray, hc: HyperConn, rms_eps: float) -> np.ndarray:
        n = X.shape[0]
        flat = self.rms_norm(X.reshape(n, -1), None, rms_eps)   # over all streams: stream 0's values first
        return self.matmul(hc.fn, flat)

    def hc_pre(self, X: np.ndarray, hc: HyperConn, n_iter: int, hc_eps: float, rms_eps: float,
               norm: np.ndarray | None = None, moe_next: bool = False):
        """(T, S, E) streams -> sublayer input x (T, E), post gates (T, S), combine matrix (T, S, S). With `norm`,
        x comes back as the sublayer's RMSNorm of it (weight `norm`), which a backend may fuse. moe_next: x goes to
        moe_routed next (the FFN's entry), which a backend may give work of this step's."""
        pre, post, logits = self.hc_gates(X, hc, hc_eps, rms_eps)
        x = np.einsum("ts,tse->te", pre, X)
        return (x if norm is None else self.rms_norm(x, norm, rms_eps)), post, self.sinkhorn(logits, n_iter, hc_eps)

    def hc_gates(self, X: np.ndarray, hc: HyperConn, hc_eps: float, rms_eps: float):
        """hc_pre's pre gates (T, S), post gates (T, S) and the combine matrix's logits (T, S, S)."""
        S = X.shape[1]
        m = self._hc_mix(X, hc, rms_eps)                        # (T, (2+S)·S)
        scale, base = hc.scale.astype(self.dtype), hc.base.astype(self.dtype)
        pre = sigmoid(m[:, :S] * scale[0] + base[:S]) + hc_eps
        post = 2.0 * sigmoid(m[:, S:2 * S] * scale[1] + base[S:2 * S])
        return pre, post, m[:, 2 * S:].reshape(-1, S, S) * scale[2] + base[2 * S:].reshape(S, S)

    @staticmethod
    def sinkhorn(c: np.ndarray, n_iter: int, hc_eps: float) -> np.ndarray:
        """The combine matrices (T, S, S) from their logits: row softmax + eps, then alternate column and row
        normalisations (n_iter column steps in all)."""
        c = np.exp(c - c.max(axis=-1, keepdims=True))
        c = c / c.sum(axis=-1, keepdims=True) + hc_eps          # row softmax, then eps
        c = c / (c.sum(axis=-2, keepdims=True) + hc_eps)        # column normalisation
        for _ in range(n_iter - 1):
            c = c / (c.sum(axis=-1, keepdims=True) + hc_eps)
            c = c / (c.sum(axis=-2, keepdims=True) + hc_eps)
        return c

    def hc_post(self, f: np.ndarray, X: np.ndarray, post: np.ndarray, comb: np.ndarray) -> np.ndarray:
        """X'[j] = post_j · f + Σ_i comb[i][j] · X[i]."""
        return post[:, :, None] * f[:, None, :] + np.einsum("tij,tie->tje", comb, X)

    def hc_post_pre(self, f: np.ndarray, X: np.ndarray, post: np.ndarray, comb: np.ndarray, hc: HyperConn,
                    n_iter: int, hc_eps: float, rms_eps: float, norm: np.ndarray | None = None,
                    moe_next: bool = False):
        """hc_post of one sublayer, then hc_pre of the next on the new streams: (new streams, x, post gates,
        combine matrix). A backend may do both in one pass over the streams."""
        X = self.hc_post(f, X, post, comb)
        return (X, *self.hc_pre(X, hc, n_iter, hc_eps, rms_eps, norm, moe_next))

    def hc_head(self, X: np.ndarray, hc: HyperConn, hc_eps: float, rms_eps: float) -> np.ndarray:
        m = self._hc_mix(X, hc, rms_eps)                        # (T, S)
        pre = sigmoid(m * hc.scale.astype(self.dtype)[0] + hc.base.astype(self.dtype)) + hc_eps
        return np.einsum("ts,tse->te", pre, X)

    # --- positions ------------------------------------------------------------------------------------------
    def norm_rope(self, x: np.ndarray, weight: np.ndarray | None, eps: float, positions: np.ndarray,
                  inv_freq: np.ndarray) -> np.ndarray:
        """rms_norm over the last axis, then rope: the query heads and the K=V row (a backend may fuse them)."""
        return self.rope(self.rms_norm(x, weight, eps), positions, inv_freq)

    def norm_ropes(self, items, eps: float, positions: np.ndarray, inv_freq: np.ndarray) -> list[np.ndarray]:
        """norm_rope of several (x, weight) at the same positions: the query heads and the K=V row (a backend may
        run them as one)."""
        return [self.norm_rope(x, w, eps, positions, inv_freq) for x, w in items]

    def rope(self, x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray, inverse: bool = False) -> np.ndarray:
        """Rotate interleaved pairs of the last 2·len(inv_freq) dims of x (T, d) or (T, heads, d) at each row's
        position."""
        n_rot = 2 * len(inv_freq)
        ang = np.asarray(positions, self.dtype)[:, None] * inv_freq.astype(self.dtype)[None, :]   # (T, n_rot/2)
        cos, sin = np.cos(ang), np.sin(ang)
        if inverse:
            sin = -sin
        shape = (len(ang),) + (1,) * (x.ndim - 2) + (n_rot // 2,)
        cos, sin = cos.reshape(shape), sin.reshape(shape)
        out = np.array(x, dtype=self.dtype)
        tail = out[..., -n_rot:]
        x0, x1 = tail[..., 0::2].copy(), tail[..., 1::2].copy()
        tail[..., 0::2] = x0 * cos - x1 * sin
        tail[..., 1::2] = x0 * sin + x1 * cos
        return out

    # --- faithful numerics ----------------------------------------------------------------------------------
    def fp8_kv(self, x: np.ndarray, n_nope: int) -> np.ndarray:
        """FP8 round trip of the unrotated dims of KV rows (the rotated tail is kept exact)."""
        out = np.array(x, dtype=self.dtype)
        out[..., :n_nope] = fp8_e4m3_roundtrip(np.ascontiguousarray(out[..., :n_nope]))
        return out

    def hadamard_fp4(self, x: np.ndarray) -> np.ndarray:
        """Orthonormal Hadamard rotation of 128-dim indexer vectors, then the FP4 round trip."""
        d = x.shape[-1]
        h = self._hadamard(d)
        return fp4_e2m1_roundtrip(np.asarray(x, self.dtype) @ h)

    @functools.lru_cache(maxsize=4)
    def _hadamard(self, d: int) -> np.ndarray:
        """The orthonormal Hadamard matrix in the backend dtype."""
        return hadamard_matrix(d).astype(self.dtype) * self.dtype.type(1.0 / math.sqrt(d))

    # --- compressor -----------------------------------------------------------------------------------------
    def compress(self, kv_state: np.ndarray, score_state: np.ndarray, kvp: np.ndarray, gate: np.ndarray,
                 ape: np.ndarray, pos0: int, ratio: int) -> tuple[np.ndarray, np.ndarray]:
        """Feed projected rows of positions pos0.. into a compressor and pool every block that completes.

        kv_state/score_state: the frontier, (coff·ratio, coff·d), updated in place. For ratio 4 rows 0..3 hold
        the previous block and rows 4..7 the current one; for ratio 128 row p mod 128 holds position p. Rows not
        yet written hold kv 0 and score -inf. kvp/gate: (T, coff·d) projections of positions pos0..; a row's
        score is its gate plus ape[position mod ratio]. Returns the pooled rows (n, d) of the blocks completed,
        in order, and each block's first position.
        """
        r = ratio
        score = np.asarray(gate, self.dtype) + ape.astype(self.dtype)[(pos0 + np.arange(len(gate))) % r]
        coff = 2 if r == 4 else 1
        T, width = kvp.shape
        d = width // coff
        end = pos0 + T
        cur = pos0 // r                                          # block of the first new token
        base = (cur - (coff - 1)) * r                            # position of ext row 0
        ext_kv = np.zeros((end - base, width), self.dtype)
        ext_sc = np.full((end - base, width), NEG_INF, self.dtype)
        done = pos0 - cur * r                                    # rows of the current block written before
        front = (coff - 1) * r + done
        ext_kv[:front], ext_sc[:front] = kv_state[:front], score_state[:front]
        ext_kv[pos0 - base:], ext_sc[pos0 - base:] = kvp, score

        blocks = np.arange(cur, end // r)
        rows = (blocks[:, None] * r + np.arange(r)[None, :]) - base          # (n, r): ext rows of each block
        if r == 4:   # lane A of the previous block's rows, lane B of the current block's rows: 8 candidates
            cand_kv = np.concatenate([ext_kv[rows - r][..., :d], ext_kv[rows][..., d:]], axis=1)
            cand_sc = np.concatenate([ext_sc[rows - r][..., :d], ext_sc[rows][..., d:]], axis=1)
        else:
            cand_kv, cand_sc = ext_kv[rows], ext_sc[rows]
        pooled = self._softmax_pool(cand_kv, cand_sc)

        nxt = end // r                                           # block of the next token
        kv_state[:] = 0
        score_state[:] = NEG_INF
        keep_from = (nxt - (coff - 1)) * r - base
        kept = end - base - keep_from
        kv_state[:kept], score_state[:kept] = ext_kv[keep_from:], ext_sc[keep_from:]
        return pooled, blocks * r

    def _softmax_pool(self, kv: np.ndarray, sc: np.ndarray) -> np.ndarray:
        """Σ_t softmax_t(sc[:, t, j]) · kv[:, t, j] per output dim; 0 where every score is -inf."""
        m = sc.max(axis=1, keepdims=True)
        m = np.where(np.isfinite(m), m, 0)
        p = np.exp(sc - m)
        den = p.sum(axis=1)
        return np.where(den > 0, (p * kv).sum(axis=1) / np.where(den > 0, den, 1), 0)

    # --- indexer --------------------------------------------------------------------------------------------
    def indexer_topk(self, q: np.ndarray, w: np.ndarray, keys: RowStore, n_visible: np.ndarray,
                     top_k: int, w_scale: float) -> np.ndarray:
        """Compressed rows each query may attend: (T, top_k) indices, ascending, padded with -1.

        Queries that see at most top_k rows get all of them; the others the top_k rows of the indexer rows
        `keys` by Σ_h (w_h · w_scale) · relu(q_h · k), ties to the lower index (MODEL.md §3.8).
        """
        w = np.asarray(w, self.dtype) * self.dtype.type(w_scale)
        T = len(q)
        sel = np.full((T, top_k), -1, np.int64)
        keys = np.asarray(keys.array(), self.dtype)
        for t in range(T):
            n = int(n_visible[t])
            if n <= top_k:
                sel[t, :n] = np.arange(n)
                continue
            dots = np.maximum(np.asarray(q[t], self.dtype) @ keys[:n].T, 0)          # (H, n)
            score = np.asarray(w[t], self.dtype) @ dots                            # (n,)
            best = np.argsort(-score, kind="stable")[:top_k]
            sel[t] = np.sort(best)
        return sel

    # --- session state --------------------------------------------------------------------------------------
    def step(self, states: list, tokens: np.ndarray, bounds: np.ndarray, positions: np.ndarray, run,
             draws: list | None = None):
        """Run one forward: `run()` calls the ops of the whole pass and returns the logits, or with draws (one
        per segment, for `sample`) the token ids and the logits; here at once, and already on the host. A
        backend that can replay a captured pass (CUDA graphs) overrides this and returns the ids (or logits) on
        the host; the arguments are the pass's sessions, token ids, segment bounds and positions, and draws."""
        return run()

    def sample(self, logits: np.ndarray, draws: list) -> np.ndarray:
        """Each row's next token by its draw (sampling.pick; -1 for a row whose draw is None)."""
        return np.array([-1 if d is None else pick(row, d) for row, d in zip(logits, draws)], np.int64)

    def host(self, x: np.ndarray) -> np.ndarray:
        """An array of this backend on the host (it is already)."""
        return x

    def new_state(self, shape, store_dtype) -> SessionState:
        """A live state; the host backends keep it in host memory, so it is the snapshot format itself."""
        return SessionState.new(shape, store_dtype, self.dtype)

    def live_state(self, snapshot: SessionState) -> SessionState:
        return snapshot

    # --- the stateful core of an attention sublayer --------------------------------------------------------
    def attend(self, spec, states: list, bounds: np.ndarray, positions: np.ndarray, q: np.ndarray,
               kv: np.ndarray, comp: tuple | None, idx: tuple | None, out_proj: tuple | None = None) -> np.ndarray:
        """Store each token's K=V row, feed the compressors, choose compressed rows and attend, per session.

        states: each segment's LayerState; bounds: segment row offsets; q (N, H, D) and kv (N, D) before their
        norms and RoPE (`norm_ropes` here: the heads unweighted, the row by spec.kv_norm; a backend may fuse them);
        comp = (kv, gate) projections of the attention compressor; idx = (kv, gate, (weight, x), head weights (N,
        Hi)) of the indexer, where weight @ x is its query (N, Hi, 128) before its RoPE (spec.rope_comp, here): a
        backend may skip that product where no token sees more than top_k compressed rows (all are chosen). Rows a
        compressor emits are visible to the token that emits them. out_proj = (weight, groups): the grouped product
        that reads the output next (a backend may hand it the output in the form it reads; ignored here).
        Returns the attention output (N, H, D) with V's rotated tail turned back (the inverse RoPE at each
        token's position).
        """
        q, kv = self.norm_ropes([(q, None), (kv, spec.kv_norm)], spec.rms_eps, positions, spec.rope)
        if idx is not None:
            iq = self.rope(self.matmul(*idx[2]).reshape(len(q), -1, len(spec.idx_norm)), positions, spec.rope_comp)
            idx = (idx[0], idx[1], self.hadamard_fp4(iq) if spec.faithful else iq, idx[3])
        if spec.faithful:
            kv = self.fp8_kv(kv, spec.n_nope)
        kv = kv.astype(spec.store_dtype)
        out = np.empty(q.shape, self.dtype)
        empty = RowStore(q.shape[-1], spec.store_dtype)
        for st, a, b in zip(states, bounds[:-1], bounds[1:]):
            pos = positions[a:b]
            pos0 = int(pos[0])
            # The raw window: rows still visible from earlier calls, then this segment's rows.
            old = st.window(pos0)
            raw = np.concatenate([old, kv[a:b]])
            first = pos0 - len(old)
            raw_hi = pos - first + 1
            raw_lo = np.maximum(pos - spec.n_swa + 1, first) - first
            st.push_raw(kv[a:b], pos0)
            sel, rows, visible = None, empty, np.zeros(b - a, np.int64)
            if comp is not None:
                pooled, starts = self.compress(st.comp_kv, st.comp_score, comp[0][a:b], comp[1][a:b], spec.comp_ape,
                                               pos0, spec.ratio)
                st.comp.append(self._finish_rows(spec, pooled, starts, spec.comp_norm, indexer=False))
                rows, visible = st.comp, (pos + 1) // spec.ratio
            if idx is not None:
                pooled, starts = self.compress(st.idx_kv, st.idx_score, idx[0][a:b], idx[1][a:b], spec.idx_ape,
                                               pos0, 4)
                st.idx.append(self._finish_rows(spec, pooled, starts, spec.idx_norm, indexer=True))
                sel = self.indexer_topk(idx[2][a:b], idx[3][a:b], st.idx, visible, spec.top_k, spec.idx_w_scale)
            out[a:b] = self.attention(q[a:b], raw, raw_lo, raw_hi, rows, sel, visible, spec.sinks, spec.scale)
        return self.rope(out, positions, spec.rope, inverse=True)

    def _finish_rows(self, spec, rows: np.ndarray, starts: np.ndarray, norm: np.ndarray, indexer: bool) -> np.ndarray:
        """A compressor's pooled rows -> stored rows: norm, RoPE at the block's first position, then the faithful
        emulation (FP8 of the unrotated dims for attention rows, Hadamard + FP4 for indexer rows)."""
        if len(rows) == 0:
            return rows.astype(spec.store_dtype)
        rows = self.rope(self.rms_norm(rows, norm, spec.rms_eps), starts, spec.rope_comp)
        if spec.faithful:
            rows = self.hadamard_fp4(rows) if indexer else self.fp8_kv(rows, spec.n_nope)
        return rows.astype(spec.store_dtype)

    # --- attention ------------------------------------------------------------------------------------------
    def attention(self, q: np.ndarray, raw: np.ndarray, raw_lo: np.ndarray, raw_hi: np.ndarray,
                  comp: RowStore, comp_sel: np.ndarray | None, comp_n: np.ndarray, sinks: np.ndarray,
                  scale: float) -> np.ndarray:
        """Softmax attention with a per-head sink over raw rows [raw_lo, raw_hi) and the compressed rows of
        `comp` (the selected indices >= 0, or the first comp_n of them). K = V. q: (T, H, D) -> (T, H, D)."""
        T, H, D = q.shape
        out = np.empty((T, H, D), self.dtype)
        raw = np.asarray(raw, self.dtype)
        comp = np.asarray(comp.array(), self.dtype)
        sinks = sinks.astype(self.dtype)
        for t in range(T):
            picked = comp_sel[t][comp_sel[t] >= 0] if comp_sel is not None else np.arange(int(comp_n[t]))
            keys = np.concatenate([raw[raw_lo[t]:raw_hi[t]], comp[picked]], axis=0)   # (n, D)
            s = (np.asarray(q[t], self.dtype) @ keys.T) * self.dtype.type(scale)       # (H, n)
            m = np.maximum(s.max(axis=1), sinks)
            p = np.exp(s - m[:, None])
            den = p.sum(axis=1) + np.exp(sinks - m)
            out[t] = (p @ keys) / den[:, None]
        return out

    # --- mixture of experts ---------------------------------------------------------------------------------
    def route(self, logits: np.ndarray, bias: np.ndarray | None, tid2eid: np.ndarray | None, tokens: np.ndarray,
              k: int, scale: float, normalize: bool) -> tuple[np.ndarray, np.ndarray]:
        """sqrt-softplus scores; top-k of scores+bias (ties to the lower index) or the hash table's experts;
        weights from the unbiased scores, normalized and scaled. Returns (ids (T, k), weights (T, k))."""
        scores = np.sqrt(softplus(np.asarray(logits, self.dtype)))
        if tid2eid is not None:
            ids = np.asarray(tid2eid)[np.asarray(tokens)].astype(np.int64)
        else:
            ids = np.argsort(-(scores + bias.astype(self.dtype)), axis=1, kind="stable")[:, :k]
        w = np.take_along_axis(scores, ids, axis=1)
        if normalize:
            w = w / np.maximum(w.sum(axis=1, keepdims=True), MOE_WEIGHT_FLOOR)
        return ids, w * self.dtype.type(scale)

    def moe_routed(self, h: np.ndarray, router: Weight, route, tokens: np.ndarray,
                   experts: tuple[Weight, Weight, Weight], clamp: float, shared: tuple[Weight, Weight, Weight],
                   shared_clamp: float) -> np.ndarray:
        """The FFN of the normed h: the shared expert (`ffn` of the `shared` gate, up and down), then `route` on
        the router's logits (router · h) by the layer's RouteSpec and `moe` onto it (a backend may choose the
        experts inside its expert kernels, and run the shared expert inside them too)."""
        out = self.ffn(h, *shared, shared_clamp)
        logits = self.matmul(router, h)
        ids, w = self.route(logits, route.bias, route.tid2eid, tokens, route.k, route.scale, route.normalize)
        return self.moe(h, ids, w, experts, clamp, out)

    def moe(self, h: np.ndarray, ids: np.ndarray, weights: np.ndarray, experts: tuple[Weight, Weight, Weight],
            clamp: float, shared: np.ndarray) -> np.ndarray:
        """The FFN output after routing: Σ_k down_e(swiglu(gate_e·h, up_e·h) · w_k) over each token's experts
        e = ids[t, k], added onto `shared`, the shared expert's output (`ffn`)."""
        h = np.asarray(h, self.dtype)
        gate, up, down = experts
        out = np.array(shared, self.dtype)
        for e in np.unique(ids):
            t_idx, k_idx = np.nonzero(ids == e)
            x = h[t_idx]
            mid = self.swiglu(self.matmul(gate.expert(int(e)), x), self.matmul(up.expert(int(e)), x), clamp)
            mid = mid * weights[t_idx, k_idx][:, None]
            np.add.at(out, t_idx, self.matmul(down.expert(int(e)), mid))
        return out

    def ffn(self, h: np.ndarray, gate: Weight, up: Weight, down: Weight, clamp: float) -> np.ndarray:
        """The shared expert: the same clamped SwiGLU with weight 1."""
        return self.matmul(down, self.swiglu(self.matmul(gate, h), self.matmul(up, h), clamp))
