"""The `ds4d` command line: `info`, `make-tiny` (and, as they land, `run`, `serve`, `bench`).

Owns argument parsing, the model-path resolution order (via `config.py`), and turning user mistakes into one
clear line on stderr with a non-zero exit, never a traceback. Each subcommand is a small function that calls the
library; nothing here computes anything itself.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

from . import __version__
from .config import ConfigError, load_config, resolve_model
from .gguf_file import GGUFFile, ModelError


class UsageError(Exception):
    """A bad command line; str(e) is the message."""


def _add_model_arg(p: argparse.ArgumentParser, positional: bool = True) -> None:
    p.add_argument("-m", "--model", dest="model", metavar="MODEL.gguf",
                   help="model file (default: $DS4_MODEL, the config file, ./ds4flash.gguf, "
                        "$XDG_DATA_HOME/ds4/ds4flash.gguf)")
    if positional:
        p.add_argument("model_pos", nargs="?", metavar="MODEL.gguf", help=argparse.SUPPRESS)


def _model_path(args: argparse.Namespace) -> Path:
    explicit = args.model or getattr(args, "model_pos", None)
    path = resolve_model(explicit, load_config())
    if path is None:
        raise UsageError("no model given and none found (use -m MODEL.gguf, or make one with `ds4d make-tiny`)")
    return path


# --- info ------------------------------------------------------------------------------------------------------

def _kind_of(name: str) -> str:
    """The byte-size group a tensor belongs to in `ds4d info`."""
    base = name.split(".", 2)[-1] if name.startswith("blk.") else name
    if base.startswith("token_embd"):
        return "embedding"
    if base.startswith("output"):
        return "output head (LM head, HC collapse, norm)"
    if base.startswith("hc_"):
        return "hyper-connection mixers"
    if base.startswith("attn_compressor"):
        return "attention compressors"
    if base.startswith("indexer"):
        return "indexers (q_b, proj, compressor)"
    if base.startswith("attn_"):
        return "attention (q/kv/output projections, norms, sinks)"
    if base.startswith(("ffn_gate_inp", "exp_probs_b", "ffn_gate_tid2eid")):
        return "routers (gate, bias, hash table)"
    if base.endswith("_exps.weight"):
        return "routed experts"
    return "shared expert and FFN norm"


def _gib(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


def cmd_info(args: argparse.Namespace) -> int:
    from .shape import read_shape
    from .weights import load_weights
    path = _model_path(args)
    g = GGUFFile(path)
    s = read_shape(g)
    w = load_weights(g, s)
    r = s.compress_ratios
    print(f"model        {path}")
    print(f"name         {g.get('general.name', '?')}")
    print(f"file         {_gib(g.size)} ({g.size:,} bytes), GGUF v3, {len(g.tensors)} tensors")
    print(f"shape        {s.n_layer} layers, hidden {s.n_embd}, vocab {s.n_vocab}, {s.n_head} heads x {s.head_dim} "
          f"({s.n_rot} rotated), q rank {s.q_lora_rank}, {s.n_out_group} output groups x {s.o_lora_rank}")
    print(f"experts      {s.n_expert} routed ({s.n_expert_used} used, width {s.n_ff_exp}) + 1 shared; "
          f"{s.n_hash_layer} hash-routed layers; routed type {w.routed_type.name}")
    print(f"attention    window {s.n_swa}; layers by compression ratio: "
          f"0 x{r.count(0)}, 4 x{r.count(4)}, 128 x{r.count(128)}; indexer {s.n_indexer_head} heads x "
          f"{s.indexer_head_dim}, top-k {s.indexer_top_k}")
    print(f"hyper-conn   {s.n_hc} streams, {s.hc_sinkhorn_iters} Sinkhorn iterations")
    print(f"rope         base {s.rope_freq_base:g} (ratio-0 layers); {s.compress_rope_freq_base:g} + YaRN x"
          f"{s.rope_scale_factor:g} from {s.rope_orig_ctx} (compressed layers)")
    types: dict[str, int] = defaultdict(int)
    kinds: dict[str, int] = defaultdict(int)
    for t in g.tensors.values():
        types[t.type.name] += 1
        kinds[_kind_of(t.name)] += t.nbytes
    print("types        " + ", ".join(f"{n} x{c}" for n, c in sorted(types.items(), key=lambda kv: -kv[1])))
    print("bytes by kind")
    for kind, n in sorted(kinds.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:<52} {_gib(n):>12}")
    weights_bytes = sum(kinds.values())
    per_k = s.kv_bytes_per_token() * 1024
    tail = _session_tail_bytes(s)
    print(f"memory       weights {_gib(weights_bytes)}; KV state {per_k / 1024:,.1f} KiB per 1K tokens of context "
          f"(f16) plus {_gib(tail)} fixed per session (raw windows, compressor frontiers)")
    if w.unused:
        print(f"unused       {len(w.unused)} tensors the model does not read: {', '.join(w.unused[:5])}"
              + (" ..." if len(w.unused) > 5 else ""))
    return 0


def _session_tail_bytes(s) -> int:
    """Per-session state that does not grow with context: raw windows (f16) and compressor frontiers (f32)."""
    total = 0
    for r in s.compress_ratios:
        total += s.n_swa * s.head_dim * 2
        if r == 4:
            total += 2 * 8 * 2 * s.head_dim * 4 + 2 * 8 * 2 * s.indexer_head_dim * 4
        elif r:
            total += 2 * r * s.head_dim * 4
    return total


# --- make-tiny -------------------------------------------------------------------------------------------------

def cmd_make_tiny(args: argparse.Namespace) -> int:
    from .tiny import VARIANTS, make_tiny, stderr_progress
    if args.variant not in VARIANTS:
        raise UsageError(f"unknown variant {args.variant!r}; choose one of {', '.join(VARIANTS)}")
    if args.layers < 1 or args.layers > 43:
        raise UsageError("--layers must be between 1 and 43")
    if args.full_shape and args.full_width:
        raise UsageError("--full-shape and --full-width exclude each other")
    out = Path(args.out)
    if out.parent and not out.parent.exists():
        raise UsageError(f"directory {out.parent} does not exist")
    progress = stderr_progress if args.full_width else None
    size = make_tiny(out, args.variant, args.layers, args.seed, full_width=args.full_width,
                     full_shape=args.full_shape, progress=progress)
    kind = "full-shape (sparse)" if args.full_shape else ("full-width" if args.full_width else "tiny")
    print(f"wrote {out}: {kind} {args.variant} model, {_gib(size)}", file=sys.stderr)
    return 0


# --- entry point -----------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ds4d", description="DeepSeek V4 Flash inference daemon and tools.",
        epilog="Run `ds4d COMMAND --help` for a command's options.")
    parser.add_argument("--version", action="version", version=f"ds4d {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("info", help="show a model's shape, tensor types, sizes and memory needs",
                       description="Validate a ds4 GGUF file and print its shape, tensor types, byte sizes per kind "
                                   "and the memory needed for the weights and the KV state.")
    _add_model_arg(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("make-tiny", help="write a random model in the real ds4 GGUF layout",
                       description="Write a random DeepSeek V4 Flash model in exactly the real file layout (names, "
                                   "metadata, types, real vocabulary): a tiny one for tests and demos, real-width "
                                   "layers for benchmarks, or the real 43-layer header over a sparse data region.")
    p.add_argument("out", metavar="OUT.gguf", help="output file")
    p.add_argument("--variant", default="f32", help="tensor types: f32, f16, q8, q2 (the real q2 file's types) "
                                                   "or q4 (the real q4 file's types); default f32")
    p.add_argument("--layers", type=int, default=6, help="number of layers (default 6; ignored with --full-shape)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0): same seed, same file")
    p.add_argument("--full-width", action="store_true", help="real widths (4096 hidden, 256 experts, ...) for N "
                                                            "layers, streamed to disk (gigabytes)")
    p.add_argument("--full-shape", action="store_true", help="the real 43-layer header and tensor directory over a "
                                                            "sparse data region (no disk cost, values all zero)")
    p.set_defaults(func=cmd_make_tiny)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.func(args)
    except UsageError as e:
        print(f"ds4d {args.command}: {e}", file=sys.stderr)
        return 2
    except (ModelError, ConfigError) as e:
        print(f"ds4d: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ds4d: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
