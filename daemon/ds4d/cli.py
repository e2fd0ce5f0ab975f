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


def _model_path(args: argparse.Namespace, demo: bool = False) -> Path:
    """The model to use; with `demo`, fall back to the generated demo model (and say so loudly)."""
    explicit = args.model or getattr(args, "model_pos", None)
    path = resolve_model(explicit, load_config())
    if path is None and demo:
        from .tiny import demo_model, stderr_progress
        path = demo_model(progress=stderr_progress)
        print(f"ds4d: NOTICE: no model found (-m, $DS4_MODEL, the config file, ./ds4flash.gguf, "
              f"$XDG_DATA_HOME/ds4/ds4flash.gguf); using the tiny RANDOM demo model {path}: its output is "
              f"gibberish. Point -m at a real ds4 GGUF for real answers.", file=sys.stderr)
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


# --- run -------------------------------------------------------------------------------------------------------

DEFAULT_SYSTEM = "You are a helpful assistant"
DIM, RESET = "\x1b[2m", "\x1b[0m"


def cmd_run(args: argparse.Namespace) -> int:
    """One prompt, answered on stdout as it is generated (reasoning dimmed on a terminal, on stderr otherwise)."""
    import json
    import time

    from .chat import render_chat_parts
    from .model import Model
    from .ops import resolve_backend
    from .output import OutputStream
    from .sampling import SamplingParams

    if args.prompt is not None and args.prompt_file is not None:
        raise UsageError("give either -p TEXT or --prompt-file FILE, not both")
    if args.prompt_file is not None:
        try:
            prompt = Path(args.prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read {args.prompt_file}: {e}") from None
    elif args.prompt is not None:
        prompt = args.prompt
    elif not sys.stdin.isatty():
        prompt = sys.stdin.read()
    else:
        raise UsageError("no prompt: give -p TEXT, --prompt-file FILE, or pipe text on stdin")
    if args.ctx < 16:
        raise UsageError("--ctx must be at least 16")
    try:
        params = SamplingParams(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                                seed=args.seed, max_tokens=args.n, logprobs=20 if args.dump_logprobs else 0)
    except ValueError as e:
        raise UsageError(str(e)) from None
    thinking = args.thinking
    path = _model_path(args, demo=True)
    backend = resolve_backend(args.backend)
    g = GGUFFile(path)
    if backend == "cuda":
        from .ops.cuda import memory_shortfall
        why = memory_shortfall(g)
        if why:
            raise UsageError(why)
    model = Model(g, backend=backend, **({"threads": args.threads} if args.threads and backend == "cpu" else {}))
    tok = model.tokenizer
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
        [{"role": "user", "content": prompt}]
    ids = tok.encode_parts(render_chat_parts(messages, thinking=thinking, context_size=args.ctx))
    if args.dump_tokens:
        print(" ".join(map(str, ids)), file=sys.stderr)
    if len(ids) >= args.ctx:
        raise UsageError(f"the prompt is {len(ids)} tokens, more than the context of {args.ctx} (--ctx)")

    tty = sys.stdout.isatty()
    out = OutputStream(tok, params, reasoning=thinking != "none")
    dump = open(args.dump_logprobs, "w", encoding="utf-8") if args.dump_logprobs else None
    shown_reasoning = False

    def show(events) -> None:
        nonlocal shown_reasoning
        for ev in events:
            if ev.kind == "reasoning" and ev.text:
                shown_reasoning = True
                if tty:
                    sys.stdout.write(DIM + ev.text + RESET)
                else:
                    sys.stderr.write(ev.text)
            elif ev.kind == "content" and ev.text:
                if shown_reasoning:
                    (sys.stdout if tty else sys.stderr).write("\n" + "-" * 40 + "\n")
                    shown_reasoning = False
                sys.stdout.write(ev.text)
            if dump is not None and ev.logprobs:
                for lp in ev.logprobs:
                    dump.write(json.dumps({"token": lp["token"], "piece": tok.decode([lp["token"]]),
                                           "top": lp["top"]}) + "\n")
        sys.stdout.flush()

    state = model.new_state()
    t0 = time.perf_counter()
    interrupted = False
    try:
        logits = model.prefill(state, ids)
        t1 = time.perf_counter()
        while True:
            if state.n_tokens >= args.ctx:
                show(out.finish("context_full"))
                break
            t = out.token(logits)
            show(out.push(t, logits))
            if out.done:
                break
            logits = model.decode([state], [t])[0]
    except KeyboardInterrupt:
        interrupted = True
        show(out.finish("cancelled"))
        t1 = locals().get("t1", time.perf_counter())
    finally:
        if dump is not None:
            dump.close()
    t2 = time.perf_counter()
    n_gen = len(out.tokens)
    sys.stdout.write("\n")
    print(f"ds4d: prompt {len(ids)} tokens in {t1 - t0:.2f} s ({len(ids) / max(t1 - t0, 1e-9):.1f} tok/s); "
          f"generated {n_gen} tokens in {t2 - t1:.2f} s ({n_gen / max(t2 - t1, 1e-9):.1f} tok/s); "
          f"finish: {out.finish_reason}", file=sys.stderr)
    return 130 if interrupted else 0


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


# --- serve -----------------------------------------------------------------------------------------------------

LOG_LEVELS = ("debug", "info", "warning", "error")


def cmd_serve(args: argparse.Namespace) -> int:
    """The daemon: each option from its flag, else the config file's key of the same name, else the default."""
    from .config import config_value
    from .server import ServeOptions, serve

    cfg = load_config()

    def pick(name: str, kind, field: str | None = None):
        value = getattr(args, name)
        if value is None:
            value = config_value(cfg, name, kind, getattr(ServeOptions, field or name))
        return value

    number = (int, float)
    cache = pick("cache_dir", str)
    # The socket is not a config key: every client resolves it by PROTOCOL.md's order, and so must the daemon.
    o = ServeOptions(model=resolve_model(args.model, cfg), socket=args.socket, backend=pick("backend", str),
                     ctx=pick("ctx", int), cache_dir=Path(cache).expanduser() if cache else None,
                     ram_cache_mb=pick("ram_cache_mb", int), disk_cache_mb=pick("disk_cache_mb", int),
                     session_mem_mb=pick("session_mem_mb", int), log_level=pick("log_level", str),
                     idle_exit_min=pick("idle_exit", number, "idle_exit_min"),
                     stall_timeout_s=pick("stall_timeout", number, "stall_timeout_s"), max_queue=pick("max_queue", int))
    if o.backend not in ("auto", "cuda", "cpu"):
        raise UsageError(f"backend must be auto, cuda or cpu, not {o.backend!r}")
    if o.log_level not in LOG_LEVELS:
        raise UsageError(f"log level must be one of {', '.join(LOG_LEVELS)}, not {o.log_level!r}")
    if o.ctx < 16:
        raise UsageError("--ctx must be at least 16")
    for name in ("ram_cache_mb", "disk_cache_mb", "session_mem_mb"):
        if getattr(o, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} cannot be negative")
    if o.idle_exit_min is not None and o.idle_exit_min <= 0:
        raise UsageError("--idle-exit must be a positive number of minutes")
    if o.stall_timeout_s <= 0 or o.max_queue < 1:
        raise UsageError("--stall-timeout and --max-queue must be positive")
    return serve(o)


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

    p = sub.add_parser("run", help="answer one prompt with the model (streamed)",
                       description="Render a chat prompt (the model's template), generate an answer and stream it. "
                                   "Without a model this uses the tiny random demo model (gibberish output).")
    _add_model_arg(p, positional=False)
    p.add_argument("-p", "--prompt", help="the user message (default: stdin when it is not a terminal)")
    p.add_argument("--prompt-file", metavar="FILE", help="read the user message from a file")
    think = p.add_mutually_exclusive_group()
    think.add_argument("--nothink", dest="thinking", action="store_const", const="none", help="answer directly")
    think.add_argument("--think", dest="thinking", action="store_const", const="high",
                       help="reason first (the default)")
    think.add_argument("--think-max", dest="thinking", action="store_const", const="max",
                       help="maximum reasoning effort (runs as --think under a 393216-token context)")
    p.set_defaults(thinking="high")
    p.add_argument("-n", type=int, default=1024, metavar="N", help="at most N generated tokens (default 1024)")
    p.add_argument("--temp", type=float, default=1.0, help="temperature (default 1; 0 = greedy)")
    p.add_argument("--top-k", type=int, default=0, help="top-k (default 0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="top-p (default 1)")
    p.add_argument("--min-p", type=float, default=0.05, help="min-p relative to the top token (default 0.05)")
    p.add_argument("--seed", type=int, help="random seed: the same seed reproduces a run")
    p.add_argument("--system", default=DEFAULT_SYSTEM, help=f"system message (default {DEFAULT_SYSTEM!r}; '' for none)")
    p.add_argument("--ctx", type=int, default=32768, help="context size in tokens (default 32768)")
    p.add_argument("--dump-tokens", action="store_true", help="print the prompt's token ids on stderr")
    p.add_argument("--dump-logprobs", metavar="FILE", help="write each step's top-20 log-probabilities (JSON lines)")
    p.add_argument("--backend", default="auto", choices=["auto", "cuda", "cpu", "reference"],
                   help="compute backend (default auto: cuda when ds4d._cuda is built and a GPU is present, else cpu)")
    p.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("serve", help="run the daemon: keep the model resident, serve clients on a Unix socket",
                       description="Load the model once and serve many local clients (ds4c, editors, scripts) over "
                                   "the msgpack-rpc protocol on a Unix socket (docs/PROTOCOL.md). Options default to "
                                   "the keys of the same name in $XDG_CONFIG_HOME/ds4/config.toml (backend, "
                                   "ctx, cache_dir, ram_cache_mb, disk_cache_mb, session_mem_mb, idle_exit, "
                                   "log_level, stall_timeout, max_queue). Without a model it serves the tiny "
                                   "random demo model. SIGTERM, SIGINT or the `shutdown` method stop it gracefully "
                                   "(sessions are saved).",
                       epilog="Logs go to stderr and $XDG_STATE_HOME/ds4/ds4d.log. Under systemd, a socket unit can "
                              "pass the listening socket (LISTEN_FDS); see docs/ds4d.service.")
    _add_model_arg(p, positional=False)
    p.add_argument("--socket", metavar="PATH", help="socket path (default: $DS4_SOCKET, $XDG_RUNTIME_DIR/ds4/ds4.sock, "
                                                    "/tmp/ds4-UID/ds4.sock)")
    p.add_argument("--backend", choices=["auto", "cuda", "cpu"],
                   help="compute backend (default auto: cuda when ds4d._cuda is built and a GPU is present, else cpu)")
    p.add_argument("--ctx", type=int, metavar="N", help="context size in tokens per request (default 32768)")
    p.add_argument("--cache-dir", metavar="DIR", help="sessions and prompt cache (default $XDG_CACHE_HOME/ds4)")
    p.add_argument("--ram-cache-mb", type=int, metavar="N",
                   help="prompt-cache snapshots kept in RAM, MiB (default 1024)")
    p.add_argument("--disk-cache-mb", type=int, metavar="N",
                   help="prompt-cache snapshots kept on disk, MiB (default 4096)")
    p.add_argument("--session-mem-mb", type=int, metavar="N",
                   help="state of live sessions, MiB (default 8192); a request that would exceed it gets "
                        "out_of_memory")
    p.add_argument("--idle-exit", type=float, metavar="MIN", help="exit after MIN minutes with no client and no work "
                                                                  "(default: never)")
    p.add_argument("--log-level", choices=LOG_LEVELS, help="log verbosity (default info)")
    p.add_argument("--stall-timeout", type=float, metavar="S", help="cancel the requests of a client that has not "
                                                                    "read its socket for S seconds (default 30)")
    p.add_argument("--max-queue", type=int, metavar="N", help="requests held at once before answering busy "
                                                              "(default 256)")
    p.set_defaults(func=cmd_serve)

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
