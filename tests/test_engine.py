"""The engine: sessions that only pay for new tokens (also across a restart), the prefix cache's tiers and its
resistance to bad files, batched decode, scheduling, cancellation and the errors a client must hear."""

from __future__ import annotations

import hashlib
import logging
import threading
import time

import numpy as np
import pytest

from ds4d.engine import ALONE_CHUNKS, SNAP_TAIL, Engine, EngineError, Job
from ds4d.model import open_model


@pytest.fixture(scope="module")
def model(tiny_model):
    return open_model(tiny_model("q2"), numerics="exact")


def engine(model, tmp_path, **kw):
    kw.setdefault("ctx", 4096)
    return Engine(model, cache_dir=tmp_path / "cache", **kw).start()


def user(text):
    return [{"role": "user", "content": text}]


def prefilled(e, fn):
    before = e.counters["prefill_tokens"]
    r = fn()
    return r, e.counters["prefill_tokens"] - before


@pytest.mark.parametrize("thinking", ["none", "high"])
def test_ten_turn_chat_prefills_only_new_tokens_also_after_restart(model, tmp_path, thinking):
    e = engine(model, tmp_path)
    prev_prompt = prev_timeline = None
    exact_turns = 0
    for turn in range(10):
        r, n = prefilled(e, lambda: e.call("chat", session="talk", messages=user(f"Question {turn}: why?"),
                                           thinking=thinking, max_tokens=6, temperature=0))
        prompt_len, cached = r["usage"]["prompt_tokens"], r["usage"]["cached_tokens"]
        assert n == prompt_len - cached                       # everything not reused is prefilled, once
        if turn == 0:
            assert cached == 0
        elif thinking == "none":
            # The whole previous timeline (prompt + the answer's ids) is reused: only the new turn is prefilled.
            # Exception: a random model sometimes emits tokens that are parts of a UTF-8 character. When the answer
            # ends inside one (its last token is never fed) or holds one that never completes (the text a client
            # sees has U+FFFD there), reuse ends at the last character the ids spell exactly; the snapshot at the
            # end of the previous prompt still saves everything before the answer.
            assert prev_prompt <= cached <= prev_timeline
            exact_turns += cached == prev_timeline
        else:
            # The template drops the previous reasoning: the prompt diverges at the previous prompt's last token
            # (<think> became </think>), so the previous answer is prefilled again, and nothing before it.
            assert cached == prev_prompt - 1
            exact_turns += 1
        prev_prompt = prompt_len
        prev_timeline = prompt_len + r["usage"]["completion_tokens"] - 1   # the last sampled token is never fed
    assert exact_turns >= 5
    history = e.call("session.history", name="talk")["messages"]
    assert len(history) == 20 and history[-1]["role"] == "assistant"
    e.stop()
    # A new engine (a restart) finds the session on disk and again prefills only the new turn.
    e2 = engine(model, tmp_path)
    r, n = prefilled(e2, lambda: e2.call("chat", session="talk", messages=user("After the restart?"),
                                         thinking=thinking, max_tokens=4, temperature=0))
    assert n == r["usage"]["prompt_tokens"] - r["usage"]["cached_tokens"]
    if thinking == "none":
        assert prev_prompt <= r["usage"]["cached_tokens"] <= prev_timeline
    else:
        assert r["usage"]["cached_tokens"] == prev_prompt - 1
    assert e2.call("session.info", name="talk")["tokens"] > 0
    e2.stop()


def test_cache_hit_gives_the_same_logits_as_a_cold_prefill(model, tmp_path):
    ids = [int(t) for t in np.random.default_rng(0).integers(0, 129280, 300)]

    def first_logprobs(e):
        _, events, done, box = _track(e, "generate", tokens=ids, max_tokens=1, temperature=0, logprobs=20)
        assert done.wait(60)
        top = next(ev["logprobs"][0]["top"] for _, ev in events if ev.get("logprobs"))
        return box["r"], np.array([lp for _, lp in top]), [t for t, _ in top]

    cold = engine(model, tmp_path / "cold")
    ref, ref_lp, ref_ids = first_logprobs(cold)
    cold.stop()
    warm = engine(model, tmp_path / "warm")
    warm.call("generate", tokens=ids[:290] + [5, 6, 7], max_tokens=1, temperature=0)
    hit, hit_lp, hit_ids = first_logprobs(warm)
    warm.stop()
    # The first warm request left snapshots at its chunk ends, 16 / 1 / 0 tokens before its end (293 tokens):
    # the longest that is a prefix of `ids` is 277.
    assert ref["usage"]["cached_tokens"] == 0 and hit["usage"]["cached_tokens"] == 293 - SNAP_TAIL[0]
    assert hit_ids == ref_ids and np.abs(hit_lp - ref_lp).max() < 1e-4 * np.abs(ref_lp).max()


