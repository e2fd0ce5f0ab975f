"""ds4d.sampling: parameter validation, the sampler's distribution against the filtered softmax written out from
MODEL.md §7 (chi-square, fixed seeds), reproducibility, the xorshift64* stream against a numpy uint64 transcription
of its definition, log-probabilities, and stop strings against a whole-text oracle."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ds4d.sampling import Rng, Sampler, SamplingParams, StopMatcher, log_softmax, top_logprobs

# ---------------------------------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------------------------------


def test_defaults_are_ds4s():
    p = SamplingParams()
    assert (p.temperature, p.top_k, p.top_p, p.min_p, p.seed, p.max_tokens, p.stop, p.logprobs) == \
        (1.0, 0, 1.0, 0.05, None, None, [], 0)


@pytest.mark.parametrize("field, value", [
    ("temperature", -0.1), ("temperature", math.nan), ("temperature", math.inf), ("temperature", "1"),
    ("top_k", -1), ("top_k", 1.5), ("top_k", True), ("top_p", 0.0), ("top_p", 1.01), ("min_p", -0.01),
    ("min_p", 1.5), ("seed", -1), ("seed", 1 << 64), ("seed", 2.0), ("max_tokens", 0), ("logprobs", -1),
    ("logprobs", 21), ("stop", "x"), ("stop", [""]), ("stop", [1]),
])
def test_invalid_parameters_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_valid_edges():
    SamplingParams(temperature=0, top_k=100000, top_p=1.0, min_p=0.0, seed=0, max_tokens=1, stop=["\n"], logprobs=20)
    SamplingParams(seed=(1 << 64) - 1, min_p=1.0, top_p=1e-9)


# ---------------------------------------------------------------------------------------------------------------------
# RNG
# ---------------------------------------------------------------------------------------------------------------------

def xorshift64star_reference(seed: int, n: int) -> list[int]:
    """The published xorshift64* (Vigna) with numpy's wrapping uint64 arithmetic."""
    with np.errstate(over="ignore"):
        x = np.uint64(seed)
        out = []
        for _ in range(n):
            x ^= x >> np.uint64(12)
            x ^= x << np.uint64(25)
            x ^= x >> np.uint64(27)
            out.append(int(x * np.uint64(0x2545F4914F6CDD1D)))
    return out


@pytest.mark.parametrize("seed", [1, 42, 0xDEADBEEFCAFEBABE, (1 << 64) - 1])
def test_rng_is_xorshift64star(seed):
    rng = Rng(seed)
    assert [rng.next_u64() for _ in range(100)] == xorshift64star_reference(seed, 100)


def test_rng_zero_seed_and_uniforms():
    # A zero state would stay zero forever: ds4 substitutes the golden-ratio constant.
    assert Rng(0).next_u64() == xorshift64star_reference(0x9E3779B97F4A7C15, 1)[0]
    rng, ref = Rng(7), xorshift64star_reference(7, 1000)
    u = [rng.uniform() for _ in range(1000)]
    assert u == [(r >> 40) / 2**24 for r in ref]
    assert all(0 <= v < 1 and v == np.float32(v) for v in u)  # 24-bit: exact in float32


# ---------------------------------------------------------------------------------------------------------------------
# Sampler
# ---------------------------------------------------------------------------------------------------------------------

LOGITS = (np.random.default_rng(1234).normal(0, 2, 64)).astype(np.float32)


def reference_distribution(logits: np.ndarray, temperature: float, top_k: int, top_p: float, min_p: float
                           ) -> np.ndarray:
    """MODEL.md §7 written out with plain loops: softmax at T over the candidates (the top-k, when set), drop tokens
    under min_p times the top probability, keep the sorted prefix until its mass reaches top_p, renormalize."""
    order = sorted(range(len(logits)), key=lambda i: (-float(logits[i]), i))
    if top_k > 0:
        order = order[:min(top_k, 1024)]
    top = float(logits[order[0]])
    w = {i: math.exp((float(logits[i]) - top) / temperature) for i in order}
    total = sum(w.values())
    kept, mass = [], 0.0
    for i in order:
        if kept and w[i] / total < min_p * w[order[0]] / total:
            break
        kept.append(i)
        mass += w[i]
        if mass / total >= top_p:
            break
    p = np.zeros(len(logits))
    for i in kept:
        p[i] = w[i] / mass
    return p


def chi_square_ok(counts: np.ndarray, probs: np.ndarray) -> tuple[float, float]:
    """(statistic, critical value at alpha = 1e-3). Cells with expected count < 5 are pooled; the quantile uses the
    Wilson-Hilferty approximation (no scipy)."""
    n = counts.sum()
    support = probs > 0
    assert counts[~support].sum() == 0, "drew a token outside the filtered support"
    exp, obs = probs[support] * n, counts[support]
    small = exp < 5
    if small.any():
        exp = np.append(exp[~small], exp[small].sum())
        obs = np.append(obs[~small], obs[small].sum())
    stat = float(((obs - exp) ** 2 / exp).sum())
    df = len(exp) - 1
    if df == 0:
        return stat, 0.0
    z = 3.0902  # standard normal quantile at 0.999
    crit = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    return stat, crit


