"""The engine: THE single worker that owns the model, the sessions and the caches, and runs every job.

Owns scheduling and state: a job queue fed from any thread (`submit`), one worker thread that alone touches the
model, the sessions and the prompt cache, and the step loop. Each step runs one `model.launch` over a batch of
segments: every decoding job advances by one token (weights read once per step, whatever the batch), plus at
most one chunk of one job's prompt, so a 100K-token prefill never freezes the other sessions. On a GPU a decode
step's tokens are read after the next step is launched (pipelined: the host's work per token overlaps the GPU's
next step; `_step` says when it waits instead). A chunk is
`prefill_chunk` tokens (512) while other jobs are active and ALONE_CHUNKS times that when the prompt's job is the
only one (bigger chunks run faster per token: each expert's weights are read once per chunk; a job that arrives
meanwhile waits at most that one chunk). Prompt snapshots land at chunk ends. Latency-bound `complete` jobs go
first. Cancellation is checked at every chunk and every step; a cancelled prefill leaves its
session at the last chunk it completed. Named sessions are saved after every request by a writer thread, from a
snapshot the worker takes, so saving never blocks the next step.

It does not parse requests or speak the protocol (`server.py` does); it reports through the callbacks a job
carries: `on_event(dict)` for streamed pieces and progress, `on_done(result | EngineError)` once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .chat import effective_thinking, render_chat_parts, render_fim_parts
from .kvstore import PageStore, SnapshotError, remove_stale_temps
from .model import Launched, Model, Sampled, Segment
from .output import OutputStream
from .prefix_cache import PrefixCache
from .sampling import SamplingParams
from .session import Session, SessionFiles, SessionNameError, check_name, common_prefix, encode_continuing

log = logging.getLogger("ds4d.engine")

STATE_FORMAT = 1
SNAP_ALIGN = 128          # prompt snapshots at chunk ends, multiples of this many tokens ...
SNAP_TAIL = (16, 1, 0)    # ... and this many tokens before the end of every prompt (0: the whole prompt)
SNAP_FIM = (8, 2, 0)      # ... and before the end of a completion's prefix (where the next keystroke lands)
THINK_MAX_MIN_CTX = 393216
ALONE_CHUNKS = 4          # a prompt with no other job active prefills in chunks this many times prefill_chunk


class EngineError(Exception):
    """A request that fails for a reason the client must hear: `code` is one of PROTOCOL.md's error codes."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Job:
    """One request. `op` is generate / chat / complete, or a session / status operation."""
    op: str
    params: dict
    on_event: Callable[[dict], None] = lambda ev: None
    on_done: Callable[[Any], None] = lambda result: None
    id: int = 0
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.monotonic)
    # set by the worker
    session: Session | None = None
    target: list[int] = field(default_factory=list)     # the prompt's token ids
    pos: int = 0                                         # next prompt token to prefill
    cached: int = 0                                      # prompt tokens served from a cache
    out: OutputStream | None = None
    pending: int | None = None                           # sampled token not yet fed to the model
    awaiting: bool = False                               # its next token is in the step in flight
    new_messages: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    snap_points: set[int] = field(default_factory=set)   # prompt positions whose state the cache keeps
    finished: bool = False

    def cancel(self) -> None:
        self.cancelled.set()

    @property
    def priority(self) -> int:       # lower first: editor completions before bulk work
        return 0 if self.op == "complete" else 1


@dataclass
class InFlight:
    """A launched step whose tokens the host has not read: the job whose prompt chunk it ran (up to `end`), then
    the jobs it decodes, in its rows' order. `followed`: ids of the jobs whose token the next step already feeds."""
    launched: Launched
    fill: Job | None
    end: int
    decoding: list[Job]
    followed: set[int] = field(default_factory=set)


