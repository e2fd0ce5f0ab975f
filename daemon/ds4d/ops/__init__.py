"""The backend interface: one method per op of the forward pass, and the backends that implement it.

`reference.Reference` is the float64 numpy oracle that defines every op; `cpu.CPU` computes the same ops in
float32 with native kernels where they pay (matrix products, MoE, attention) and inherits the rest from the
reference at its own dtype. GPU backends (cuda.py, hip.py, metal.py) will implement the same methods.

`model.py` calls only these ops; it never does arithmetic on tensors itself.
"""

from __future__ import annotations


def get_backend(name: str, numerics: str = "faithful", **options):
    """Instantiate a backend by name: "reference" (float64 unless dtype= says otherwise) or "cpu"."""
    if name == "reference":
        from .reference import Reference
        return Reference(**options)
    if name == "cpu":
        from .cpu import CPU
        return CPU(numerics=numerics, **options)
    raise ValueError(f"unknown backend {name!r}; available: cpu, reference")
