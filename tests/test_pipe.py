"""Pipe mode and auto-start through real processes: `python -m ds4c -p ...` against a daemon with a tiny model
(stdin in, only the answer out, --json, --show-reasoning, sessions), every exit status, a reader that closes
the pipe early, and, with no daemon running, the auto-start: one daemon for two racing clients, a start that
fails, and --no-autostart."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from ds4c.client import Client


@pytest.fixture(scope="module")
def daemon(spawn_ds4d):
    return spawn_ds4d()


def ds4c(*args: str, env: dict, stdin: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ds4c", *args], input=stdin, env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL if stdin is None else None, timeout=timeout)


def answer(daemon, content: str, **kw) -> dict:
    """What the library answers to the same request: the --json object, but for the cache's share of the usage."""
    with Client(daemon.socket) as c:
        r = c.chat([{"role": "user", "content": content}], temperature=0, **{"thinking": "none", **kw})
    return comparable({"text": r.text, "reasoning": r.reasoning, "tool_calls": r.tool_calls, "usage": r.usage,
                       "finish_reason": r.finish_reason})


def comparable(out: dict) -> dict:
    """Whether the prompt came from the daemon's cache depends on what ran before."""
    return {**out, "usage": {**out["usage"], "cached_tokens": None}}


def no_traceback(stderr: str) -> bool:
    return "Traceback" not in stderr and "Exception ignored" not in stderr


def test_stdin_in_only_the_answer_out(daemon):
    p = ds4c("-p", "Summarize this.", "-n", "6", "--temp", "0", env=daemon.env, stdin="line one\nline two\n")
    assert p.returncode == 0 and p.stderr == ""
    expected = answer(daemon, "Summarize this.\n\nline one\nline two\n", max_tokens=6)["text"]
    assert p.stdout == expected + ("" if expected.endswith("\n") else "\n")
    # stdin that is not a terminal but empty adds nothing to the instruction.
    p = ds4c("-p", "Just this.", "-n", "6", "--temp", "0", env=daemon.env)
    expected = answer(daemon, "Just this.", max_tokens=6)["text"]
    assert p.returncode == 0 and p.stdout.rstrip("\n") == expected.rstrip("\n")


def test_json_reasoning_and_sessions(daemon):
    p = ds4c("-p", "Why?", "-n", "8", "--temp", "0", "--json", env=daemon.env)
    assert p.returncode == 0
    out = comparable(json.loads(p.stdout))
    assert set(out) == {"text", "reasoning", "tool_calls", "usage", "finish_reason"}
    assert out == answer(daemon, "Why?", max_tokens=8) and out["reasoning"] == ""    # no thinking unless asked
    p = ds4c("-p", "Why?", "-n", "8", "--temp", "0", "--json", "--think", env=daemon.env)
    thought = comparable(json.loads(p.stdout))
    assert thought["reasoning"] and thought == answer(daemon, "Why?", max_tokens=8, thinking="high")
    # --show-reasoning streams the reasoning to stderr; stdout keeps only the answer.
    p = ds4c("-p", "Why?", "-n", "8", "--temp", "0", "--think", "--show-reasoning", env=daemon.env)
    assert p.returncode == 0 and p.stderr.strip() == thought["reasoning"].strip()
    assert p.stdout.rstrip("\n") == thought["text"].rstrip("\n")
    # --session continues the daemon's conversation of that name.
    for q in ("first", "second"):
        assert ds4c("-p", q, "-n", "3", "--temp", "0", "--session", "piped", env=daemon.env).returncode == 0
    with Client(daemon.socket) as c:
        history = c.session_history("piped")
    assert [m["content"] for m in history if m["role"] == "user"] == ["first", "second"]


def test_exit_status_for_usage_daemon_errors_and_no_daemon(daemon):
    for args in (["-p", "x", "-n", "0"], ["-p", "x", "--bogus"], ["-p", "x", "--session", "../etc"], ["--json"],
                 ["-p"], ["-p", "x", "--idle-exit", "-1"]):
        p = ds4c(*args, env=daemon.env)
        assert p.returncode == 2 and p.stderr.count("\n") == 1 and p.stderr.startswith("ds4c: "), (args, p.stderr)
    assert ds4c(env=daemon.env).returncode == 2                                 # the chat needs a terminal
    # The daemon refuses the request: a prompt longer than the context.
    p = ds4c("-p", "Count the words.", "-n", "1", env=daemon.env, stdin="word " * 40000)
    assert p.returncode == 1 and p.stderr.startswith("ds4c: context_full: ") and p.stdout == ""
    p = ds4c("-p", "x", "--temp", "-1", env=daemon.env)
    assert p.returncode == 1 and "temperature" in p.stderr and no_traceback(p.stderr)
    # No daemon, and not allowed to start one.
    missing = daemon.home / "none.sock"
    p = ds4c("-p", "x", "--socket", str(missing), "--no-autostart", env=daemon.env)
    assert p.returncode == 3 and p.stderr == f"ds4c: no daemon answers on {missing} (no such socket)\n"
    p = ds4c("--help", env=daemon.env)
    assert p.returncode == 0 and "exit status" in p.stdout and "--no-autostart" in p.stdout
    assert ds4c("--version", env=daemon.env).stdout.startswith("ds4c ")


