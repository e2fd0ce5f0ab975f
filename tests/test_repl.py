"""The `ds4c` REPL under a pseudo-terminal against a real daemon with a tiny model: a turn with its statistics,
slash commands, multi-line input, an attached file, Ctrl+C during a generation (the daemon stops, the prompt
comes back), and a session resumed with its history after the daemon restarted."""

from __future__ import annotations

import fcntl
import os
import re
import select
import struct
import subprocess
import sys
import termios
import time

import pytest

from ds4c.client import Client

ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\r")


class Terminal:
    """`python -m ds4c ...` on a pseudo-terminal that is its controlling terminal (so Ctrl+C is a real SIGINT);
    `expect` waits for a pattern in the output with the escape sequences removed."""

    def __init__(self, env: dict, *args: str):
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 150, 0, 0))
        # No cursor-position requests: nothing here would answer them.
        env = {**env, "TERM": "xterm", "PROMPT_TOOLKIT_NO_CPR": "1"}
        env.pop("NO_COLOR", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "ds4c", *args], stdin=slave, stdout=slave, stderr=slave,
                                     env=env, start_new_session=True,
                                     preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
        os.close(slave)
        self.raw = b""
        self.seen = 0           # `expect` looks at what came after the previous match

    @property
    def text(self) -> str:
        return ANSI.sub(b"", self.raw).decode("utf-8", "replace")

    def expect(self, pattern: str, timeout: float = 30) -> re.Match:
        deadline = time.monotonic() + timeout
        while True:
            m = re.compile(pattern).search(self.text, self.seen)
            if m:
                self.seen = m.end()
                return m
            left = deadline - time.monotonic()
            if left <= 0 or not self._read(left):
                raise AssertionError(f"no {pattern!r} in the REPL's output:\n{self.text[self.seen:]}")

    def _read(self, timeout: float) -> bool:
        if select.select([self.master], [], [], min(timeout, 0.2))[0]:
            try:
                data = os.read(self.master, 65536)
            except OSError:                   # EIO: the other side is gone
                return False
            self.raw += data
        return True

    def send(self, data: str) -> None:
        os.write(self.master, data.encode())

    def prompt(self, session: str) -> None:
        """Wait for the input prompt (prompt_toolkit draws it with cursor moves, not a trailing space)."""
        self.expect(rf"(^|\n){re.escape(session)}>")

    def close(self, timeout: float = 15) -> int | None:
        """The exit status; None when it had to be killed."""
        if self.master < 0:
            return self.proc.returncode
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None
        finally:
            os.close(self.master)
            self.master = -1


@pytest.fixture(scope="module")
def daemon(spawn_ds4d):
    return spawn_ds4d()


@pytest.fixture
def terminals():
    """terminal(env, *args) -> a running REPL; each is closed (killed if need be) after the test."""
    opened: list[Terminal] = []

    def open_(env: dict, *args: str) -> Terminal:
        opened.append(Terminal(env, *args))
        return opened[-1]

    yield open_
    for t in opened:
        t.close(0.1)