@pytest.mark.parametrize("temperature, top_k, top_p, min_p", [
    (1.0, 0, 1.0, 0.0),     # plain softmax
    (1.0, 0, 1.0, 0.05),    # ds4 defaults
    (0.7, 0, 0.9, 0.05),
    (1.5, 0, 1.0, 0.2),
    (1.3, 10, 1.0, 0.0),
    (1.0, 5, 0.8, 0.1),
    (2.0, 0, 0.5, 0.0),
    (1.0, 2000, 0.95, 0.0),  # top-k above the cap and the vocab
])
def test_distribution_matches_filtered_softmax(temperature, top_k, top_p, min_p):
    sampler = Sampler(SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=20240601))
    draws = [sampler.sample(LOGITS) for _ in range(20000)]
    counts = np.bincount(draws, minlength=len(LOGITS))
    probs = reference_distribution(LOGITS, temperature, top_k, top_p, min_p)
    stat, crit = chi_square_ok(counts, probs)
    assert stat < crit, (stat, crit)


def test_seeded_runs_reproduce():
    logits = np.random.default_rng(5).normal(0, 1, 1000).astype(np.float32)
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=99)
    a = [Sampler(params).sample(logits) for _ in range(3)]
    assert len(set(a)) == 1
    s1, s2, s3 = Sampler(params), Sampler(params), Sampler(SamplingParams(temperature=0.9, top_p=0.95, seed=100))
    r1 = [s1.sample(logits) for _ in range(500)]
    assert r1 == [s2.sample(logits) for _ in range(500)]
    assert r1 != [s3.sample(logits) for _ in range(500)]


def test_unseeded_samplers_differ():
    assert Sampler(SamplingParams()).rng.state != Sampler(SamplingParams()).rng.state


def test_temperature_zero_and_greedy_are_argmax():
    logits = np.random.default_rng(3).normal(0, 1, 129280).astype(np.float32)
    best = int(np.argmax(logits))
    assert Sampler(SamplingParams(temperature=0, seed=1)).sample(logits) == best
    sampler = Sampler(SamplingParams(temperature=5.0, min_p=0.0, seed=1))
    state = sampler.rng.state
    assert all(sampler.sample(logits, greedy=True) == best for _ in range(10))
    assert sampler.rng.state == state  # forced greedy draws nothing


def test_non_finite_logits_are_never_drawn():
    logits = np.full(100, -np.inf, dtype=np.float32)
    logits[[3, 50]] = [1.0, 1.2]
    logits[7] = np.nan
    for params in (SamplingParams(seed=1, min_p=0), SamplingParams(seed=1, min_p=0, top_p=0.99),
                   SamplingParams(seed=1, min_p=0, top_k=40)):
        sampler = Sampler(params)
        assert {sampler.sample(logits) for _ in range(300)} == {3, 50}


def test_min_p_one_keeps_only_the_top():
    sampler = Sampler(SamplingParams(min_p=1.0, seed=3, temperature=3.0))
    assert {sampler.sample(LOGITS) for _ in range(200)} == {int(np.argmax(LOGITS))}


# ---------------------------------------------------------------------------------------------------------------------
# Log-probabilities
# ---------------------------------------------------------------------------------------------------------------------

def test_top_logprobs():
    logits = np.random.default_rng(11).normal(0, 3, 5000).astype(np.float32)
    x = logits.astype(np.float64)
    probs = np.exp(x - x.max())
    probs /= probs.sum()
    top = top_logprobs(logits, 20)
    assert [i for i, _ in top] == list(np.argsort(-probs, kind="stable")[:20])
    assert np.allclose([lp for _, lp in top], np.log(probs[[i for i, _ in top]]), atol=1e-9)
    assert np.isclose(np.exp(log_softmax(logits)).sum(), 1.0)
    assert top_logprobs(logits, 0) == []
    assert len(top_logprobs(logits[:3], 20)) == 3


# ---------------------------------------------------------------------------------------------------------------------
# Stop strings
# ---------------------------------------------------------------------------------------------------------------------

def stop_oracle(text: str, stops: list[str]) -> tuple[str, str | None]:
    """Whole-text reference: generation stops when a stop string first completes; at equal ends the longer wins."""
    for end in range(1, len(text) + 1):
        done = [s for s in stops if text[:end].endswith(s)]
        if done:
            s = max(done, key=len)
            return text[:end - len(s)], s
    return text, None


def run_matcher(stops: list[str], pieces: list[str]) -> tuple[str, str | None]:
    m = StopMatcher(stops)
    out = "".join(m.push(p) for p in pieces) + m.flush()
    return out, m.matched


@settings(max_examples=500, deadline=None)
@given(st.text("abc\n", max_size=40), st.lists(st.text("abc\n", min_size=1, max_size=4), max_size=4), st.data())
def test_stop_strings_never_leak(text, stops, data):
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=10)))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    assert run_matcher(stops, pieces) == stop_oracle(text, stops)


def test_stop_matcher_holds_back_only_possible_starts():
    m = StopMatcher(["</answer>", "STOP"])
    assert m.push("The result is 4") == "The result is 4"
    assert m.push(" </ans") == " "
    assert m.push("wer") == ""
    assert m.push("> trailing") == ""
    assert m.stopped and m.matched == "</answer>"
    assert m.push("more") == "" and m.flush() == ""
    m = StopMatcher(["STOP"])
    assert m.push("ST") == "" and m.push("AY") == "STAY" and m.push("S") == "" and m.flush() == "S"
    assert not m.stopped