def test_forks_are_independent_and_sessions_list(model, tmp_path):
    e = engine(model, tmp_path)
    e.call("chat", session="a", messages=user("one"), thinking="none", max_tokens=3, temperature=0)
    assert e.call("session.fork", name="a", new_name="b") == {"name": "b"}
    with pytest.raises(EngineError) as err:
        e.call("session.fork", name="a", new_name="b")
    assert err.value.code == "exists"
    e.call("chat", session="b", messages=user("two"), thinking="none", max_tokens=3, temperature=0)
    ha, hb = e.call("session.history", name="a")["messages"], e.call("session.history", name="b")["messages"]
    assert len(ha) == 2 and len(hb) == 4 and hb[:2] == ha
    names = [s["name"] for s in e.call("session.list")["sessions"]]
    assert names == ["a", "b"]
    e.call("session.close", name="a")
    assert "a" not in e.sessions and e.call("session.info", name="a")["tokens"] > 0     # still on disk
    e.call("session.delete", name="a")
    with pytest.raises(EngineError) as err:
        e.call("session.info", name="a")
    assert err.value.code == "not_found"
    for bad in ("../etc/passwd", ".hidden", "a/b", "", "x" * 65):
        with pytest.raises(EngineError) as err:
            e.call("session.open", name=bad)
        assert err.value.code == "bad_request"
    e.stop()


def test_bad_snapshot_files_are_ignored_with_a_log_line(model, tmp_path, caplog):
    e = engine(model, tmp_path, ram_cache_mb=0)      # every prompt snapshot spills to disk at once
    ids = [int(t) for t in np.random.default_rng(1).integers(0, 129280, 200)]
    e.call("generate", tokens=ids, max_tokens=1, temperature=0)
    e.call("chat", session="keep", messages=user("hi"), thinking="none", max_tokens=2, temperature=0)
    e.stop()
    prefix_dir = next((tmp_path / "cache" / "prefix").iterdir())
    snaps = sorted(prefix_dir.glob("*.snap"))
    assert len(snaps) >= 3
    data = snaps[0].read_bytes()
    snaps[0].write_bytes(data[:-100])                              # truncated
    data = bytearray(snaps[1].read_bytes())
    data[200] ^= 0xFF
    snaps[1].write_bytes(bytes(data))                              # a flipped byte
    data = bytearray(snaps[2].read_bytes())
    data[12:20] = b"deadbeef"                                      # another model's fingerprint, validly framed
    snaps[2].write_bytes(bytes(data[:-32]) + hashlib.sha256(bytes(data[:-32])).digest())
    session_file = next((tmp_path / "cache" / "sessions").glob("*/keep.snap"))
    session_file.write_bytes(session_file.read_bytes()[:50])
    with caplog.at_level(logging.WARNING):
        e2 = engine(model, tmp_path)
        r = e2.call("generate", tokens=ids, max_tokens=1, temperature=0)
        r2 = e2.call("chat", session="keep", messages=user("again"), thinking="none", max_tokens=2,
                     temperature=0)
        e2.stop()
    text = caplog.text
    assert "truncated" in text and "checksum" in text and "fingerprint" in text
    assert "session keep" in text
    assert r["finish_reason"] == "length" and r2["usage"]["cached_tokens"] == 0


def test_lru_eviction_within_budgets(model, tmp_path):
    e = engine(model, tmp_path, ram_cache_mb=1, disk_cache_mb=2)
    rng = np.random.default_rng(2)
    for i in range(8):
        e.call("generate", tokens=[int(t) for t in rng.integers(0, 129280, 300)], max_tokens=1, temperature=0)
        assert e.cache.ram_bytes() <= 1 << 20
        assert e.cache.disk_bytes() <= 2 << 20
    spilled = [en for en in e.cache.entries.values() if en.path is not None]
    assert spilled and all(en.state is None for en in spilled)
    # The most recent prompt is still in RAM; the oldest ones are gone from both tiers.
    newest = max(e.cache.entries.values(), key=lambda en: en.last_used)
    assert newest.state is not None
    e.stop()


