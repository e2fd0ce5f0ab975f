"""Random DeepSeek V4 Flash models in exactly the real GGUF layout (`ds4d make-tiny`).

Owns the test and demo models: the default tiny shape (every layer kind in 6 layers), the per-variant tensor
types (the real q2/q4 files' types, or all-f32/f16/q8), the random values, and the streaming GGUF writer that
also produces full-width layers (gigabytes, never held in memory) and the full-shape header over a sparse data
region (the real 43-layer directory at no disk cost). Names, dims and metadata come from `shape.py` and
`weights.expected_tensors`, the same code that validates files on load, plus the real vocabulary.

Values are N(0, 1/fan_in) so activations keep a realistic scale; the parameters that random init usually leaves
at zero (attention sinks, compressor position bias, router bias, HC base) are non-zero so tests exercise them.
Every tensor draws from its own seeded generator: the same seed gives the same file, byte for byte.
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGML_QUANT_SIZES, GGUFValueType, GGUFWriter

from .shape import Shape, flash_ratio, flash_shape
from .weights import TensorSpec, expected_tensors

VARIANTS = ("f32", "f16", "q8", "q2", "q4")

# Non-routed tensors the real files store as Q8_0 (attention projections, shared expert, LM head); the other
# matrices are F16 (embeddings, HC mixers, compressors, indexer, router). MODEL.md §2.1.
_Q8_IN_REAL_FILES = ("attn_q_a.weight", "attn_q_b.weight", "attn_kv.weight", "attn_output_a.weight",
                     "attn_output_b.weight", "ffn_gate_shexp.weight", "ffn_up_shexp.weight",
                     "ffn_down_shexp.weight", "output.weight")
# Routed expert types per variant: (gate and up, down).
_EXPERT_TYPES = {"f32": (Q.F32, Q.F32), "f16": (Q.F16, Q.F16), "q8": (Q.Q8_0, Q.Q8_0),
                 "q2": (Q.IQ2_XXS, Q.Q2_K), "q4": (Q.Q4_K, Q.Q4_K)}


def tiny_shape(n_layer: int = 6) -> Shape:
    """The default test shape: every layer kind (ratio 0, 4, 128; hash and top-k routing) at a tiny width."""
    return replace(
        flash_shape(n_layer), n_embd=256, n_head=8, head_dim=128, n_rot=64, q_lora_rank=64, o_lora_rank=64,
        n_out_group=2, n_expert=16, n_expert_used=4, n_ff_exp=256, n_swa=32, n_indexer_head=4, indexer_top_k=16,
        compress_ratios=tuple(flash_ratio(i) for i in range(n_layer)))


def tensor_type(spec: TensorSpec, variant: str) -> Q:
    """The storage type of a tensor in a file of this variant."""
    if spec.kind == "vector":
        return Q.F32
    if spec.kind == "index":
        return Q.I32
    if spec.kind == "experts":
        gate_up, down = _EXPERT_TYPES[variant]
        return down if "ffn_down_exps" in spec.name else gate_up
    if variant in ("f32", "f16"):
        return Q.F32 if variant == "f32" else Q.F16
    base = spec.name.split(".", 2)[2] if spec.name.startswith("blk.") else spec.name
    return Q.Q8_0 if base in _Q8_IN_REAL_FILES else Q.F16


def tensor_nbytes(dims: tuple[int, ...], qtype: Q) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    return int(np.prod(dims, dtype=np.int64)) // block * size


# --- values ----------------------------------------------------------------------------------------------------

def _rng(seed: int, name: str) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _values(spec: TensorSpec, shape: Shape, rng: np.random.Generator, rows: slice | None = None) -> np.ndarray:
    """float32 values of a tensor (numpy order), or of a range of its outermost rows for streamed tensors."""
    np_dims = tuple(reversed(spec.dims))
    if rows is not None:
        np_dims = (rows.stop - rows.start,) + np_dims[1:]
    base = spec.name.split(".", 2)[-1] if spec.name.startswith("blk.") else spec.name
    if spec.kind == "index":      # tid2eid: n_expert_used distinct experts per token id
        keys = rng.random((shape.n_vocab, shape.n_expert))
        return np.argsort(keys, axis=1)[:, :shape.n_expert_used].astype(np.int32)
    if "norm" in base:            # RMSNorm weights near one
        return (1.0 + 0.1 * rng.standard_normal(np_dims)).astype(np.float32)
    if base.startswith(("hc_attn_scale", "hc_ffn_scale", "output_hc_scale")):
        return rng.uniform(0.5, 1.5, np_dims).astype(np.float32)
    if base.startswith(("hc_attn_base", "hc_ffn_base", "output_hc_base")):
        return (0.5 * rng.standard_normal(np_dims)).astype(np.float32)
    if base.startswith("attn_sinks"):
        return rng.standard_normal(np_dims).astype(np.float32)
    if "_ape" in base:
        return (0.5 * rng.standard_normal(np_dims)).astype(np.float32)
    if base.startswith("exp_probs_b"):
        return (0.1 * rng.standard_normal(np_dims)).astype(np.float32)
    if base == "token_embd.weight":
        return rng.standard_normal(np_dims).astype(np.float32)
    return (rng.standard_normal(np_dims) / np.sqrt(np_dims[-1])).astype(np.float32)


def _encode(values: np.ndarray, qtype: Q) -> np.ndarray:
    """Values in the file's storage type (quantized properly)."""
    if qtype == Q.F32:
        return values.astype(np.float32)
    if qtype == Q.F16:
        return values.astype(np.float16)
    if qtype == Q.I32:
        return values.astype(np.int32)
    from .quants import quantize
    rows = values.reshape(-1, values.shape[-1])
    return quantize(rows, int(qtype))


