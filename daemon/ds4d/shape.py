"""The DeepSeek V4 Flash shape, read from a GGUF's `deepseek4.*` metadata and checked for consistency.

Owns every hyperparameter of the architecture (the real Flash value is written beside each field) and the rules
that tie them together. ds4 hard-codes these numbers; we read them, so tiny test models of the same architecture
load through the same path as the real files (MODEL.md §1). Tensor names, dims and types are `weights.py`'s job.
Called by `weights.load_weights`, `ds4d info` and the model generator (which writes a `Shape` back as metadata).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from .gguf_file import GGUFFile, ModelError

ARCH = "deepseek4"
KEY = ARCH + "."
GATING_SQRT_SOFTPLUS = 4          # deepseek4.expert_gating_func as llama.cpp numbers it
COMPRESS_RATIOS = (0, 4, 128)     # the only compression ratios the architecture defines


@dataclass(frozen=True)
class Shape:
    n_layer: int                  # 43
    n_embd: int                   # 4096 (E)
    n_vocab: int                  # 129280
    n_head: int                   # 64 query heads (H)
    head_dim: int                 # 512 (D): key length == value length, one shared K=V head
    n_rot: int                    # 64 rotated tail dims per head
    q_lora_rank: int              # 1024
    o_lora_rank: int              # 1024 per output group
    n_out_group: int              # 8
    n_expert: int                 # 256 routed experts
    n_expert_used: int            # 6
    n_ff_exp: int                 # 2048 (routed and shared expert width)
    n_hash_layer: int             # 3: layers 0..2 route by token id
    n_swa: int                    # 128 raw sliding-window rows
    n_indexer_head: int           # 64
    indexer_head_dim: int         # 128
    indexer_top_k: int            # 512
    n_hc: int                     # 4 hyper-connection streams
    hc_sinkhorn_iters: int        # 20
    hc_eps: float                 # 1e-6
    compress_ratios: tuple[int, ...]       # per layer: 0, 0, 4, 128, 4, 128, ..., 4
    swiglu_clamp_exp: tuple[float, ...]    # per layer: 10.0 (routed experts)
    swiglu_clamp_shexp: tuple[float, ...]  # per layer: defaults to swiglu_clamp_exp (shared expert)
    rope_orig_ctx: int            # 65536 (YaRN original context)
    rope_freq_base: float         # 10000: ratio-0 layers, no scaling
    rope_scale_factor: float      # 16: YaRN factor of the compressed layers
    yarn_beta_fast: float         # 32
    yarn_beta_slow: float         # 1
    compress_rope_freq_base: float  # 160000: compressed layers (and their compressed rows and indexer)
    expert_weights_scale: float   # 1.5
    rms_eps: float                # 1e-6
    expert_weights_norm: bool     # True
    context_length: int = 1048576  # training context, informational
    n_expert_shared: int = 1
    expert_gating_func: int = GATING_SQRT_SOFTPLUS

    # --- derived quantities ---------------------------------------------------------------------------------
    @property
    def hc_dim(self) -> int:           # 16384: the flattened residual of all streams
        return self.n_hc * self.n_embd

    @property
    def hc_mix(self) -> int:           # 24 = 2·4 + 4·4: pre weights, post gates, combine matrix
        return (2 + self.n_hc) * self.n_hc

    @property
    def n_nope(self) -> int:           # 448 unrotated dims of a head
        return self.head_dim - self.n_rot

    def ratio(self, il: int) -> int:
        return self.compress_ratios[il]

    def is_hash(self, il: int) -> bool:
        return il < self.n_hash_layer

    def compressor_width(self, il: int) -> int:
        """Columns of attn_compressor_kv/gate: two overlapping lanes for ratio 4, one for ratio 128."""
        r = self.ratio(il)
        return (2 if r == 4 else 1) * self.head_dim if r else 0

    def kv_bytes_per_token(self, bytes_per_value: int = 2) -> float:
        """Compressed-KV bytes one token of context adds (attention rows + indexer rows), f16 by default."""
        total = 0.0
        for r in self.compress_ratios[:self.n_layer]:
            if r == 4:
                total += (self.head_dim + self.indexer_head_dim) * bytes_per_value / 4
            elif r:
                total += self.head_dim * bytes_per_value / r
        return total

    def to_metadata(self) -> dict[str, tuple[str, object]]:
        """The metadata a ds4 GGUF carries for this shape: key -> (gguf type name, value)."""
        u32, f32 = "uint32", "float32"
        m = {
            "block_count": (u32, self.n_layer), "context_length": (u32, self.context_length),
            "embedding_length": (u32, self.n_embd), "vocab_size": (u32, self.n_vocab),
            "attention.head_count": (u32, self.n_head), "attention.head_count_kv": (u32, 1),
            "attention.key_length": (u32, self.head_dim), "attention.value_length": (u32, self.head_dim),
            "rope.dimension_count": (u32, self.n_rot), "attention.q_lora_rank": (u32, self.q_lora_rank),
            "attention.output_lora_rank": (u32, self.o_lora_rank),
            "attention.output_group_count": (u32, self.n_out_group),
            "expert_count": (u32, self.n_expert), "expert_used_count": (u32, self.n_expert_used),
            "expert_feed_forward_length": (u32, self.n_ff_exp), "expert_shared_count": (u32, self.n_expert_shared),
            "hash_layer_count": (u32, self.n_hash_layer), "attention.sliding_window": (u32, self.n_swa),
            "attention.indexer.head_count": (u32, self.n_indexer_head),
            "attention.indexer.key_length": (u32, self.indexer_head_dim),
            "attention.indexer.top_k": (u32, self.indexer_top_k),
            "hyper_connection.count": (u32, self.n_hc),
            "hyper_connection.sinkhorn_iterations": (u32, self.hc_sinkhorn_iters),
            "hyper_connection.epsilon": (f32, self.hc_eps),
            "attention.compress_ratios": ("array_uint32", list(self.compress_ratios)),
            "swiglu_clamp_exp": ("array_float32", list(self.swiglu_clamp_exp)),
            # u32: we and ds4 accept u32 or u64 here, llama.cpp only u32
            "rope.scaling.original_context_length": ("uint32", self.rope_orig_ctx),
            "rope.freq_base": (f32, self.rope_freq_base), "rope.scaling.factor": (f32, self.rope_scale_factor),
            "rope.scaling.yarn_beta_fast": (f32, self.yarn_beta_fast),
            "rope.scaling.yarn_beta_slow": (f32, self.yarn_beta_slow),
            "attention.compress_rope_freq_base": (f32, self.compress_rope_freq_base),
            "expert_weights_scale": (f32, self.expert_weights_scale),
            "attention.layer_norm_rms_epsilon": (f32, self.rms_eps),
            "expert_weights_norm": ("bool", self.expert_weights_norm),
            "expert_gating_func": (u32, self.expert_gating_func),
        }
        return {KEY + k: v for k, v in m.items()}


def flash_ratio(il: int) -> int:
    """The real model's layer schedule (MODEL.md §1.3): 0 for layers 0-1, then 4 on even and 128 on odd layers."""
    return 0 if il < 2 else (4 if il % 2 == 0 else 128)


