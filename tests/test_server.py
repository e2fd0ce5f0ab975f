"""The daemon for real: `python -m ds4d serve` in a subprocess on a temporary socket with a tiny model, and clients
speaking raw msgpack over AF_UNIX sockets (no client library, no mocks): every method, streaming, many clients at
once, cancellation, disconnects, a client that stops reading, bad input, restarts, signals, socket activation,
other users, the idle timeout and the refusals at start."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack
import pytest

from daemon_harness import Daemon, short_home

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("q2")


@pytest.fixture(scope="module")
def daemon(model):
    home = short_home()
    d = Daemon(home, model)
    yield d
    assert d.stop() == 0
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def home():
    h = short_home()
    yield h
    shutil.rmtree(h, ignore_errors=True)


@pytest.fixture
def spawn(model, home):
    """spawn(*args, model=..., **kw) -> a Daemon in `home`; whatever a failing test leaves running is killed."""
    started: list[Daemon] = []

    def start(*args, model=model, **kw) -> Daemon:
        started.append(Daemon(home, model, *args, **kw))
        return started[-1]

    yield start
    for d in started:
        d.kill()


def user(text):
    return [{"role": "user", "content": text}]


def streamed_text(notes, kind="content"):
    return "".join(n.get("text", "") for n in notes if n["kind"] == kind)


def wait_until(cond, timeout: float, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return False


# --- methods ---------------------------------------------------------------------------------------------------

def test_hello_socket_modes_log_and_versions(daemon, model):
    c = daemon.client()
    r = c.call("hello", protocol="1.0", client="pytest")
    assert r["protocol"] == "1.0" and r["backend"] == os.environ.get("DS4_TEST_BACKEND", "cpu") and r["ctx"] == 32768
    m = r["model"]
    assert m["path"] == model and m["n_layer"] == 6 and m["n_vocab"] == 129280 and m["quant"] == "q2"
    assert m["demo"] is False and len(m["fingerprint"]) == 64
    assert {"stream", "cancel", "sessions"} <= set(r["capabilities"])
    assert c.call("hello", protocol="1.7")["protocol"] == "1.0"          # minor versions are compatible
    assert c.error("hello", protocol="2.0")["code"] == "version_mismatch"
    assert c.error("hello", protocol="one")["message"].startswith("protocol:")
    assert stat.S_IMODE(daemon.socket.stat().st_mode) == 0o600
    assert stat.S_IMODE(daemon.socket.parent.stat().st_mode) == 0o700
    assert "ready: serving on" in (daemon.home / "state" / "ds4" / "ds4d.log").read_text()
    c.close()


def test_generate_streams_pieces_that_add_up_to_the_result(daemon):
    c = daemon.client()
    i = c.send("generate", prompt="The quick brown fox", max_tokens=12, temperature=0)
    r = c.wait(i)[3]
    notes = c.notes[i]
    assert r["finish_reason"] == "length" and len(r["tokens"]) == r["usage"]["completion_tokens"] == 12
    assert streamed_text(notes) == r["text"]
    assert [t for n in notes for t in n.get("tokens", [])] == r["tokens"]
    progress = [n for n in notes if n["kind"] == "progress"]
    assert progress and progress[-1]["done"] == progress[-1]["total"] == r["usage"]["prompt_tokens"]
    assert all(n["id"] == i for n in notes)
    # Same request by token ids, without streaming: same answer, no notifications.
    ids = c.call("tokenize", text="The quick brown fox")["tokens"]
    j = c.send("generate", tokens=ids, max_tokens=12, temperature=0, stream=False)
    assert c.wait(j)[3]["tokens"] == r["tokens"] and j not in c.notes
    # logprobs ride along with the tokens.
    k = c.send("generate", prompt="x", max_tokens=3, temperature=0, logprobs=2)
    c.wait(k)
    lps = [lp for n in c.notes[k] for lp in n.get("logprobs", [])]
    assert len(lps) == 3 and all(len(lp["top"]) == 2 for lp in lps)
    c.close()


def test_chat_reasoning_think_max_warning_and_complete(daemon):
    c = daemon.client()
    i = c.send("chat", messages=user("Why is the sky blue?"), thinking="max", max_tokens=8, temperature=0)
    r = c.wait(i)[3]
    assert r["warnings"] and "ran as 'high'" in r["warnings"][0]
    assert streamed_text(c.notes[i], "reasoning") == r["reasoning"]
    assert streamed_text(c.notes[i], "content") == r["text"]
    r = c.call("chat", messages=user("hi"), thinking="none", max_tokens=4, temperature=0)
    assert "warnings" not in r and r["reasoning"] == "" and set(r) >= {"text", "tool_calls", "usage"}
    r = c.call("complete", prefix="def add(a, b):\n    return ", suffix="\n", max_tokens=5,
               context=[{"path": "util.py", "text": "import os\n"}])
    assert r["finish_reason"] in ("length", "eos") and r["usage"]["completion_tokens"] <= 5
    # A time budget ends a completion early, as a length limit.
    r = c.call("complete", prefix="x = ", max_tokens=5000, time_budget_ms=300)
    assert r["finish_reason"] == "length" and r["usage"]["completion_tokens"] < 5000
    c.close()


def test_newer_complete_in_the_same_session_supersedes_the_older(daemon):
    c = daemon.client()
    old = c.send("complete", prefix="int main() {", session="editor", max_tokens=3000)
    while old not in c.notes:                 # it is running
        c.pump()
    other = c.send("complete", prefix="fn main() {", session="elsewhere", max_tokens=3)
    new = c.send("complete", prefix="int main() {\n", session="editor", max_tokens=3)
    assert c.wait(old)[3]["finish_reason"] == "cancelled"
    assert c.wait(new)[3]["finish_reason"] in ("length", "eos")
    assert c.wait(other)[3]["finish_reason"] in ("length", "eos")
    c.close()


def test_tokenize_status_and_sessions(daemon):
    c = daemon.client()
    ids = c.call("tokenize", text="hello world")["tokens"]
    assert c.call("detokenize", tokens=ids)["text"] == "hello world"
    assert len(c.call("tokenize", text="<｜User｜>", specials=True)["tokens"]) == 1
    assert c.error("detokenize", tokens=[-1])["message"].startswith("tokens[0]:")
    st = c.call("status")
    assert set(st) >= {"uptime_s", "sessions", "queue", "memory", "counters"} and st["connections"] >= 1
    assert st["memory"]["weights"] > 0 and "decode_tokens" in st["counters"]

    opened = c.call("session.open", name="notes")
    assert opened == {"name": "notes", "tokens": 0, "messages": []}
    assert c.call("session.open")["name"]                                  # a generated name
    r = c.call("chat", session="notes", messages=user("first"), thinking="none", max_tokens=3, temperature=0)
    assert r["usage"]["prompt_tokens"] > 0
    info = c.call("session.info", name="notes")
    assert info["tokens"] > 0 and [m["role"] for m in info["messages"]] == ["user", "assistant"]
    assert c.call("session.history", name="notes")["messages"] == info["messages"]
    assert c.call("session.fork", name="notes", new_name="notes2") == {"name": "notes2"}
    assert c.error("session.fork", name="notes", new_name="notes2")["code"] == "exists"
    names = {s["name"] for s in c.call("session.list")["sessions"]}
    assert {"notes", "notes2"} <= names
    assert c.call("session.close", name="notes2") == {}
    assert c.call("session.info", name="notes2")["tokens"] == info["tokens"]     # still on disk
    assert c.call("session.delete", name="notes2") == {}
    assert c.error("session.info", name="notes2")["code"] == "not_found"
    assert c.error("session.open", name="nothing", create=False)["code"] == "not_found"
    for bad in ("../etc/passwd", "/abs", ".hidden", "a/b", "x" * 65):
        e = c.error("session.info", name=bad)
        assert e["code"] == "bad_request" and e["message"].startswith("name:"), e
    e = c.error("generate", prompt="x", session="../up")
    assert e["code"] == "bad_request" and e["message"].startswith("session:")
    c.close()


# --- many clients, cancellation, disconnects, stalls -----------------------------------------------------------

def test_a_paused_request_keeps_its_events_merged_in_order():
    from ds4d.server import merge_event
    pending: list[dict] = []
    for ev in [{"kind": "progress", "done": 1, "total": 3}, {"kind": "progress", "done": 3, "total": 3},
               {"kind": "reasoning", "text": "a", "tokens": [1]}, {"kind": "reasoning", "text": "b", "tokens": [2]},
               {"kind": "content", "text": "c", "tokens": [3], "logprobs": [{"token": 3, "top": [[3, -0.1]]}]},
               {"kind": "content", "text": "d", "tokens": [4], "logprobs": [{"token": 4, "top": [[4, -0.2]]}]},
               {"kind": "tool_call", "name": "f", "arguments_delta": '{"a"'},
               {"kind": "tool_call", "name": "f", "arguments_delta": ": 1}"},
               {"kind": "tool_call", "name": "g", "arguments_delta": "{}"}, {"kind": "content", "text": "e"}]:
        merge_event(pending, dict(ev))
    assert pending == [
        {"kind": "progress", "done": 3, "total": 3},
        {"kind": "reasoning", "text": "ab", "tokens": [1, 2]},
        {"kind": "content", "text": "cd", "tokens": [3, 4],
         "logprobs": [{"token": 3, "top": [[3, -0.1]]}, {"token": 4, "top": [[4, -0.2]]}]},
        {"kind": "tool_call", "name": "f", "arguments_delta": '{"a": 1}'},
        {"kind": "tool_call", "name": "g", "arguments_delta": "{}"},
        {"kind": "content", "text": "e"}]


def test_many_clients_stream_at_once(daemon):
    n_clients, per_client, n_tok = 8, 2, 16
    before = daemon.client().call("status")["counters"]
    results: dict = {}

    def run(k):
        c = daemon.client()
        ids = [c.send("generate", prompt=f"client {k} request {j}", max_tokens=n_tok, temperature=0)
               for j in range(per_client)]
        results[k] = [(c.wait(i)[3], c.notes[i]) for i in ids]
        c.close()

    threads = [threading.Thread(target=run, args=(k,)) for k in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == n_clients
    for rs in results.values():
        for r, notes in rs:
            assert r["finish_reason"] == "length" and streamed_text(notes) == r["text"]
    after = daemon.client().call("status")["counters"]
    tokens = after["decode_tokens"] - before["decode_tokens"]
    steps = after["decode_steps"] - before["decode_steps"]
    assert tokens >= n_clients * per_client * (n_tok - 1) and steps < tokens / 2    # decoded together


def test_cancel_by_id(daemon):
    c = daemon.client()
    i = c.send("generate", prompt="count", max_tokens=5000, temperature=0)
    while not any(n["kind"] == "content" for n in c.notes.get(i, [])):
        c.pump()
    assert c.call("cancel", id=i) == {"cancelled": True}
    r = c.wait(i)[3]
    assert r["finish_reason"] == "cancelled" and r["usage"]["completion_tokens"] < 5000
    assert streamed_text(c.notes[i]) == r["text"]
    assert c.call("cancel", id=i) == {"cancelled": False}          # no longer in flight
    assert c.call("cancel", id=999) == {"cancelled": False}
    c.close()


def test_disconnect_mid_stream_cancels_the_work(daemon):
    c = daemon.client()
    i = c.send("generate", prompt="a long story", max_tokens=5000, temperature=0)
    while not any(n["kind"] == "content" for n in c.notes.get(i, [])):
        c.pump()
    c.close()
    watcher = daemon.client()
    assert wait_until(lambda: watcher.call("status")["queue"] == 0, 10)
    decoded = watcher.call("status")["counters"]["decode_tokens"]
    time.sleep(0.3)
    assert watcher.call("status")["counters"]["decode_tokens"] == decoded
    watcher.close()


def test_a_client_that_stops_reading_is_paused_then_cancelled_while_others_keep_their_rate(spawn):
    d = spawn("--stall-timeout", "3", "--max-queue", "6")
    try:
        b = d.client()

        def rate():          # the better of two runs: this machine may be busy with other work too
            rates = []
            for _ in range(2):
                t0 = time.perf_counter()
                r = b.call("generate", prompt="steady", max_tokens=30, temperature=0)
                rates.append(r["usage"]["completion_tokens"] / (time.perf_counter() - t0))
            return max(rates)

        alone = rate()
        # The stalled client: a big tokenize answer fills its socket, then a long generation streams into it.
        a = d.client()
        a.send("tokenize", text="many words " * 300_000)
        gen = a.send("generate", prompt="never read", max_tokens=100_000, temperature=0)
        assert wait_until(lambda: b.call("status")["counters"]["decode_tokens"] > 0, 10)
        beside = rate()
        assert beside > alone / 3, (alone, beside)        # not blocked by the stalled client (loose: 2 cores)
        # After the stall timeout its generation is cancelled (it would otherwise run for minutes).
        assert wait_until(lambda: b.call("status")["queue"] == 0, 15)
        b.close()
        # When it reads again it gets everything: the tokenize answer, the merged stream and the final result.
        r = a.wait(gen)[3]
        assert r["finish_reason"] == "cancelled" and 0 < r["usage"]["completion_tokens"] < 100_000
        notes = a.notes[gen]
        assert streamed_text(notes) == r["text"]
        assert len(notes) < r["usage"]["completion_tokens"]          # merged while it was not reading
        assert "has not read" in d.log()
        # A full queue answers busy: six requests are held, the rest are refused at once.
        ids = range(100, 109)
        a.sock.sendall(b"".join(msgpack.packb([0, i, "generate", [{"prompt": "q", "max_tokens": 2}]]) for i in ids))
        codes = [(a.wait(i)[2] or {}).get("code") for i in ids]
        assert codes.count("busy") == 3 and codes.count(None) == 6
        a.close()
    finally:
        assert d.stop() == 0


# --- bad input -------------------------------------------------------------------------------------------------

def test_bad_messages_get_errors_or_a_clean_close_and_others_carry_on(daemon):
    good = daemon.client()
    good.call("hello", protocol="1.0")
    c = daemon.client()

    def raw(obj) -> list:
        c.responses.clear()
        c.sock.sendall(msgpack.packb(obj))
        while not c.responses:
            assert c.pump()
        return c.responses.popitem()[1]

    assert c.error("no.such.method")["code"] == "unknown_method"
    for params, field in [({"prompt": 5}, "prompt"), ({"prompt": "x", "max_tokens": "many"}, "max_tokens"),
                          ({"prompt": "x", "stop": "END"}, "stop"), ({"prompt": "x", "stream": 1}, "stream"),
                          ({"prompt": "x", "tokens": [1]}, "prompt"), ({}, "prompt"),
                          ({"prompt": "x", "max_token": 3}, "max_token")]:
        e = c.error("generate", **params)
        assert e["code"] == "bad_request" and e["message"].startswith(field), (params, e)
    e = c.error("chat", messages=[{"content": "no role"}])
    assert e["code"] == "bad_request" and e["message"].startswith("messages[0].role:")
    e = c.error("chat", messages=[{"role": "wizard", "content": "x"}])
    assert e["code"] == "bad_request" and "role" in e["message"]
    e = c.error("complete", prefix="x", context=[{"path": "a.py"}])
    assert e["message"].startswith("context[0].text:")
    assert c.error("generate", prompt="x", temperature=-1)["message"].startswith("temperature")
    assert c.error("generate", tokens=[10**7])["message"].startswith("tokens[0]:")
    # Shapes of messages that are framed well but are not requests.
    assert raw({"not": "an array"})[1:3] == [None, {"code": "bad_request",
                                                    "message": "a request is an array [0, msgid, method, params]"}]
    assert raw([0, 77, "hello"])[1] == 77
    assert raw([0, 78, "status", {"a": 1}])[2]["message"].startswith("params:")
    assert raw([0, -1, "status", [{}]])[2]["message"].startswith("msgid:")
    assert raw([2, "stream", [{}]])[2]["code"] == "bad_request"
    assert raw([0, 79, "status", []])[2] is None                 # [] is "no arguments" (Neovim sends it)
    assert c.call("hello", protocol="1.0")                       # this connection still works

    # Undecodable bytes: that connection is closed, nothing else is affected.
    c.sock.sendall(b"\xc1")
    assert c.closed_by_peer()
    d = daemon.client()
    d.sock.sendall(msgpack.packb([0, 1, "hello", [{"protocol": "1.0"}]])[:-3] + b"\xa2\xff\xfe")  # bad UTF-8
    assert d.closed_by_peer()
    # Oversized: too_large (with the msgid, read from the message's start), then a close.
    e = daemon.client()
    big = msgpack.packb([0, 5, "tokenize", [{"text": "x" * (17 << 20)}]])

    def send_all():
        try:
            e.sock.sendall(big)
        except OSError:                          # the daemon closes while we are still sending: expected
            pass

    sender = threading.Thread(target=send_all)
    sender.start()
    msg = e.wait(5)
    assert msg[2]["code"] == "too_large"
    assert e.closed_by_peer()
    sender.join(10)
    # A message just under the cap is decoded (and here answered with an error about its content).
    f = daemon.client()
    assert f.error("tokenize", text="y" * (15 << 20), specials="no")["message"].startswith("specials:")
    # A result that would exceed the cap is refused as well (the connection stays).
    dashes = f.call("tokenize", text="-" * 64)["tokens"]
    assert len(dashes) == 1
    assert f.error("detokenize", tokens=dashes * 300_000)["code"] == "too_large"
    assert good.call("hello", protocol="1.0")["protocol"] == "1.0"
    for x in (good, c, d, e, f):
        x.close()


# --- lifecycle -------------------------------------------------------------------------------------------------

def test_restart_keeps_sessions_and_sigterm_saves_them(spawn):
    d = spawn()
    c = d.client()
    for q in ("first question", "second question"):
        c.call("chat", session="keep", messages=user(q), thinking="none", max_tokens=4, temperature=0)
    history = c.call("session.history", name="keep")["messages"]
    assert len(history) == 4
    assert c.call("shutdown") == {}
    assert c.closed_by_peer()
    assert d.wait() == 0 and not d.socket.exists()

    d = spawn()
    c = d.client()
    assert "keep" in {s["name"] for s in c.call("session.list")["sessions"]}
    assert c.call("session.history", name="keep")["messages"] == history
    r = c.call("chat", session="keep", messages=user("third"), thinking="none", max_tokens=3, temperature=0)
    assert r["usage"]["cached_tokens"] > 0                       # the restart did not lose the prompt cache
    # SIGTERM mid-generation: the request is answered as cancelled and its session saved.
    i = c.send("generate", prompt="interrupted story", session="long", max_tokens=5000, temperature=0)
    while not any(n["kind"] == "content" for n in c.notes.get(i, [])):
        c.pump()
    d.proc.send_signal(signal.SIGTERM)
    assert c.wait(i)[3]["finish_reason"] == "cancelled"
    assert d.wait() == 0 and "saving sessions" in d.log()

    d = spawn()
    c = d.client()
    assert c.call("session.info", name="long")["tokens"] > 3
    c.call("shutdown")
    assert d.wait() == 0


def test_second_daemon_stale_socket_and_foreign_file(model, home, spawn, daemon):
    # A live daemon on the socket: a clear error, exit 1, the running one unaffected.
    other = subprocess.run([sys.executable, "-m", "ds4d", "serve", "-m", model, "--socket", str(daemon.socket)],
                           env=daemon.env, capture_output=True, text=True, timeout=60)
    assert other.returncode == 1 and "already" in other.stderr
    assert daemon.client().call("hello", protocol="1.0")
    # A stale socket file (its daemon died) is replaced.
    run = home / "run"
    run.mkdir(mode=0o700)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(run / "ds4.sock"))
    stale.close()
    d = spawn()
    assert "stale" in d.log()
    d.client().call("shutdown")
    assert d.wait() == 0
    # Something that is not a socket is never deleted.
    (run / "ds4.sock").write_text("mine")
    r = subprocess.run([sys.executable, "-m", "ds4d", "serve", "-m", model], env=d.env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1 and "not a socket" in r.stderr and (run / "ds4.sock").read_text() == "mine"


ACTIVATE = """
import os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(sys.argv[1])
s.listen(16)
if s.fileno() != 3:
    os.dup2(s.fileno(), 3)
