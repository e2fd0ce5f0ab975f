"""The editor integrations against a real daemon (a tiny model on a temporary socket): each editor's own test
suite run by the editor itself (headless Neovim, `node --test` for the VS Code extension's protocol client and
completion logic, Emacs ERT in batch mode), plus keystrokes through Neovim's real command loop (`nvim --embed`
driven over its own msgpack-rpc). An editor that is not installed skips, unless DS4_REQUIRE_REFS=1 (CI), where
it fails."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import msgpack
import pytest

from daemon_harness import Daemon, short_home

ROOT = Path(__file__).resolve().parents[1]
EDITORS = ROOT / "editor-integrations"
NVIM, VSCODE, EMACS = EDITORS / "nvim", EDITORS / "vscode", EDITORS / "emacs"


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        if os.environ.get("DS4_REQUIRE_REFS") == "1":
            pytest.fail(f"{tool} is required (DS4_REQUIRE_REFS=1) but not installed")
        pytest.skip(f"{tool} is not installed")
    return path


@pytest.fixture(scope="module")
def daemon(tiny_model):
    home = short_home()
    d = Daemon(home, tiny_model("q2"))
    yield d
    assert d.stop() == 0, d.log()
    shutil.rmtree(home, ignore_errors=True)


def run(cmd: list[str], daemon: Daemon, cwd: Path = ROOT, timeout: float = 120) -> str:
    """Run an editor's test command with the daemon's environment; its output, or a failure showing it."""
    p = subprocess.run(cmd, cwd=cwd, env=daemon.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       stdin=subprocess.DEVNULL, text=True, timeout=timeout)
    if p.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited with {p.returncode}:\n{p.stdout}\n"
                    f"--- daemon log ---\n{daemon.log()[-3000:]}")
    return p.stdout


# --- Neovim ----------------------------------------------------------------------------------------------------

NVIM_ARGS = ["--headless", "-u", "NONE", "-i", "NONE", "--cmd", f"set rtp^={NVIM}"]


def test_neovim_plugin(daemon):
    out = run([need("nvim"), *NVIM_ARGS, "-c", f"luafile {NVIM / 'tests' / 'run.lua'}"], daemon)
    assert "not ok" not in out and " passed, 0 failed" in out, out


class Nvim:
    """`nvim --embed`, driven over its stdio msgpack-rpc: keys go in through nvim_input, as a user types them."""

    def __init__(self, env: dict):
        self.proc = subprocess.Popen([need("nvim"), "--embed", *NVIM_ARGS], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env)
        self.unpacker = msgpack.Unpacker(raw=False)
        self.next_id = 0

    def call(self, method: str, *args):
        self.next_id += 1
        self.proc.stdin.write(msgpack.packb([0, self.next_id, method, list(args)]))
        self.proc.stdin.flush()
        while True:
            data = os.read(self.proc.stdout.fileno(), 1 << 16)
            assert data, "nvim exited"
            self.unpacker.feed(data)
            for msg in self.unpacker:
                if msg[0] == 1 and msg[1] == self.next_id:
                    assert msg[2] is None, msg[2]
                    return msg[3]

    def lua(self, code: str, *args):
        return self.call("nvim_exec_lua", code, list(args))

    def wait(self, what: str, code: str, timeout: float = 30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.lua(code)
            if value:
                return value
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}")

    def close(self):
        self.proc.kill()
        self.proc.wait()


def test_neovim_typing_debounce_tab_and_fallback(daemon):
    """Typing in insert mode fires the autocommands, the debounce timer requests a completion, <Tab> accepts
    it through the expr mapping; with nothing to accept <Tab> is an ordinary tab."""
    nvim = Nvim(daemon.env)
    try:
        nvim.lua("require('ds4').setup({ debounce_ms = 30, max_tokens = 4 })")
        nvim.call("nvim_input", "ix = ")
        text = nvim.wait("a finished suggestion", "local c = require('ds4.complete') "
                                                  "return not c.streaming() and c.suggestion()")
        nvim.call("nvim_input", "<Tab>")
        assert nvim.wait("the accepted text", "local b = table.concat(vim.api.nvim_buf_get_lines(0, 0, -1, false), "
                                              "'\\n') return b ~= 'x = ' and b") == "x = " + text
        nvim.call("nvim_input", "<Esc>o<Tab>")
        assert nvim.wait("the new line", "local l = vim.api.nvim_buf_get_lines(0, -2, -1, false)[1] "
                                         "return l ~= '' and l") == "\t"
    finally:
        nvim.close()


# --- VS Code ---------------------------------------------------------------------------------------------------

def test_vscode_protocol_client_and_completion_logic(daemon):
    need("node")
    if not (VSCODE / "node_modules").is_dir():
        msg = "editor-integrations/vscode has no node_modules: run `npm ci` there (.ci/run does)"
        if os.environ.get("DS4_REQUIRE_REFS") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    run([need("npm"), "run", "--silent", "compile"], daemon, cwd=VSCODE)     # tests the sources as they are now
    out = run([need("node"), "--test", "--test-reporter=tap", "out/test/"], daemon, cwd=VSCODE)
    assert "# fail 0" in out, out


# --- Emacs -----------------------------------------------------------------------------------------------------

def test_emacs_codec_and_completion(daemon):
    out = run([need("emacs"), "--batch", "-Q", "-L", str(EMACS), "-l", str(EMACS / "test" / "ds4-test.el"),
               "-f", "ert-run-tests-batch-and-exit"], daemon)
    assert ", 0 unexpected" in out, out
