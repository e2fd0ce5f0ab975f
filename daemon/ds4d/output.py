"""What one request's sampled tokens turn into: streamed reasoning, content and tool calls, and a finish reason.

Owns the per-token logic that sits between the logits and the client, the same for `ds4d run`, the engine's
generate / chat / complete jobs and the REPL: choose the token (greedy on DSML structure, MODEL.md §7), detokenize
without splitting UTF-8, switch from reasoning to content at `</think>`, parse DSML tool calls out of the content,
hold back and cut at stop strings, and decide when to finish (EOS, a stop string, the token budget, or a full
context). It never runs the model: its driver asks `draw()` before a step and pushes the token the backend sampled
(the engine), or feeds it logits and asks `token()` (`ds4d run`), then `push()`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .chat import Content, ToolCall, ToolCallDelta, ToolCallError, ToolCallParser
from .sampling import Draw, Sampler, SamplingParams, StopMatcher, pick, top_logprobs
from .tokenizer import Tokenizer

THINK_END = "</think>"


@dataclass
class Event:
    """A piece of the stream: kind is "reasoning", "content" or "tool_call"."""
    kind: str
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list | None = None
    name: str | None = None                 # tool_call: the function's name
    arguments_delta: str | None = None      # tool_call: a piece of the arguments JSON


class OutputStream:
    """Turns the tokens of one request into events. `reasoning=True` when the prompt opened a `<think>` block;
    `tools=True` to parse DSML tool calls out of the content."""

    def __init__(self, tokenizer: Tokenizer, params: SamplingParams, reasoning: bool = False, tools: bool = False):
        self.tokenizer = tokenizer
        self.params = params
        self.sampler = Sampler(params)
        self.in_reasoning = reasoning
        self.parser = ToolCallParser() if tools else None
        self.stop = StopMatcher(params.stop)
        self.detok = tokenizer.stream_decoder()
        self.eos = tokenizer.eos_id
        self.think_end = tokenizer.token_id(THINK_END) if reasoning else None
        self.tokens: list[int] = []
        self.text: list[str] = []
        self.reasoning: list[str] = []
        self.tool_calls: list[dict] = []
        self.errors: list[str] = []
        self.finish_reason: str | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def draw(self) -> Draw:
        """The next token's draw (greedy while a tool call's structure is being written), made before the logits
        exist so that a backend can sample in its step (the engine's way)."""
        return self.sampler.draw(greedy=self.parser is not None and not self.in_reasoning and self.parser.structural)

    def token(self, logits: np.ndarray) -> int:
        """Choose the next token from its logits on the host."""
        return pick(logits, self.draw())

    def push(self, token_id: int, logits: np.ndarray | None = None) -> list[Event]:
        """Account for a sampled token; returns the events it completes (possibly none)."""
        self.tokens.append(token_id)
        lp = None
        if self.params.logprobs and logits is not None:
            lp = [{"token": token_id, "top": top_logprobs(logits, self.params.logprobs)}]
        if token_id == self.eos:
            return self._finish("eos", lp)
        if self.in_reasoning and token_id == self.think_end:
            self.in_reasoning = False
            tail = self.detok.flush()
            self.detok = self.tokenizer.stream_decoder()
            return self._reasoning(tail, token_id, lp)
        piece = self.detok.feed(token_id)
        events = self._reasoning(piece, token_id, lp) if self.in_reasoning else self._content(piece, token_id, lp)
        if self.params.max_tokens is not None and len(self.tokens) >= self.params.max_tokens and not self.done:
            events += self._finish("length")
        return events

    def finish(self, reason: str) -> list[Event]:
        """End the stream from outside (cancelled, context_full); flushes what was held back."""
        return [] if self.done else self._finish(reason)

    # --- internals ------------------------------------------------------------------------------------------
    def _reasoning(self, piece: str, token_id: int, lp) -> list[Event]:
        if piece:
            self.reasoning.append(piece)
        return [Event("reasoning", piece, [token_id], lp)] if piece or lp else []

    def _content(self, piece: str, token_id: int | None, lp) -> list[Event]:
        text = self.stop.push(piece)
        events = self._parse(text, [token_id] if token_id is not None else [], lp)
        if self.stop.stopped:
            events += self._finish("stop")
        return events

    def _parse(self, text: str, tokens: list[int], lp) -> list[Event]:
        if self.parser is None:
            if text:
                self.text.append(text)
            return [Event("content", text, tokens, lp)] if text or lp else []
        return self._tool_events(self.parser.feed(text), tokens, lp)

    def _tool_events(self, parsed, tokens: list[int], lp) -> list[Event]:
        events = []
        for ev in parsed:
            if isinstance(ev, Content):
                self.text.append(ev.text)
                events.append(Event("content", ev.text))
            elif isinstance(ev, ToolCallDelta):
                events.append(Event("tool_call", name=ev.name, arguments_delta=ev.arguments_delta))
            elif isinstance(ev, ToolCall):
                self.tool_calls.append({"id": f"call_{ev.index}", "name": ev.name, "arguments": ev.arguments})
                if ev.error:
                    self.errors.append(ev.error)
            elif isinstance(ev, ToolCallError):
                self.errors.append(ev.message)
                self.text.append(ev.raw)
                events.append(Event("content", ev.raw))
        if events:
            events[0].tokens, events[0].logprobs = tokens, lp
        elif lp:
            events.append(Event("content", "", tokens, lp))
        return events

    def _finish(self, reason: str, lp=None) -> list[Event]:
        self.finish_reason = reason
        tail = self.detok.flush()
        if self.in_reasoning:
            events = self._reasoning(tail, self.tokens[-1], None) if tail else []
        else:
            text = "" if self.stop.stopped else self.stop.push(tail) + self.stop.flush()
            events = self._parse(text, [], None) if text else []
            if self.parser is not None:
                events += self._tool_events(self.parser.finish(), [], None)
        if lp:
            events = events or [Event("content", "")]
            events[0].tokens, events[0].logprobs = [self.tokens[-1]], lp
        return events

    def result(self) -> dict:
        return {"text": "".join(self.text), "reasoning": "".join(self.reasoning), "tool_calls": self.tool_calls,
                "tokens": list(self.tokens), "finish_reason": self.finish_reason}