def flash_shape(n_layer: int = 43) -> Shape:
    """The real DeepSeek V4 Flash shape (with n_layer layers of the real schedule)."""
    return Shape(
        n_layer=n_layer, n_embd=4096, n_vocab=129280, n_head=64, head_dim=512, n_rot=64, q_lora_rank=1024,
        o_lora_rank=1024, n_out_group=8, n_expert=256, n_expert_used=6, n_ff_exp=2048,
        n_hash_layer=min(3, n_layer), n_swa=128, n_indexer_head=64, indexer_head_dim=128, indexer_top_k=512,
        n_hc=4, hc_sinkhorn_iters=20, hc_eps=1e-6,
        compress_ratios=tuple(flash_ratio(i) for i in range(n_layer)),
        swiglu_clamp_exp=(10.0,) * n_layer, swiglu_clamp_shexp=(10.0,) * n_layer,
        rope_orig_ctx=65536, rope_freq_base=10000.0, rope_scale_factor=16.0, yarn_beta_fast=32.0,
        yarn_beta_slow=1.0, compress_rope_freq_base=160000.0, expert_weights_scale=1.5, rms_eps=1e-6,
        expert_weights_norm=True)


# --- reading ---------------------------------------------------------------------------------------------------

def _int(g: GGUFFile, key: str, default: int | None = None) -> int:
    v = g.get(KEY + key)
    if v is None:
        if default is not None:
            return default
        raise g.error(f"missing metadata key {KEY + key}")
    if isinstance(v, bool) or not isinstance(v, int):
        raise g.error(f"metadata {KEY + key} must be an integer, got {type(v).__name__}")
    if v < 0:
        raise g.error(f"metadata {KEY + key} must not be negative, got {v}")
    return v