# --- writing ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    shape: Shape
    variant: str
    tensors: tuple[tuple[TensorSpec, Q], ...]

    @property
    def nbytes(self) -> int:
        return sum(tensor_nbytes(spec.dims, qt) for spec, qt in self.tensors)


def plan(shape: Shape, variant: str) -> Plan:
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    return Plan(shape, variant, tuple((spec, tensor_type(spec, variant)) for spec in expected_tensors(shape)))


def gguf_value(value: object) -> tuple[object, GGUFValueType, GGUFValueType | None]:
    """A python metadata value with the GGUF type a ds4 file uses for it: (value, type, array element type)."""
    def scalar(v):
        if isinstance(v, bool):
            return GGUFValueType.BOOL
        if isinstance(v, int):
            return GGUFValueType.UINT32 if 0 <= v < 2**32 else GGUFValueType.INT64
        if isinstance(v, float):
            return GGUFValueType.FLOAT32
        if isinstance(v, str):
            return GGUFValueType.STRING
        raise TypeError(f"unsupported metadata value {v!r}")
    if isinstance(value, (list, tuple)):
        ints = all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        sub = GGUFValueType.INT32 if ints else scalar(value[0])   # token types are INT32 in real files
        return list(value), GGUFValueType.ARRAY, sub
    return value, scalar(value), None


def _metadata(p: Plan, name: str, overrides: dict[str, object] | None = None) -> dict:
    """key -> (value, type, array element type): the shape's keys, the real vocabulary, then `overrides`
    (a value of None removes a key; tests use this to write inconsistent files)."""
    from .tokenizer import gguf_vocab_from_tokenizer_json
    kinds = {"uint32": GGUFValueType.UINT32, "uint64": GGUFValueType.UINT64, "float32": GGUFValueType.FLOAT32,
             "bool": GGUFValueType.BOOL}
    meta = {"general.name": gguf_value(name)}
    for key, (kind, value) in p.shape.to_metadata().items():
        if kind.startswith("array_"):
            meta[key] = (value, GGUFValueType.ARRAY, kinds[kind[len("array_"):]])
        else:
            meta[key] = (value, kinds[kind], None)
    for key, value in gguf_vocab_from_tokenizer_json().items():
        meta[key] = gguf_value(value)
    for key, value in (overrides or {}).items():
        if value is None:
            meta.pop(key, None)
        elif isinstance(value, tuple):          # (GGUFValueType, value): an explicit type
            meta[key] = (value[1], value[0], None)
        else:
            meta[key] = gguf_value(value)
    return meta


def _tensor_chunks(spec: TensorSpec, qtype: Q, p: Plan, seed: int, fast_experts: bool) -> Iterator[np.ndarray]:
    """The bytes of one tensor, in pieces of at most one expert (full-width expert tensors are gigabytes)."""
    rng = _rng(seed, spec.name)
    if spec.kind != "experts":
        yield _encode(_values(spec, p.shape, rng), qtype)
        return
    n_expert = spec.dims[2]
    rows, cols = spec.dims[1], spec.dims[0]
    for e in range(n_expert):
        if fast_experts and qtype not in (Q.F32, Q.F16):
            # Full-width files exist for speed work: kernels don't care about values, and quantizing 20 G weights
            # properly in numpy would take hours. Valid random blocks of the right magnitude instead.
            from .quants import random_blocks
            yield random_blocks(rows, cols, int(qtype), rng, scale=1.0 / np.sqrt(cols))
        else:
            yield _encode(_values(spec, p.shape, rng, rows=slice(e, e + 1))[0], qtype)


Chunks = Callable[[TensorSpec, Q], Iterator[np.ndarray]]