def _track(e, op, **params):
    """Submit a job; returns (job, [(time, event)], done flag, {"r": result, "t": time of completion})."""
    events, done, box = [], threading.Event(), {}
    job = e.submit(Job(op, params, on_event=lambda ev: events.append((time.monotonic(), ev)),
                       on_done=lambda r: (box.update(r=r, t=time.monotonic()), done.set())))
    return job, events, done, box


def test_complete_starts_within_one_chunk_of_a_long_prefill(model, tmp_path):
    e = engine(model, tmp_path, prefill_chunk=128, ctx=8192)
    long_ids = [int(t) for t in np.random.default_rng(3).integers(0, 129280, 2000)]
    _, events, done, box = _track(e, "generate", tokens=long_ids, max_tokens=1, temperature=0)
    while not events:
        time.sleep(0.001)
    _, cevents, cdone, cbox = _track(e, "complete", prefix="def add(a, b):\n    return", max_tokens=3)
    at_submit = events[-1][1]["done"]
    assert cdone.wait(60) and done.wait(120)
    assert cbox["r"]["finish_reason"] in ("length", "eos") and cbox["t"] < box["t"]
    # The completion's prompt ran right after the chunk that was in flight when it arrived (a lone prompt's chunk:
    # ALONE_CHUNKS x 128; its decode steps then share each step with one more chunk of 128 of the long prompt).
    started = cevents[0][0]
    progress = [ev["done"] for t, ev in events if ev["kind"] == "progress" and t <= started]
    assert progress[-1] - at_submit <= ALONE_CHUNKS * 128
    assert events[-1][1]["kind"] != "progress" or events[-1][1]["done"] == 2000
    e.stop()


def test_a_lone_prompt_prefills_in_bigger_chunks_ending_on_snapshot_points(model, tmp_path):
    """With no other job active a prompt goes in chunks of ALONE_CHUNKS x prefill_chunk (each expert's weights
    read once per chunk), each ending at a multiple of SNAP_ALIGN or at a snapshot point near the prompt's end."""
    e = engine(model, tmp_path, prefill_chunk=128, ctx=8192)
    ids = [int(t) for t in np.random.default_rng(5).integers(0, 129280, 1500)]
    _, events, done, box = _track(e, "generate", tokens=ids, max_tokens=1, temperature=0)
    assert done.wait(60)
    ends = [ev["done"] for _, ev in events if ev["kind"] == "progress"]
    assert ends == [512, 1024, 1484, 1499, 1500]   # 1500 - SNAP_TAIL: 1484, 1499, 1500
    e.stop()


def test_cancel_mid_prefill_stops_within_a_chunk_and_session_stays_usable(model, tmp_path):
    e = engine(model, tmp_path, prefill_chunk=128, ctx=8192)
    ids = [int(t) for t in np.random.default_rng(4).integers(0, 129280, 3000)]
    job, events, done, box = _track(e, "generate", tokens=ids, session="c", max_tokens=5, temperature=0)
    while not events:
        time.sleep(0.001)
    job.cancel()
    at_cancel = events[-1][1]["done"]
    assert done.wait(30)
    r = box["r"]
    assert r["finish_reason"] == "cancelled"
    last = max(ev["done"] for _, ev in events)
    assert last - at_cancel <= 2 * ALONE_CHUNKS * 128 and last < 3000
    assert len(e.sessions["c"].tokens) == last == e.sessions["c"].state.n_tokens
    r2 = e.call("generate", tokens=ids[:last] + [11, 12], session="c", max_tokens=2, temperature=0)
    assert r2["usage"]["cached_tokens"] == last and r2["finish_reason"] == "length"
    e.stop()


def test_context_full_and_out_of_memory(model, tmp_path):
    e = engine(model, tmp_path, ctx=64)
    with pytest.raises(EngineError) as err:
        e.call("generate", tokens=list(range(100, 170)), max_tokens=4)
    assert err.value.code == "context_full"
    r = e.call("generate", tokens=list(range(100, 150)), temperature=0)   # no max_tokens: runs into the end
    assert r["finish_reason"] == "context_full" and r["usage"]["prompt_tokens"] + r["usage"]["completion_tokens"] <= 64
    e.stop()
    small = engine(model, tmp_path / "small", session_mem_mb=0)
    with pytest.raises(EngineError) as err:
        small.call("generate", prompt="hello", max_tokens=4)
    assert err.value.code == "out_of_memory" and "MiB" in err.value.message
    small.stop()