def _float(g: GGUFFile, key: str) -> float:
    v = g.get(KEY + key)
    if v is None:
        raise g.error(f"missing metadata key {KEY + key}")
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise g.error(f"metadata {KEY + key} must be a finite number, got {v!r}")
    return float(v)


def _array(g: GGUFFile, key: str, n: int, kind: type) -> tuple:
    v = g.get(KEY + key)
    if v is None:
        raise g.error(f"missing metadata key {KEY + key}")
    if not isinstance(v, list):
        raise g.error(f"metadata {KEY + key} must be an array")
    if len(v) < n:
        raise g.error(f"metadata {KEY + key} has {len(v)} entries, fewer than the {n} layers")
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        raise g.error(f"metadata {KEY + key} must hold numbers")
    return tuple(kind(x) for x in v[:n])


def read_shape(g: GGUFFile) -> Shape:
    """Read and validate the shape of a ds4 GGUF; raises ModelError naming the file and the problem."""
    arch = g.get("general.architecture")
    if arch != ARCH:
        raise g.error(f"architecture is {arch!r}, expected {ARCH!r} (DeepSeek V4 Flash)")
    n_layer = _int(g, "block_count")
    if n_layer < 1:
        raise g.error("block_count must be at least 1")
    ratios = _array(g, "attention.compress_ratios", n_layer, int)
    clamp = _array(g, "swiglu_clamp_exp", n_layer, float)
    clamp_sh = _array(g, "swiglu_clamp_shexp", n_layer, float) if g.get(KEY + "swiglu_clamp_shexp") is not None else clamp
    expert_norm = g.get(KEY + "expert_weights_norm")
    if not isinstance(expert_norm, bool):
        raise g.error(f"metadata {KEY}expert_weights_norm must be a bool")
    s = Shape(
        n_layer=n_layer, n_embd=_int(g, "embedding_length"), n_vocab=_int(g, "vocab_size"),
        n_head=_int(g, "attention.head_count"), head_dim=_int(g, "attention.key_length"),
        n_rot=_int(g, "rope.dimension_count"), q_lora_rank=_int(g, "attention.q_lora_rank"),
        o_lora_rank=_int(g, "attention.output_lora_rank"), n_out_group=_int(g, "attention.output_group_count"),
        n_expert=_int(g, "expert_count"), n_expert_used=_int(g, "expert_used_count"),
        n_ff_exp=_int(g, "expert_feed_forward_length"), n_hash_layer=_int(g, "hash_layer_count"),
        n_swa=_int(g, "attention.sliding_window"), n_indexer_head=_int(g, "attention.indexer.head_count"),
        indexer_head_dim=_int(g, "attention.indexer.key_length"), indexer_top_k=_int(g, "attention.indexer.top_k"),
        n_hc=_int(g, "hyper_connection.count"), hc_sinkhorn_iters=_int(g, "hyper_connection.sinkhorn_iterations"),
        hc_eps=_float(g, "hyper_connection.epsilon"), compress_ratios=ratios, swiglu_clamp_exp=clamp,
        swiglu_clamp_shexp=clamp_sh, rope_orig_ctx=_int(g, "rope.scaling.original_context_length"),
        rope_freq_base=_float(g, "rope.freq_base"), rope_scale_factor=_float(g, "rope.scaling.factor"),
        yarn_beta_fast=_float(g, "rope.scaling.yarn_beta_fast"),
        yarn_beta_slow=_float(g, "rope.scaling.yarn_beta_slow"),
        compress_rope_freq_base=_float(g, "attention.compress_rope_freq_base"),
        expert_weights_scale=_float(g, "expert_weights_scale"), rms_eps=_float(g, "attention.layer_norm_rms_epsilon"),
        expert_weights_norm=expert_norm, context_length=_int(g, "context_length", 1048576),
        n_expert_shared=_int(g, "expert_shared_count"),
        expert_gating_func=_int(g, "expert_gating_func", GATING_SQRT_SOFTPLUS))
    _check_consistency(g, s)
    return s