def _default_sigint():
    """In the child: Ctrl+C's default action even when the tests run in the background (a shell starts background
    jobs with SIGINT ignored, children inherit that, and Python then installs no KeyboardInterrupt)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_interrupt_exits_130_and_a_closed_pipe_is_no_error(daemon):
    cmd = [sys.executable, "-m", "ds4c", "-p", "Tell a long story.", "-n", "5000", "--temp", "0"]
    p = subprocess.Popen(cmd, env=daemon.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         preexec_fn=_default_sigint)
    assert p.stdout.read(1)                                  # it is answering
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 130 and err.decode() == "ds4c: interrupted\n"

    # `ds4c -p ... | head -c 1`: the reader leaves after one byte.
    p = subprocess.Popen(cmd, env=daemon.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout.read(1)
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(30) == 0 and err == ""
    with Client(daemon.socket) as c:                          # and the daemon stopped generating for it
        deadline = time.monotonic() + 10
        while c.status()["queue"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert c.status()["queue"] == 0


# --- auto-start ------------------------------------------------------------------------------------------------

@pytest.fixture
def fresh_home(tiny_model):
    """The environment of a user with no daemon running: XDG dirs and the socket in a short temporary home, the
    tiny model in $DS4_MODEL. Whatever daemon a test started there is shut down afterwards."""
    home = Path(tempfile.mkdtemp(prefix="ds4c-", dir="/tmp"))            # socket paths must stay short
    env = {**os.environ, "XDG_STATE_HOME": str(home / "state"), "XDG_CACHE_HOME": str(home / "cache"),
           "XDG_CONFIG_HOME": str(home / "config"), "XDG_DATA_HOME": str(home / "data"),
           "DS4_SOCKET": str(home / "run" / "ds4.sock"), "DS4_MODEL": tiny_model("q2")}
    yield home, env
    for pid in started_pids(home):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    shutil.rmtree(home, ignore_errors=True)


def started_pids(home: Path) -> list[int]:
    log = home / "state" / "ds4" / "ds4d.log"
    if not log.exists():
        return []
    return [int(m) for m in re.findall(r"ds4d \S+ starting \(pid (\d+)\)", log.read_text())]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/status").read_text().find("State:\tZ") < 0


def test_autostart_starts_one_daemon_for_two_racing_clients(fresh_home):
    home, env = fresh_home
    cmd = [sys.executable, "-m", "ds4c", "-p", "Why is the sky blue?", "-n", "5", "--temp", "0"]
    racers = [subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True) for _ in range(2)]
    outs = [p.communicate(timeout=80) for p in racers]
    assert [p.returncode for p in racers] == [0, 0], outs
    assert outs[0][0] == outs[1][0] and outs[0][0].strip()
    pids = started_pids(home)
    assert len(pids) == 1 and alive(pids[0])                   # exactly one daemon was started, and it stays
    assert sum("starting ds4d" in err for _, err in outs) == 1
    starter = next(err for _, err in outs if "starting ds4d" in err)
    assert "ds4d: loading " in starter and no_traceback(starter)              # it showed the daemon loading
    cmdline = Path(f"/proc/{pids[0]}/cmdline").read_bytes().split(b"\0")
    assert b"--idle-exit" in cmdline and cmdline[cmdline.index(b"--idle-exit") + 1] == b"30"
    assert (home / "state" / "ds4" / "ds4d-autostart.log").exists()
    # A later client finds it running and starts nothing.
    p = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stderr == "" and p.stdout == outs[0][0]
    with Client(env["DS4_SOCKET"]) as c:
        c.shutdown()
    deadline = time.monotonic() + 20
    while alive(pids[0]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pids[0]) and started_pids(home) == pids


def test_a_failed_start_or_no_autostart_exits_3(fresh_home):
    home, env = fresh_home
    p = ds4c("-p", "x", "--no-autostart", env=env)
    assert p.returncode == 3 and "no such socket" in p.stderr and started_pids(home) == []
    p = ds4c("-p", "x", env={**env, "DS4_MODEL": str(home / "missing.gguf")})
    assert p.returncode == 3 and no_traceback(p.stderr)
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("ds4c: ds4d exited with status 1 while starting: ") and "missing.gguf" in last
