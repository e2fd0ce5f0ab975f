"""Prompt rendering for DeepSeek V4 (chat with thinking modes and tools, FIM) and the streaming DSML tool-call parser.

Owns: messages -> prompt text exactly as DeepSeek's official V4 encoder renders it (MODEL.md §6, §6.1; checked byte
for byte against shared/fixtures/chat_render.json), the same prompt as `(text, trusted)` parts so that only template
text may contain atomic added tokens (MODEL.md §11: a user cannot inject `<｜User｜>` by typing it), the FIM prompt,
and parsing the model's DSML tool-call blocks incrementally, including whether the next token is *structural*
(MODEL.md §7: the sampler forces temperature 0 there).

Deliberately not here: token ids (`Tokenizer.encode_parts` turns parts into ids), splitting reasoning from content
(the engine sees `<think>` / `</think>` as token ids), sampling, sessions, tool execution.

Callers: the engine and server (`chat` / `complete` requests), tests.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from .sampling import partial_suffix
from .tokenizer import BOS_TEXT, EOS_TEXT

# A prompt part: (text, trusted). Trusted text is template text whose added-token strings are atomic tokens;
# untrusted text (anything a client sent: contents, reasoning, tool names, schemas, argument values) is plain text.
Part = tuple[str, bool]

THINKING_MODES = ("none", "high", "max")
THINK_MAX_MIN_CONTEXT = 393216  # below this context size "max" runs as "high" (ds4's rule)

USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
FIM_BEGIN = "<｜fim▁begin｜>"
FIM_HOLE = "<｜fim▁hole｜>"
FIM_END = "<｜fim▁end｜>"

THINK_MAX_PREFIX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root cause,"
    " rigorously stress-testing your logic against all potential paths, edge cases, and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, considered"
    " alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n"
)

DSML = "｜DSML｜"
CALLS_OPEN = f"<{DSML}tool_calls>"
CALLS_CLOSE = f"</{DSML}tool_calls>"
INVOKE_OPEN = f"<{DSML}invoke"
INVOKE_CLOSE = f"</{DSML}invoke>"
PARAM_OPEN = f"<{DSML}parameter"
PARAM_CLOSE = f"</{DSML}parameter>"
# A string value that contains PARAM_CLOSE cannot be written raw: it is written as a JSON string (string="false")
# with that "</" escaped as "<\/" (valid JSON, json.loads undoes it), so the raw closing tag always ends a value.
_PARAM_CLOSE_ESCAPED = "<\\/" + PARAM_CLOSE[2:]

TOOLS_HEADER = (
    "## Tools\n\nYou have access to a set of tools to help answer the user's question. You can invoke tools by"
    f' writing a "{CALLS_OPEN}" block like the following:\n\n'
    f"{CALLS_OPEN}\n"
    f'{INVOKE_OPEN} name="$TOOL_NAME">\n'
    f'{PARAM_OPEN} name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE{PARAM_CLOSE}\n'
    "...\n"
    f"{INVOKE_CLOSE}\n"
    f'{INVOKE_OPEN} name="$TOOL_NAME2">\n'
    "...\n"
    f"{INVOKE_CLOSE}\n"
    f"{CALLS_CLOSE}\n\n"
    'String parameters should be specified as is and set `string="true"`. For all other types (numbers, booleans,'
    ' arrays, objects), pass the value in JSON format and set `string="false"`.\n\n'
    f"If thinking_mode is enabled (triggered by {THINK_OPEN}), you MUST output your complete reasoning inside"
    f" {THINK_OPEN}...{THINK_CLOSE} BEFORE any tool calls or final response.\n\n"
    f"Otherwise, output directly after {THINK_CLOSE} with tool calls or final response.\n\n"
    "### Available Tool Schemas\n\n"
)
TOOLS_FOOTER = "\nYou MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n"

_ROLES = ("system", "user", "developer", "assistant", "tool")


# ---------------------------------------------------------------------------------------------------------------------
# Chat rendering
#
# The official encoder's rules (MODEL.md §6): BOS, the Think-Max prefix, all system text hoisted to the top (tools
# block after it); each run of user / developer / tool messages opens one <｜User｜> and joins its parts with "\n\n";
# each assistant turn is <｜Assistant｜>{think-part}{content}{DSML calls}<｜end▁of▁sentence｜>; the prompt ends with
# the assistant opening for the mode unless the conversation already ends with an assistant turn.
# ---------------------------------------------------------------------------------------------------------------------

def effective_thinking(thinking: str, context_size: int | None = None) -> str:
    """The thinking mode a request really runs in: "max" becomes "high" when a context under 393216 is given."""
    if thinking not in THINKING_MODES:
        raise ValueError(f"thinking must be one of {', '.join(THINKING_MODES)}, not {thinking!r}")
    if thinking == "max" and context_size is not None and context_size < THINK_MAX_MIN_CONTEXT:
        return "high"
    return thinking


def render_chat(messages: Sequence[Mapping], thinking: str = "none", tools: Sequence[Mapping] | None = None,
                context_size: int | None = None) -> str:
    """The prompt text for OpenAI-style `messages` (and `tools`), BOS included."""
    return "".join(text for text, _ in render_chat_parts(messages, thinking, tools, context_size))


def render_chat_parts(messages: Sequence[Mapping], thinking: str = "none", tools: Sequence[Mapping] | None = None,
                      context_size: int | None = None) -> list[Part]:
    """`render_chat` as (text, trusted) parts, for `Tokenizer.encode_parts`."""
    mode = effective_thinking(thinking, context_size)
    think = mode != "none"
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or m.get("role") not in _ROLES:
            raise ValueError(f"messages[{i}]: role must be one of {', '.join(_ROLES)}")
    functions = [_tool_function(i, t) for i, t in enumerate(tools or ())]

    out: list[Part] = [(BOS_TEXT, True)]
    if mode == "max":
        out.append((THINK_MAX_PREFIX, True))
    system = [_text(m.get("content")) for m in messages if m["role"] == "system"]
    out += [(s, False) for s in system]
    if functions:
        if any(system):
            out.append(("\n\n", True))
        out.append((TOOLS_HEADER, True))
        for fn in functions:
            out += [(json.dumps(fn, ensure_ascii=False), False), ("\n", True)]
        out.append((TOOLS_FOOTER, True))

    turns = [m for m in messages if m["role"] != "system"]
    last_user = max((i for i, m in enumerate(turns) if m["role"] != "assistant"), default=-1)
    # Earlier turns' reasoning is dropped, except in a tool conversation (the official encoder keeps it when tools
    # are given; MODEL.md §6 adds tool messages): an agent loop reasons across its calls.
    keep_reasoning = bool(functions) or any(m["role"] == "tool" for m in turns)
    call_order: dict[str, int] = {}  # tool_call_id -> position among the latest assistant's calls
    i = 0
    while i < len(turns):
        m = turns[i]
        if m["role"] == "assistant":
            out += _render_assistant(m, think and (keep_reasoning or i > last_user))
            calls = m.get("tool_calls") or ()
            if calls:
                call_order = {c.get("id"): k for k, c in enumerate(calls)}
            i += 1
            continue
        j = i
        while j < len(turns) and turns[j]["role"] != "assistant":
            j += 1
        out += _render_user_run(turns[i:j], call_order)
        i = j
    if not turns or turns[-1]["role"] != "assistant":
        out += [(ASSISTANT, True), (THINK_OPEN if think else THINK_CLOSE, True)]
    return out


def _render_user_run(run: Sequence[Mapping], call_order: Mapping[str, int]) -> list[Part]:
    # Tool results are put in the order of the calls they answer (unknown ids first, as the official encoder's
    # default key 0 does); user and developer parts keep their places.
    results = sorted((m for m in run if m["role"] == "tool"), key=lambda m: call_order.get(m.get("tool_call_id"), 0))
    out: list[Part] = [(USER, True)]
    for k, m in enumerate(run):
        if k:
            out.append(("\n\n", True))
        if m["role"] == "tool":
            out += [("<tool_result>", True), (_text(results.pop(0).get("content"), "\n\n"), False),
                    ("</tool_result>", True)]
        else:
            out.append((_text(m.get("content")), False))
    return out


def _render_assistant(m: Mapping, with_reasoning: bool) -> list[Part]:
    out: list[Part] = [(ASSISTANT, True)]
    if with_reasoning:
        out += [(THINK_OPEN, True), (_text(m.get("reasoning_content")), False), (THINK_CLOSE, True)]
    else:
        out.append((THINK_CLOSE, True))
    out.append((_text(m.get("content")), False))
    calls = m.get("tool_calls") or ()
    if calls:
        out.append((f"\n\n{CALLS_OPEN}\n", True))
        for call in calls:
            name, arguments = _call_name_arguments(call)
            out += [(f'{INVOKE_OPEN} name="', True), (name, False), ('">\n', True)]
            for key, value in arguments.items():
                is_string, text = _dsml_value(value)
                out += [(f'{PARAM_OPEN} name="', True), (str(key), False),
                        (f'" string="{"true" if is_string else "false"}">', True), (text, False),
                        (f"{PARAM_CLOSE}\n", True)]
            if not arguments:
                out.append(("\n", True))
            out.append((f"{INVOKE_CLOSE}\n", True))
        out.append((CALLS_CLOSE, True))
    out.append((EOS_TEXT, True))
    return out


def _dsml_value(value: object) -> tuple[bool, str]:
    """(string attribute, value text) of one tool-call argument: strings raw, everything else as JSON."""
    if isinstance(value, str) and PARAM_CLOSE not in value:
        return True, value
    return False, json.dumps(value, ensure_ascii=False).replace(PARAM_CLOSE, _PARAM_CLOSE_ESCAPED)


def _call_name_arguments(call: Mapping) -> tuple[str, Mapping]:
    fn = call.get("function") if isinstance(call, Mapping) else None
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
        raise ValueError("tool_calls: each call needs function.name")
    arguments = fn.get("arguments")
    if arguments is None or arguments == "":
        return fn["name"], {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as e:
            raise ValueError(f"tool_calls: arguments of {fn['name']!r} are not JSON: {e}") from None
    if not isinstance(arguments, Mapping):
        raise ValueError(f"tool_calls: arguments of {fn['name']!r} must be a JSON object")
    return fn["name"], arguments


def _tool_function(i: int, tool: Mapping) -> Mapping:
    fn = tool.get("function") if isinstance(tool, Mapping) else None
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
        raise ValueError(f"tools[{i}]: expected {{'type': 'function', 'function': {{'name': ...}}}}")
    return fn


def _text(content: object, joiner: str = "") -> str:
    """Message content as text: a string, None, or OpenAI content parts of type "text"."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence) and all(isinstance(p, Mapping) and p.get("type") == "text" for p in content):
        return joiner.join(str(p.get("text", "")) for p in content)
    raise ValueError("message content must be a string or a list of text parts")