MAX_SIZE = 1 << 24              # 16 times the real context; every other size of the real model is far smaller
MAX_SINKHORN_ITERS = 1000


def _check_consistency(g: GGUFFile, s: Shape) -> None:
    def bad(problem: str) -> ModelError:
        return g.error(f"inconsistent metadata: {problem}")

    value_length = _int(g, "attention.value_length")
    if value_length != s.head_dim:
        raise bad(f"key length {s.head_dim} and value length {value_length} differ (K and V are one vector)")
    if _int(g, "attention.head_count_kv") != 1:
        raise bad("head_count_kv must be 1 (one shared K=V head)")
    for f in fields(Shape):
        v = getattr(s, f.name)
        if isinstance(v, int) and not isinstance(v, bool) and v == 0 and f.name not in ("n_hash_layer",):
            raise bad(f"{f.name} is 0")
        # A size far past any real model's (the real maximum is the 1M context) would make the first allocation
        # fail with no useful message, or a loop over it never end: refuse it here, by name.
        if isinstance(v, int) and not isinstance(v, bool) and v > MAX_SIZE:
            raise bad(f"{f.name} is {v}, more than {MAX_SIZE}")
    if s.hc_sinkhorn_iters > MAX_SINKHORN_ITERS:
        raise bad(f"{s.hc_sinkhorn_iters} Sinkhorn iterations (at most {MAX_SINKHORN_ITERS}; the real model uses 20)")
    if s.n_head % s.n_out_group:
        raise bad(f"{s.n_head} heads are not divisible by {s.n_out_group} output groups")
    if s.n_rot % 2 or s.n_rot > s.head_dim or s.n_rot > s.indexer_head_dim:
        raise bad(f"rope dimension {s.n_rot} must be even and fit the head dims {s.head_dim}/{s.indexer_head_dim}")
    if s.indexer_head_dim != 128:
        raise bad(f"indexer head dim is {s.indexer_head_dim}; the Hadamard+FP4 path needs 128")
    if s.n_expert_used > s.n_expert:
        raise bad(f"{s.n_expert_used} experts used of only {s.n_expert}")
    if s.n_hash_layer > s.n_layer:
        raise bad(f"{s.n_hash_layer} hash layers in a {s.n_layer}-layer model")
    if s.n_expert_shared != 1:
        raise bad(f"expert_shared_count is {s.n_expert_shared}; DeepSeek V4 has exactly one shared expert")
    if s.expert_gating_func != GATING_SQRT_SOFTPLUS:
        raise bad(f"expert_gating_func {s.expert_gating_func} is not sqrt-softplus ({GATING_SQRT_SOFTPLUS})")
    groups = g.get(KEY + "expert_group_count", 0) or 0
    if groups not in (0, 1):
        raise bad(f"expert_group_count {groups}: group-limited routing is not part of DeepSeek V4 Flash")
    bad_ratios = sorted({r for r in s.compress_ratios if r not in COMPRESS_RATIOS})
    if bad_ratios:
        raise bad(f"compress_ratios holds {bad_ratios}; only 0, 4 and 128 exist")
    if s.n_hc < 1 or s.hc_sinkhorn_iters < 1:
        raise bad("hyper-connection count and Sinkhorn iterations must be positive")
    if s.rms_eps <= 0 or s.hc_eps <= 0 or s.rope_freq_base <= 0 or s.compress_rope_freq_base <= 0:
        raise bad("epsilons and RoPE bases must be positive")
    if s.rope_scale_factor < 1 or s.yarn_beta_fast <= 0 or s.yarn_beta_slow <= 0:
        raise bad("YaRN factor must be >= 1 and its betas positive")