def test_a_turn_slash_commands_multiline_and_a_file(daemon, terminals, tmp_path):
    t = terminals(daemon.env, "--session", "r1", "--nothink", "--temp", "0", "-n", "8")
    t.expect(r"tiny q2 model")
    t.expect(r"session r1 \(new; resume it later with `ds4c --session r1`\)")
    t.prompt("r1")
    t.send("hello there\r")
    stats = t.expect(r"\[8 tokens, [\d.]+ tok/s · prompt (\d+) tokens \(0 cached\).* · length\]")
    with Client(daemon.socket) as c:
        history = c.session_history("r1")
    assert [m["role"] for m in history] == ["user", "assistant"] and history[0]["content"] == "hello there"
    assert history[1]["content"].strip() in t.text[:stats.start()]           # the answer was shown
    t.prompt("r1")
    t.send("/tokens\r")
    t.expect(r"session r1: \d+ of 32768 tokens")
    t.prompt("r1")
    t.send("/think\r")
    t.expect(r"thinking on")
    t.prompt("r1")
    t.send("/nothink\r")
    t.expect(r"thinking off")
    t.prompt("r1")
    t.send("/bogus\r")
    t.expect(r"unknown command /bogus; /help lists them")
    t.prompt("r1")
    t.send("/help\r")
    t.expect(r"/session NAME +switch to session NAME")
    # Alt+Enter starts a new line instead of sending; /read attaches a file to the next message.
    (tmp_path / "notes.txt").write_text("the file's text\n")
    t.prompt("r1")
    t.send(f"/read {tmp_path / 'notes.txt'}\r")
    t.expect(r"attached .*notes.txt \(2 lines")
    t.prompt("r1")
    t.send("line one\x1b\rline two\r")
    t.expect(r"\[8 tokens")
    t.prompt("r1")
    t.send("/fork r1-copy\r")
    t.expect(r"forked r1 into r1-copy; now in r1-copy")
    t.prompt("r1-copy")
    t.send("/sessions\r")
    t.expect(r"\* r1-copy +\d+ tokens")
    t.prompt("r1-copy")
    t.send("/stats\r")
    t.expect(r"daemon +up [\d.]+ min .*\nmemory .*\ncounters .*\nlast turn 8 tokens")
    t.prompt("r1-copy")
    t.send("/session r1\r")
    t.expect(r"session r1: 4 messages")
    t.prompt("r1")
    t.send("/clear\r")
    t.expect(r"session r1 is empty now")
    t.prompt("r1")
    t.send("/quit\r")
    assert t.close() == 0
    with Client(daemon.socket) as c:
        last = c.session_history("r1-copy")[-2]
        assert c.session_history("r1") == []
    assert last["role"] == "user" and last["content"].endswith("```\nthe file's text\n\n```\n\nline one\nline two")
    assert "hello there" in (daemon.home / "state" / "ds4" / "ds4c_history").read_text()


def test_ctrl_c_cancels_the_generation_and_returns_to_the_prompt(daemon, terminals):
    t = terminals(daemon.env, "--session", "r2", "--nothink", "--temp", "0", "-n", "100000")
    t.prompt("r2")
    t.send("Tell me a story that never ends.\r")
    with Client(daemon.socket) as c:
        deadline = time.monotonic() + 30
        while c.status()["queue"] == 0:                          # wait until it is generating
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.5)
        t.send("\x03")
        t.expect(r"\[\d+ tokens.* · cancelled\]")
        t.prompt("r2")
        assert c.status()["queue"] == 0                          # the daemon stopped generating
        answer = c.session_history("r2")[-1]
        assert answer["role"] == "assistant" and answer["content"]   # the partial answer stays in the session
    t.send("\x04")                                               # Ctrl+D leaves
    assert t.close() == 0


def test_a_session_resumes_with_its_history_after_a_daemon_restart(spawn_ds4d, terminals):
    d = spawn_ds4d()
    first = terminals(d.env, "--session", "r3", "--nothink", "--temp", "0", "-n", "6", "--no-autostart")
    first.prompt("r3")
    first.send("first question\r")
    first.expect(r"\[6 tokens")
    first.prompt("r3")
    with Client(d.socket) as c:
        answer = c.session_history("r3")[1]["content"]
    assert d.stop() == 0

    d = spawn_ds4d(home=d.home)
    # A REPL that stayed open reconnects by itself.
    first.send("/tokens\r")
    first.expect(r"reconnecting to the daemon\n.*session r3: \d+ of 32768 tokens")
    first.prompt("r3")
    first.send("/quit\r")
    assert first.close() == 0
    # A new one resumes the session and shows its history.
    t = terminals(d.env, "--session", "r3", "--nothink", "--temp", "0", "-n", "6")
    t.expect(r"session r3: 2 messages, \d+ tokens")
    start = t.seen
    t.prompt("r3")
    shown = t.text[start:t.seen]
    assert "> first question\n" in shown and answer.strip() in shown
    t.send("second question\r")
    t.expect(r"prompt \d+ tokens \([1-9]\d* cached\)")           # the restart kept the prompt cache
    t.prompt("r3")
    t.send("/quit\r")
    assert t.close() == 0
