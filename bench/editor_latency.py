"""Editor completion latency: time to the first token and to the whole completion for a `complete` whose
4K-token prefix is cold (never seen) or cached (the same prefix plus one typed character, as after a keystroke).

    PYTHONPATH=daemon:client python bench/editor_latency.py [--model tiny.gguf | --socket PATH] [--rounds 5]

Starts `python -m ds4d serve` on a temporary socket with the tiny q2 model (generated unless --model is given),
or measures a daemon already running (--socket: another model or backend). Each round sends what an editor
plugin sends (prefix, a 10-line suffix, 64 tokens at temperature 0, streaming) twice: cold, with a first line
that no earlier request had, then cached. It does so from Python (raw msgpack: the floor) and, when `nvim` is
installed, through the Neovim plugin's own client in headless Neovim, the two taking turns. Prints a markdown
report; timings are measured here, never asserted by tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgpack

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from daemon_harness import Daemon, tiny_q2  # noqa: E402
PREFIX_TOKENS = 4096
MAX_TOKENS = 64       # the daemon's default for `complete`, and the plugins'


def source_lines(n: int) -> list[str]:
    """Deterministic Python-looking code: what a completion's prefix usually is."""
    out = []
    for i in range(n):
        out += [f"def scale_{i}(values, factor={i % 7 + 1}):",
                f'    """Multiply every value by {i % 7 + 1} and drop the ones above {i * 3}."""',
                f"    return [v * factor for v in values if v * factor <= {i * 3}]", ""]
    return out


class Raw:
    """The floor: a Python client speaking raw msgpack-rpc, timing from the send."""

    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.unpacker = msgpack.Unpacker(raw=False)
        self.msgid = 0

    def request(self, method: str, **params) -> tuple[dict, float | None, float]:
        """(result, seconds to the first content piece, seconds to the response)."""
        self.msgid += 1
        t0 = time.perf_counter()
        self.sock.sendall(msgpack.packb([0, self.msgid, method, [params]]))
        first = None
        while True:
            for msg in self.unpacker:
                if msg[0] == 2 and msg[2][0]["kind"] == "content" and first is None:
                    first = time.perf_counter() - t0
                elif msg[0] == 1 and msg[1] == self.msgid:
                    assert msg[2] is None, msg[2]
                    return msg[3], first, time.perf_counter() - t0
            data = self.sock.recv(1 << 20)
            assert data, "the daemon closed the connection"
            self.unpacker.feed(data)


def prefix_of(path: str) -> str:
    """About PREFIX_TOKENS tokens of code (whole lines), measured with the daemon's tokenizer."""
    c = Raw(path)
    lines = source_lines(400)
    lo, hi = 1, len(lines)
    while lo < hi:                        # the longest prefix of lines within PREFIX_TOKENS tokens
        mid = (lo + hi + 1) // 2
        n = len(c.request("tokenize", text="\n".join(lines[:mid]) + "\n")[0]["tokens"])
        lo, hi = (mid, hi) if n <= PREFIX_TOKENS else (lo, mid - 1)
    return "\n".join(lines[:lo]) + "\n"


def round_requests(prefix: str, tag: str) -> list[tuple[str, dict]]:
    """One round: (kind, params) of a cold request, then of the cached one after a typed character."""
    suffix = "\n".join(source_lines(3)[:10])
    cold = f"# {tag}: {time.time_ns()}\n" + prefix       # a first line never seen before: nothing to reuse
    return [(kind, {"prefix": p, "suffix": suffix, "max_tokens": MAX_TOKENS, "temperature": 0})
            for kind, p in (("cold", cold), ("cached", cold + "d"))]


def via_python(path: str, reqs: list[tuple[str, dict]]) -> list[dict]:
    c = Raw(path)
    rows = []
    for kind, params in reqs:
        result, first, total = c.request("complete", **params)
        rows.append({"kind": kind, "ttft": first, "total": total, **result["usage"]})
    return rows