class Engine:
    def __init__(self, model: Model, *, cache_dir: str | Path | None = None, ctx: int = 32768,
                 ram_cache_mb: int = 1024, disk_cache_mb: int = 4096, session_mem_mb: int = 8192,
                 prefill_chunk: int = 512, max_batch: int = 16, pipeline: bool | None = None):
        self.model = model
        # Pipelined decode: the next step is launched before this one's tokens are read (a GPU never waits for the
        # host). Where the backend runs a step at once (the CPU) it would only delay each token by a step.
        # DS4_PIPELINE=0 turns it off (for comparisons).
        if pipeline is None:
            pipeline = model.ops.follows_on_device and os.environ.get("DS4_PIPELINE", "1") != "0"
        self.pipeline = pipeline
        self._inflight: InFlight | None = None
        self.tokenizer = model.tokenizer
        self.ctx = ctx
        self.chunk = max(SNAP_ALIGN, prefill_chunk // SNAP_ALIGN * SNAP_ALIGN)
        self.max_batch = max_batch
        self.session_mem = session_mem_mb << 20
        dt = np.dtype(model.ops.dtype).name
        self.fingerprint = hashlib.sha256(
            f"{model.gguf.fingerprint()}:{model.numerics}:{dt}:{STATE_FORMAT}".encode()).hexdigest()
        root = Path(cache_dir) if cache_dir is not None else None
        pages = PageStore(root / "pages") if root is not None else None
        self.files = SessionFiles(root / "sessions" / self.fingerprint[:16], self.fingerprint, pages) \
            if root is not None else None
        if self.files is not None:
            for d in (root, root / "sessions", self.files.root):     # private: snapshots hold conversations
                d.mkdir(mode=0o700, parents=True, exist_ok=True)
            for tier in ("pages", "sessions", "prefix"):        # what writes cut short by a crash left behind
                if n := remove_stale_temps(root / tier):
                    log.info("removed %d temporary file(s) of interrupted writes under %s", n, root / tier)
        self.cache = PrefixCache(root, self.fingerprint, model.host_state, ram_cache_mb << 20, disk_cache_mb << 20,
                                 pages)
        self.sessions: dict[str, Session] = {}
        self.weight_calls_by_batch: dict[int, int] = {}     # decode batch size -> weight-kernel calls of a step
        self._fresh_bytes = model.new_state().nbytes
        self._fim_hole = self.tokenizer.token_id("<｜fim▁hole｜>")
        self.counters = {"prefill_tokens": 0, "decode_tokens": 0, "cache_hit_tokens": 0, "requests": 0,
                         "decode_steps": 0, "pipelined_steps": 0, "weight_calls_last_step": 0}
        self.started = time.time()
        self._inbox: queue.Queue[Job] = queue.Queue()
        self._waiting: deque[Job] = deque()       # admitted later: their session is busy
        self._active: list[Job] = []
        self._next_id = 0
        self._id_lock = threading.Lock()
        self._stop = threading.Event()
        self._saves: queue.Queue = queue.Queue()
        self._unsaved: dict[str, str] = {}         # session -> why its latest save failed (a full disk, ...)
        self._worker = threading.Thread(target=self._run, name="ds4d-engine", daemon=True)
        self._writer = threading.Thread(target=self._write_loop, name="ds4d-writer", daemon=True)

    # --- lifecycle ------------------------------------------------------------------------------------------
    def start(self) -> "Engine":
        self._worker.start()
        self._writer.start()
        return self

    def stop(self) -> None:
        """Cancel everything in flight, save the named sessions, stop the threads."""
        self._stop.set()
        self._inbox.put(Job("noop", {}))
        if self._worker.is_alive():
            self._worker.join()
        self._saves.put(None)
        if self._writer.is_alive():
            self._writer.join()

    def submit(self, job: Job) -> Job:
        """Queue a job (any thread). Its on_done runs exactly once, on the worker thread."""
        with self._id_lock:
            self._next_id += 1
            job.id = job.id or self._next_id
        if self._stop.is_set():
            job.on_done(EngineError("shutting_down", "the engine is shutting down"))
            return job
        self._inbox.put(job)
        return job

    def call(self, op: str, timeout: float | None = None, **params) -> Any:
        """Run a job and wait for its result (tests and simple callers); raises EngineError."""
        done = threading.Event()
        box: list = []
        self.submit(Job(op, params, on_done=lambda r: (box.append(r), done.set())))
        if not done.wait(timeout):
            raise TimeoutError(op)
        if isinstance(box[0], EngineError):
            raise box[0]
        return box[0]

    # --- the worker -----------------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            busy = bool(self._active) or self._inflight is not None
            try:
                job = self._inbox.get(timeout=None if not busy else 0)
                self._accept(job)
                while True:                      # drain what else arrived
                    self._accept(self._inbox.get_nowait())
            except queue.Empty:
                pass
            if self._stop.is_set():
                break
            try:
                self._step()
            except Exception as e:               # a bug: fail the jobs in flight, keep serving
                log.exception("engine step failed")
                self._inflight = None
                for job in list(self._active):
                    self._fail(job, EngineError("internal", f"internal error: {type(e).__name__}"))
        if self._inflight is not None:           # its tokens are the sessions' (fed or about to be)
            try:
                self._collect(self._inflight)
            except Exception:
                log.exception("engine step failed")
            self._inflight = None
        for job in list(self._active):          # finishing saves their named sessions
            job.cancel()
            self._finish(job, "cancelled")
        for job in list(self._waiting):
            job.on_done(EngineError("shutting_down", "the engine is shutting down"))
        self.cache.persist()
        while True:
            try:
                self._inbox.get_nowait().on_done(EngineError("shutting_down", "the engine is shutting down"))
            except queue.Empty:
                break

    def _accept(self, job: Job) -> None:
        if job.op == "noop":
            return
        try:
            handler = getattr(self, "_op_" + job.op.replace(".", "_"), None)
            if job.op in ("generate", "chat", "complete"):
                self.counters["requests"] += 1
                self._admit(job)
            elif handler is not None:
                job.on_done(handler(**job.params))
            else:
                raise EngineError("unknown_method", f"unknown operation {job.op!r}")
        except EngineError as e:
            job.on_done(e)
        except SessionNameError as e:
            job.on_done(EngineError("bad_request", f"name: {e}"))
        except (TypeError, ValueError) as e:
            job.on_done(EngineError("bad_request", str(e)))
        except Exception as e:                   # a bug: this job fails, the worker keeps serving
            log.exception("engine: %s failed", job.op)
            job.on_done(EngineError("internal", f"internal error: {type(e).__name__}"))

    # --- admission: prompt -> tokens, session, cache ----------------------------------------------------------
    def _admit(self, job: Job) -> None:
        if job.cancelled.is_set():                # superseded before it started: costs nothing
            job.on_done(self._result(job, "cancelled"))
            return
        p = job.params
        name = p.get("session")
        session = self._session(name, create=True) if name is not None else Session(f"#{job.id}", named=False)
        if session.busy:
            self._waiting.append(job)             # one job per session at a time
            return
        sampling = _sampling(p, job.op)
        if session.name in self._unsaved:
            job.warnings.append(f"session {session.name!r} is not saved on disk ({self._unsaved[session.name]}); "
                                f"it is kept in memory only")
        thinking = "none"
        if job.op == "chat":
            thinking = p.get("thinking", "high")
            eff = effective_thinking(thinking, self.ctx)
            if eff != thinking:
                job.warnings.append(f"thinking {thinking!r} needs a context of {THINK_MAX_MIN_CTX} tokens; "
                                    f"ran as {eff!r}")
            job.new_messages = list(p["messages"])
            messages = (session.messages if session.named else []) + job.new_messages
            parts = render_chat_parts(messages, thinking=eff, tools=p.get("tools"), context_size=self.ctx)
            reasoning, tools = eff != "none", bool(p.get("tools"))
        elif job.op == "complete":
            context = [(c["path"], c["text"]) for c in p.get("context", [])]
            parts = render_fim_parts(p["prefix"], p.get("suffix", ""), context)
            reasoning, tools = False, False
        else:
            parts = [(p["prompt"], False)] if p.get("tokens") is None else None
            reasoning, tools = False, False
        ids = list(p["tokens"]) if parts is None else encode_continuing(self.tokenizer, parts, session.tokens)
        if not ids:
            raise EngineError("bad_request", "prompt: the prompt is empty")
        if len(ids) >= self.ctx:
            raise EngineError("context_full", f"the prompt is {len(ids)} tokens; the context holds {self.ctx}")
        need = self._estimate_bytes(len(ids) + (sampling.max_tokens or 0))
        if self._live_bytes() + need > self.session_mem:
            raise EngineError("out_of_memory", f"this request needs about {need >> 20} MiB of session state; "
                                               f"{(self.session_mem - self._live_bytes()) >> 20} MiB are free")
        job.session, job.target = session, ids
        job.snap_points = {len(ids) - k for k in SNAP_TAIL}
        if job.op == "complete":
            # The user types at the end of the prefix: keep the state just before it, so the next completion
            # recomputes only the typed text and the suffix.
            hole = len(ids) - 1 - ids[::-1].index(self._fim_hole)
            job.snap_points |= {hole - k for k in SNAP_FIM}
        job.out = OutputStream(self.tokenizer, sampling, reasoning=reasoning, tools=tools)
        session.busy = True
        session.last_used = time.time()
        self._sync(job)
        self._active.append(job)

    def _sync(self, job: Job) -> None:
        """Reuse the longest valid prefix: the session's own state if the prompt extends it, else the best
        cached snapshot, else nothing. At least one prompt token is always recomputed (for its logits)."""
        s, target = job.session, job.target
        limit = len(target) - 1
        keep = common_prefix(s.tokens, target) if s.state is not None else 0
        own = keep if keep == len(s.tokens) and keep <= limit else 0
        n, state = self.cache.lookup(target, limit)
        if own >= n and own > 0:
            start = own
        elif n > 0:
            s.state, s.tokens, start = self.model.live_state(state), list(target[:n]), n
        else:
            s.state, s.tokens, start = self.model.new_state(), [], 0
        job.pos = job.cached = start
        self.counters["cache_hit_tokens"] += start

    # --- stepping -------------------------------------------------------------------------------------------
    #
    # Every step is launched (Model.launch) and collected (its tokens read, streamed, jobs finished). Without
    # pipelining a step is collected right after its launch. With it, a decode step stays in flight, and the next
    # step is launched before it is collected, its decoding sessions taking the tokens in flight on the device
    # (`_follow_up`); the host's work of a step (reading the tokens, streaming them, building the next table)
    # then overlaps the GPU's next step. A session finished by the step in flight has been fed its last token by
    # the one behind it: its tokens then include it (an end-of-sentence token is the next turn's anyway); that
    # step is otherwise spent for nothing, and a request arriving then starts after it.
    def _step(self) -> None:
        fl, self._inflight = self._inflight, None
        busy = {id(j) for j in fl.decoding} if fl is not None else set()
        for job in list(self._active):
            if job.cancelled.is_set() and id(job) not in busy:
                self._finish(job, "cancelled")
        if fl is not None:
            self._inflight = self._follow_up(fl) if self.pipeline else None
            self._collect(fl)
            if self._inflight is not None:
                return
        decoding = [j for j in self._active if j.pending is not None][:self.max_batch]
        prefilling = sorted((j for j in self._active if j.pending is None and not j.finished and not j.awaiting),
                            key=lambda j: (j.priority, j.submitted))
        segments, fill, end = [], None, 0
        if prefilling:
            fill = prefilling[0]
            end = self._chunk_end(fill, self.chunk * (ALONE_CHUNKS if len(self._active) == 1 else 1))
            segments.append(Segment(fill.session.state, np.asarray(fill.target[fill.pos:end], np.int64)))
        for j in decoding:
            segments.append(Segment(j.session.state, np.asarray([j.pending], np.int64)))
        if not segments:
            return
        # Each next token is drawn before the step (the RNG's uniform, greedy or not), so that the backend samples
        # it in the step: from a GPU only the token ids come back.
        draws = [fill.out.draw() if end == len(fill.target) else None] if fill is not None else []
        step = self._launch(segments, draws, fill, end, decoding, None)
        if self.pipeline and fill is None:
            self._inflight = step
        else:
            self._collect(step)

    def _follow_up(self, fl: InFlight) -> InFlight | None:
        """The next decode step, launched while `fl` (a decode step) is in flight: the sessions it decodes whose
        next token it may feed without reading it, plus those with a token waiting; None when the next step must
        wait for fl's tokens: a prompt to prefill, rows the host must read first (logprobs, or sampling the
        device may leave to the host), draws that depend on the tokens (a tool call's structure is greedy)."""
        if fl.fill is not None or any(j.pending is None and not j.awaiting and not j.finished for j in self._active):
            return None
        if not all(self._draws_ahead(j) for j in fl.decoding):
            return None
        row = {id(j): r for r, j in enumerate(fl.decoding)
               if not j.finished and not j.cancelled.is_set() and len(j.session.tokens) + 1 < self.ctx
               and (j.out.params.max_tokens is None or len(j.out.tokens) + 1 < j.out.params.max_tokens)}
        if not row:
            return None
        decoding = ([j for j in fl.decoding if id(j) in row] + [j for j in self._active if j.pending is not None])
        decoding = decoding[:self.max_batch]
        segments = [Segment(j.session.state, np.asarray([j.pending], np.int64)) if j.pending is not None else
                    Segment(j.session.state, np.zeros(1, np.int64), follow=row[id(j)]) for j in decoding]
        step = self._launch(segments, [], None, 0, decoding, fl.launched)
        fl.followed = {id(j) for j in decoding if id(j) in row}
        self.counters["pipelined_steps"] += 1
        return step

    @staticmethod
    def _draws_ahead(job: Job) -> bool:
        """Whether the job's next draws can be made before its tokens are read and its device samples them all:
        no logprobs, no tool-call parser (its structure's tokens are greedy), and knobs the device never leaves to
        the host (top-p without top-k may keep more candidates than it holds)."""
        p = job.out.params
        return not p.logprobs and job.out.parser is None and (p.temperature == 0 or p.top_k > 0 or p.top_p >= 1)

    def _launch(self, segments: list[Segment], draws: list, fill: Job | None, end: int, decoding: list[Job],
                after: Launched | None) -> InFlight:
        draws = draws + [j.out.draw() for j in decoding]
        calls = getattr(self.model.ops, "weight_calls", 0)
        launched = self.model.launch(segments, draws, after)
        if fill is None:
            self.counters["decode_steps"] += 1
            used = getattr(self.model.ops, "weight_calls", 0) - calls
            self.counters["weight_calls_last_step"] = used
            self.weight_calls_by_batch[len(decoding)] = used
        for j in decoding:
            if j.pending is not None:               # fed from the host (a followed token counts when read)
                j.session.tokens.append(j.pending)
                self.counters["decode_tokens"] += 1
                j.pending = None
            j.awaiting = True
        return InFlight(launched, fill, end, decoding)

    def _collect(self, fl: InFlight) -> None:
        """Read a step's tokens and act on them: stream, finish, or queue each job's next token."""
        res = fl.launched.result()
        rows = iter(range(len(fl.decoding) + (fl.fill is not None)))
        if fl.fill is not None:
            self._prefilled(fl.fill, fl.end, res, next(rows))
        for j in fl.decoding:
            row = next(rows)
            if j.finished:
                continue
            j.awaiting = False
            fed = id(j) in fl.followed
            if fed and res.tokens[row] < 0:
                # The device left the row to the host (its logits were not finite) after the next step had fed
                # its stand-in: the session's state holds a token nobody chose.
                j.session.state, j.session.tokens = None, []
                self._fail(j, EngineError("internal", "internal error: the model's logits were not finite"))
                continue
            if fed:
                j.session.tokens.append(res.tokens[row])
                self.counters["decode_tokens"] += 1
                j.awaiting = True
            self._sampled(j, res, row, fed)

    def _chunk_end(self, job: Job, chunk: int) -> int:
        """Where the next prefill chunk stops: at the job's first snapshot point ahead (near the end of the prompt,
        and of a completion's prefix) or its end, else after at most `chunk` tokens at a multiple of SNAP_ALIGN,
        so that the cache can keep the state there."""
        start, total = job.pos, len(job.target)
        stop = min([total] + [p for p in job.snap_points if p > start])
        if stop - start <= chunk:
            return stop
        return max((start + chunk) // SNAP_ALIGN * SNAP_ALIGN, (start // SNAP_ALIGN + 1) * SNAP_ALIGN)

    def _prefilled(self, job: Job, end: int, res: Sampled, row: int) -> None:
        s = job.session
        self.counters["prefill_tokens"] += end - job.pos
        s.tokens.extend(job.target[job.pos:end])
        job.pos = end
        total = len(job.target)
        if end % SNAP_ALIGN == 0 or end in job.snap_points:
            self.cache.insert(s.tokens, s.state)
        job.on_event({"kind": "progress", "done": end, "total": total})
        if end == total:
            self._sampled(job, res, row)

    def _sampled(self, job: Job, res: Sampled, row: int, fed: bool = False) -> None:
        """Stream the token sampled from the last fed token's logits (row `row` of the step), finish or queue it
        (fed: the step behind this one already feeds it)."""
        if job.cancelled.is_set():
            self._finish(job, "cancelled")
            return
        t = res.tokens[row]
        for ev in job.out.push(t, res.logits(row) if job.out.params.logprobs else None):
            job.on_event(_event_dict(ev))
        if job.out.done:
            self._finish(job, job.out.finish_reason)
        elif fed:
            pass
        elif len(job.session.tokens) + 1 >= self.ctx:
            self._finish(job, "context_full")
        else:
            job.pending = t

    def _finish(self, job: Job, reason: str) -> None:
        if job.finished:
            return
        job.finished = True
        if job.out is not None:
            for ev in job.out.finish(reason):
                job.on_event(_event_dict(ev))
        if job in self._active:
            self._active.remove(job)
        s = job.session
        if s is not None:
            s.busy = False
            s.last_used = time.time()
            if job.op == "chat" and s.named:
                r = job.out.result()
                msg = {"role": "assistant", "content": r["text"]}
                if r["reasoning"]:
                    msg["reasoning_content"] = r["reasoning"]
                if r["tool_calls"]:
                    msg["tool_calls"] = [{"id": c["id"], "type": "function", "function": {
                        "name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
                        for c in r["tool_calls"]]
                s.messages = s.messages + job.new_messages + [msg]
            if s.named:
                self._save(s)
        job.on_done(self._result(job, reason))
        self._admit_waiting()

    def _fail(self, job: Job, err: EngineError) -> None:
        job.finished = True
        if job in self._active:
            self._active.remove(job)
        if job.session is not None:
            job.session.busy = False
        job.on_done(err)
        self._admit_waiting()

    def _admit_waiting(self) -> None:
        for _ in range(len(self._waiting)):
            self._accept(self._waiting.popleft())

    def _result(self, job: Job, reason: str) -> dict:
        r = job.out.result() if job.out is not None else {"text": "", "reasoning": "", "tool_calls": [], "tokens": []}
        usage = {"prompt_tokens": len(job.target), "cached_tokens": job.cached,
                 "completion_tokens": len(r["tokens"])}
        result = {"text": r["text"], "finish_reason": reason, "usage": usage}
        if job.op == "generate":
            result["tokens"] = r["tokens"]
        if job.op == "chat":
            result.update(reasoning=r["reasoning"], tool_calls=r["tool_calls"])
        if job.warnings:
            result["warnings"] = job.warnings
        return result

    # --- sessions -------------------------------------------------------------------------------------------
    def _session(self, name: str, create: bool) -> Session:
        check_name(name)
        s = self.sessions.get(name)
        if s is not None:
            return s
        if self.files is not None and self.files.exists(name):
            try:
                s = self.files.load(name, self.model.host_state())
                s.state = self.model.live_state(s.state)
            except SnapshotError as e:
                log.warning("session %s: its file is unusable (%s); starting it afresh", name, e)
                s = Session(name)
        elif create:
            s = Session(name)
        else:
            raise EngineError("not_found", f"no session named {name!r}")
        self.sessions[name] = s
        return s

    def _save(self, s: Session) -> None:
        if self.files is None or not s.named or s.state is None:
            return
        self._saves.put((s.name, list(s.tokens), s.state.snapshot(), list(s.messages), s.last_used))

    def _write_loop(self) -> None:
        while True:
            item = self._saves.get()
            if item is None:
                return
            if isinstance(item, threading.Event):   # a flush marker: everything queued before it is written
                item.set()
                continue
            name = item[0]
            try:
                size = self.files.save(*item)
            except OSError as e:                # the file on disk is still the previous complete save
                log.error("cannot save session %s: %s", name, e)
                self._unsaved[name] = f"{e.strerror or e}"
            except Exception:                   # a bug: this save is lost, but the writer must keep saving the rest
                log.exception("cannot save session %s", name)
                self._unsaved[name] = "internal error (see the daemon log)"
            else:
                self._unsaved.pop(name, None)
                log.debug("saved session %s: %d tokens, %d messages, %d bytes", name, len(item[1]), len(item[3]),
                          size)

    def flush(self, timeout: float | None = 60) -> None:
        """Wait until every session save queued so far is on disk."""
        if not self._writer.is_alive():
            return
        marker = threading.Event()
        self._saves.put(marker)
        marker.wait(timeout)

    def _op_session_open(self, name: str | None = None, create: bool = True) -> dict:
        if name is None:
            name = f"s{int(time.time() * 1000) % 10**10}-{self._next_id}"
        s = self._session(name, create)
        return {"name": s.name, "tokens": len(s.tokens), "messages": s.messages}

    def _op_session_list(self) -> dict:
        out = {n: s.info() for n, s in self.sessions.items()}
        for n in (self.files.names() if self.files is not None else []):
            if n not in out:
                summary = self.files.summary(n)
                summary.pop("messages", None)
                out[n] = summary
        return {"sessions": sorted(out.values(), key=lambda d: d["name"])}

    def _op_session_info(self, name: str) -> dict:
        s = self._loaded_or_summary(name)
        return {**s.info(), "messages": s.messages}

    def _op_session_history(self, name: str) -> dict:
        return {"messages": self._loaded_or_summary(name).messages}

    def _loaded_or_summary(self, name: str) -> Session:
        check_name(name)
        if name in self.sessions:
            return self.sessions[name]
        if self.files is not None and self.files.exists(name):
            summary = self.files.summary(name)
            return Session(name, [0] * summary["tokens"], summary.get("messages", []), None, summary["last_used"])
        raise EngineError("not_found", f"no session named {name!r}")

    def _op_session_fork(self, name: str, new_name: str | None = None) -> dict:
        src = self._session(name, create=False)
        new_name = new_name or f"{name}-fork{self._next_id}"
        check_name(new_name)
        if new_name in self.sessions or (self.files is not None and self.files.exists(new_name)):
            raise EngineError("exists", f"a session named {new_name!r} exists")
        state = self.model.live_state(src.state.snapshot()) if src.state is not None else None
        self.sessions[new_name] = Session(new_name, list(src.tokens), list(src.messages), state)
        self._save(self.sessions[new_name])
        return {"name": new_name}

    def _op_session_close(self, name: str) -> dict:
        s = self._session(name, create=False)
        if s.busy:
            raise EngineError("busy", f"session {name!r} is running a request")
        self._save(s)
        self.flush()          # on disk before it leaves memory: a lookup right after must find the file
        if name in self._unsaved:             # unloading it now would lose what the disk does not hold
            raise EngineError("out_of_memory", f"session {name!r} cannot be saved ({self._unsaved[name]}); it "
                                               f"stays loaded")
        del self.sessions[name]
        return {}

    def _op_session_delete(self, name: str) -> dict:
        check_name(name)
        s = self.sessions.get(name)
        if s is not None and s.busy:
            raise EngineError("busy", f"session {name!r} is running a request")
        exists = s is not None or (self.files is not None and self.files.exists(name))
        if not exists:
            raise EngineError("not_found", f"no session named {name!r}")
        self.sessions.pop(name, None)
        if self.files is not None:
            self.flush()
            self.files.delete(name)
            self._unsaved.pop(name, None)
        return {}

    def _op_status(self) -> dict:
        return {"uptime_s": time.time() - self.started, "sessions": len(self.sessions),
                "queue": self._inbox.qsize() + len(self._waiting) + len(self._active),
                "memory": {"weights": self.model.gguf.tensor_bytes,
                           "sessions": self._live_bytes(), "ram_cache": self.cache.ram_bytes(),
                           "disk_cache": self.cache.disk_bytes() if self.cache.root is not None else 0},
                "counters": dict(self.counters)}

    # --- memory ---------------------------------------------------------------------------------------------
    def _live_bytes(self) -> int:
        return sum(s.nbytes for s in self.sessions.values()) + sum(
            j.session.nbytes for j in self._active if not j.session.named)

    def _estimate_bytes(self, n_tokens: int) -> int:
        per_token = self.model.shape.kv_bytes_per_token(np.dtype(self.model.store_dtype).itemsize)
        return int(self._fresh_bytes + per_token * n_tokens)


def _sampling(p: dict, op: str) -> SamplingParams:
    defaults = {"temperature": 0.0, "max_tokens": 64} if op == "complete" else {}
    kw = {k: p[k] for k in ("temperature", "top_k", "top_p", "min_p", "seed", "max_tokens", "stop", "logprobs")
          if p.get(k) is not None}
    return SamplingParams(**{**defaults, **kw})


def _event_dict(ev) -> dict:
    d = {"kind": ev.kind}
    if ev.text:
        d["text"] = ev.text
    if ev.tokens:
        d["tokens"] = ev.tokens
    if ev.logprobs:
        d["logprobs"] = ev.logprobs
    if ev.kind == "tool_call":
        d["name"], d["arguments_delta"] = ev.name, ev.arguments_delta
    return d
