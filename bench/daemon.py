"""Daemon benchmark (tiny model): `hello` round trips over the socket, the per-token cost of streaming, and
aggregate throughput with 1, 4 and 16 clients against the same work run in-process on the engine.

    PYTHONPATH=daemon:client python bench/daemon.py [--model tiny.gguf] [--out docs/DAEMON.md]

Starts `python -m ds4d serve` as a real process on a temporary socket and talks raw msgpack to it. Prints a
markdown report (and writes it with --out). Timings are measured here, never asserted by tests.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

import msgpack

import ds4d  # noqa: F401  (first: sets single-threaded BLAS before numpy loads)
from ds4d.engine import Engine, Job
from ds4d.model import open_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from daemon_harness import Daemon, tiny_q2  # noqa: E402

# min_p 0 and a high temperature keep the random model away from EOS: every request decodes max_tokens.
SAMPLING = {"temperature": 1.5, "min_p": 0.0}


class Client:
    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.unpacker = msgpack.Unpacker(raw=False)
        self.msgid = 0

    def call(self, method: str, on_note=None, **params):
        self.msgid += 1
        self.sock.sendall(msgpack.packb([0, self.msgid, method, [params]]))
        while True:
            for msg in self.unpacker:
                if msg[0] == 1 and msg[1] == self.msgid:
                    assert msg[2] is None, msg[2]
                    return msg[3]
                if on_note is not None:
                    on_note(msg)
            data = self.sock.recv(1 << 20)
            assert data, "the daemon closed the connection"
            self.unpacker.feed(data)


def percentiles(samples_ns: list[int]) -> tuple[float, float, float]:
    s = sorted(samples_ns)
    return s[len(s) // 2] / 1e3, s[int(len(s) * 0.99)] / 1e3, statistics.fmean(s) / 1e3


def hello_round_trips(path: str, n: int) -> list[int]:
    """Nanoseconds per `hello` request -> response, one request in flight."""
    c = Client(path)
    msg = msgpack.packb([0, 1, "hello", [{"protocol": "1.0", "client": "bench"}]])
    out = []
    for i in range(n + 200):
        t0 = time.perf_counter_ns()
        c.sock.sendall(msg)
        while True:
            c.unpacker.feed(c.sock.recv(65536))
            if any(True for _ in c.unpacker):
                break
        if i >= 200:                                 # warm-up
            out.append(time.perf_counter_ns() - t0)
    return out


ECHO = """
import socket, sys
s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(1); print("ready", flush=True)
c, _ = s.accept()
while (d := c.recv(65536)):
    c.sendall(d)
