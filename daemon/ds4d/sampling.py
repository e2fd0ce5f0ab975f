"""Token sampling (MODEL.md §7), log-probabilities and stop strings: pure functions on numpy logits and text.

Owns: the sampling parameters and their validation, ds4's sampler (temperature, min-p relative to the top token,
top-k capped at 1024, top-p over the sorted mass, xorshift64* RNG with 24-bit uniforms) split into the draw made
before a step (`Sampler.draw`: the RNG's uniform) and the rule applied to the logits (`pick`, the reference of the
CUDA backend's sampling kernel), top-k log-probabilities, and stop-string matching on streamed text.

Deliberately not here: when to sample greedily because a DSML tool call is in a structural position (the caller asks
`ToolCallParser.structural` and passes `greedy=True`), logits computation, detokenization, EOS handling.

Callers: the engine (one Sampler and one StopMatcher per running request), the server (SamplingParams from request
fields), tests.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np

TOP_K_MAX = 1024       # ds4 keeps at most this many candidates when top-k is on
LOGPROBS_MAX = 20      # as many alternatives as the official API returns

_U64 = (1 << 64) - 1


@dataclass(frozen=True)
class SamplingParams:
    """Sampling knobs of one request; defaults are ds4's (`ds4.h`). Invalid values raise ValueError naming the
    field. max_tokens None means until EOS or the context is full."""
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.05
    seed: int | None = None
    max_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: int = 0

    def __post_init__(self):
        def number(name: str, lo: float, hi: float, lo_open: bool = False) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, not {v!r}")
            if v < lo or (lo_open and v == lo) or v > hi:
                raise ValueError(f"{name} must be in {'(' if lo_open else '['}{lo}, {hi}], not {v!r}")

        def integer(name: str, lo: int, hi: int, optional: bool = False) -> None:
            v = getattr(self, name)
            if optional and v is None:
                return
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise ValueError(f"{name} must be an integer in [{lo}, {hi}], not {v!r}")

        number("temperature", 0.0, math.inf)
        number("top_p", 0.0, 1.0, lo_open=True)
        number("min_p", 0.0, 1.0)
        integer("top_k", 0, 2**31 - 1)
        integer("seed", 0, _U64, optional=True)
        integer("max_tokens", 1, 2**31 - 1, optional=True)
        integer("logprobs", 0, LOGPROBS_MAX)
        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError("stop must be a list of non-empty strings")
        object.__setattr__(self, "stop", list(self.stop))


# ---------------------------------------------------------------------------------------------------------------------
# Sampler
#
# ds4's rule: candidates are the finite logits (the top-k of them when top_k > 0), weighted exp((l - max) / T).
# Tokens whose weight is below min_p times the top token's are dropped. With top_p < 1 the candidates are sorted and
# kept until their mass reaches top_p of the candidates' total. A 24-bit uniform u picks the first candidate whose
# running weight reaches u * (kept weight).
# ---------------------------------------------------------------------------------------------------------------------

class Rng:
    """xorshift64* as ds4 uses it: a zero state is replaced by the golden-ratio constant; uniforms are the top 24
    bits of the output over 2^24, so they are exact float32 values in [0, 1)."""

    def __init__(self, seed: int):
        self.state = seed & _U64

    def next_u64(self) -> int:
        x = self.state or 0x9E3779B97F4A7C15
        x ^= x >> 12
        x ^= (x << 25) & _U64
        x ^= x >> 27
        self.state = x
        return (x * 0x2545F4914F6CDD1D) & _U64

    def uniform(self) -> float:
        return (self.next_u64() >> 40) / 16777216.0


@dataclass(frozen=True)
class Draw:
    """One token's sampling, fixed before its logits exist: the request's knobs, whether to take the argmax, and
    the uniform the RNG gave (0 for greedy draws, which take none). A backend may sample on its device from this
    (the CUDA step does); `pick` is the rule on the host."""
    params: SamplingParams
    greedy: bool
    u: float


class Sampler:
    """Draws tokens for one request. Seeded samplers reproduce their sequence; unseeded ones seed from os.urandom."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = Rng(params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little"))

    def draw(self, greedy: bool = False) -> Draw:
        """The next token's draw. greedy=True (DSML structure, MODEL.md §7) or temperature 0 takes the argmax and
        draws nothing from the RNG."""
        greedy = greedy or self.params.temperature <= 0
        return Draw(self.params, greedy, 0.0 if greedy else self.rng.uniform())

    def sample(self, logits: np.ndarray, greedy: bool = False) -> int:
        """A token id from `logits` (vocab,)."""
        return pick(logits, self.draw(greedy))


def pick(logits: np.ndarray, d: Draw) -> int:
    """The token a draw takes from `logits` (vocab,): the argmax, or the first candidate whose running weight
    reaches u times the candidates' total."""
    if d.greedy:
        return int(np.argmax(logits))
    p = d.params
    ids, weights = candidates(logits, p.temperature, p.top_k, p.top_p, p.min_p)
    cum = np.cumsum(weights)
    i = int(np.searchsorted(cum, d.u * cum[-1], side="left"))
    return int(ids[min(i, len(ids) - 1)])