def write_model(path: str | os.PathLike[str], p: Plan, seed: int = 0, *, sparse: bool = False,
                fast_experts: bool = False, progress: Callable[[str], None] | None = None,
                name: str = "ds4 random test model", metadata: dict[str, object] | None = None,
                chunks: Chunks | None = None) -> int:
    """Write a model; returns its size in bytes. `sparse` writes header and directory only (the data region is a
    hole), `fast_experts` fills routed experts with valid random blocks instead of quantizing random floats,
    `metadata` overrides keys (None removes one), `chunks` supplies tensor bytes instead of the seeded values (an
    int among its chunks leaves a hole of that many bytes)."""
    chunks = chunks or (lambda spec, qt: _tensor_chunks(spec, qt, p, seed, fast_experts))
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    w = GGUFWriter(str(tmp), "deepseek4")
    for key, (value, vtype, sub) in _metadata(p, name, metadata).items():
        w.add_key_value(key, value, vtype, sub_type=sub)
    for spec, qt in p.tensors:
        # With a raw type and a non-uint8 dtype the writer records the logical dims as given.
        w.add_tensor_info(spec.name, tuple(reversed(spec.dims)), np.dtype(np.float32),
                          tensor_nbytes(spec.dims, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    fout = w.fout[0]
    align = w.data_alignment
    pad = lambda n: (-n) % align  # noqa: E731
    fout.write(b"\0" * pad(fout.tell()))
    data_start = fout.tell()
    total = data_start + sum(tensor_nbytes(s.dims, q) + pad(tensor_nbytes(s.dims, q)) for s, q in p.tensors)
    try:
        if sparse:
            fout.truncate(total)
        else:
            for i, (spec, qt) in enumerate(p.tensors):
                if progress:
                    progress(f"[{i + 1}/{len(p.tensors)}] {spec.name} {qt.name} "
                             f"{tensor_nbytes(spec.dims, qt) / 2**20:,.1f} MiB")
                written = 0
                for chunk in chunks(spec, qt):
                    if isinstance(chunk, int):              # a hole of that many bytes (reads as zeros)
                        fout.seek(chunk, os.SEEK_CUR)
                        written += chunk
                        continue
                    fout.write(np.ascontiguousarray(chunk).tobytes())
                    written += chunk.nbytes
                assert written == tensor_nbytes(spec.dims, qt), (spec.name, written)
                fout.write(b"\0" * pad(written))
            fout.truncate(total)                            # a hole at the end still counts
        fout.flush()
        os.fsync(fout.fileno())
    finally:
        w.close()
    os.replace(tmp, path)
    return total


def make_tiny(path: str | os.PathLike[str], variant: str = "f32", n_layer: int = 6, seed: int = 0, *,
              full_width: bool = False, full_shape: bool = False, progress: Callable[[str], None] | None = None,
              **shape_overrides) -> int:
    """`ds4d make-tiny`: a random model of the tiny shape, the real width (`full_width`, N layers) or the whole
    real layout over a sparse data region (`full_shape`, always 43 layers). `shape_overrides` replace fields of
    the tiny shape (tests use it, e.g. more indexer heads so that no two indexer scores tie)."""
    if full_shape:
        shape, sparse = flash_shape(), True
    elif full_width:
        shape, sparse = flash_shape(n_layer), False
    else:
        shape, sparse = replace(tiny_shape(n_layer), **shape_overrides), False
    kind = "full-shape (sparse)" if full_shape else ("full-width" if full_width else "tiny")
    return write_model(path, plan(shape, variant), seed, sparse=sparse, fast_experts=full_width,
                       progress=progress, name=f"ds4 random {kind} {variant} model (seed {seed})")


def stderr_progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def write_dequantized(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> int:
    """An all-float32 copy of a model whose weights are the source's dequantized values: the twin that separates
    what a quantized file's weights lose from what the kernels' activation handling loses."""
    from .gguf_file import GGUFFile
    from .shape import read_shape
    from .weights import Weight
    g = GGUFFile(src)
    p = plan(read_shape(g), "f32")

    def chunks(spec: TensorSpec, qt: Q) -> Iterator[np.ndarray]:
        t = g.tensors[spec.name]
        if qt == Q.I32:
            yield np.asarray(t.data)
        else:
            yield Weight(spec.name, t.type, tuple(reversed(spec.dims)), t.data).dequantize().astype(np.float32)

    return write_model(dst, p, chunks=chunks, name=f"dequantized twin of {g.get('general.name', src)}")


def demo_model(progress: Callable[[str], None] | None = None) -> Path:
    """The demo model used when no real model is configured: a tiny q2 model generated once (fixed seed) into the
    cache directory. Its output is meaningless; it lets a new user try the whole pipeline at once."""
    from .config import DEMO_SEED, DEMO_VARIANT, demo_model_path
    path = demo_model_path()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        if progress:
            progress(f"generating the demo model into {path} (once) ...")
        make_tiny(path, DEMO_VARIANT, seed=DEMO_SEED)
    return path