"""


def socket_floor(tmp: Path, n: int) -> list[int]:
    """The same ping-pong against a blocking Python echo server: what the kernel and two processes cost."""
    path = str(tmp / "echo.sock")
    proc = subprocess.Popen([sys.executable, "-c", ECHO, path], stdout=subprocess.PIPE, text=True)
    proc.stdout.readline()
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    msg = msgpack.packb([0, 1, "hello", [{"protocol": "1.0", "client": "bench"}]])
    out = []
    for i in range(n + 200):
        t0 = time.perf_counter_ns()
        s.sendall(msg)
        s.recv(65536)
        if i >= 200:
            out.append(time.perf_counter_ns() - t0)
    s.close()
    proc.wait()
    return out


def main_thread_cpu_ns(pid: int) -> int:
    """CPU time of a process's main thread (the daemon's runs its event loop); Linux schedstat, ns resolution."""
    with open(f"/proc/{pid}/task/{pid}/schedstat") as f:
        return int(f.read().split()[0])


def streaming_cost(path: str, pid: int, tokens: int, rounds: int) -> dict:
    """The same request (same seed, same tokens) with and without streaming: the loop's CPU time and the wall
    time per token that streaming adds."""
    c = Client(path)
    cpu = {True: [], False: []}
    wall = {True: [], False: []}
    notes = []
    for r in range(rounds):
        for stream in (True, False):
            c0, t0 = main_thread_cpu_ns(pid), time.perf_counter_ns()
            res = c.call("generate", on_note=notes.append, prompt="Streaming benchmark.", max_tokens=tokens,
                         seed=7, stream=stream, **SAMPLING)
            wall[stream].append(time.perf_counter_ns() - t0)
            cpu[stream].append(main_thread_cpu_ns(pid) - c0)
            assert res["usage"]["completion_tokens"] == tokens
    med = {k: {s: statistics.median(v[s]) / tokens / 1e3 for s in (True, False)} for k, v in
           (("cpu", cpu), ("wall", wall))}
    return {"tokens": tokens, "rounds": rounds, "notes_per_token": len(notes) / rounds / tokens, **med}


def daemon_throughput(path: str, pid: int, clients: int, tokens: int) -> tuple[float, float, float]:
    """(aggregate tokens/s, median time to first token in ms, event-loop CPU µs per token) with `clients`
    connections streaming at once."""
    conns = [Client(path) for _ in range(clients)]
    got, first = [0] * clients, [0.0] * clients
    barrier = threading.Barrier(clients + 1)

    def run(k: int) -> None:
        barrier.wait()
        t0 = time.perf_counter()

        def note(msg):
            if msg[2][0]["kind"] == "content" and not first[k]:
                first[k] = time.perf_counter() - t0

        r = conns[k].call("generate", on_note=note, prompt=f"Client {k} writes a long story.", max_tokens=tokens,
                          seed=k, **SAMPLING)
        got[k] = r["usage"]["completion_tokens"]

    threads = [threading.Thread(target=run, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    c0 = main_thread_cpu_ns(pid)
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    return sum(got) / elapsed, statistics.median(first) * 1e3, (main_thread_cpu_ns(pid) - c0) / sum(got) / 1e3


def wakeup_floor(n: int = 300) -> float:
    """Main-thread CPU µs for the smallest cross-thread wake-up of an event loop, on this machine: a worker that
    mixes Python and numpy (like the engine) calls call_soon_threadsafe with a callback that does nothing."""
    import numpy as np
    a = np.random.default_rng(0).random((256, 256), dtype=np.float32)

    async def measure() -> float:
        loop = asyncio.get_running_loop()
        done = asyncio.Event()
        count = [0]

        def tick():
            count[0] += 1
            if count[0] == n:
                done.set()

        def worker():
            for _ in range(n):
                t = time.perf_counter()
                while time.perf_counter() - t < 0.005:
                    a @ a
                loop.call_soon_threadsafe(tick)

        c0 = main_thread_cpu_ns(os.getpid())
        th = threading.Thread(target=worker)
        th.start()
        await done.wait()
        th.join()
        return (main_thread_cpu_ns(os.getpid()) - c0) / n / 1e3

    try:
        import uvloop
        factory = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(measure())


def engine_throughput(model, clients: int, tokens: int) -> float:
    """The same requests submitted to an engine in this process: no socket, no daemon."""
    e = Engine(model, cache_dir=None, ctx=4096).start()
    e.call("generate", prompt="warm up", max_tokens=4, temperature=0)
    done = [threading.Event() for _ in range(clients)]
    got = [0] * clients
    t0 = time.perf_counter()
    for k in range(clients):
        def finished(r, k=k):
            got[k] = r["usage"]["completion_tokens"]
            done[k].set()
        e.submit(Job("generate", {"prompt": f"Client {k} writes a long story.", "max_tokens": tokens, "seed": k,
                                  **SAMPLING}, on_done=finished))
    for d in done:
        d.wait()
    elapsed = time.perf_counter() - t0
    e.stop()
    return sum(got) / elapsed


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        import uvloop
        loop = f"uvloop {uvloop.__version__}"
    except ImportError:
        loop = "asyncio (no uvloop)"
    return (f"{cpu}, {os.cpu_count()} cores, Linux {platform.release()}, Python {platform.python_version()}, "
            f"msgpack {'.'.join(map(str, msgpack.version))}, {loop}; load average {os.getloadavg()[0]:.1f} at the "
            f"start (other work on the machine shows in the timings)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a tiny model (default: generate the q2 tiny model in a temp dir)")
    ap.add_argument("--hellos", type=int, default=5000, help="hello round trips to time (default 5000)")
    ap.add_argument("--tokens", type=int, default=128, help="tokens per request (default 128)")
    ap.add_argument("--out", help="write the report to this markdown file")
    args = ap.parse_args()
    tmp_dir = tempfile.TemporaryDirectory(prefix="ds4b-", dir="/tmp")
    tmp = Path(tmp_dir.name)
    path = args.model or tiny_q2(tmp)
    daemon = Daemon(tmp, path, "--log-level", "warning", "--ctx", "4096")
    sock, pid = str(daemon.socket), daemon.proc.pid
    try:
        idle = percentiles(hello_round_trips(sock, args.hellos))
        floor = percentiles(socket_floor(tmp, args.hellos))
        # hello while 16 other clients stream: how responsive the loop stays under load
        load = threading.Thread(target=daemon_throughput, args=(sock, pid, 16, args.tokens * 2))
        load.start()
        time.sleep(0.5)
        busy = percentiles(hello_round_trips(sock, 1000))
        load.join()
        stream = streaming_cost(sock, pid, args.tokens, rounds=7)
        daemon_rates = {n: daemon_throughput(sock, pid, n, args.tokens) for n in (1, 4, 16)}
        Client(sock).call("shutdown")
        daemon.wait(60)
    finally:
        daemon.kill()
    wake = wakeup_floor()
    model = open_model(path)
    engine_rates = {n: engine_throughput(model, n, args.tokens) for n in (1, 4, 16)}

    us = "{:,.0f}".format
    rows = [f"| {n} | {daemon_rates[n][0]:,.1f} | {engine_rates[n]:,.1f} | {daemon_rates[n][0] / engine_rates[n]:.2f} "
            f"| {daemon_rates[n][1]:,.1f} | {daemon_rates[n][2]:,.1f} |" for n in (1, 4, 16)]
    added_cpu = stream["cpu"][True] - stream["cpu"][False]
    added_wall = stream["wall"][True] - stream["wall"][False]
    verdict = {True: "met", False: "**not met**"}
    report = [
        f"# Daemon benchmark ({date.today().isoformat()})", "",
        f"Machine: {machine()}. `bench/daemon.py`: `ds4d serve` as a separate process on a Unix socket, the tiny "
        f"q2 model (6 layers, hidden 256, real vocabulary), CPU backend; clients speak raw msgpack from Python.", "",
        "| target (PERFORMANCE.md) | measured | |", "|---|---:|---|",
        f"| `hello` round trip p50 under 200 µs | {us(idle[0])} µs | {verdict[idle[0] < 200]} |",
        f"| streaming adds under 50 µs per token (event-loop CPU, one stream) | {added_cpu:,.0f} µs | "
        f"{verdict[added_cpu < 50]} |",
        f"| the same, per token with 16 streams | {daemon_rates[16][2]:,.0f} µs | "
        f"{verdict[daemon_rates[16][2] < 50]} |",
        f"| aggregate rate through the daemon vs in-process, 1 / 4 / 16 clients | "
        f"{' / '.join(f'{daemon_rates[n][0] / engine_rates[n]:.2f}' for n in (1, 4, 16))} | |", "",
        "## `hello` round trip (target: p50 under 200 µs)", "",
        "| | p50 µs | p99 µs | mean µs |", "|---|---:|---:|---:|",
        f"| `hello`, daemon idle ({args.hellos:,} round trips) | {us(idle[0])} | {us(idle[1])} | {us(idle[2])} |",
        f"| `hello` while 16 clients stream (1,000) | {us(busy[0])} | {us(busy[1])} | {us(busy[2])} |",
        f"| floor: the same bytes echoed by a blocking Python server | {us(floor[0])} | {us(floor[1])} | "
        f"{us(floor[2])} |", "",
        "## Streaming overhead per token (target: under 50 µs)", "",
        f"One request of {stream['tokens']} tokens (fixed seed: the same tokens every time), with and without "
        f"streaming, median of {stream['rounds']} rounds each; {stream['notes_per_token']:.2f} notifications per "
        f"token when streaming.", "",
        "| per token | streaming | not streaming | added by streaming |", "|---|---:|---:|---:|",
        f"| event-loop CPU time (daemon main thread, schedstat) | {stream['cpu'][True]:,.1f} µs | "
        f"{stream['cpu'][False]:,.1f} µs | **{added_cpu:,.1f} µs** |",
        f"| wall time per token seen by the client | {stream['wall'][True]:,.0f} µs | "
        f"{stream['wall'][False]:,.0f} µs | {added_wall:,.1f} µs |", "",
        f"For scale: on this machine the smallest possible cross-thread wake-up of an event loop (a worker mixing "
        f"Python and numpy calls `call_soon_threadsafe` with a callback that does nothing) costs the loop thread "
        f"**{wake:,.1f} µs** of CPU. A lone stream pays one such wake-up per token plus the packing and the write, "
        f"run with cold caches after each model step; with many streams one wake-up and one write per connection "
        f"carry a whole decode step (the last column below).", "",
        "Where that time goes (`perf record` on the loop thread, once, on this machine): about 40% is the kernel",
        "switching threads, almost all of it hand-offs of the GIL. The tiny model's engine thread runs Python",
        "most of each step, so the loop thread, woken for a token, usually waits for the GIL and then hands it",
        "back (about 7 futex calls per token); msgpack packing and the socket write are a few percent. An engine",
        "thread that spends its step inside GIL-free native calls (the GPU backend) should leave most of these",
        "hand-offs out; not measured yet. What a user sees is the wall-time row and the 1-client ratio below; on",
        "this shared 2-core machine both move by several percent from run to run.", "",
        f"## Aggregate throughput ({args.tokens} tokens per client, all starting together)", "",
        "| clients | daemon tok/s | in-process engine tok/s | daemon / engine | median time to first token ms | "
        "event-loop CPU per token µs |", "|---:|---:|---:|---:|---:|---:|", *rows, "",
        "The in-process column runs the same requests on an `Engine` in the benchmark's own process (no socket,",
        "no event loop): the ratio is what serving through the daemon costs at the aggregate level.", "",
    ]
    text = "\n".join(report)
    print(text)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
