"""Fault injection: the daemon killed at many points, a full disk while saving, clients killed mid-stream.

    PYTHONPATH=daemon:client python bench/fault_injection.py [--writes 10] [--kills 15] [--out FILE]

Every trial runs `python -m ds4d serve` on the tiny q2 model (tests/daemon_harness.py) in a fresh home, with a
1 MiB RAM prompt cache so that prefix snapshots and their pages spill to disk during the run, and drives chat
turns round-robin through three named sessions (each turn a session save: pages, then the snapshot file).

* Crash points: `DS4_TEST_CRASH_AT=<point>:<n>` makes the daemon SIGKILL itself at one of kvstore's
  CRASH_POINTS (before the temp file, half written, written but not fsynced, fsynced but not renamed, renamed but
  the directory not fsynced) of its n-th atomic write, whatever file that is (a page, a session, a prefix
  snapshot): every point at each of `--writes` write numbers.
* Kills during generation: SIGKILL from outside after a random number of streamed pieces of a random turn.

After each kill the daemon restarts on the same cache, and the oracle is:
  * no temp file of an interrupted write survives the restart, and every snapshot file on disk (sessions and
    prefix cache) verifies completely (checksum, fingerprint, every page it references) against the model;
  * every named session loads at its last complete snapshot: the last save the daemon logged ("saved session"),
    or the save it was finishing when killed if that one's rename had already happened (its log line never came);
    a session whose file write was cut before the rename is at its previous save; the user messages it holds are
    exactly those the client sent, in order; and it continues from its cached state (`cached_tokens` > 0);
  * the restarted daemon logs no unusable snapshot and no traceback, and stops cleanly.

* Full disk: RLIMIT_FSIZE lowered on the running daemon (prlimit; it ignores SIGXFSZ) below the size of a session
  file, so its writes fail as on a full disk (EFBIG instead of ENOSPC; the daemon handles both as OSError), which
  needs neither root nor a mount. The session's next save fails: `session.close` answers `out_of_memory` naming
  the failure and keeps the session loaded, later requests in it carry a warning, the file on disk stays the
  previous complete save and no temp file is left; once there is room again, `session.close` saves it and a
  restart loads it.
* Clients killed mid-stream: a client process SIGKILLed while a long generation streams to it. Its request is
  cancelled (the queue empties, decoding stops), its session memory is released (`status` memory.sessions back
  to what it was) and the daemon's resident memory stays flat over many such kills.

tests/test_reliability.py runs one trial of each kind.
"""

from __future__ import annotations

import argparse
import platform
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import date
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from daemon_harness import Client, Daemon, short_home, tiny_q2  # noqa: E402
from ds4d.kvstore import CRASH_POINTS, PageStore, SnapshotError, read_snapshot  # noqa: E402

SERVE_ARGS = ("--ram-cache-mb", "1", "--disk-cache-mb", "64")
SESSIONS = ("fa", "fb", "fc")
WORDS = "the a daemon crash disk page snapshot rename fsync session model token cache write kill".split()
WRITE_NUMBERS = (1, 2, 3, 5, 8, 12, 17, 23, 30, 40)        # which atomic write to crash in (--writes takes a prefix)
TURNS = 30


class Violation(AssertionError):
    pass


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# --- driving the daemon until it dies -----------------------------------------------------------------------------

def workload(d: Daemon, rng: random.Random, turns: int, kill_at: tuple[int, int] | None = None) -> dict:
    """Chat turns round-robin over SESSIONS until `turns` are done or the daemon dies; `kill_at` = (turn, pieces)
    SIGKILLs it from outside after that many streamed pieces of that turn. Returns the user texts sent per
    session (the last one may not have been answered)."""
    sent: dict[str, list[str]] = {n: [] for n in SESSIONS}
    c = Client(d.socket, timeout=60)
    try:
        for t in range(turns):
            name = SESSIONS[t % len(SESSIONS)]
            # Long turns: a session passes 256 tokens (a full page of compressed rows) within a few turns.
            text = f"turn {t}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 80)))
            sent[name].append(text)
            i = c.send("chat", session=name, messages=user(text), thinking="none", max_tokens=rng.randint(4, 24),
                       temperature=1.0, seed=t)
            if kill_at is not None and kill_at[0] == t:
                while len(c.notes.get(i, [])) < kill_at[1] and i not in c.responses:
                    c.pump()
                d.kill()
            c.wait(i)
    except (AssertionError, OSError):           # the daemon is gone (or going) mid-request
        pass
    finally:
        c.close()
    return sent