def test_concurrent_sessions_decode_together_in_one_step(model, tmp_path):
    e = engine(model, tmp_path)
    e.call("generate", prompt="alone", max_tokens=8, temperature=0)
    tracked = [_track(e, "generate", prompt=f"session number {i}", max_tokens=30, temperature=0)
               for i in range(4)]
    for _, _, done, _ in tracked:
        assert done.wait(60)
    calls = e.weight_calls_by_batch
    assert 1 in calls and 4 in calls                                # steps with 1 and with 4 sessions decoding
    assert len(set(calls.values())) == 1, calls                     # weights read once per step, whatever B
    e.stop()


def test_a_keystroke_after_a_completion_recomputes_only_the_typed_text_and_the_suffix(model, tmp_path):
    e = engine(model, tmp_path)
    prefix = "".join(f"def f{i}(x):\n    return x * {i}\n\n" for i in range(40)) + "def g(y):\n    ret"
    suffix = "\n\nprint(g(2))\n"
    first = e.call("complete", prefix=prefix, suffix=suffix, max_tokens=2)
    before = e.counters["prefill_tokens"]
    second = e.call("complete", prefix=prefix + "u", suffix=suffix, max_tokens=2)
    recomputed = e.counters["prefill_tokens"] - before
    tail = len(model.tokenizer.encode("return" + suffix)) + 3          # the edited word, the suffix, FIM markers
    assert first["usage"]["prompt_tokens"] > 400
    assert second["usage"]["cached_tokens"] >= first["usage"]["prompt_tokens"] - tail - 8
    assert recomputed <= tail + 8 + 1
    e.stop()



def test_pipelined_steps_decode_the_same_tokens_and_keep_the_sessions_whole(model, tmp_path):
    """Pipelined decode (each step launched before the last one's tokens are read, its sessions taking them on the
    device; forced here on the CPU, where the model resolves them on the host) gives every job the tokens of
    steps fed by the host, whatever its knobs, beside a job whose logprobs stop the pipeline while it runs. A
    session a stop string finishes mid-pipeline has been fed its last token: its tokens and its state agree, and
    the next request reuses all of them."""
    prompts = [f"pipeline {i}" for i in range(4)]
    knobs = [dict(temperature=0), dict(temperature=0.9, seed=3), dict(temperature=0.7, top_k=20, seed=4),
             dict(temperature=0, logprobs=2, max_tokens=3)]

    def run(pipeline, stop=None):
        e = Engine(model, cache_dir=tmp_path / f"cache{pipeline}{stop is not None}", ctx=4096, pipeline=pipeline)
        tracked = [_track(e, "generate", prompt=p, session=f"s{i}", **{"max_tokens": 12, **k})
                   for i, (p, k) in enumerate(zip(prompts, knobs))]
        if stop is not None:
            tracked.append(_track(e, "generate", prompt="stop here", session="stop", max_tokens=12, temperature=0,
                                  stop=[stop]))
        e.start()                                   # every job was queued first: the same schedule both ways
        for _, _, done, _ in tracked:
            assert done.wait(60)
        results = [box["r"] for _, _, _, box in tracked]
        for s in e.sessions.values():
            assert len(s.tokens) == s.state.n_tokens
        return e, results

    plain, want = run(False)
    piped, got = run(True)
    assert [r["tokens"] for r in got] == [r["tokens"] for r in want]
    assert piped.counters["pipelined_steps"] > 0 and plain.counters["pipelined_steps"] == 0
    plain.stop()
    piped.stop()
    # A stop string that ends the answer at its 4th token (greedy: the same tokens as without it).
    probe = Engine(model, cache_dir=tmp_path / "probe", ctx=4096).start()
    full = probe.call("generate", prompt="stop here", max_tokens=12, temperature=0)["tokens"]
    probe.stop()
    stop = model.tokenizer.decode(full[3:4])
    assert stop.strip() and stop not in model.tokenizer.decode(full[:3])
    e, got = run(True, stop)
    assert got[-1]["finish_reason"] == "stop"
    s = e.sessions["stop"]
    assert s.tokens[-4:] == full[:4] and s.state.n_tokens == len(s.tokens)   # the 4th token was fed
    again = e.call("generate", tokens=s.tokens + [5, 6], session="stop", max_tokens=1, temperature=0)
    assert again["usage"]["cached_tokens"] == len(s.tokens) - 2
    e.stop()
