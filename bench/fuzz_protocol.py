"""Protocol fuzzing against a live daemon: random and mutated msgpack-rpc frames, batch after batch, with the
protocol's promises checked after every one.

    PYTHONPATH=daemon:client python bench/fuzz_protocol.py [--frames 100000] [--seed 0] [--out FILE]

Starts `python -m ds4d serve` on the tiny q2 model (tests/daemon_harness.py) and sends it batches drawn by
hypothesis: well-formed requests of every method whose named arguments are mutated (wrong types, huge integers,
NaN, deep nesting, giant strings, unknown and missing fields, session names that try to leave the cache
directory), frames of the wrong shape or arity, unknown methods, floods of cancels, and bytes that are not
msgpack at all (random, reserved, truncated, nested past msgpack's limit, over the 16 MiB cap). The oracle
(PROTOCOL.md):
  * every decodable frame on a connection that stays open gets exactly one response, with a msgid that was
    sent (or nil when none could be read) and an error that is nil or one of the protocol's codes, never
    `internal` (a bug in the daemon);
  * undecodable bytes and oversized messages end that connection (too_large is answered first);
  * after every batch the daemon answers `hello` on a fresh connection and on a witness connection opened at
    the start, and the witness sessions are exactly as they were; every tenth batch a new session goes through
    the disk and back unchanged;
  * at the end the daemon's log holds no traceback (a failure on a thread that answers no one, like the writer)
    and SIGTERM stops it with status 0.
The daemon runs with a 512-token context (room for a chat with tools, which is about 300 tokens) so that a
mutation which happens to be a valid generation costs a few hundred tokens at most; `shutdown` is fuzzed only with
invalid arguments (a valid one would stop the run).
tests/test_reliability.py runs the same fuzz for a few thousand frames with a fixed seed.
"""

from __future__ import annotations

import argparse
import math
import platform
import shutil
import socket
import sys
import time
from collections import Counter
from datetime import date
from pathlib import Path

import msgpack
from hypothesis import HealthCheck, Phase, given, seed as hseed, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from daemon_harness import Client, Daemon, short_home, tiny_q2  # noqa: E402
from ds4c.protocol import ERROR_CODES, MAX_MESSAGE_BYTES, METHODS  # noqa: E402

SERVE_ARGS = ("--ctx", "512", "--session-mem-mb", "512")
WITNESSES = ("zz-witness-chat", "zz-witness-gen")       # sessions no fuzzed name can reach (see NAMES)
BATCH_TIMEOUT_S = 120
SAVE_CHECK_EVERY = 10                   # batches between two round trips of a session through the disk

# --- values -----------------------------------------------------------------------------------------------------
#
# The generic values mutations put anywhere, biased towards the edges a parser gets wrong: integer format
# boundaries up to the largest msgpack can carry (u64 max), non-finite and subnormal floats, text with
# non-ASCII digits, template tokens, NULs and traversal, binary where text is expected, and nesting.

EDGE_INTS = [0, 1, -1, 127, 128, 255, 256, 2**15, 2**16, 2**31 - 1, 2**31, -2**31, 2**32 - 1, 2**32, 2**53 + 1,
             2**63 - 1, -2**63, 2**64 - 1]
EDGE_FLOATS = [0.0, -0.0, 5e-324, 1e-300, 1e308, 1.7976931348623157e308, math.inf, -math.inf, math.nan, 0.5, 2.0]
EDGE_TEXTS = ["", " ", "\x00", "1.0", "2.0", "1", "١.٠", "²", "1.0.0", "-1", "NaN", "<｜User｜>",
              "<｜end▁of▁sentence｜>", "<think>", "</think>", "<｜fim▁hole｜>", "｜DSML｜", "\ud7ff", "\u202e", "é" * 9,
              "../../etc/passwd", "%s%n", "{}", "[]", "null"]
# Session names: valid ones (a small pool, so valid requests reuse a few sessions) and every way out of a
# directory we could think of. The witnesses start with "zz-", which nothing here or in st.text(max_size=12)
# can produce by chance in practice.
NAMES = ["fz0", "fz1", "fz2", "fz-3.x", "a" * 64, "a" * 65, "", ".", "..", "...", "../fz0", "fz0/../fz1", "/tmp/x",
         "/etc/passwd", "a/b", "a\\b", "..\\x", "x\x00y", "~", "~root", "%2e%2e", ".hidden", "-rf", "fz0.snap",
         "fz0\n", " fz0", "fz0 ", "ｆｚ０", "CON", "nul", "fz\u202e0"]