os.set_inheritable(3, True)
os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()))   # exec keeps the pid, as systemd arranges
os.execv(sys.argv[2], sys.argv[2:])
"""


def test_socket_activation_serves_an_inherited_socket(home, spawn):
    path = home / "activated.sock"
    d = spawn(wrapper=[sys.executable, "-c", ACTIVATE, str(path)], env={"DS4_SOCKET": str(path)}, wait=False)
    d.socket = path
    d.wait_ready()
    assert "socket activation" in d.log() and not (home / "run").exists()
    c = d.client()
    assert c.call("generate", prompt="hi", max_tokens=2, temperature=0)["finish_reason"] == "length"
    c.call("shutdown")
    assert d.wait() == 0


def test_idle_exit(spawn):
    d = spawn("--idle-exit", "0.03")               # 1.8 s
    c = d.client()
    c.call("generate", prompt="hi", max_tokens=2)
    time.sleep(2.5)
    assert d.proc.poll() is None                                 # a connected client keeps it alive
    c.close()
    assert d.wait() == 0 and "idle" in d.log() and not d.socket.exists()


def test_demo_model_when_none_is_configured(model, home, spawn):
    from ds4d.config import DEMO_SEED, DEMO_VARIANT
    demo = home / "cache" / "ds4" / f"demo-{DEMO_VARIANT}-seed{DEMO_SEED}.gguf"
    demo.parent.mkdir(parents=True)
    os.symlink(model, demo)                                       # "generated once" earlier: not again here
    d = spawn(model=None)
    c = d.client()
    assert c.call("hello", protocol="1.0")["model"]["demo"] is True
    assert "demo model" in d.log()
    c.call("shutdown")
    assert d.wait() == 0


def test_weights_that_do_not_fit_are_refused(home, spawn):
    from ds4d.server import mem_available
    from ds4d.tiny import make_tiny
    path = home / "full.gguf"
    make_tiny(path, "q2", full_shape=True)                        # the real 43-layer layout, sparse on disk
    if (mem_available() or 0) > path.stat().st_size:
        pytest.skip("this machine has room for the real weights")
    d = spawn(model=str(path), wait=False)
    assert d.wait(60) == 1
    assert "does not fit" in d.log() and "GiB" in d.log()
