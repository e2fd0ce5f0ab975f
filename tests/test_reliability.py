"""Reliability and security, the quick versions of bench/fuzz_protocol.py, bench/fault_injection.py and
bench/load.py (their long runs are in docs/RELIABILITY.md): a real daemon on a real socket fuzzed, killed inside
its snapshot writes and during generation, given a full disk, loaded by 32 clients at once, and asked by another
user and by hostile session names for what is not theirs. Plus the regressions of what those runs found."""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import sys
import threading
from pathlib import Path

import msgpack
import numpy as np
import pytest

from daemon_harness import Daemon, short_home

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import fault_injection as fi  # noqa: E402
import fuzz_protocol as fp  # noqa: E402
import load  # noqa: E402
from ds4d.kvstore import CRASH_POINTS, PageStore, SnapshotError, read_snapshot  # noqa: E402
from ds4d.model import open_model  # noqa: E402
from ds4d.prefix_cache import PrefixCache  # noqa: E402
from ds4d.session import SessionFiles  # noqa: E402


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("q2")


@pytest.fixture(scope="module")
def template(model):
    return open_model(model).host_state


@pytest.fixture
def home():
    h = short_home()
    yield h
    shutil.rmtree(h, ignore_errors=True)


@pytest.fixture(scope="module")
def fuzzed(model):
    """One daemon for the protocol fuzz and the security checks that follow it."""
    h = short_home()
    d = fp.start(h, model)
    yield d
    d.kill()
    shutil.rmtree(h, ignore_errors=True)


# --- protocol fuzz ------------------------------------------------------------------------------------------------

def test_protocol_fuzz(fuzzed):
    stats = fp.fuzz(fuzzed, 1500, seed=11, examples_per_round=40)
    assert stats["frames"] >= 1500 and stats["answer:ok"] > 0 and stats["answer:bad_request"] > 0
    assert fuzzed.proc.poll() is None and "Traceback" not in fuzzed.log()


# --- fault injection ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("point, n", list(zip(CRASH_POINTS, (2, 4, 6, 9, 12))))
def test_sigkill_inside_a_snapshot_write(home, model, template, point, n):
    tally = fi.crash_trial(home, model, template, point, n)
    assert tally["crash_hook_fired"] == 1 and tally["files_verified"] > 0


def test_sigkill_during_generation(home, model, template):
    tally = fi.kill_trial(home, model, template, seed=3)
    assert tally["crash_hook_fired"] == 0 and tally["sessions_at_last_logged_save"] > 0


def test_full_disk_while_saving(home, model, template):
    assert fi.full_disk_trial(home, model, template)["full_disk_trials"] == 1


def test_client_killed_mid_stream(home, model):
    assert fi.client_kill_trials(home, model, 2)["clients_killed"] == 2


def test_pages_of_a_snapshot_being_written_are_never_collected(tmp_path, template):
    """Regression (found reading the page collector, confirmed by this loop): the prefix cache
    collected, on the engine's worker, the pages a session save on the writer thread had just written but whose
    snapshot file was not renamed into place yet; the session then failed to load ("page ... is missing")."""
    pages, files, cache = stores(tmp_path, template)
    rng = np.random.default_rng(0)
    stop = threading.Event()

    def collect():
        while not stop.is_set():
            cache._collect_pages()

    collector = threading.Thread(target=collect)
    collector.start()
    broken = 0
    try:
        for _ in range(8):                     # before the fix, three saves in four lost pages
            files.save("s", [1] * 128, filled(template, rng), [], 0.0)
            try:
                read_snapshot(files.path("s"), "f" * 64, template(), pages)
            except SnapshotError:
                broken += 1
    finally:
        stop.set()
        collector.join()
    assert broken == 0


def test_counting_the_disk_tier_while_a_session_is_saved(tmp_path, template):
    """Regression (found by bench/load.py: `complete` answered `internal error: FileNotFoundError`): the prefix
    cache's size of the disk tier counted every file under pages/, the writer thread's temp files included, and
    failed when one was renamed between the listing and its stat."""
    pages, files, cache = stores(tmp_path, template)
    rng = np.random.default_rng(1)
    done = threading.Event()

    def save():
        for _ in range(8):
            files.save("s", [1] * 128, filled(template, rng), [], 0.0)
        done.set()

    saver = threading.Thread(target=save)
    saver.start()
    try:
        while not done.is_set():
            assert cache.disk_bytes() >= 0
    finally:
        saver.join()
    assert cache.disk_bytes() == sum(p.stat().st_size for p in pages.root.glob("??/*"))


def stores(tmp_path, template):
    """The page store, session files and prefix cache of one model, as the engine wires them."""
    pages = PageStore(tmp_path / "pages")
    files = SessionFiles(tmp_path / "sessions", "f" * 64, pages)
    files.root.mkdir(parents=True)
    return pages, files, PrefixCache(tmp_path, "f" * 64, template, 1 << 20, 1 << 20, pages)


def filled(template, rng):
    """A state with two full pages of fresh rows in every row store."""
    state = template()
    for layer in state.layers:
        for store in (layer.comp, layer.idx):
            if store is not None:
                store.append(rng.standard_normal((128, store.width)).astype(store.dtype))
    return state


# --- load ---------------------------------------------------------------------------------------------------------