ints = st.sampled_from(EDGE_INTS) | st.integers(-2**63, 2**64 - 1)
floats = st.sampled_from(EDGE_FLOATS) | st.floats()
texts = st.sampled_from(EDGE_TEXTS) | st.text(max_size=12)
scalars = st.none() | st.booleans() | ints | floats | texts | st.binary(max_size=12)
values = st.recursive(scalars, lambda kids: st.lists(kids, max_size=4)
                      | st.dictionaries(texts | ints, kids, max_size=4), max_leaves=10)


@st.composite
def weighted(draw, *choices: tuple[int, st.SearchStrategy]):
    """one_of with weights (hypothesis picks the branches of one_of evenly)."""
    i = draw(st.integers(0, sum(w for w, _ in choices) - 1))
    for w, s in choices:
        if i < w:
            return draw(s)
        i -= w


deep = st.integers(1, 400).map(lambda n: _nest(n))         # msgpack packs up to 511 levels
giant = st.sampled_from([1 << 10, 1 << 14, 1 << 17, 1 << 20]).map(lambda n: "g" * n)   # (the cap: bad_bytes)
anything = weighted((12, values), (3, st.sampled_from(NAMES)), (1, deep), (1, giant))


def edges_like(v):
    """Edge values of the same kind as `v`: what a field that checks only the type lets through."""
    if isinstance(v, bool) or v is None:
        return st.sampled_from([True, False, None])
    if isinstance(v, int):
        return st.sampled_from(EDGE_INTS)
    if isinstance(v, float):
        return st.sampled_from(EDGE_FLOATS)
    if isinstance(v, str):
        return weighted((16, st.sampled_from(EDGE_TEXTS + NAMES)), (4, st.binary(max_size=8)), (1, giant))
    if isinstance(v, list):
        return weighted((6, st.lists(anything, max_size=3)), (1, deep))
    return st.dictionaries(texts | ints | st.binary(max_size=4), anything, min_size=1, max_size=3)


def _nest(n: int):
    v: object = "core"
    for _ in range(n):
        v = [v]
    return v


# Chat messages from the grammar of PROTOCOL.md with odd values in every slot: the free-form parts of a message
# (content parts, reasoning, tool calls and their arguments, fields the renderer ignores) are stored in a session
# file, so they must be valid on their way in.
ROLES = ["system", "user", "developer", "assistant", "tool"]
part = st.fixed_dictionaries({"type": weighted((4, st.just("text")), (1, anything))},
                             optional={"text": weighted((3, texts), (1, anything))})
tool_call = st.fixed_dictionaries({"id": texts, "type": st.just("function"), "function": st.fixed_dictionaries(
    {"name": weighted((3, texts), (1, anything))},
    optional={"arguments": weighted((1, st.just('{"a": [1, {"b": null}]}')), (1, texts), (1, values))})})
message = st.fixed_dictionaries(
    {"role": weighted((8, st.sampled_from(ROLES)), (1, anything))},
    optional={"content": weighted((3, texts), (2, st.lists(part, max_size=3)), (1, anything)),
              "reasoning_content": weighted((3, texts), (1, anything)),
              "tool_calls": weighted((3, st.lists(tool_call, max_size=2)), (1, anything)),
              "tool_call_id": weighted((3, texts), (1, anything)), "name": anything})


# --- requests -----------------------------------------------------------------------------------------------------
#
# A template of valid arguments per method; a mutation then replaces, removes or adds fields, at the top or inside
# the nested maps (messages, context, tools, tool calls). Valid-looking generations keep max_tokens small.

def template(draw, method: str) -> dict:
    """Valid arguments of `method` (a few drawn: the session, the sampling, the extra chat messages)."""
    name = draw(st.sampled_from(NAMES[:5]))
    sampling = {"max_tokens": draw(st.integers(1, 6)), "temperature": draw(st.sampled_from([0, 0.7, 1.5])),
                "top_k": 40, "top_p": 0.9, "min_p": 0.05, "seed": 7, "stop": ["\n\n"], "logprobs": 2}
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}}
    if method == "hello":
        return {"protocol": "1.0", "client": "fuzz"}
    if method == "tokenize":
        return {"text": "hello fuzz", "specials": True}
    if method == "detokenize":
        return {"tokens": [1, 2, 3]}
    if method == "session.open":
        return {"name": name, "create": True}
    if method == "session.fork":
        return {"name": name, "new_name": draw(st.sampled_from(NAMES[:5]))}
    if method.startswith("session.") and method != "session.list":
        return {"name": name}
    if method == "generate":
        return {"prompt": "fuzz", "session": name, "stream": True, **sampling}
    if method == "chat":
        return {"messages": [{"role": "system", "content": "s"},
                             {"role": "user", "content": [{"type": "text", "text": "hi"}]},
                             {"role": "assistant", "content": "", "reasoning_content": "r", "tool_calls": [call]},
                             {"role": "tool", "tool_call_id": "c1", "content": "42"}]
                + draw(st.lists(message, max_size=3)),
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
                if draw(st.booleans()) else None, "thinking": "none", "session": name, **sampling}
    if method == "complete":
        return {"prefix": "def f(", "suffix": ")", "context": [{"path": "a.py", "text": "x = 1"}],
                "time_budget_ms": 2000, "session": name, **sampling}
    if method == "cancel":
        return {"id": draw(st.integers(0, 64))}
    return {}                             # status, session.list, shutdown, and methods that do not exist


