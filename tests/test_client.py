"""The client library against a real daemon (`ds4d serve` on a temporary socket with a tiny model): hello and the
version check, streams that yield their events and then the result, several requests in flight on one
connection, cancel (explicit, by leaving a stream, by a timeout), each error code as its exception class,
sessions, a daemon that is missing, of another major version or that hangs up, and the asyncio client on the
same wire code."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import msgpack
import pytest

from ds4c.client import (ERRORS, AsyncClient, BadRequest, Client, ContextFull, DaemonError, DaemonTimeout,
                         DaemonUnreachable, Event, Exists, NotFound, Result, UnknownMethod, VersionMismatch,
                         error_from)
from ds4c.protocol import ERROR_CODES


@pytest.fixture(scope="module")
def daemon(spawn_ds4d):
    return spawn_ds4d()


@pytest.fixture
def client(daemon):
    with Client(daemon.socket, timeout=60) as c:
        yield c


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def drain(stream) -> tuple[list[Event], Result]:
    items = list(stream)
    assert isinstance(items[-1], Result) and all(isinstance(i, Event) for i in items[:-1])
    return items[:-1], items[-1]


def joined(events: list[Event], kind: str) -> str:
    return "".join(e.text for e in events if e.kind == kind)


def wait_idle(c: Client, timeout: float = 10) -> bool:
    """True once the daemon runs no request (a cancelled one has stopped)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if c.status()["queue"] == 0:
            return True
        time.sleep(0.05)
    return False


def test_hello_checks_the_version_and_the_socket_comes_from_the_environment(daemon, monkeypatch):
    monkeypatch.setenv("DS4_SOCKET", str(daemon.socket))
    with Client() as c:                                         # no socket given: protocol.socket_path()
        assert c.path == daemon.socket
        assert c.info["protocol"] == "1.0" and c.info["model"]["n_layer"] == 6 and c.info["model"]["demo"] is False
        assert {"stream", "cancel", "sessions"} <= set(c.info["capabilities"])
        with pytest.raises(VersionMismatch) as e:
            c.call("hello", protocol="2.0")
        assert e.value.code == "version_mismatch" and "2.0" in str(e.value)
        assert c.call("hello", protocol="1.9")["protocol"] == "1.0"      # any minor version is served


def test_streams_yield_their_events_then_the_result(client):
    events, r = drain(client.chat(user("Why is the sky blue?"), thinking="high", max_tokens=10, temperature=0,
                                  stream=True))
    assert r.finish_reason == "length" and r.usage["completion_tokens"] == 10
    assert joined(events, "reasoning") == r.reasoning and joined(events, "content") == r.text
    progress = [e for e in events if e.kind == "progress"]
    assert progress and progress[-1].done == progress[-1].total == r.usage["prompt_tokens"]
    # The same request without a stream gives the same answer.
    plain = client.chat(user("Why is the sky blue?"), thinking="high", max_tokens=10, temperature=0)
    assert (plain.text, plain.reasoning) == (r.text, r.reasoning) and plain.raw["usage"] == plain.usage

    stream = client.generate(tokens=client.tokenize("The quick brown fox"), max_tokens=6, temperature=0, stream=True)
    events, r = drain(stream)
    assert stream.result is r and [t for e in events for t in e.tokens] == r.tokens and len(r.tokens) == 6
    assert client.detokenize(r.tokens) == r.text == client.generate("The quick brown fox", max_tokens=6,
                                                                     temperature=0).text
    r = client.complete("def add(a, b):\n    return ", "\n", context=[{"path": "u.py", "text": "import os\n"}],
                        max_tokens=4)
    assert r.finish_reason in ("length", "eos") and r.usage["completion_tokens"] <= 4


def test_requests_in_flight_together_are_told_apart(client):
    # Prompts of different lengths: each result's prompt size names its request. (Their texts are not compared
    # with runs alone: batched decode need not give the same bits as one token alone, e.g. the GPU's products of
    # several tokens run on tensor cores.)
    prompts = ["alpha", "beta gamma", "delta epsilon zeta eta"]
    sizes = [client.generate(p, max_tokens=1, temperature=0).usage["prompt_tokens"] for p in prompts]
    assert len(set(sizes)) == 3
    streams = [client.generate(p, max_tokens=8, temperature=0, stream=True) for p in prompts]
    assert len({s.msgid for s in streams}) == 3
    # Reading the last stream first pumps the others' notifications into their own queues.
    results = {i: drain(streams[i]) for i in (2, 0, 1)}
    for i, (events, r) in results.items():
        assert r.usage["prompt_tokens"] == sizes[i] and r.text == joined(events, "content")
        assert [t for e in events for t in e.tokens] == r.tokens


def test_cancel_stops_the_generation_and_leaving_a_stream_early_too(client):
    stream = client.generate("count", max_tokens=5000, temperature=0, stream=True)
    seen = []
    for item in stream:
        seen.append(item)
        if sum(isinstance(i, Event) and i.kind == "content" for i in seen) == 3:
            stream.cancel()
    r = stream.result
    assert r.finish_reason == "cancelled" and 3 <= r.usage["completion_tokens"] < 5000
    assert joined(seen[:-1], "content") == r.text
    assert client.cancel(stream.msgid) is False                            # no longer in flight

    for item in client.generate("a long story", max_tokens=5000, temperature=0, stream=True):
        if isinstance(item, Event) and item.kind == "content":
            break                                                          # the generator's close cancels
    assert wait_idle(client)
    assert client.hello()["protocol"] == "1.0"                             # the connection is still good