# ---------------------------------------------------------------------------------------------------------------------
# FIM (MODEL.md §6.1)
# ---------------------------------------------------------------------------------------------------------------------

def render_fim(prefix: str, suffix: str = "", context: Iterable[tuple[str, str]] = ()) -> str:
    """The fill-in-the-middle prompt; the model writes the middle until EOS."""
    return "".join(text for text, _ in render_fim_parts(prefix, suffix, context))


def render_fim_parts(prefix: str, suffix: str = "", context: Iterable[tuple[str, str]] = ()) -> list[Part]:
    """`render_fim` as (text, trusted) parts. Context chunks come first, in the given order (most stable first, so
    successive completions share the longest prefix)."""
    out: list[Part] = [(BOS_TEXT, True)]
    for path, text in context:
        out += [("# ", True), (path, False), ("\n", True), (text, False), ("\n\n", True)]
    out += [(FIM_BEGIN, True), (prefix, False), (FIM_HOLE, True), (suffix, False), (FIM_END, True)]
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Streaming DSML tool-call parser
#
# The model writes, after its content:
#   \n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="N">\n<｜DSML｜parameter name="K" string="true|false">V</｜DSML｜parameter>\n
#   ...</｜DSML｜invoke>\n...</｜DSML｜tool_calls>
# The parser is a state machine over text pieces: text outside blocks (content), between invokes, between
# parameters, and inside a value. It holds back only what could still be the start of a marker, so content streams
# with at most a marker's length of delay. A value ends at the first raw </｜DSML｜parameter> (see _dsml_value for how
# the renderer keeps that unambiguous). Whitespace between tags is free; anything else unexpected ends the block with
# a ToolCallError carrying the block's raw text, and parsing continues as content.
# ---------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Content:
    """Text outside tool-call blocks (trailing whitespace before a block is dropped: it separates the two)."""
    text: str


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of call `index`'s arguments as JSON text; the pieces of one call concatenate to a JSON object
    (unless a string="false" value was not JSON, which the final ToolCall reports)."""
    index: int
    name: str
    arguments_delta: str


@dataclass(frozen=True)
class ToolCall:
    """A complete call. `error` is set when a string="false" value was not valid JSON (that value is then kept as
    its raw text)."""
    index: int
    name: str
    arguments: dict
    error: str | None = None


@dataclass(frozen=True)
class ToolCallError:
    """A malformed or unterminated block. `raw` is the block's text from its opening tag up to the point where it
    went wrong (calls completed before that were already reported); `index` is the call abandoned, if any."""
    raw: str
    message: str
    index: int | None = None


Event = Content | ToolCallDelta | ToolCall | ToolCallError

_TEXT, _CALLS, _INVOKE, _VALUE = "text", "calls", "invoke", "value"
_INVOKE_RE = re.compile(rf'{re.escape(INVOKE_OPEN)}\s+name="([^"]*)"\s*>')
_PARAM_RE = re.compile(rf'{re.escape(PARAM_OPEN)}\s+name="([^"]*)"\s+string="(true|false)"\s*>')
_MAX_TAG = 1024  # a tag longer than this is garbage, not a tag still arriving


@dataclass
class _Call:
    index: int
    name: str
    arguments: dict = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    n_values: int = 0


class ToolCallParser:
    """Incremental DSML parser: `feed(text)` -> events, `finish()` at the end of the stream. Never raises on model
    output. `structural` says whether the next token is DSML structure (greedy) rather than free text."""

    def __init__(self):
        self._reset()

    def _reset(self) -> None:
        self._state = _TEXT
        self._buf = ""      # text received but not yet consumed
        self._raw = ""      # the current block's text so far
        self._n_calls = 0
        self._call: _Call | None = None
        self._key = ""
        self._is_string = True
        self._value: list[str] = []
        self._json = _JsonLexer()

    @property
    def structural(self) -> bool:
        if self._state in (_CALLS, _INVOKE):
            return True
        # A held-back marker that already contains the DSML token is a tag being written.
        if DSML in self._buf:
            return True
        if self._state == _VALUE:
            return not self._is_string and self._json.structural
        return False

    def feed(self, text: str) -> list[Event]:
        self._buf += text
        events: list[Event] = []
        while self._step(events):
            pass
        return events

    def finish(self) -> list[Event]:
        """End of stream: flush held-back content, report an unterminated block."""
        events: list[Event] = []
        if self._state == _TEXT:
            if self._buf:
                events.append(Content(self._buf))
        else:
            events.append(self._abandon("unterminated tool-call block", self._buf))
        self._reset()
        return events

    # -- states ----------------------------------------------------------------------------------------------------

    def _step(self, events: list[Event]) -> bool:
        """Consume what the current state can; False when it needs more text."""
        if self._state == _TEXT:
            return self._step_text(events)
        if self._state == _VALUE:
            return self._step_value(events)
        return self._step_tags(events)

    def _step_text(self, events: list[Event]) -> bool:
        buf = self._buf
        at = buf.find(CALLS_OPEN)
        if at >= 0:
            content = buf[:at].rstrip()
            if content:
                events.append(Content(content))
            self._buf = buf[at + len(CALLS_OPEN):]
            self._raw = CALLS_OPEN
            self._state = _CALLS
            return True
        # Hold back a possible start of the opening tag and the whitespace before it.
        keep = len(buf) - partial_suffix(buf, CALLS_OPEN)
        emit = len(buf[:keep].rstrip())
        if emit:
            events.append(Content(buf[:emit]))
            self._buf = buf[emit:]
        return False

    def _step_tags(self, events: list[Event]) -> bool:
        """Between invokes (_CALLS) or between parameters (_INVOKE)."""
        stripped = self._buf.lstrip()
        self._consume(len(self._buf) - len(stripped))
        buf = self._buf
        if not buf:
            return False
        close, open_, pattern = ((CALLS_CLOSE, INVOKE_OPEN, _INVOKE_RE) if self._state == _CALLS
                                 else (INVOKE_CLOSE, PARAM_OPEN, _PARAM_RE))
        if buf.startswith(close):
            self._consume(len(close))
            if self._state == _CALLS:
                self._state = _TEXT
            else:
                events += self._end_call()
            return True
        if buf.startswith(open_):
            end = _tag_end(buf[:_MAX_TAG])
            if end < 0:
                if len(buf) < _MAX_TAG:
                    return False
                events.append(self._abandon(f"{open_}... tag longer than {_MAX_TAG} characters"))
                return True
            m = pattern.fullmatch(buf, 0, end + 1)
            if m is None:
                events.append(self._abandon(f"malformed tag {buf[:end + 1]!r}"))
                return True
            self._consume(end + 1)
            if self._state == _CALLS:
                self._start_call(m.group(1), events)
            else:
                self._start_value(m.group(1), m.group(2) == "true", events)
            return True
        if close.startswith(buf) or open_.startswith(buf):
            return False
        expected = "an invoke" if self._state == _CALLS else "a parameter"
        events.append(self._abandon(f"expected {expected} or {close}"))
        return True

    def _step_value(self, events: list[Event]) -> bool:
        buf = self._buf
        at = buf.find(PARAM_CLOSE)
        chunk = buf[:at] if at >= 0 else buf[:len(buf) - partial_suffix(buf, PARAM_CLOSE)]
        if chunk:
            self._consume(len(chunk))
            self._value.append(chunk)
            if self._is_string:
                delta = json.dumps(chunk, ensure_ascii=False)[1:-1]
            else:
                self._json.feed(chunk)
                delta = chunk
            events.append(ToolCallDelta(self._call.index, self._call.name, delta))
        if at < 0:
            return False
        self._consume(len(PARAM_CLOSE))
        self._end_value(events)
        return True

    # -- transitions -----------------------------------------------------------------------------------------------

    def _start_call(self, name: str, events: list[Event]) -> None:
        self._call = _Call(self._n_calls, name)
        self._n_calls += 1
        self._state = _INVOKE
        events.append(ToolCallDelta(self._call.index, name, "{"))

    def _end_call(self) -> list[Event]:
        call, self._call = self._call, None
        self._state = _CALLS
        return [ToolCallDelta(call.index, call.name, "}"),
                ToolCall(call.index, call.name, call.arguments, "; ".join(call.errors) or None)]

    def _start_value(self, key: str, is_string: bool, events: list[Event]) -> None:
        self._key, self._is_string, self._value = key, is_string, []
        self._json = _JsonLexer()
        self._state = _VALUE
        sep = ", " if self._call.n_values else ""
        self._call.n_values += 1
        events.append(ToolCallDelta(self._call.index, self._call.name,
                                    f"{sep}{json.dumps(key, ensure_ascii=False)}: " + ('"' if is_string else "")))

    def _end_value(self, events: list[Event]) -> None:
        text = "".join(self._value)
        if self._is_string:
            value = text
            events.append(ToolCallDelta(self._call.index, self._call.name, '"'))
        else:
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                value = text
                self._call.errors.append(f"parameter {self._key!r}: invalid JSON ({e})")
        self._call.arguments[self._key] = value
        self._state = _INVOKE

    def _consume(self, n: int) -> None:
        self._raw += self._buf[:n]
        self._buf = self._buf[n:]

    def _abandon(self, message: str, extra: str = "") -> ToolCallError:
        """Give up on the current block: report its raw text; what is left in the buffer is content again."""
        error = ToolCallError(self._raw + extra, message, self._call.index if self._call else None)
        self._raw, self._call, self._state = "", None, _TEXT
        return error


class _JsonLexer:
    """Just enough of a JSON scanner to know whether the next character is inside a string value (free text) or
    structure (punctuation, numbers, literals, object keys)."""

    def __init__(self):
        self._stack: list[str] = []
        self._in_string = self._escape = False
        self._string_is_key = self._expect_key = False

    @property
    def structural(self) -> bool:
        return not self._in_string or self._string_is_key

    def feed(self, text: str) -> None:
        for c in text:
            if self._in_string:
                if self._escape:
                    self._escape = False
                elif c == "\\":
                    self._escape = True
                elif c == '"':
                    self._in_string = False
            elif c == '"':
                self._in_string = True
                self._string_is_key = self._expect_key
            elif c in "{[":
                self._stack.append(c)
                self._expect_key = c == "{"
            elif c in "}]":
                if self._stack:
                    self._stack.pop()
                self._expect_key = False
            elif c == ",":
                self._expect_key = bool(self._stack) and self._stack[-1] == "{"
            elif c == ":":
                self._expect_key = False


def _tag_end(text: str) -> int:
    """Index of the '>' closing the tag at the start of `text` (quoted attribute values may contain '>'), or -1."""
    quoted = False
    for i, c in enumerate(text):
        if c == '"':
            quoted = not quoted
        elif c == ">" and not quoted:
            return i
    return -1
