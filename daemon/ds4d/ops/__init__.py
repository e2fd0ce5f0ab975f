"""The backend interface: one method per op of the forward pass, and the backends that implement it.

`reference.Reference` is the float64 numpy oracle that defines every op; `cpu.CPU` computes the same ops in
float32 with native kernels where they pay (matrix products, MoE, attention) and inherits the rest from the
reference at its own dtype. `cuda.CUDA` runs the same methods on an NVIDIA GPU with activations and session state
in device memory (hip.py and metal.py later).

`model.py` calls only these ops; it never does arithmetic on tensors itself. Per-session state is touched only
inside `attend`, so a backend may keep it where its kernels run. A whole forward goes through `step`, which calls
back into model.py for the ops, so a backend may record a decode step once and replay it (CUDA graphs).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class AttnSpec:
    """What a layer's `attend` needs besides its inputs: built once per layer by the model."""
    ratio: int                    # compression ratio: 0, 4 or 128
    n_swa: int                    # raw window rows
    n_nope: int                   # unrotated dims of a K=V row (the FP8 part)
    scale: float                  # softmax scale, 1/sqrt(head_dim)
    sinks: np.ndarray             # (H,) per-head sink logits
    rope: np.ndarray              # the layer's RoPE frequencies (queries and raw rows)
    rope_comp: np.ndarray         # the compressed layers' frequencies (compressed rows, indexer)
    faithful: bool                # FP8 / Hadamard+FP4 emulation on
    store_dtype: np.dtype         # K=V rows in the state: float16 (faithful) or the backend's dtype
    rms_eps: float                # the query heads' and the K=V row's norms (and the compressors')
    kv_norm: np.ndarray           # (D,) the K=V row's norm weight
    comp_ape: np.ndarray | None   # attention compressor: position bias (ratio, coff·D), row norm (D,)
    comp_norm: np.ndarray | None
    idx_ape: np.ndarray | None    # indexer compressor (ratio-4 layers)
    idx_norm: np.ndarray | None
    top_k: int                    # indexer top-k
    idx_w_scale: float            # 1/sqrt(indexer head dim · indexer heads)


@dataclass(frozen=True)
class RouteSpec:
    """A layer's router besides its logits (MODEL.md §3.4): built once per layer by the model."""
    bias: np.ndarray | None       # (n_expert,) selection bias, or None (hash layers)
    tid2eid: np.ndarray | None    # (vocabulary, k) experts by token id (hash layers), or None
    k: int                        # experts per token
    scale: float                  # weight scale
    normalize: bool               # weights divided by their sum


BACKENDS = ("auto", "cuda", "cpu", "reference")


def resolve_backend(name: str) -> str:
    """The backend a name stands for: "auto" is "cuda" when ds4d._cuda imports and sees a GPU, else "cpu"."""
    if name != "auto":
        return name
    from .cuda import available
    return "cuda" if available() is None else "cpu"


def get_backend(name: str, numerics: str = "faithful", **options):
    """Instantiate a backend by name: "reference" (float64 unless dtype= says otherwise), "cpu", "cuda" or "auto"."""
    name = resolve_backend(name)
    if name == "reference":
        from .reference import Reference
        return Reference(**options)
    if name == "cpu":
        from .cpu import CPU
        return CPU(numerics=numerics, **options)
    if name == "cuda":
        from .cuda import CUDA
        return CUDA(numerics=numerics, **options)
    raise ValueError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}")