SAVED = re.compile(r"saved session (\S+): (\d+) tokens, (\d+) messages")
CRASHED = re.compile(r"DS4_TEST_CRASH_AT: SIGKILL at (\S+) of write (\d+) \((.*)\)")


def saves_and_crash(log: str) -> tuple[dict[str, tuple[int, int]], tuple[str, Path] | None]:
    """The last logged save of each session (tokens, messages) and the crash (point, file), if the hook fired."""
    last = {m[1]: (int(m[2]), int(m[3])) for m in SAVED.finditer(log)}
    m = CRASHED.search(log)
    return last, (m[1], Path(m[3])) if m else None


# --- the oracle -------------------------------------------------------------------------------------------------

def verify_files(cache: Path, fingerprint: str, template) -> int:
    """Every snapshot file under the cache verifies completely; no temp file is left. Returns how many files."""
    temps = [p for p in cache.rglob(".*.tmp")]
    if temps:
        raise Violation(f"temp files of interrupted writes survived the restart: {temps}")
    pages = PageStore(cache / "pages")
    snaps = sorted(cache.rglob("*.snap"))
    for snap in snaps:
        try:
            read_snapshot(snap, fingerprint, template(), pages)
        except SnapshotError as e:
            raise Violation(f"a corrupt snapshot file is on disk: {snap}: {e}") from None
    return len(snaps)


def check_sessions(c: Client, sent: dict, last: dict, crash: tuple[str, Path] | None) -> Counter:
    """Each named session is at its last complete snapshot (see the module docstring) and continues from it."""
    tally: Counter = Counter()
    for name in SESSIONS:
        prev = last.get(name)
        crashed_here = crash is not None and crash[1].name == f"{name}.snap"
        if crashed_here and crash[0] == "after-rename":
            allowed = ("next",)                    # the new file is in place: that is the last complete save
        elif crashed_here:
            allowed = ("last",)                    # the new file never replaced the old one
        else:
            allowed = ("last", "next")             # killed between a rename and its log line, or not
        msg = c.wait(c.send("session.info", name=name))
        if msg[2] is not None:
            if msg[2]["code"] != "not_found" or (prev is not None or "last" not in allowed):
                raise Violation(f"session {name}: {msg[2]} (last logged save {prev}, allowed {allowed})")
            tally["sessions_never_saved"] += 1
            continue
        info = msg[3]
        got = (info["tokens"], len(info["messages"]))
        users = [m["content"] for m in info["messages"] if m["role"] == "user"]
        if users != sent[name][:len(users)]:
            raise Violation(f"session {name}: its user messages are not the ones sent, in order")
        base_tokens, base_msgs = prev if prev is not None else (0, 0)
        if "last" in allowed and prev is not None and got == prev:
            tally["sessions_at_last_logged_save"] += 1
        elif "next" in allowed and got[1] == base_msgs + 2 and got[0] > base_tokens:
            tally["sessions_at_save_finishing_when_killed"] += 1
        else:
            raise Violation(f"session {name} loaded with (tokens, messages) {got}; last logged save {prev}, "
                            f"allowed {allowed}, crash {crash}")
        r = c.call("chat", session=name, messages=user("after the restart"), thinking="none", max_tokens=2,
                   temperature=0)
        if r["usage"]["cached_tokens"] == 0:
            raise Violation(f"session {name} restarted from nothing: its snapshot was not used")
    return tally