def test_32_clients_mixing_every_kind_of_request(home, model):
    d = Daemon(home, model, *load.SERVE_ARGS)
    try:
        fig = load.run_load(d, clients=32, seconds=2)
        assert fig["requests"] >= 32 and fig["peak_rss"] > 0
        assert d.stop() == 0
    finally:
        d.kill()
    assert load.check_sessions_reload(home, model, 32) > 0


# --- security -----------------------------------------------------------------------------------------------------

def test_session_names_cannot_leave_the_cache_directory(fuzzed):
    before = {p for p in fuzzed.home.rglob("*") if "sessions" not in p.parts}
    c = fuzzed.client()
    escaping = [n for n in fp.NAMES if "/" in n or "\\" in n or ".." in n or n.startswith(".") or n in ("", "~")]
    for name in escaping:
        for method, params in [("session.open", {"name": name}), ("session.info", {"name": name}),
                               ("session.history", {"name": name}), ("session.close", {"name": name}),
                               ("session.delete", {"name": name}), ("session.fork", {"name": "zz-witness-gen",
                                                                                     "new_name": name}),
                               ("generate", {"prompt": "x", "max_tokens": 1, "session": name}),
                               ("chat", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1,
                                         "session": name}),
                               ("complete", {"prefix": "x", "max_tokens": 1, "session": name})]:
            e = c.error(method, **params)
            assert e["code"] == "bad_request" and "session names" in e["message"], (method, name, e)
    c.close()
    assert {p for p in fuzzed.home.rglob("*") if "sessions" not in p.parts} == before
    for p in (fuzzed.home / "sessions").rglob("*"):
        assert p.resolve().is_relative_to((fuzzed.home / "sessions").resolve())


def test_socket_cache_and_log_are_private(fuzzed):
    """Regression: session snapshots (whole conversations) and the log were created 0644 in 0755 directories."""
    assert stat.S_IMODE(fuzzed.socket.stat().st_mode) == 0o600
    assert stat.S_IMODE(fuzzed.socket.parent.stat().st_mode) == 0o700
    cache = fuzzed.home / "sessions"
    made = [p for p in cache.rglob("*")] + [fuzzed.home / "state" / "ds4" / "ds4d.log"]
    assert any(p.suffix == ".snap" for p in made)
    for p in made:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (0o700 if p.is_dir() else 0o600), (p, oct(mode))


def test_size_limits(fuzzed):
    c = fuzzed.client()
    assert c.error("generate", prompt="word " * 600)["code"] == "context_full"          # --ctx 512
    r = c.call("generate", prompt="word " * 480, max_tokens=5000, temperature=0)
    assert r["finish_reason"] in ("context_full", "eos")
    assert r["usage"]["prompt_tokens"] + r["usage"]["completion_tokens"] <= 512
    assert c.error("generate", prompt="x", max_tokens=-1)["code"] == "bad_request"
    assert c.error("generate", prompt="x", logprobs=10**6)["code"] == "bad_request"
    assert c.error("chat", messages=[{"role": "user", "content": fp._nest(200)}])["code"] == "bad_request"
    c.close()


PEER = """
import socket, sys
try:
    open(sys.argv[2], "rb").read(1)
    print("READ", end=" ")
except PermissionError:
    print("EACCES", end=" ")
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(20)
try:
    s.connect(sys.argv[1])
except PermissionError:
    print("EACCES")
    sys.exit()
try:
    s.sendall(bytes.fromhex(sys.argv[3]))
    print("SERVED" if s.recv(65536) else "CLOSED")
except (BrokenPipeError, ConnectionResetError):
    print("CLOSED")
"""


def test_another_user_can_neither_connect_nor_read_sessions(fuzzed):
    if os.getuid() != 0:
        pytest.skip("running a client as a second user needs root")
    name = "ds4test"
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        r = subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot create the user {name}: {r.stderr.strip()}")
        pw = pwd.getpwnam(name)
    python = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")
    if python is None:
        pytest.skip("no system python3 that a second user can run")
    snap = next((fuzzed.home / "sessions").rglob("*.snap"))
    hello = msgpack.packb([0, 1, "hello", [{"protocol": "1.0"}]]).hex()

    def as_other() -> str:
        r = subprocess.run([python, "-c", PEER, str(fuzzed.socket), str(snap), hello], user=pw.pw_uid,
                           group=pw.pw_gid, extra_groups=[], cwd="/", capture_output=True, text=True, timeout=30)
        return r.stdout.strip() or r.stderr

    assert as_other() == "EACCES EACCES"
    # With every directory on the way opened up (by root, here), the files' own modes and the daemon's peer-uid
    # check still refuse.
    dirs = [fuzzed.socket.parent] + [p for p in snap.parents if p.is_relative_to(fuzzed.home)]
    modes = {p: stat.S_IMODE(p.stat().st_mode) for p in dirs + [fuzzed.socket]}
    for p in dirs:
        os.chmod(p, 0o711)
    os.chmod(fuzzed.socket, 0o777)
    try:
        assert as_other() == "EACCES CLOSED"
    finally:
        for p, mode in modes.items():
            os.chmod(p, mode)
    assert f"refused a connection from uid {pw.pw_uid}" in fuzzed.log()
