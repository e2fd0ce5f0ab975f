"""The DeepSeek V4 Flash forward pass, in pipeline order: embed -> (HC, attention, HC, MoE) x layers -> head.

Owns the order of operations of MODEL.md §3: which op runs when, on which rows, with which weights and
parameters. All arithmetic happens in the backend's ops (`ops/`), and so does everything that touches a
session's state (the backend's `attend` stores K=V rows, runs the compressors and the indexer, and attends), so
a GPU backend can keep the state in device memory; this module never computes anything itself.

One `forward` serves prefill and decode alike: it takes a batch of *segments*, each a run of new tokens of one
session at that session's next positions. A prefill chunk is one long segment; a decode step over B sessions is
B segments of one token, each at its own position and compression phase (emission and indexer use follow from
the positions inside the ops, not from branches here). Matrix products run once over all rows of the batch, so
weights are read once per step.

Entry point: `open_model(path, backend="cpu", numerics="faithful")`, then `m.logits(ids)` or
`m.new_state()` + `m.forward(...)`, or `m.sample(...)` (the forward plus each segment's next token, sampled by the
backend: the engine's step). `m.launch(...)` is `sample` in two halves: the step is given to the backend and its
tokens come back on `result()`, so the engine can launch the next step first, its segments taking the tokens this
one samples (`Segment.follow`) without the host seeing them: a GPU then never waits for the host between steps.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from .gguf_file import GGUFFile
from .ops import AttnSpec, RouteSpec, get_backend
from .ops.reference import rope_inv_freq
from .sampling import Draw, pick
from .shape import Shape, read_shape
from .state import LayerState, SessionState
from .weights import Layer, Weights, load_weights

NUMERICS = ("faithful", "exact")


@dataclass
class Segment:
    """New tokens of one session, at positions state.n_tokens, state.n_tokens + 1, ... With `follow` = r, the
    segment's one token is the one the step it follows (`Model.launch(after=)`) samples in row r, and `tokens`
    holds a placeholder."""
    state: SessionState
    tokens: np.ndarray
    follow: int | None = None


class Sampled:
    """What `Model.sample` gives back: each segment's next token (-1 where it had no draw), how many of them the
    host picked (the rows a device sampler leaves to it), and on demand the logits of a segment's last token (a
    download from a GPU backend; valid until the next forward)."""

    def __init__(self, ops, tokens: list[int], logits):
        self.tokens, self.host_rows, self._ops, self._logits = tokens, 0, ops, logits

    def logits(self, i: int) -> np.ndarray:
        return self._ops.host(self._logits[i:i + 1])[0]


class Launched:
    """A step given to the backend (`Model.launch`): `result()` waits for its token ids (once) and returns the
    `Sampled`. `ids` is the backend's (a numpy array, or a GPU backend's ids on their way to the host, which a
    step following this one reads on the device)."""

    def __init__(self, model: "Model", ids, logits, draws: list):
        self.ids, self.followed = ids, False
        self._model, self._logits, self._draws, self._res = model, logits, draws, None

    def result(self) -> Sampled:
        if self._res is None:
            ids = self.ids.wait() if hasattr(self.ids, "wait") else self.ids
            res = Sampled(self._model.ops, [int(t) for t in ids], self._logits)
            for i, d in enumerate(self._draws):
                if d is not None and res.tokens[i] < 0 and not self.followed:
                    res.tokens[i] = pick(res.logits(i), d)   # rows the device leaves to the host (sampling.pick)
                    res.host_rows += 1
            self._res = res
        return self._res


class Model:
    def __init__(self, gguf: GGUFFile, backend: str = "cpu", numerics: str = "faithful", **backend_options):
        if numerics not in NUMERICS:
            raise ValueError(f"numerics must be one of {', '.join(NUMERICS)}, not {numerics!r}")
        self.gguf = gguf
        self.shape: Shape = read_shape(gguf)
        self.weights: Weights = load_weights(gguf, self.shape)
        self.numerics = numerics
        self.faithful = numerics == "faithful"
        self.ops = get_backend(backend, numerics=numerics, **backend_options)
        s = self.shape
        # Faithful numerics store K=V rows as f16 (MODEL.md §3.9); exact numerics keep the backend's precision.
        self.store_dtype = np.dtype(np.float16) if self.faithful else self.ops.dtype
        self.rope_main = rope_inv_freq(s.n_rot, s.rope_freq_base)
        self.rope_comp = rope_inv_freq(s.n_rot, s.compress_rope_freq_base,
                                       (s.rope_scale_factor, s.rope_orig_ctx, s.yarn_beta_fast, s.yarn_beta_slow))
        self.attn_specs = [self._attn_spec(L) for L in self.weights.layers]
        self.route_specs = [RouteSpec(L.exp_probs_b, L.ffn_gate_tid2eid, s.n_expert_used, s.expert_weights_scale,
                                      s.expert_weights_norm) for L in self.weights.layers]
        self._tokenizer = None

    def _attn_spec(self, L: Layer) -> AttnSpec:
        s = self.shape
        c, i = L.compressor, L.indexer
        return AttnSpec(
            ratio=L.ratio, n_swa=s.n_swa, n_nope=s.n_nope, scale=1.0 / math.sqrt(s.head_dim), sinks=L.attn_sinks,
            rope=self.rope_main if L.ratio == 0 else self.rope_comp, rope_comp=self.rope_comp,
            faithful=self.faithful, store_dtype=self.store_dtype, rms_eps=s.rms_eps, kv_norm=L.attn_kv_a_norm,
            comp_ape=None if c is None else c.ape, comp_norm=None if c is None else c.norm,
            idx_ape=None if i is None else i.compressor.ape, idx_norm=None if i is None else i.compressor.norm,
            top_k=s.indexer_top_k, idx_w_scale=1.0 / math.sqrt(s.indexer_head_dim * s.n_indexer_head))

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from .tokenizer import Tokenizer
            self._tokenizer = Tokenizer.from_metadata(self.gguf.metadata)
        return self._tokenizer

    def new_state(self):
        """A fresh live state on the backend (host memory for the CPU backend, device memory for a GPU one)."""
        return self.ops.new_state(self.shape, self.store_dtype)

    def host_state(self) -> SessionState:
        """A fresh state in host memory: the format of snapshots, the prompt cache and the files on disk."""
        return SessionState.new(self.shape, self.store_dtype, self.ops.dtype)

    def live_state(self, snapshot: SessionState):
        """A live backend state holding a host snapshot's content (the snapshot itself on the CPU)."""
        return self.ops.live_state(snapshot)

    # --- entry points ---------------------------------------------------------------------------------------
    def logits(self, token_ids, chunk: int = 512) -> np.ndarray:
        """float32 logits (len(token_ids), vocab) at every position, from a fresh state, prefilled in chunks."""
        state = self.new_state()
        ids = np.asarray(token_ids, dtype=np.int64)
        out = [self.forward([Segment(state, ids[i:i + chunk])], all_logits=True)[0]
               for i in range(0, len(ids), chunk)]
        return np.concatenate(out).astype(np.float32, copy=False)

    def prefill(self, state: SessionState, token_ids, chunk: int = 512) -> np.ndarray:
        """Extend a state by tokens, chunk by chunk; returns the last position's logits (float32)."""
        ids = np.asarray(token_ids, dtype=np.int64)
        if len(ids) == 0:
            raise ValueError("prefill needs at least one token")
        for i in range(0, len(ids), chunk):
            last = self.forward([Segment(state, ids[i:i + chunk])])[0]
        return last[-1].astype(np.float32)

    def decode(self, states: list[SessionState], tokens) -> np.ndarray:
        """One step for a batch of sessions (one token each, each at its own position): logits (B, vocab)."""
        segs = [Segment(st, np.asarray([t], dtype=np.int64)) for st, t in zip(states, tokens)]
        return np.concatenate(self.forward(segs)).astype(np.float32, copy=False)

    def sample(self, segments: list[Segment], draws: list[Draw | None]) -> Sampled:
        """`forward`, then each segment's next token from its last logits by its draw (None: no token), on the
        backend's device where it can (the engine's step: only the token ids come back from a GPU)."""
        return self.launch(segments, draws).result()

    def launch(self, segments: list[Segment], draws: list[Draw | None], after: "Launched | None" = None) -> "Launched":
        """`sample`, its tokens collected later by `result()`. Segments with `follow` take their token from the
        step `after` (launched before this one, not necessarily collected): on the device where the backend can,
        else from `after.result()`. Once followed, `after` leaves rows its device could not sample to the caller
        (-1): the next step may already have replaced the logits the host would pick them from."""
        if len(draws) != len(segments):
            raise ValueError("one draw (or None) per segment")
        follow = None
        if any(seg.follow is not None for seg in segments):
            if after is None or any(seg.follow is not None and len(seg.tokens) != 1 for seg in segments):
                raise ValueError("a segment that follows a step needs that step and one token")
            if self.ops.follows_on_device:
                follow = np.concatenate([np.full(len(seg.tokens), -1 if seg.follow is None else seg.follow)
                                         for seg in segments])
            else:
                got = after.result().tokens
                segments = [seg if seg.follow is None else Segment(seg.state, np.array([got[seg.follow]]))
                            for seg in segments]
            after.followed = True
        (ids, logits), _ = self._pass(segments, False, draws, follow, after)
        return Launched(self, ids, logits, draws)

    # --- the pass -------------------------------------------------------------------------------------------
    def forward(self, segments: list[Segment], all_logits: bool = False) -> list[np.ndarray]:
        """Run new tokens of several sessions through the model; returns per segment the logits of its last
        token (1, vocab), or of every token with all_logits. Advances each state."""
        logits, bounds = self._pass(segments, all_logits, None)
        if all_logits:
            return [logits[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        return [logits[i:i + 1] for i in range(len(segments))]

    def _pass(self, segments: list[Segment], all_logits: bool, draws: list | None, follow=None, after=None):
        """The forward of `forward` and `launch`: (the backend step's result, the segments' row bounds). follow:
        per token the row of `after` whose sampled id it is, or -1 (backends that follow on the device)."""
        s, ops = self.shape, self.ops
        if not segments or any(len(seg.tokens) == 0 for seg in segments):
            raise ValueError("every segment needs at least one token")
        if len({id(seg.state) for seg in segments}) != len(segments):
            raise ValueError("a session can appear only once in a batch")
        tokens = np.concatenate([seg.tokens for seg in segments])
        if tokens.min() < 0 or tokens.max() >= s.n_vocab:
            raise ValueError(f"token ids must lie in 0..{s.n_vocab - 1}")
        bounds = np.cumsum([0] + [len(seg.tokens) for seg in segments])
        positions = np.concatenate([seg.state.n_tokens + np.arange(len(seg.tokens)) for seg in segments])

        rows = np.arange(len(tokens)) if all_logits else bounds[1:] - 1

        def run():
            X = ops.embed(self.weights.token_embd, tokens, s.n_hc)                  # (N, n_hc, E)
            upd = None    # the last sublayer's hc_post, left to the next sublayer's hc_pre (a backend fuses them)
            for layer in self.weights.layers:
                states = [seg.state.layers[layer.index] for seg in segments]
                X, upd = self._attention(layer, X, upd, states, bounds, positions)
                X, upd = self._ffn(layer, X, upd, tokens)
            f, post, comb = upd
            X = ops.hc_post(f, X, post, comb)
            x = ops.hc_head(X[rows], self.weights.output_hc, s.hc_eps, s.rms_eps)
            logits = ops.matmul(self.weights.output, ops.rms_norm(x, self.weights.output_norm, s.rms_eps))
            return logits if draws is None else (ops.sample(logits, draws), logits)
        # The backend runs the pass: at once on the CPU; on a GPU maybe as the replay of a captured graph. It
        # returns the logits on the host, or with draws the token ids on the host and the logits where they are.
        followed = {} if follow is None else {"follow": follow, "prev": after.ids}   # host backends take neither
        out = ops.step([seg.state for seg in segments], tokens, bounds, positions, run, draws, **followed)
        for seg in segments:
            seg.state.n_tokens += len(seg.tokens)
        return out, bounds

    # --- the residual streams -------------------------------------------------------------------------------
    #
    # Each sublayer returns the streams it started from and its update (its output, post gates and combine matrix
    # for hc_post); the next sublayer's entry applies it, so that a backend can fuse hc_post with hc_pre.

    def _hc_pre(self, X: np.ndarray, upd, hc, norm: np.ndarray, moe_next: bool = False):
        """A sublayer's entry: the residual streams X after the previous sublayer's update `upd` (its output, post
        gates and combine matrix for hc_post, or None), then hc_pre on them. Returns the streams, the sublayer's
        input (N, E), its post gates and combine matrix. moe_next: the FFN's entry (its input goes to moe_routed)."""
        s, ops = self.shape, self.ops
        args = (hc, s.hc_sinkhorn_iters, s.hc_eps, s.rms_eps, norm, moe_next)
        if upd is None:
            return (X, *ops.hc_pre(X, *args))
        f, post, comb = upd
        return ops.hc_post_pre(f, X, post, comb, *args)

    # --- attention sublayer ---------------------------------------------------------------------------------
    #
    # Per token: the query path (low rank, weighted norm), one K=V row, the compressors' projections of the
    # normed input and the indexer's query; then the backend's `attend` norms and rotates the query heads (per-head
    # unweighted norm, RoPE) and the K=V row (norm, RoPE), stores the row (FP8 of the unrotated dims, f16 storage),
    # runs the compressors and the indexer on each session's state, attends over the raw window plus the
    # compressed rows visible at each position and turns the output's rotated tail back (inverse RoPE). The grouped
    # low-rank output projection closes the sublayer.

    def _attention(self, L: Layer, X: np.ndarray, upd, states: list[LayerState], bounds: np.ndarray,
                   positions: np.ndarray):
        s, ops = self.shape, self.ops
        N = len(positions)
        X, h, post, comb = self._hc_pre(X, upd, L.hc_attn, L.attn_norm)          # h: (N, E)
        # Every product of h in one call (a backend may join those of one weight type into one product).
        ws = [L.attn_q_a, L.attn_kv]
        if L.compressor is not None:
            ws += [L.compressor.kv, L.compressor.gate]                               # (N, coff·D) each
        if L.indexer is not None:
            ws += [L.indexer.compressor.kv, L.indexer.compressor.gate, L.indexer.proj]
        qa, kv, *of_h = ops.matmuls(ws, h)
        q, qn = ops.norm_matmul(L.attn_q_b, qa, L.attn_q_a_norm, s.rms_eps)          # qn: (N, q_rank)
        spec = self.attn_specs[L.index]
        comp = tuple(of_h[:2]) if L.compressor is not None else None
        idx = None
        if L.indexer is not None:       # its query's product: attend's to run, where some token needs the choice
            idx = (of_h[2], of_h[3], (L.indexer.attn_q_b, qn), of_h[4])
        o = ops.attend(spec, states, bounds, positions, q.reshape(N, s.n_head, s.head_dim), kv, comp, idx,
                       (L.attn_output_a, s.n_out_group))
        low = ops.matmul_grouped(L.attn_output_a, o.reshape(N, -1), s.n_out_group)   # (N, G·o_rank)
        y = ops.matmul(L.attn_output_b, low)                                          # (N, E)
        return X, (y, post, comb)

    # --- FFN sublayer ---------------------------------------------------------------------------------------
    def _ffn(self, L: Layer, X: np.ndarray, upd, tokens: np.ndarray):
        s, ops = self.shape, self.ops
        X, h, post, comb = self._hc_pre(X, upd, L.hc_ffn, L.ffn_norm, moe_next=True)
        # The shared expert (no routing) and the routed experts added onto its output.
        f = ops.moe_routed(h, L.ffn_gate_inp, self.route_specs[L.index], tokens,
                           (L.ffn_gate_exps, L.ffn_up_exps, L.ffn_down_exps), s.swiglu_clamp_exp[L.index],
                           (L.ffn_gate_shexp, L.ffn_up_shexp, L.ffn_down_shexp), s.swiglu_clamp_shexp[L.index])
        return X, (f, post, comb)


def open_model(path: str | os.PathLike[str], backend: str = "cpu", numerics: str = "faithful",
               **backend_options) -> Model:
    """Open a ds4 GGUF (memory-mapped) and bind it to a backend. Raises ModelError for a bad file."""
    return Model(GGUFFile(path), backend=backend, numerics=numerics, **backend_options)
