"""OutputStream: sampled tokens -> reasoning / content / tool calls / finish reason; and `ds4d run` end to end."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from ds4d.chat import render_chat
from ds4d.output import OutputStream
from ds4d.sampling import SamplingParams
from ds4d.tokenizer import Tokenizer, gguf_vocab_from_tokenizer_json


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_metadata(gguf_vocab_from_tokenizer_json())


def feed(out: OutputStream, ids):
    events = []
    for t in ids:
        events += out.push(int(t))
        if out.done:
            break
    return events


def test_reasoning_then_content_then_eos(tok):
    out = OutputStream(tok, SamplingParams(), reasoning=True)
    ids = tok.encode("Let me think: 2+2 is 4.") + [tok.token_id("</think>")] + tok.encode("The answer is 4.")
    events = feed(out, ids + [tok.eos_id] + tok.encode("never seen"))
    r = out.result()
    assert r["reasoning"] == "Let me think: 2+2 is 4." and r["text"] == "The answer is 4."
    assert r["finish_reason"] == "eos"
    kinds = [e.kind for e in events if e.text]
    assert kinds == sorted(kinds, key=lambda k: k != "reasoning")          # reasoning strictly before content


def test_split_utf8_is_never_emitted_half(tok):
    text = "caffè 🧪 日本語"
    out = OutputStream(tok, SamplingParams())
    pieces = [e.text for e in feed(out, tok.encode(text)) + out.finish("length") if e.text]
    assert "".join(pieces) == text
    for p in pieces:
        p.encode("utf-8")                         # a lone surrogate or replacement would show up here
        assert "\ufffd" not in p


@pytest.mark.parametrize("stop", [["STOP"], ["TO", "STOP"], ["\n\n"]])
def test_stop_strings_cut_and_never_leak(tok, stop):
    text = "Hello world.\n\nSTOP and more text after the stop"
    out = OutputStream(tok, SamplingParams(stop=stop))
    emitted = "".join(e.text for e in feed(out, tok.encode(text)))
    # Generation stops at the stop string that completes first (StopMatcher's rule) and cuts where it starts.
    end, neg_len = min((text.find(s) + len(s), -len(s)) for s in stop if s in text)
    cut = end + neg_len
    assert out.finish_reason == "stop" and emitted == text[:cut] == out.result()["text"]


def test_max_tokens_finishes_with_length(tok):
    out = OutputStream(tok, SamplingParams(max_tokens=3))
    feed(out, tok.encode("one two three four five six"))
    assert out.finish_reason == "length" and len(out.tokens) == 3


def test_tool_calls_are_parsed_and_structure_is_greedy(tok):
    msgs = [{"role": "user", "content": "weather?"},
            {"role": "assistant", "content": "Checking.", "tool_calls": [{"id": "c1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Roma", "days": 3}'}}]}]
    rendered = render_chat(msgs, thinking="none")
    body = rendered.split("<｜Assistant｜></think>", 1)[1].replace("<｜end▁of▁sentence｜>", "")
    out = OutputStream(tok, SamplingParams(temperature=1.0, seed=1), tools=True)
    ids = tok.encode(body, specials=True)
    structural = []
    for t in ids:
        structural.append(out.parser.structural)
        out.push(t)
    out.push(tok.eos_id)
    r = out.result()
    assert r["text"] == "Checking."
    assert r["tool_calls"] == [{"id": "call_0", "name": "get_weather", "arguments": {"city": "Roma", "days": 3}}]
    assert any(structural) and not all(structural)
    # In a structural position the sampler is greedy whatever the temperature.
    out2 = OutputStream(tok, SamplingParams(temperature=5.0, seed=3), tools=True)
    for t in tok.encode("Sure.\n\n<｜DSML｜tool_calls>\n", specials=True):
        out2.push(t)
    assert out2.parser.structural
    logits = np.random.default_rng(0).standard_normal(tok.n_vocab).astype(np.float32)
    assert all(out2.token(logits) == int(logits.argmax()) for _ in range(5))


def test_logprobs_are_reported_per_token(tok):
    out = OutputStream(tok, SamplingParams(logprobs=3))
    logits = np.random.default_rng(1).standard_normal(tok.n_vocab).astype(np.float32)
    t = out.token(logits)
    events = out.push(t, logits)
    lp = [e.logprobs for e in events if e.logprobs][0][0]
    assert lp["token"] == t and len(lp["top"]) == 3 and lp["top"][0][1] >= lp["top"][1][1]


# --- ds4d run --------------------------------------------------------------------------------------------------

def run(*args, stdin=None):
    env = {**os.environ, "XDG_CACHE_HOME": os.environ.get("XDG_CACHE_HOME", "/tmp/ds4-test-cache")}
    return subprocess.run([sys.executable, "-m", "ds4d", "run", *args], capture_output=True, text=True,
                          input=stdin, env=env, timeout=300)


def test_run_streams_an_answer(tiny_model):
    m = tiny_model("q2")
    a = run("-m", m, "-p", "Ciao, come stai?", "-n", "12", "--seed", "7", "--nothink")
    assert a.returncode == 0, a.stderr
    assert "generated 12 tokens" in a.stderr and "finish: length" in a.stderr and a.stdout.strip()
    b = run("-m", m, "-p", "Ciao, come stai?", "-n", "12", "--seed", "7", "--nothink")
    assert a.stdout == b.stdout                                      # seeded runs reproduce
    c = run("-m", m, "-n", "4", "--temp", "0", stdin="a prompt from a pipe")
    assert c.returncode == 0 and "prompt" in c.stderr


@pytest.mark.parametrize("args,message", [
    (["-p", "x", "--temp", "-1"], "temperature"),
    (["-p", "x", "-n", "0"], "max_tokens"),
    (["--prompt-file", "/nonexistent/prompt.txt"], "cannot read"),
    (["-p", "x", "--prompt-file", "f"], "not both"),
    (["-p", "x", "--ctx", "8"], "--ctx"),
])
def test_run_rejects_bad_arguments_clearly(tiny_model, args, message):
    r = run("-m", tiny_model("q2"), *args)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_run_reports_a_bad_model_file(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_text("nope")
    r = run("-m", str(bad), "-p", "x")
    assert r.returncode == 1 and "not a GGUF file" in r.stderr and "Traceback" not in r.stderr
