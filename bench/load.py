"""Load: many concurrent clients mixing generate, chat (in sessions), complete and cancel against one daemon for a
bounded time. Every request must be answered, or cleanly cancelled, with zero protocol errors; the daemon's
memory must stay bounded; and after a restart every session must load.

    PYTHONPATH=daemon:client python bench/load.py [--clients 32] [--seconds 120] [--out FILE]

Starts `python -m ds4d serve` on the tiny q2 model (tests/daemon_harness.py) with small prompt-cache budgets, so
that RAM eviction, disk spills and page collection all run under the load. Each client is a thread with its own
connection and session, looping over a random mix of operations:
  * generate: an anonymous generation of 1-24 tokens;
  * chat: one more turn of the client's own session;
  * complete: an editor completion in the client's own file session, sometimes superseded at once by a newer one
    (the older must then answer `cancelled`);
  * cancel: a long generation cancelled after its first streamed piece.
The oracle: no error response at all, every response after its request's notifications, streamed pieces that add
up to the result, finish reasons that fit the operation. The daemon's resident memory is sampled all along
(VmRSS) and its peak read at the end (VmHWM). tests/test_reliability.py runs a few seconds of the same load.
"""

from __future__ import annotations

import argparse
import platform
import random
import shutil
import sys
import threading
import time
from collections import Counter
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from daemon_harness import Client, Daemon, short_home, tiny_q2  # noqa: E402

SERVE_ARGS = ("--ram-cache-mb", "16", "--disk-cache-mb", "24")
OPS = ("generate", "chat", "complete", "cancel")
WORDS = "the a daemon socket model token cache session stream cancel load memory page disk".split()
FINISH = {"generate": {"length", "eos", "stop"}, "chat": {"length", "eos", "stop"},
          "complete": {"length", "eos", "stop"}, "superseded": {"cancelled"},
          "cancel": {"cancelled", "length", "eos", "stop"}}


class ProtocolError(AssertionError):
    pass


def streamed(notes: list[dict]) -> str:
    return "".join(n.get("text", "") for n in notes if n["kind"] == "content")


def finish(c: Client, msgid: int, op: str, tally: Counter) -> None:
    """Wait for a request's response and check it against the oracle."""
    msg = c.wait(msgid)
    notes = c.notes.pop(msgid, [])
    if msg[2] is not None:
        raise ProtocolError(f"{op}: error response {msg[2]}")
    r = msg[3]
    if r["finish_reason"] not in FINISH[op]:
        raise ProtocolError(f"{op}: finish_reason {r['finish_reason']!r}")
    if streamed(notes) != r["text"]:
        raise ProtocolError(f"{op}: the streamed pieces do not add up to the result")
    tally[f"{op}:{r['finish_reason']}"] += 1
    tally["completion_tokens"] += r["usage"]["completion_tokens"]
    del c.responses[msgid]


def client_loop(path, k: int, deadline: float, seed: int, tally: Counter, errors: list) -> None:
    rng = random.Random(seed * 1000 + k)
    c = Client(path, timeout=120)
    try:
        c.call("hello", protocol="1.0", client=f"load-{k}")
        turn = 0
        while time.monotonic() < deadline:
            op = rng.choice(OPS)
            # Up to a few hundred tokens: sessions and cached prefixes soon fill pages of compressed rows (the
            # ratio-4 layers fill a 64-row page every 256 tokens), which the disk tier stores and collects.
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 200)))
            t0 = time.monotonic()
            if op == "generate":
                finish(c, c.send("generate", prompt=text, max_tokens=rng.randint(1, 24), temperature=1.0), op, tally)
            elif op == "chat":
                turn += 1
                finish(c, c.send("chat", session=f"load-{k}", messages=[{"role": "user", "content": f"{turn}: {text}"}],
                                 thinking="none", max_tokens=rng.randint(1, 16)), op, tally)
            elif op == "complete":
                first = c.send("complete", prefix=f"def f{turn}({text}", suffix=")\n", session=f"load-{k}-file",
                               max_tokens=rng.randint(1, 16))
                if rng.random() < 0.3:           # the user typed on: a newer completion supersedes the first
                    second = c.send("complete", prefix=f"def f{turn}({text}, x", suffix=")\n",
                                    session=f"load-{k}-file", max_tokens=8)
                    finish(c, first, "superseded", tally)
                    first = second
                finish(c, first, "complete", tally)
            else:
                i = c.send("generate", prompt=text, max_tokens=400, temperature=1.0)
                while not any(n["kind"] == "content" for n in c.notes.get(i, [])) and i not in c.responses:
                    c.pump()
                if c.call("cancel", id=i)["cancelled"]:
                    tally["cancel_sent"] += 1
                finish(c, i, "cancel", tally)
            tally[f"latency_ms:{op}"] += int((time.monotonic() - t0) * 1000)
            tally[f"requests:{op}"] += 1
    except Exception as e:                       # a protocol error, a timeout, a closed connection: all failures
        errors.append(f"client {k}: {type(e).__name__}: {e}")
    finally:
        c.close()