def test_a_timeout_raises_and_cancels_the_request(daemon):
    with Client(daemon.socket, timeout=0.3) as c:
        t0 = time.monotonic()
        with pytest.raises(DaemonTimeout, match="within 0.3 s"):
            c.generate("never ending", max_tokens=5000, temperature=0)
        assert time.monotonic() - t0 < 5
        assert wait_idle(c)
        assert c.tokenize("still usable") and isinstance(DaemonTimeout("x"), DaemonUnreachable)


def test_each_error_code_has_its_exception(client):
    assert set(ERRORS) == set(ERROR_CODES) and all(issubclass(cls, DaemonError) for cls in ERRORS.values())
    with pytest.raises(BadRequest, match="^max_tokens: must be an integer"):
        client.generate("x", max_tokens="many")
    with pytest.raises(BadRequest, match="^temperature"):
        client.chat(user("x"), temperature=-1)
    with pytest.raises(UnknownMethod):
        client.call("no.such.method")
    with pytest.raises(NotFound) as e:
        client.session_info("never-made")
    assert e.value.code == "not_found" and "never-made" in e.value.message
    with pytest.raises(ContextFull):
        client.generate(tokens=[100] * (client.info["ctx"] + 1), max_tokens=1)
    client.session_open("twin")
    with pytest.raises(Exists):
        client.session_fork("twin", "twin")
    newer = error_from({"code": "from_the_future", "message": "m"})
    assert type(newer) is DaemonError and newer.code == "from_the_future"


def test_sessions(client):
    name = client.session_open()["name"]                          # a generated name
    for q in ("first", "second"):
        client.chat(user(q), session=name, thinking="none", max_tokens=3, temperature=0)
    history = client.session_history(name)
    assert [m["role"] for m in history] == ["user", "assistant"] * 2 and history[2]["content"] == "second"
    assert client.session_open(name, create=False)["messages"] == history
    fork = client.session_fork(name, "copy-of-it")
    assert fork == "copy-of-it" and client.session_info(fork)["messages"] == history
    assert {name, fork} <= {s["name"] for s in client.session_list()}
    r = client.chat(user("third"), session=fork, thinking="none", max_tokens=2, temperature=0)
    assert r.usage["cached_tokens"] > 0                           # the fork kept the state, not just the text
    client.session_close(name)
    assert client.session_info(name)["tokens"] > 0                # closed means on disk, not gone
    client.session_delete(name)
    with pytest.raises(NotFound):
        client.session_history(name)


def test_no_daemon_a_foreign_one_or_a_vanishing_one(tmp_path):
    with pytest.raises(DaemonUnreachable) as e:
        Client(tmp_path / "none.sock")
    assert e.value.absent and "no such socket" in str(e.value)
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()                                                     # a socket file nobody listens on
    with pytest.raises(DaemonUnreachable) as e:
        Client(stale)
    assert e.value.absent

    # A "daemon" of another major version, then one that hangs up in the middle of a call.
    path = tmp_path / "odd.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(2)

    def serve():
        conn, _ = listener.accept()
        msgid = msgpack.unpackb(conn.recv(1024))[1]
        conn.sendall(msgpack.packb([1, msgid, None, {"protocol": "2.0"}]))
        conn.close()
        conn, _ = listener.accept()
        conn.recv(1024)
        conn.close()

    t = threading.Thread(target=serve)
    t.start()
    with pytest.raises(VersionMismatch, match="speaks protocol 2.0"):
        Client(path)
    c = Client(path, hello=False)
    with pytest.raises(DaemonUnreachable, match="closed the connection") as e:
        c.status()
    assert not e.value.absent and not c.is_open()
    with pytest.raises(DaemonUnreachable):
        c.status()
    c.close()
    t.join()
    listener.close()


def test_async_client(daemon, client):
    questions = ["a", "b c", "d e f g"]
    alone = {q: client.chat(user(q), thinking="none", max_tokens=6, temperature=0) for q in questions}
    assert len({r.usage["prompt_tokens"] for r in alone.values()}) == 3

    async def main():
        async with await AsyncClient.connect(daemon.socket, timeout=60) as a:
            assert a.info["protocol"] == "1.0"
            # Three requests on one connection at once, answered as they finish, each to its own caller (told by
            # its prompt's size: batched decode need not repeat the bits of a request alone).
            results = await asyncio.gather(*(a.chat(user(q), thinking="none", max_tokens=6, temperature=0)
                                             for q in questions))
            assert [r.usage["prompt_tokens"] for r in results] == [alone[q].usage["prompt_tokens"] for q in questions]
            stream = a.chat(user("a"), thinking="none", max_tokens=6, temperature=0, stream=True)
            items = [item async for item in stream]
            assert isinstance(items[-1], Result) and items[-1] is stream.result
            assert joined(items[:-1], "content") == alone["a"].text
            # Cancel from the stream, and errors as exceptions.
            stream = a.generate("count", max_tokens=5000, temperature=0, stream=True)
            async for item in stream:
                if isinstance(item, Event) and item.kind == "content":
                    stream.cancel()
            assert stream.result.finish_reason == "cancelled"
            with pytest.raises(NotFound):
                await a.session_info("never-made")
            # A task cancelled while it waits cancels its request in the daemon.
            task = asyncio.create_task(a.generate("x", max_tokens=5000, temperature=0))
            await asyncio.sleep(0.3)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            for _ in range(200):
                if (await a.status())["queue"] == 0:
                    break
                await asyncio.sleep(0.05)
            assert (await a.status())["queue"] == 0
        with pytest.raises(DaemonUnreachable):
            await AsyncClient.connect(daemon.home / "none.sock")

    asyncio.run(main())
