"""GGUF tensor names -> a typed per-layer weight table, checked against the shape before anything runs.

Owns the tensor layout of MODEL.md §2: which tensors each layer kind has, their dims and accepted types. Every
missing, misshapen or wrongly typed tensor fails at load time with one line naming the file and the tensor, never
later inside a kernel. Weights stay memory-mapped views of the file (`Weight.raw`); only 1-D tensors (norms,
scales, biases, sinks) and small float tables are copied out as float32.

Names are the GGUF / DeepSeek names (`attn_q_a`, `ffn_gate_exps`) so one grep finds both sides. Called by
`open_model` (model.py), `ds4d info`, and the tests; the generator uses `expected_tensors` to write files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGML_QUANT_SIZES

from .gguf_file import GGUFFile
from .shape import Shape

# Accepted storage types per kind of tensor (the contract; the real files use F16/Q8_0 dense matrices
# and IQ2_XXS+Q2_K or Q4_K routed experts).
DENSE_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0)
EXPERT_TYPES = (Q.IQ2_XXS, Q.Q2_K, Q.Q4_K, Q.Q8_0, Q.F16, Q.F32)
VECTOR_TYPES = (Q.F32,)
INDEX_TYPES = (Q.I32,)
# Float-only matrices: the hyper-connection mixers (F16 in the real files) and the compressors' position bias.
FLOAT_TYPES = (Q.F32, Q.F16, Q.BF16)


@dataclass(frozen=True)
class Weight:
    """A matrix (or a stack of expert matrices) as the file stores it.

    `shape` is numpy order: (rows=out, cols=in) or (n_expert, rows, cols). `raw` is the file's data with the same
    leading dims and the row's storage last: float32/float16 values, or the row's bytes for BF16 and quantized
    types. `raw` is a read-only view into the memory-mapped file.
    """

    name: str
    type: Q
    shape: tuple[int, ...]
    raw: np.ndarray = field(repr=False)

    @property
    def rows(self) -> int:
        return self.shape[-2]

    @property
    def cols(self) -> int:
        return self.shape[-1]

    @property
    def n_expert(self) -> int:
        return self.shape[0] if len(self.shape) == 3 else 0

    @property
    def nbytes(self) -> int:
        return int(self.raw.nbytes)

    def expert(self, e: int) -> "Weight":
        """Expert e of a 3-D expert tensor, without copying."""
        return Weight(f"{self.name}[{e}]", self.type, self.shape[1:], self.raw[e])

    def row_slice(self, start: int, stop: int) -> "Weight":
        """Rows [start, stop) of a matrix, without copying (the grouped output projection uses this)."""
        return Weight(f"{self.name}[{start}:{stop}]", self.type, (stop - start, self.cols), self.raw[start:stop])

    def dequantize(self) -> np.ndarray:
        """float32 values with `shape`, decoded by gguf.quants (the independent reference decoder)."""
        from gguf.quants import dequantize
        if self.type == Q.F32:
            return np.asarray(self.raw, dtype=np.float32)
        if self.type == Q.F16:
            return self.raw.astype(np.float32)
        return dequantize(np.asarray(self.raw), self.type).reshape(self.shape).astype(np.float32, copy=False)


@dataclass(frozen=True)
class Compressor:
    """The KV compressor of a compressed layer (ratio 4 or 128), or the indexer's own 128-wide compressor."""

    ratio: int
    head_dim: int                 # d: 512 for attention rows, 128 for indexer rows
    ape: np.ndarray               # (ratio, coff·d) float32: score bias by position in the block
    kv: Weight                    # (coff·d, E)
    gate: Weight                  # (coff·d, E)
    norm: np.ndarray              # (d,)

    @property
    def coff(self) -> int:        # two overlapping lanes for ratio 4
        return 2 if self.ratio == 4 else 1


@dataclass(frozen=True)
class Indexer:
    attn_q_b: Weight              # (n_idx_head·idx_dim, q_lora_rank)
    proj: Weight                  # (n_idx_head, E)
    compressor: Compressor