@st.composite
def mutated(draw, v):
    """`v` with one random change somewhere inside it (maps and lists are entered at random)."""
    if isinstance(v, dict) and v and draw(st.integers(0, 2)):
        key = draw(st.sampled_from(sorted(v, key=repr)))
        return {**v, key: draw(mutated(v[key]))}
    if isinstance(v, list) and v and draw(st.integers(0, 2)):
        i = draw(st.integers(0, len(v) - 1))
        return v[:i] + [draw(mutated(v[i]))] + v[i + 1:]
    op = draw(st.sampled_from(["replace", "replace", "drop", "add", "nil"] if isinstance(v, dict) else ["replace"]))
    if op == "replace":
        return draw(weighted((1, edges_like(v)), (1, anything)))
    if op == "drop" and v:
        key = draw(st.sampled_from(sorted(v, key=repr)))
        return {k: x for k, x in v.items() if k != key}
    if op == "nil" and v:
        return {**v, draw(st.sampled_from(sorted(v, key=repr))): None}
    return {**v, draw(texts | ints): draw(anything)}


@st.composite
def request(draw):
    """A frame built around a request: a mutated template, an unknown method, or a request of the wrong shape."""
    method = draw(st.sampled_from(METHODS + METHODS + ("?",)))
    if method == "?":
        method = draw(texts)
    params = template(draw, method)
    # Mostly one change: a request broken in one place tests that place; more changes test the combinations.
    for _ in range(draw(st.sampled_from([0, 1, 1, 1, 2, 2, 3, 6]))):
        params = draw(mutated(params))
    msgid = draw(st.integers(0, 40) | ints)
    shape = draw(st.sampled_from(["request"] * 6 + ["no_args", "bare_map", "arity", "kind", "scalar"]))
    if shape == "no_args":
        return [0, msgid, method, []]
    if shape == "bare_map":
        return [0, msgid, method, params]
    if shape == "arity":
        return [0, msgid, method, [params]][:draw(st.integers(0, 3))] + draw(st.lists(values, max_size=2))
    if shape == "kind":
        return [draw(ints | values), msgid, method, [params]]
    if shape == "scalar":
        return draw(values)
    return [0, msgid, method, [params]]


def is_valid_shutdown(frame) -> bool:
    return (isinstance(frame, list) and len(frame) == 4 and frame[0] == 0 and frame[2] == "shutdown"
            and frame[3] in ([], [{}]) and isinstance(frame[1], int) and 0 <= frame[1] < 2**32)


@st.composite
def cancel_flood(draw):
    """Many cancels at once: of requests of the same batch, of nothing, and of ids no one could have used."""
    n = draw(st.integers(10, 100))
    return [[0, 1000 + i, "cancel", [{"id": draw(st.integers(0, 60) | ints)}]] for i in range(n)]


# --- bytes that are not a well-framed message -----------------------------------------------------------------------

@st.composite
def bad_bytes(draw):
    """Bytes that end the connection (or leave a partial message the daemon keeps waiting for)."""
    kind = draw(st.sampled_from(["random", "reserved", "flipped", "truncated", "utf8", "deep", "over_cap",
                                 "map_key"]))
    good = msgpack.packb([0, 1, "hello", [{"protocol": "1.0", "client": "fuzz"}]])
    if kind == "random":
        return draw(st.binary(min_size=1, max_size=256))
    if kind == "reserved":
        return good + b"\xc1"
    if kind == "flipped":
        data = bytearray(good)
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
        return bytes(data)
    if kind == "truncated":
        return good[:draw(st.integers(1, len(good) - 1))]
    if kind == "utf8":
        return b"\x94\x00\x01\xa5hello\x91\x81\xa8protocol\xa3\xff\xfe\xfd"
    if kind == "deep":          # nesting past msgpack's stack (and far past it)
        n = draw(st.sampled_from([600, 1000, 1025, 5000, 100_000, 1 << 20]))
        return b"\x94\x00\x01\xa8tokenize\x91\x81\xa4text" + b"\x91" * n + b"\xc0"
    if kind == "map_key":       # an array used as a map key: valid msgpack, not a valid Python dict
        return b"\x94\x00\x01\xa5hello\x91\x81\x91\x01\x01"
    # Over the cap, by a declared length or by real bytes.
    if draw(st.booleans()):
        return b"\x94\x00\x05\xa8tokenize\x91\x81\xa4text\xdb" + (MAX_MESSAGE_BYTES + 1).to_bytes(4, "big")
    return msgpack.packb([0, 5, "tokenize", [{"text": "x" * (MAX_MESSAGE_BYTES + 1)}]])