def run_load(d: Daemon, clients: int, seconds: float, seed: int = 0) -> dict:
    """Run the load; returns the figures. Raises AssertionError on any failure."""
    tally: Counter = Counter()
    errors: list[str] = []
    rss: list[tuple[float, int]] = []
    t0 = time.monotonic()
    deadline = t0 + seconds
    threads = [threading.Thread(target=client_loop, args=(d.socket, k, deadline, seed, tally, errors))
               for k in range(clients)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        rss.append((time.monotonic() - t0, d.memory("VmRSS")))
        time.sleep(0.5)
    for t in threads:
        t.join()
    assert not errors, "\n".join(errors)
    watcher = d.client()
    status = watcher.call("status")
    watcher.close()
    assert status["queue"] == 0, f"{status['queue']} requests still queued after every client finished"
    requests = sum(v for k, v in tally.items() if k.startswith("requests:"))
    return {"clients": clients, "seconds": time.monotonic() - t0, "requests": requests, "tally": dict(tally),
            "rss": rss, "peak_rss": d.memory("VmHWM"), "status": status}


def check_sessions_reload(home: Path, model: str, clients: int) -> int:
    """Restart on the same cache: every client's chat session loads, no snapshot is unusable. Returns how many."""
    d = Daemon(home, model, *SERVE_ARGS)
    try:
        c = d.client()
        listed = {s["name"]: s for s in c.call("session.list")["sessions"]}
        bad = [n for n, s in listed.items() if s.get("error")]
        assert not bad, f"unreadable session files after the load: {bad}"
        for k in range(clients):
            if f"load-{k}" in listed:
                assert c.call("session.open", name=f"load-{k}", create=False)["tokens"] > 0
        c.close()
        assert d.stop() == 0
        for word in ("unusable", "ignoring prefix snapshot", "cannot save", "Traceback"):
            assert word not in d.log(), f"{word!r} in the log of the restarted daemon:\n{d.log()[-3000:]}"
        return sum(1 for k in range(clients) if f"load-{k}" in listed)
    finally:
        d.kill()


def report(fig: dict, reloaded: int, weights: int) -> list[str]:
    t = fig["tally"]
    mem = fig["status"]["memory"]
    n = {op: t.get(f"requests:{op}", 0) for op in OPS}
    ops = ", ".join(f"{op} {n[op]:,} (mean {t.get(f'latency_ms:{op}', 0) / max(1, n[op]):.0f} ms)" for op in OPS)
    reasons = ", ".join(f"{k} {v:,}" for k, v in sorted(t.items()) if ":" in k and k.split(":")[0] in FINISH)
    series = fig["rss"]
    quarter = [max(r for s, r in series if s <= fig["seconds"] * q / 4) for q in (1, 2, 3, 4)]
    return [f"## Load ({date.today()}, {platform.node()}, {platform.machine()}, {_cores()} cores)", "",
            f"* {fig['clients']} concurrent clients for {fig['seconds']:.0f} s: {fig['requests']:,} requests "
            f"({fig['requests'] / fig['seconds']:.1f}/s), {t['completion_tokens']:,} generated tokens",
            f"* by operation: {ops}",
            f"* outcomes: {reasons}",
            "* protocol errors: 0; unanswered requests: 0; error responses: 0; queue after the run: 0",
            f"* daemon peak RSS (VmHWM): {fig['peak_rss'] / 2**20:.0f} MiB (weights {weights / 2**20:.0f} MiB); "
            f"highest VmRSS by quarter of the run: " + ", ".join(f"{q / 2**20:.0f}" for q in quarter) + " MiB; "
            f"at the end {fig['status']['sessions']} sessions hold {mem['sessions'] / 2**20:.0f} MiB of state "
            f"(the --session-mem-mb budget bounds it) and the RAM prompt cache {mem['ram_cache'] / 2**20:.0f} MiB "
            f"(budget {SERVE_ARGS[1]} MiB)",
            f"* after a restart on the same cache: all {reloaded} chat sessions load, no unusable snapshot", ""]


def _cores() -> int:
    import os
    return os.cpu_count() or 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a tiny q2 GGUF (default: generated)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="also write the figures (markdown) here")
    a = ap.parse_args()
    home = short_home()
    try:
        model = a.model or tiny_q2(home)
        d = Daemon(home, model, *SERVE_ARGS)
        try:
            fig = run_load(d, a.clients, a.seconds, a.seed)
            assert d.stop() == 0
        except AssertionError:
            print(f"the daemon's log ends:\n{d.log()[-4000:]}", file=sys.stderr)     # the home is removed below
            raise
        finally:
            d.kill()
        reloaded = check_sessions_reload(home, model, a.clients)
        lines = report(fig, reloaded, fig["status"]["memory"]["weights"])
        print("\n".join(lines))
        if a.out:
            Path(a.out).write_text("\n".join(lines))
    finally:
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