@dataclass(frozen=True)
class HyperConn:
    fn: Weight                    # (mix, n_hc·E): F16 in the real files
    scale: np.ndarray             # (3,) or (1,) for the output head
    base: np.ndarray              # (mix,)


@dataclass(frozen=True)
class Layer:
    index: int
    ratio: int
    hc_attn: HyperConn
    attn_norm: np.ndarray
    attn_q_a: Weight
    attn_q_a_norm: np.ndarray
    attn_q_b: Weight
    attn_kv: Weight
    attn_kv_a_norm: np.ndarray
    attn_sinks: np.ndarray
    attn_output_a: Weight
    attn_output_b: Weight
    compressor: Compressor | None
    indexer: Indexer | None
    hc_ffn: HyperConn
    ffn_norm: np.ndarray
    ffn_gate_inp: Weight
    exp_probs_b: np.ndarray | None       # router selection bias: exactly the non-hash layers
    ffn_gate_tid2eid: np.ndarray | None  # (n_vocab, n_expert_used) int32: exactly the hash layers
    ffn_gate_exps: Weight
    ffn_up_exps: Weight
    ffn_down_exps: Weight
    ffn_gate_shexp: Weight
    ffn_up_shexp: Weight
    ffn_down_shexp: Weight


@dataclass(frozen=True)
class Weights:
    shape: Shape
    token_embd: Weight
    output_hc: HyperConn
    output_norm: np.ndarray
    output: Weight
    layers: tuple[Layer, ...]
    unused: tuple[str, ...]              # tensors in the file that the model does not use

    @property
    def routed_type(self) -> Q:
        return self.layers[0].ffn_gate_exps.type


# --- the layout ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorSpec:
    name: str
    dims: tuple[int, ...]         # GGUF order (ne0 first)
    types: tuple[Q, ...]
    kind: str                     # "dense", "experts" (-> Weight); "vector", "table" (-> float32); "index"