def restart_and_check(home: Path, model: str, sent: dict, template) -> Counter:
    """Restart on the killed daemon's cache and apply the whole oracle."""
    log = (home / "stderr.log").read_text(errors="replace")
    last, crash = saves_and_crash(log)
    cache = home / "sessions"
    tally = Counter(temp_files_left_by_the_kill=len(list(cache.rglob(".*.tmp"))))
    with open(home / "stderr.log", "w"):
        pass                                      # the restarted daemon's log alone, below
    d = Daemon(home, model, *SERVE_ARGS)
    try:
        c = d.client()
        fingerprint = c.call("hello", protocol="1.0", client="fault")["model"]["fingerprint"]
        tally["files_verified"] += verify_files(cache, fingerprint, template)
        tally.update(check_sessions(c, sent, last, crash))
        c.close()
        if d.stop() != 0:
            raise Violation("the restarted daemon did not stop cleanly")
        for word in ("unusable", "ignoring prefix snapshot", "cannot save", "Traceback"):
            if word in d.log():
                raise Violation(f"{word!r} in the restarted daemon's log:\n{d.log()[-3000:]}")
    finally:
        d.kill()
    tally["crash_hook_fired"] += crash is not None
    return tally


def crash_trial(home: Path, model: str, template, point: str, n: int, seed: int = 0) -> Counter:
    """SIGKILL at `point` of the n-th atomic write, restart, check."""
    d = Daemon(home, model, *SERVE_ARGS, env={"DS4_TEST_CRASH_AT": f"{point}:{n}"})
    try:
        sent = workload(d, random.Random(seed), TURNS)
        try:
            d.proc.wait(5)                        # a save queued by the last turn may still be on its way
        except subprocess.TimeoutExpired:
            d.kill()                              # the workload made fewer writes: an idle kill then
        d.wait()
    finally:
        d.kill()
    return restart_and_check(home, model, sent, template)


def kill_trial(home: Path, model: str, template, seed: int) -> Counter:
    """SIGKILL from outside while a turn streams, restart, check."""
    rng = random.Random(seed)
    d = Daemon(home, model, *SERVE_ARGS)
    try:
        sent = workload(d, rng, TURNS, kill_at=(rng.randint(0, 11), rng.randint(1, 6)))
        d.wait()
    finally:
        d.kill()
    return restart_and_check(home, model, sent, template)


# --- a full disk ---------------------------------------------------------------------------------------------------