@st.composite
def batch(draw):
    """(frames, bad): frames sent on one connection, then optionally bytes that end it."""
    frames = draw(st.lists(request(), min_size=4, max_size=64))
    if draw(st.integers(0, 19)) == 0:
        frames += draw(cancel_flood())
    frames = [f for f in frames if not is_valid_shutdown(f)]
    bad = draw(bad_bytes()) if draw(st.integers(0, 5)) == 0 else None
    return frames, bad


# --- the oracle -----------------------------------------------------------------------------------------------------

class Violation(AssertionError):
    pass


def check_message(msg, sent_ids: set | None) -> str | None:
    """The error code of a response (None: success); notifications return "note". Raises Violation. A msgid must
    be one that was sent (any, for random bytes: sent_ids None)."""
    def known(msgid) -> bool:
        return msgid in sent_ids if sent_ids is not None else isinstance(msgid, int)

    if not isinstance(msg, list) or not msg or msg[0] not in (1, 2):
        raise Violation(f"not a response or notification: {msg!r:.200}")
    if msg[0] == 2:
        if not (len(msg) == 3 and msg[1] == "stream" and isinstance(msg[2], list) and len(msg[2]) == 1
                and isinstance(msg[2][0], dict) and known(msg[2][0].get("id"))):
            raise Violation(f"bad notification: {msg!r:.200}")
        return "note"
    if len(msg) != 4 or not (msg[1] is None or known(msg[1])):
        raise Violation(f"bad response: {msg!r:.200}")
    err = msg[2]
    if err is None:
        return None
    if not (isinstance(err, dict) and err.get("code") in ERROR_CODES and isinstance(err.get("message"), str)
            and len(err["message"].splitlines()) == 1):
        raise Violation(f"bad error: {err!r:.300}")
    if err["code"] == "internal":
        raise Violation(f"internal error for a fuzzed frame: {err!r:.300}")
    return err["code"]


def exchange(path, frames: list, bad: bytes | None, stats: Counter) -> None:
    """Send one batch on a fresh connection and check what comes back."""
    c = Client(path, timeout=BATCH_TIMEOUT_S)
    sent_ids = {f[1] for f in frames if isinstance(f, list) and len(f) > 1 and isinstance(f[1], int)}
    payload = b"".join(msgpack.packb(f, use_bin_type=True) for f in frames)
    stats["frames"] += len(frames)
    try:
        if bad is None:
            c.sock.sendall(payload)
            _read(c, len(frames), sent_ids, stats, until_eof=False)
        else:
            stats["frames"] += 1
            stats["bad_bytes_frames"] += 1
            try:
                c.sock.sendall(payload + bad)
                c.sock.shutdown(socket.SHUT_WR)       # a partial message then ends: the daemon must just close
            except (BrokenPipeError, ConnectionResetError):
                pass                                  # it closed while we were still sending (over the cap)
            _read(c, None, None, stats, until_eof=True)
    finally:
        c.close()


def _read(c: Client, n_responses: int | None, sent_ids: set | None, stats: Counter, until_eof: bool) -> None:
    got = 0
    deadline = time.monotonic() + BATCH_TIMEOUT_S
    while until_eof or got < n_responses:
        if time.monotonic() > deadline:
            raise Violation(f"{n_responses - got} of {n_responses} requests unanswered after {BATCH_TIMEOUT_S} s")
        try:
            data = c.sock.recv(1 << 20)
        except ConnectionResetError:
            data = b""
        if not data:
            if until_eof:
                return
            raise Violation(f"the daemon closed a connection with {n_responses - got} requests unanswered")
        c.unpacker.feed(data)
        for msg in c.unpacker:
            code = check_message(msg, sent_ids)
            if code != "note":
                got += 1
                stats[f"answer:{code or 'ok'}"] += 1