def expected_tensors(s: Shape) -> Iterator[TensorSpec]:
    """Every tensor a ds4 GGUF of this shape must hold, in the order the real files store them."""
    E, H, D = s.n_embd, s.n_head, s.head_dim
    V = lambda n, dims: TensorSpec(n, dims, VECTOR_TYPES, "vector")        # noqa: E731
    M = lambda n, dims: TensorSpec(n, dims, DENSE_TYPES, "dense")          # noqa: E731
    F = lambda n, dims: TensorSpec(n, dims, FLOAT_TYPES, "dense")          # noqa: E731
    T = lambda n, dims: TensorSpec(n, dims, FLOAT_TYPES, "table")          # noqa: E731
    X = lambda n, dims: TensorSpec(n, dims, EXPERT_TYPES, "experts")       # noqa: E731
    yield M("token_embd.weight", (E, s.n_vocab))
    for il in range(s.n_layer):
        p, r = f"blk.{il}.", s.ratio(il)
        yield F(p + "hc_attn_fn.weight", (s.hc_dim, s.hc_mix))
        yield V(p + "hc_attn_scale.weight", (3,))
        yield V(p + "hc_attn_base.weight", (s.hc_mix,))
        yield V(p + "attn_norm.weight", (E,))
        yield M(p + "attn_q_a.weight", (E, s.q_lora_rank))
        yield V(p + "attn_q_a_norm.weight", (s.q_lora_rank,))
        yield M(p + "attn_q_b.weight", (s.q_lora_rank, H * D))
        yield M(p + "attn_kv.weight", (E, D))
        yield V(p + "attn_kv_a_norm.weight", (D,))
        yield V(p + "attn_sinks.weight", (H,))
        yield M(p + "attn_output_a.weight", (H * D // s.n_out_group, s.n_out_group * s.o_lora_rank))
        yield M(p + "attn_output_b.weight", (s.n_out_group * s.o_lora_rank, E))
        if r:
            w = s.compressor_width(il)
            yield T(p + "attn_compressor_ape.weight", (w, r))
            yield M(p + "attn_compressor_kv.weight", (E, w))
            yield M(p + "attn_compressor_gate.weight", (E, w))
            yield V(p + "attn_compressor_norm.weight", (D,))
        if r == 4:
            di = s.indexer_head_dim
            yield M(p + "indexer.attn_q_b.weight", (s.q_lora_rank, s.n_indexer_head * di))
            yield M(p + "indexer.proj.weight", (E, s.n_indexer_head))
            yield T(p + "indexer_compressor_ape.weight", (2 * di, 4))
            yield M(p + "indexer_compressor_kv.weight", (E, 2 * di))
            yield M(p + "indexer_compressor_gate.weight", (E, 2 * di))
            yield V(p + "indexer_compressor_norm.weight", (di,))
        yield F(p + "hc_ffn_fn.weight", (s.hc_dim, s.hc_mix))
        yield V(p + "hc_ffn_scale.weight", (3,))
        yield V(p + "hc_ffn_base.weight", (s.hc_mix,))
        yield V(p + "ffn_norm.weight", (E,))
        yield M(p + "ffn_gate_inp.weight", (E, s.n_expert))
        if s.is_hash(il):
            yield TensorSpec(p + "ffn_gate_tid2eid.weight", (s.n_expert_used, s.n_vocab), INDEX_TYPES, "index")
        else:
            yield V(p + "exp_probs_b.bias", (s.n_expert,))
        yield X(p + "ffn_gate_exps.weight", (E, s.n_ff_exp, s.n_expert))
        yield X(p + "ffn_up_exps.weight", (E, s.n_ff_exp, s.n_expert))
        yield X(p + "ffn_down_exps.weight", (s.n_ff_exp, E, s.n_expert))
        yield M(p + "ffn_gate_shexp.weight", (E, s.n_ff_exp))
        yield M(p + "ffn_up_shexp.weight", (E, s.n_ff_exp))
        yield M(p + "ffn_down_shexp.weight", (s.n_ff_exp, E))
    yield F("output_hc_fn.weight", (s.hc_dim, s.n_hc))
    yield V("output_hc_scale.weight", (1,))
    yield V("output_hc_base.weight", (s.n_hc,))
    yield V("output_norm.weight", (E,))
    yield M("output.weight", (E, s.n_vocab))


# --- binding ---------------------------------------------------------------------------------------------------

def _type_list(types: tuple[Q, ...]) -> str:
    return ", ".join(t.name for t in types)


def load_weights(g: GGUFFile, s: Shape) -> Weights:
    """Bind and check every tensor of the layout; raises ModelError on the first problem."""
    found: dict[str, object] = {}
    for spec in expected_tensors(s):
        t = g.tensors.get(spec.name)
        if t is None:
            raise g.error(f"missing tensor {spec.name}")
        if t.dims != spec.dims:
            raise g.error(f"tensor {spec.name} has dims {list(t.dims)}, expected {list(spec.dims)}")
        if t.type not in spec.types:
            raise g.error(f"tensor {spec.name} has type {t.type.name}; accepted: {_type_list(spec.types)}")
        if spec.kind in ("vector", "table"):
            found[spec.name] = _as_float32(t.data, t.type).reshape(tuple(reversed(spec.dims)))
        elif spec.kind == "index":
            found[spec.name] = t.data.reshape(spec.dims[1], spec.dims[0])
        else:
            found[spec.name] = Weight(spec.name, t.type, tuple(reversed(spec.dims)), t.data)

    # Extra rules of the routed experts: gate and up share a type, and K/IQ rows are whole super-blocks.
    for il in range(s.n_layer):
        p = f"blk.{il}."
        gate, up = found[p + "ffn_gate_exps.weight"], found[p + "ffn_up_exps.weight"]
        if gate.type != up.type:
            raise g.error(f"{p}ffn_up_exps is {up.type.name} but {p}ffn_gate_exps is {gate.type.name}; they must match")
    for name, w in found.items():
        if isinstance(w, Weight) and w.type in (Q.Q2_K, Q.Q4_K, Q.IQ2_XXS) and w.cols % GGML_QUANT_SIZES[w.type][0]:
            raise g.error(f"tensor {name}: input dim {w.cols} is not a multiple of 256 ({w.type.name})")
    for il in range(s.n_hash_layer):   # 3 MB each in the real file: cheap to check once
        name = f"blk.{il}.ffn_gate_tid2eid.weight"
        lo, hi = int(found[name].min()), int(found[name].max())
        if lo < 0 or hi >= s.n_expert:
            raise g.error(f"tensor {name} names expert {lo if lo < 0 else hi}, outside 0..{s.n_expert - 1}")

    def hc(prefix: str) -> HyperConn:
        return HyperConn(found[prefix + "_fn.weight"], found[prefix + "_scale.weight"], found[prefix + "_base.weight"])

    def compressor(prefix: str, ratio: int, d: int) -> Compressor:
        return Compressor(ratio, d, found[prefix + "_ape.weight"], found[prefix + "_kv.weight"],
                          found[prefix + "_gate.weight"], found[prefix + "_norm.weight"])

    layers = []
    for il in range(s.n_layer):
        p, r = f"blk.{il}.", s.ratio(il)
        comp = compressor(p + "attn_compressor", r, s.head_dim) if r else None
        idx = None
        if r == 4:
            idx = Indexer(found[p + "indexer.attn_q_b.weight"], found[p + "indexer.proj.weight"],
                          compressor(p + "indexer_compressor", 4, s.indexer_head_dim))
        layers.append(Layer(
            index=il, ratio=r, hc_attn=hc(p + "hc_attn"), attn_norm=found[p + "attn_norm.weight"],
            attn_q_a=found[p + "attn_q_a.weight"], attn_q_a_norm=found[p + "attn_q_a_norm.weight"],
            attn_q_b=found[p + "attn_q_b.weight"], attn_kv=found[p + "attn_kv.weight"],
            attn_kv_a_norm=found[p + "attn_kv_a_norm.weight"], attn_sinks=found[p + "attn_sinks.weight"],
            attn_output_a=found[p + "attn_output_a.weight"], attn_output_b=found[p + "attn_output_b.weight"],
            compressor=comp, indexer=idx, hc_ffn=hc(p + "hc_ffn"), ffn_norm=found[p + "ffn_norm.weight"],
            ffn_gate_inp=found[p + "ffn_gate_inp.weight"], exp_probs_b=found.get(p + "exp_probs_b.bias"),
            ffn_gate_tid2eid=found.get(p + "ffn_gate_tid2eid.weight"),
            ffn_gate_exps=found[p + "ffn_gate_exps.weight"], ffn_up_exps=found[p + "ffn_up_exps.weight"],
            ffn_down_exps=found[p + "ffn_down_exps.weight"], ffn_gate_shexp=found[p + "ffn_gate_shexp.weight"],
            ffn_up_shexp=found[p + "ffn_up_shexp.weight"], ffn_down_shexp=found[p + "ffn_down_shexp.weight"]))
    unused = tuple(sorted(set(g.tensors) - set(found)))
    return Weights(shape=s, token_embd=found["token_embd.weight"], output_hc=hc("output_hc"),
                   output_norm=found["output_norm.weight"], output=found["output.weight"],
                   layers=tuple(layers), unused=unused)


def _as_float32(data: np.ndarray, qtype: Q) -> np.ndarray:
    if qtype == Q.BF16:
        return (np.ascontiguousarray(data).view(np.uint16).astype(np.uint32) << 16).view(np.float32).ravel()
    return np.asarray(data, dtype=np.float32).ravel().copy()