def full_disk_trial(home: Path, model: str, template) -> Counter:
    d = Daemon(home, model, *SERVE_ARGS)
    tally: Counter = Counter()
    try:
        c = d.client()
        fingerprint = c.call("hello", protocol="1.0")["model"]["fingerprint"]
        for q in ("first question about the disk", "second question"):
            c.call("chat", session="disk", messages=user(q), thinking="none", max_tokens=8, temperature=0)
        assert c.call("session.close", name="disk") == {}
        path = next((home / "sessions" / "sessions").rglob("disk.snap"))
        before = read_snapshot(path, fingerprint, template(), PageStore(home / "sessions" / "pages"))[0]
        logs = [home / "stderr.log", home / "state" / "ds4" / "ds4d.log"]
        limit = max(p.stat().st_size for p in logs) + (128 << 10)        # the logs still fit; a session does not
        if path.stat().st_size <= limit:
            raise Violation(f"a session file ({path.stat().st_size} bytes) is not larger than the limit {limit}")
        resource.prlimit(d.proc.pid, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
        c.call("chat", session="disk", messages=user("third, on a full disk"), thinking="none", max_tokens=8,
               temperature=0)
        e = c.error("session.close", name="disk")
        if e["code"] != "out_of_memory" or "cannot be saved" not in e["message"]:
            raise Violation(f"session.close on a full disk: {e}")
        tally["clear_errors"] += 1
        r = c.call("chat", session="disk", messages=user("fourth"), thinking="none", max_tokens=4, temperature=0)
        if not any("not saved" in w for w in r.get("warnings", [])):
            raise Violation(f"a request in an unsaved session carries no warning: {r.get('warnings')}")
        # Anything else the daemon writes meanwhile (prefix snapshots spilling from the 1 MiB RAM tier) fails too.
        c.call("generate", prompt=" ".join(["spill"] * 300), max_tokens=2, temperature=0)
        if d.proc.poll() is not None:
            raise Violation("the daemon died on a full disk")
        if list((home / "sessions").rglob(".*.tmp")):
            raise Violation("a failed write left its temp file")
        now = read_snapshot(path, fingerprint, template(), PageStore(home / "sessions" / "pages"))[0]
        if now != before:
            raise Violation("the session file changed although its save failed")
        tally["files_intact"] += 1
        resource.prlimit(d.proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        live = c.call("session.info", name="disk")
        assert c.call("session.close", name="disk") == {}
        c.close()
        if d.stop() != 0:
            raise Violation("the daemon did not stop cleanly after a full disk")
        if "cannot save session disk" not in d.log():
            raise Violation("the failed save is not in the log")
    finally:
        d.kill()
    d = Daemon(home, model, *SERVE_ARGS)
    try:
        c = d.client()
        info = c.call("session.info", name="disk")
        if (info["tokens"], info["messages"]) != (live["tokens"], live["messages"]):
            raise Violation("after the disk had room again, the session did not load at its latest state")
        verify_files(home / "sessions", fingerprint, template)
        c.close()
        d.stop()
    finally:
        d.kill()
    tally["full_disk_trials"] += 1
    return tally


# --- clients killed mid-stream ----------------------------------------------------------------------------------

STREAMING_CLIENT = """
import socket, sys, msgpack
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
s.sendall(msgpack.packb([0, 1, "generate", [{"prompt": "a story that never ends", "max_tokens": 100000,
                                            "temperature": 1.0, "session": sys.argv[2] or None}]]))
u = msgpack.Unpacker(raw=False)
while True:
    u.feed(s.recv(65536))
    if any(m[0] == 2 and m[2][0]["kind"] == "content" for m in u):
        print("streaming", flush=True)
        break
sys.stdin.read()                      # until SIGKILL
"""


def client_kill_trials(home: Path, model: str, kills: int) -> Counter:
    """SIGKILL `kills` streaming client processes (every other one in a named session); returns the figures."""
    d = Daemon(home, model, *SERVE_ARGS)
    tally: Counter = Counter()
    try:
        watcher = d.client()
        baseline = watcher.call("status")["memory"]["sessions"]
        rss = []
        for k in range(kills):
            session = f"killed-{k}" if k % 2 else ""
            p = subprocess.Popen([sys.executable, "-c", STREAMING_CLIENT, str(d.socket), session],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            if p.stdout.readline().strip() != "streaming":
                raise Violation("the client never saw its stream")
            p.send_signal(signal.SIGKILL)
            p.wait()
            if not _until(lambda: watcher.call("status")["queue"] == 0, 10):
                raise Violation("a killed client's request is still queued")
            decoded = watcher.call("status")["counters"]["decode_tokens"]
            time.sleep(0.2)
            status = watcher.call("status")
            if status["counters"]["decode_tokens"] != decoded:
                raise Violation("the daemon kept decoding for a killed client")
            if session:                          # a named session stays loaded (and saved) until closed
                watcher.call("session.close", name=session)
            if watcher.call("status")["memory"]["sessions"] != baseline:
                raise Violation("the killed client's session memory was not released")
            rss.append(d.memory("VmRSS"))
            tally["clients_killed"] += 1
        watcher.close()
        tally["rss_first_kib"], tally["rss_half_kib"], tally["rss_last_kib"] = (rss[0] >> 10, rss[len(rss) // 2] >> 10,
                                                                                rss[-1] >> 10)
        tally["rss_peak_kib"] = d.memory("VmHWM") >> 10
        if d.stop() != 0:
            raise Violation("the daemon did not stop cleanly")
    finally:
        d.kill()
    return tally


def _until(cond, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


# --- the run ------------------------------------------------------------------------------------------------------

def fresh(run: Callable, *args) -> Counter:
    home = short_home()
    try:
        return run(home, *args)
    finally:
        shutil.rmtree(home, ignore_errors=True)


def main() -> None:
    from ds4d.model import open_model
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a tiny q2 GGUF (default: generated)")
    ap.add_argument("--writes", type=int, default=len(WRITE_NUMBERS), help="write numbers per crash point")
    ap.add_argument("--kills", type=int, default=15, help="kills during generation")
    ap.add_argument("--client-kills", type=int, default=20)
    ap.add_argument("--full-disk", type=int, default=3)
    ap.add_argument("--out", help="also write the figures (markdown) here")
    a = ap.parse_args()
    work = short_home()
    model = a.model or tiny_q2(work)
    template = open_model(model).host_state
    t0 = time.monotonic()
    total: Counter = Counter()
    for point in CRASH_POINTS:
        for n in WRITE_NUMBERS[:a.writes]:
            total.update(fresh(crash_trial, model, template, point, n))
            total["crash_point_trials"] += 1
            print(f"crash at {point} of write {n}: ok", flush=True)
    for k in range(a.kills):
        total.update(fresh(kill_trial, model, template, k))
        total["kill_trials"] += 1
        print(f"kill during generation {k}: ok", flush=True)
    for _ in range(a.full_disk):
        total.update(fresh(full_disk_trial, model, template))
    print("full disk: ok", flush=True)
    kills = fresh(client_kill_trials, model, a.client_kills)
    elapsed = time.monotonic() - t0
    shutil.rmtree(work, ignore_errors=True)
    sessions = total["sessions_at_last_logged_save"] + total["sessions_at_save_finishing_when_killed"]
    lines = [f"## Fault injection ({date.today()}, {platform.node()}, {platform.machine()})", "",
             f"* daemon SIGKILLs survived: {total['crash_point_trials'] + total['kill_trials']} "
             f"({total['crash_point_trials']} inside atomic writes: {len(CRASH_POINTS)} crash points x "
             f"{a.writes} write numbers, the hook fired in {total['crash_hook_fired']}; {total['kill_trials']} "
             f"from outside during generation), {elapsed:.0f} s in all",
             f"* after each restart: {total['files_verified']:,} snapshot files verified, 0 corrupt; "
             f"{total['temp_files_left_by_the_kill']} temp files of interrupted writes, all removed at the start",
             f"* named sessions checked: {sessions + total['sessions_never_saved']} "
             f"({total['sessions_at_last_logged_save']} at their last logged save, "
             f"{total['sessions_at_save_finishing_when_killed']} at the save whose rename had completed when the "
             f"kill came, {total['sessions_never_saved']} never saved yet and absent); every one continued from "
             f"its cached state; data lost: none",
             f"* full disk (RLIMIT_FSIZE): {total['full_disk_trials']} trials, each a clear `out_of_memory` error "
             f"on session.close and a warning on the next request, the previous file intact, no temp file left, "
             f"the session saved once there was room",
             f"* clients SIGKILLed mid-stream: {kills['clients_killed']}, every request cancelled, session memory "
             f"back to its baseline each time; daemon VmRSS {kills['rss_first_kib'] >> 10} MiB after the first, "
             f"{kills['rss_half_kib'] >> 10} MiB half way, {kills['rss_last_kib'] >> 10} MiB after the last (peak "
             f"{kills['rss_peak_kib'] >> 10} MiB; the memory-mapped weights count as their pages are touched)", ""]
    print("\n".join(lines))
    if a.out:
        Path(a.out).write_text("\n".join(lines))


if __name__ == "__main__":
    main()
