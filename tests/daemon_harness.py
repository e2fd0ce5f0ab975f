"""The test harness for a real daemon: `Daemon` runs `python -m ds4d serve` as a subprocess in a private home
(XDG directories, socket, cache), `Client` speaks raw msgpack-rpc to it. Shared by the daemon's, the client's
and the editors' tests; no mock anywhere: a real process on a real socket."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgpack


def tiny_q2(directory: Path) -> str:
    """The tiny q2 model written into `directory` (the benchmark scripts' default model); its path."""
    from ds4d.tiny import make_tiny
    path = Path(directory) / "tiny-q2.gguf"
    make_tiny(path, "q2")
    return str(path)


class Client:
    """A raw msgpack-rpc client: requests go out, notifications are kept per request id, responses by id."""

    def __init__(self, path, timeout: float = 60):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.unpacker = msgpack.Unpacker(raw=False)
        self.notes: dict[int, list[dict]] = {}
        self.responses: dict[int, list] = {}
        self.next_id = 0

    def send(self, method: str, **params) -> int:
        self.next_id += 1
        self.sock.sendall(msgpack.packb([0, self.next_id, method, [params]]))
        return self.next_id

    def pump(self) -> bool:
        """Read once; False at EOF."""
        data = self.sock.recv(1 << 20)
        if not data:
            return False
        self.unpacker.feed(data)
        for msg in self.unpacker:
            if msg[0] == 2:
                assert msg[1] == "stream" and len(msg[2]) == 1
                self.notes.setdefault(msg[2][0]["id"], []).append(msg[2][0])
            else:
                self.responses[msg[1]] = msg
        return True

    def wait(self, msgid: int) -> list:
        while msgid not in self.responses:
            assert self.pump(), "the daemon closed the connection"
        return self.responses[msgid]

    def call(self, method: str, **params):
        """The result; raises AssertionError on an error response."""
        msg = self.wait(self.send(method, **params))
        assert msg[2] is None, msg[2]
        return msg[3]

    def error(self, method: str, **params) -> dict:
        msg = self.wait(self.send(method, **params))
        assert msg[2] is not None, msg
        return msg[2]

    def closed_by_peer(self, timeout: float = 10) -> bool:
        """True when the daemon closes the connection (after whatever it still had to say)."""
        self.sock.settimeout(timeout)
        try:
            while self.pump():
                pass
        except ConnectionResetError:
            pass
        return True

    def close(self):
        self.sock.close()


class Daemon:
    def __init__(self, home: Path, model: str | None, *args: str, wrapper: list[str] | None = None,
                 env: dict | None = None, wait: bool = True):
        self.home = home
        self.socket = home / "run" / "ds4.sock"
        self.env = {**os.environ, "XDG_STATE_HOME": str(home / "state"), "XDG_CACHE_HOME": str(home / "cache"),
                    "XDG_CONFIG_HOME": str(home / "config"), "XDG_DATA_HOME": str(home / "data"),
                    "DS4_SOCKET": str(self.socket), **(env or {})}
        self.env.pop("DS4_MODEL", None)
        if "PYTHONPATH" in self.env:         # the daemon runs in `home`: relative entries would stop working
            self.env["PYTHONPATH"] = os.pathsep.join(map(os.path.abspath, self.env["PYTHONPATH"].split(os.pathsep)))
        # DS4_TEST_BACKEND=cuda runs the daemon tests on the GPU (an explicit --backend in args still wins).
        backend = os.environ.get("DS4_TEST_BACKEND")
        cmd = [sys.executable, "-m", "ds4d", "serve", "--cache-dir", str(home / "sessions"), "--log-level", "debug",
               *(["--backend", backend] if backend else []), *(["-m", model] if model else []), *args]
        self.stderr = open(home / "stderr.log", "ab")
        self.proc = subprocess.Popen((wrapper or []) + cmd, env=self.env, cwd=home, stderr=self.stderr,
                                     stdout=subprocess.DEVNULL)
        if wait:
            try:
                self.wait_ready()
            except BaseException:
                self.kill()
                raise

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def wait_ready(self, timeout: float = 60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"the daemon exited early:\n{self.log()}"
            try:
                c = Client(self.socket, timeout=5)
                c.call("hello", protocol="1.0", client="test")
                c.close()
                return
            except (FileNotFoundError, ConnectionRefusedError, socket.timeout):
                time.sleep(0.05)
        raise AssertionError(f"the daemon did not come up:\n{self.log()}")

    def client(self) -> Client:
        return Client(self.socket)

    def log(self) -> str:
        return (self.home / "stderr.log").read_text(errors="replace")

    def memory(self, key: str = "VmHWM") -> int:
        """A memory figure of the daemon process in bytes from /proc/<pid>/status: VmHWM is the peak resident
        set, VmRSS the current one."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(key)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM (once: a second one means "exit now") and the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def wait(self, timeout: float = 30) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self.stderr.close()


def short_home() -> Path:
    """Unix socket paths are limited to 107 bytes: pytest's tmp_path can be longer."""
    return Path(tempfile.mkdtemp(prefix="ds4t-", dir="/tmp"))