class Witness:
    """What must survive every batch: a connection opened at the start, two sessions whose content is known, and
    the writer that saves sessions (a probe session goes to disk and is read back each time)."""

    def __init__(self, d: Daemon):
        self.d = d
        self.conn = d.client()
        self.conn.call("hello", protocol="1.0", client="witness")
        self.conn.call("chat", session=WITNESSES[0], messages=[{"role": "user", "content": "remember me"}],
                       thinking="none", max_tokens=4, temperature=0)
        self.conn.call("generate", session=WITNESSES[1], prompt="witness", max_tokens=4, temperature=0)
        self.state = self.sessions(WITNESSES)
        self.probes = 0

    def sessions(self, names) -> dict:
        out = {}
        for name in names:
            info = self.conn.call("session.info", name=name)
            out[name] = (info["tokens"], info["messages"])
        return out

    def check(self) -> None:
        if self.d.proc.poll() is not None:
            raise Violation(f"the daemon exited ({self.d.proc.returncode})")
        fresh = self.d.client()
        assert fresh.call("hello", protocol="1.0")["protocol"] == "1.0"
        fresh.close()
        assert self.conn.call("hello", protocol="1.0")["protocol"] == "1.0"
        if self.sessions(WITNESSES) != self.state:
            raise Violation("a witness session changed")

    def check_saving(self) -> None:
        """A new session through the disk and back: session.close waits for the writer thread, then session.info
        reads the file."""
        self.probes += 1
        probe = f"zz-probe-{self.probes}"
        self.conn.call("chat", session=probe, messages=[{"role": "user", "content": f"probe {self.probes}"}],
                       thinking="none", max_tokens=2, temperature=0)
        live = self.sessions([probe])
        self.conn.call("session.close", name=probe)
        if self.sessions([probe]) != live:
            raise Violation("a session read back from disk differs from what was saved")
        self.conn.call("session.delete", name=probe)


# --- the run --------------------------------------------------------------------------------------------------------

def fuzz(d: Daemon, n_frames: int, seed: int, examples_per_round: int = 200) -> Counter:
    """Fuzz until at least `n_frames` frames were sent; returns the counters. Raises Violation (after hypothesis
    has shrunk the failing batch) when a promise is broken."""
    stats: Counter = Counter()
    witness = Witness(d)
    rounds = 0
    while stats["frames"] < n_frames:
        @hseed(seed * 1_000_003 + rounds)
        @settings(max_examples=examples_per_round, database=None, deadline=None, derandomize=False,
                  suppress_health_check=list(HealthCheck), phases=[Phase.generate, Phase.shrink])
        @given(batch())
        def one(b):
            frames, bad = b
            exchange(d.socket, frames, bad, stats)
            stats["batches"] += 1
            witness.check()
            if stats["batches"] % SAVE_CHECK_EVERY == 0:
                witness.check_saving()

        one()
        rounds += 1
    witness.conn.close()
    return stats


def start(home: Path, model: str) -> Daemon:
    return Daemon(home, model, *SERVE_ARGS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a tiny q2 GGUF (default: generated)")
    ap.add_argument("--frames", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="also write the figures (markdown) here")
    a = ap.parse_args()
    home = short_home()
    model = a.model or tiny_q2(home)
    d = start(home, model)
    t0 = time.monotonic()
    try:
        stats = fuzz(d, a.frames, a.seed)
        rss = d.memory("VmHWM")
        assert d.stop() == 0, "the daemon did not stop cleanly"
        assert "Traceback" not in d.log(), f"a traceback in the daemon's log:\n{d.log()[-3000:]}"
    finally:
        d.kill()
    elapsed = time.monotonic() - t0
    answers = {k.split(":", 1)[1]: v for k, v in sorted(stats.items()) if k.startswith("answer:")}
    lines = [f"## Protocol fuzz ({date.today()}, {platform.node()}, {platform.machine()})", "",
             f"* frames sent: {stats['frames']:,} in {stats['batches']:,} batches ({elapsed:.0f} s, seed "
             f"{a.seed}); {stats['bad_bytes_frames']:,} of them undecodable or over the cap",
             "* answers: " + ", ".join(f"{k} {v:,}" for k, v in answers.items()),
             "* internal errors: 0; unanswered requests: 0; daemon restarts: 0; witness sessions changed: 0; "
             "tracebacks in the log: 0",
             f"* daemon peak RSS: {rss / 2**20:.0f} MiB; exit status after SIGTERM: 0", ""]
    print("\n".join(lines))
    if a.out:
        Path(a.out).write_text("\n".join(lines))
    shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