# The same sequence through the Neovim plugin's client (editor-integrations/nvim/lua/ds4/rpc.lua), timed inside
# Neovim from the request to its first piece and to its response callback.
NVIM_BENCH = """
local uv = vim.uv or vim.loop
local client = require('ds4.rpc').connect(os.getenv('DS4_SOCKET'))
local rows = {}
for _, req in ipairs(vim.fn.json_decode(table.concat(vim.fn.readfile(os.getenv('BENCH_IN')), '\\n'))) do
  local t0, first, done = uv.hrtime(), nil, nil
  client:request('complete', req[2], function(err, result)
    assert(not err, err and err.message)
    done = { result = result, t = uv.hrtime() }
  end, function(ev)
    if ev.kind == 'content' and not first then first = uv.hrtime() end
  end)
  vim.wait(600000, function() return done ~= nil end, 1)
  local u = done.result.usage
  table.insert(rows, { kind = req[1], ttft = first and (first - t0) / 1e9 or vim.NIL, total = (done.t - t0) / 1e9,
    prompt_tokens = u.prompt_tokens, cached_tokens = u.cached_tokens, completion_tokens = u.completion_tokens })
end
vim.fn.writefile({ vim.fn.json_encode(rows) }, os.getenv('BENCH_OUT'))
"""


def via_neovim(path: str, reqs: list[tuple[str, dict]], tmp: Path) -> list[dict]:
    (tmp / "in.json").write_text(json.dumps(reqs))
    (tmp / "bench.lua").write_text(NVIM_BENCH)
    env = {**os.environ, "DS4_SOCKET": path, "BENCH_IN": str(tmp / "in.json"), "BENCH_OUT": str(tmp / "out.json")}
    subprocess.run(["nvim", "--headless", "-u", "NONE", "-i", "NONE", "--cmd",
                    f"set rtp^={ROOT / 'editor-integrations' / 'nvim'}", "-c", f"luafile {tmp / 'bench.lua'}",
                    "-c", "qa!"], env=env, check=True, stdin=subprocess.DEVNULL, timeout=3600)
    return json.loads((tmp / "out.json").read_text())


def ms(x: float | None) -> str:
    return "–" if x is None else f"{x * 1000:,.0f}"


def report(results: dict[str, list[dict]], hello: dict, rounds: int) -> str:
    m = hello["model"]
    lines = [f"Machine: {platform.machine()}, {os.cpu_count()} cores, Linux {platform.release()}, Python "
             f"{platform.python_version()}, load average {os.getloadavg()[0]:.1f} at the end; daemon "
             f"{hello['daemon']}, backend {hello['backend']}, model {m['name']} ({m['n_layer']} layers). Median "
             f"of {rounds} rounds; each round one cold request, then the cached one (its prefix plus one typed "
             f"character). {MAX_TOKENS} tokens at temperature 0, a 10-line suffix, streaming.", "",
             "| client | prefix | prompt tokens | cached | first token ms | whole completion ms | tokens |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for client, rows in results.items():
        for kind in ("cold", "cached"):
            sel = [r for r in rows if r["kind"] == kind]

            def med(key: str) -> float | None:
                values = [r[key] for r in sel if r[key] is not None]     # ttft is None when nothing was generated
                return statistics.median(values) if values else None

            lines.append(f"| {client} | {kind} | {med('prompt_tokens'):,.0f} | {med('cached_tokens'):,.0f} | "
                         f"{ms(med('ttft'))} | {ms(med('total'))} | {med('completion_tokens'):.0f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a model for the daemon started here (default: generate the tiny q2 model)")
    ap.add_argument("--socket", help="measure the daemon already serving this socket instead")
    ap.add_argument("--rounds", type=int, default=5, help="cold + cached pairs per client (default 5)")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="ds4-edbench-", dir="/tmp"))
    daemon = None
    try:
        path = args.socket
        if path is None:
            daemon = Daemon(tmp, args.model or tiny_q2(tmp), "--log-level", "warning")
            path = str(daemon.socket)
        hello = Raw(path).request("hello", protocol="1.0", client="editor-bench")[0]
        prefix = prefix_of(path)
        # The clients take turns round by round, so a change in the machine's load hits both alike.
        results: dict[str, list[dict]] = {"Python (raw msgpack)": []}
        if shutil.which("nvim"):
            results["Neovim plugin"] = []
        for r in range(args.rounds):
            results["Python (raw msgpack)"] += via_python(path, round_requests(prefix, f"python {r}"))
            if "Neovim plugin" in results:
                results["Neovim plugin"] += via_neovim(path, round_requests(prefix, f"nvim {r}"), tmp)
        print(report(results, hello, args.rounds))
    finally:
        if daemon is not None:
            daemon.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