def candidates(logits: np.ndarray, temperature: float, top_k: int, top_p: float, min_p: float
               ) -> tuple[np.ndarray, np.ndarray]:
    """(ids, unnormalized weights) the sampler draws from; their normalized weights are the sampling distribution.
    Sorted by descending logit when top-k or top-p is active, in vocab order otherwise."""
    logits = np.asarray(logits)
    finite = np.isfinite(logits)
    if not finite.any():  # ds4 falls back to argmax
        return np.array([int(np.argmax(logits))]), np.ones(1)
    if top_k > 0:
        pool = _top_k(logits, np.flatnonzero(finite), min(top_k, TOP_K_MAX))
        top = float(logits[pool[0]])
    else:
        pool = None
        top = float(logits[finite].max())
    # min-p in logit space (weight >= min_p <=> logit >= top + T log min_p), so only survivors are exponentiated:
    # with the default min_p that is a handful of the 129K logits. The floor is rounded to the logits' precision
    # (float32 from every backend but the float64 reference), as the CUDA sampler does.
    floor = logits.dtype.type(top + temperature * math.log(min_p) if min_p > 0 else -math.inf)
    ids = pool[logits[pool] >= floor] if pool is not None else np.flatnonzero(finite & (logits >= floor))

    def weights_of(idx: np.ndarray) -> np.ndarray:
        # float64 so that very peaked distributions keep their tail mass
        return np.exp((logits[idx].astype(np.float64) - top) / temperature)

    weights = weights_of(ids)
    if top_p < 1.0:
        # The mass is relative to all candidates, min-p survivors or not (ds4). Sorting only the survivors gives
        # the same prefix as sorting everything.
        total = weights_of(pool if pool is not None else finite).sum()
        if pool is None:
            order = np.lexsort((ids, -logits[ids]))
            ids, weights = ids[order], weights[order]
        reached = np.flatnonzero(np.cumsum(weights) >= top_p * total)
        if len(reached):
            ids, weights = ids[:reached[0] + 1], weights[:reached[0] + 1]
    return ids, weights


def _top_k(logits: np.ndarray, finite: np.ndarray, k: int) -> np.ndarray:
    """The k largest finite logits, descending; among equal logits the lower id first (ds4's insertion order)."""
    values = logits[finite]
    if k < len(finite):
        threshold = np.partition(values, len(values) - k)[len(values) - k]
        above = finite[values > threshold]
        finite = np.concatenate([above, finite[values == threshold][:k - len(above)]])
    return finite[np.lexsort((finite, -logits[finite]))]


# ---------------------------------------------------------------------------------------------------------------------
# Log-probabilities (temperature 1, before any filtering: what the official API reports)
# ---------------------------------------------------------------------------------------------------------------------

def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    m = np.max(x)
    return x - (m + np.log(np.sum(np.exp(x - m))))


def top_logprobs(logits: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The k most likely tokens and their log-probabilities, most likely first (ties: lower id first)."""
    lp = log_softmax(logits)
    k = min(k, len(lp))
    if k <= 0:
        return []
    top = np.argpartition(-lp, k - 1)[:k]
    top = top[np.lexsort((top, -lp[top]))]
    return [(int(i), float(lp[i])) for i in top]


# ---------------------------------------------------------------------------------------------------------------------
# Stop strings
# ---------------------------------------------------------------------------------------------------------------------

class StopMatcher:
    """Streams text through stop strings. `push(piece)` returns the text that is safe to emit: everything except a
    suffix that could still grow into a stop string. Generation stops at the first stop string to complete (the
    earliest end; at equal ends the longer one, so no part of any stop string leaks); that string and everything
    after it is never emitted. `flush()` releases the held-back text when the stream ends without a stop."""

    def __init__(self, stops: list[str]):
        if not all(isinstance(s, str) and s for s in stops):
            raise ValueError("stop strings must be non-empty")
        self.stops = list(stops)
        self.matched: str | None = None
        self._held = ""

    @property
    def stopped(self) -> bool:
        return self.matched is not None

    def push(self, piece: str) -> str:
        if self.stopped:
            return ""
        text = self._held + piece
        best: tuple[int, int, str] | None = None  # (end, -length, stop)
        for s in self.stops:
            at = text.find(s)
            if at >= 0 and (best is None or (at + len(s), -len(s)) < best[:2]):
                best = (at + len(s), -len(s), s)
        if best is not None:
            end, neg_len, self.matched = best
            self._held = ""
            return text[:end + neg_len]
        hold = max((partial_suffix(text, s) for s in self.stops), default=0)
        self._held = text[len(text) - hold:]
        return text[:len(text) - hold]

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "" if self.stopped else held


def partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`: what a streaming matcher must
    hold back (stop strings here, DSML tags in `chat.ToolCallParser`)."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0
