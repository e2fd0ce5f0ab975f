"""`ds4c`: the command line of the ds4 daemon: an interactive chat (REPL) on a terminal, pipe mode for scripts.

Owns what a person or a script sees: the options, auto-starting the daemon (through `client.connect`), the REPL
(prompt_toolkit input with a history file and multi-line editing, slash commands, streamed answers with the
reasoning dimmed and set apart, Ctrl+C that cancels the generation, a progress bar while a long prompt is
prefilled, speed after each turn) and pipe mode (`ds4c -p INSTRUCTION`, stdin appended: only the answer on
stdout, an exit status a script can test). The protocol is `client.py`'s: nothing here frames or parses
messages. Entry points: the `ds4c` console script and `python -m ds4c`, both `main`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from datetime import datetime
from pathlib import Path

from . import __version__
from .client import (DEFAULT_IDLE_EXIT_MIN, Client, DaemonError, DaemonUnreachable, Event, Result, connect,
                     state_dir)
from .protocol import PROTOCOL_VERSION, valid_session_name

EXIT_OK, EXIT_DAEMON, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
DEMO_MAX_TOKENS = 256        # the demo model rarely stops by itself: bound a REPL answer unless -n says otherwise
DEMO_NOTICE = ("the daemon serves its tiny RANDOM demo model (no model configured), so the answers are gibberish; "
               "give ds4d a real ds4 GGUF ($DS4_MODEL, `model` in ~/.config/ds4/config.toml, or ./ds4flash.gguf) "
               "and restart it")

_STYLE = "NO_COLOR" not in os.environ
DIM, BOLD, RESET, ERASE_LINE = ("\x1b[2m", "\x1b[1m", "\x1b[0m", "\x1b[K") if _STYLE else ("", "", "", "")


class UsageError(Exception):
    """A mistake on the command line; str(e) is the one line to show."""


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------

HELP = """\
Talk to the ds4 daemon (ds4d), which keeps DeepSeek V4 Flash loaded for every tool of this user.

On a terminal, `ds4c` is a chat: every conversation is a named session that the daemon keeps, also across
restarts (`--session NAME` resumes one and shows its history); /help lists the commands. With -p it answers
one instruction for a script: the user message is INSTRUCTION, a blank line, then stdin (unless stdin is a
terminal); only the answer goes to stdout.

When no daemon answers on the socket, ds4c starts `ds4d serve` in the background (its model comes from
$DS4_MODEL, the config file or ./ds4flash.gguf; without one it serves a tiny random demo model), shows it
loading, and goes on. The daemon exits after --idle-exit minutes without clients."""

EPILOG = """\
examples:
  ds4c                                   chat (a new session; /help lists the commands)
  ds4c --session notes                   resume the session "notes", showing its history
  git diff | ds4c -p "Write a commit message for this change." -n 200
  ds4c -p "Why is the sky blue?" --think --show-reasoning
  ds4c -p "Summarize." --json < report.txt | jq -r .text

exit status: 0 ok, 1 the daemon answered with an error, 2 usage error, 3 no daemon (not running and not
started), 130 interrupted"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):           # one line instead of argparse's usage block
        raise UsageError(f"{message} (see ds4c --help)")


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text!r}")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ds4c", description=HELP, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-p", "--prompt", metavar="INSTRUCTION",
                   help="pipe mode: answer INSTRUCTION (plus a blank line and stdin) on stdout, then exit")
    p.add_argument("-n", "--max-tokens", type=_positive_int, metavar="N",
                   help=f"at most N generated tokens per answer (default: until the model stops; "
                        f"{DEMO_MAX_TOKENS} in the REPL with the demo model)")
    think = p.add_mutually_exclusive_group()
    think.add_argument("--think", dest="thinking", action="store_const", const="high",
                       help="reason before answering (the REPL's default)")
    think.add_argument("--think-max", dest="thinking", action="store_const", const="max",
                       help="maximum reasoning effort (runs as --think below a 393216-token context)")
    think.add_argument("--nothink", dest="thinking", action="store_const", const="none",
                       help="answer directly (pipe mode's default)")
    p.add_argument("--session", metavar="NAME",
                   help="continue the named conversation (created when new); the REPL starts a new one otherwise")
    p.add_argument("--json", action="store_true",
                   help="pipe mode: print one JSON object {text, reasoning, tool_calls, usage, finish_reason}")
    p.add_argument("--show-reasoning", action="store_true", help="pipe mode: stream the reasoning to stderr")
    p.add_argument("--temp", type=float, metavar="T", help="sampling temperature (default 1; 0 = always the "
                                                          "likeliest token)")
    p.add_argument("--seed", type=int, metavar="S", help="random seed: the same seed reproduces an answer")
    p.add_argument("--socket", metavar="PATH", help="the daemon's socket (default: $DS4_SOCKET, "
                                                    "$XDG_RUNTIME_DIR/ds4/ds4.sock, /tmp/ds4-UID/ds4.sock)")
    p.add_argument("--no-autostart", action="store_true",
                   help="when no daemon answers, exit with status 3 instead of starting one")
    p.add_argument("--idle-exit", type=float, default=DEFAULT_IDLE_EXIT_MIN, metavar="MIN",
                   help=f"a daemon that ds4c starts exits after MIN minutes without clients (default "
                        f"{DEFAULT_IDLE_EXIT_MIN:g}; 0 = never)")
    p.add_argument("--version", action="version", version=f"ds4c {__version__} (protocol {PROTOCOL_VERSION})")
    return p


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(errors="replace")          # model text on a terminal that cannot show it all
    try:
        args = build_parser().parse_args(argv)
        _check(args)
        return run_pipe(args) if args.prompt is not None else Repl(args).run()
    except UsageError as e:
        return _fail(str(e), EXIT_USAGE)
    except DaemonUnreachable as e:
        return _fail(str(e), EXIT_UNREACHABLE)
    except DaemonError as e:
        return _fail(f"{e.code}: {e}", EXIT_DAEMON)
    except KeyboardInterrupt:
        return _fail("interrupted", EXIT_INTERRUPTED)
    except BrokenPipeError:
        # The reader went away (`ds4c -p ... | head -1`): not an error. Point stdout at /dev/null so that the
        # interpreter's final flush does not complain about the pipe again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


def _fail(message: str, status: int) -> int:
    try:
        print(f"ds4c: {message}", file=sys.stderr)
    except OSError:
        pass
    return status


def _check(args: argparse.Namespace) -> None:
    if args.session is not None and not valid_session_name(args.session):
        raise UsageError(f"bad session name {args.session!r}: use 1-64 letters, digits, '_', '.', '-' (not "
                         f"starting with '.' or '-')")
    if args.idle_exit < 0:
        raise UsageError("--idle-exit cannot be negative")
    if args.prompt is None:
        if args.json or args.show_reasoning:
            raise UsageError("--json and --show-reasoning belong to pipe mode: add -p INSTRUCTION")
        if not (sys.stdin.isatty() and sys.stdout.isatty()):
            raise UsageError("the chat needs a terminal; in a script or a pipe use ds4c -p INSTRUCTION")


def _connect(args: argparse.Namespace) -> Client:
    return connect(args.socket, autostart=not args.no_autostart, idle_exit_min=args.idle_exit or None,
                   notify=_notify, name="ds4c")


def _notify(line: str) -> None:
    """Start-up news (a daemon being started, its loading lines) on stderr, dimmed on a terminal."""
    print(DIM + line + RESET if sys.stderr.isatty() else line, file=sys.stderr, flush=True)


def _sampling(args: argparse.Namespace, max_tokens: int | None) -> dict:
    return {k: v for k, v in (("max_tokens", max_tokens), ("temperature", args.temp), ("seed", args.seed))
            if v is not None}


# ---------------------------------------------------------------------------------------------------------------
# Pipe mode
# ---------------------------------------------------------------------------------------------------------------

def run_pipe(args: argparse.Namespace) -> int:
    message = args.prompt
    if not sys.stdin.isatty():
        data = sys.stdin.buffer.read().decode("utf-8", "replace")
        if data:
            message += "\n\n" + data
    client = _connect(args)
    if client.info["model"].get("demo"):
        print(f"ds4c: note: {DEMO_NOTICE}", file=sys.stderr)
    request = dict(messages=[{"role": "user", "content": message}], session=args.session,
                   thinking=args.thinking or "none", **_sampling(args, args.max_tokens))
    if args.json and not args.show_reasoning:
        result = client.chat(**request)
    else:
        stream = client.chat(**request, stream=True)
        in_reasoning = False
        for item in stream:
            if not isinstance(item, Event):
                continue
            if item.kind == "reasoning" and args.show_reasoning:
                in_reasoning = True
                sys.stderr.write(item.text)
                sys.stderr.flush()
            elif item.kind == "content" and not args.json:
                if in_reasoning:
                    in_reasoning = False
                    sys.stderr.write("\n")
                sys.stdout.write(item.text)
                sys.stdout.flush()
        result = stream.result
        if in_reasoning:
            sys.stderr.write("\n")
    for warning in result.warnings:
        print(f"ds4c: warning: {warning}", file=sys.stderr)
    if args.json:
        print(json.dumps({"text": result.text, "reasoning": result.reasoning, "tool_calls": result.tool_calls,
                          "usage": result.usage, "finish_reason": result.finish_reason}, ensure_ascii=False))
    elif not result.text.endswith("\n"):
        sys.stdout.write("\n")
    sys.stdout.flush()
    if result.finish_reason == "cancelled":        # only the daemon stopping does that to a pipe-mode request
        return _fail("the daemon stopped before the answer was complete (is it shutting down?)", EXIT_DAEMON)
    if result.finish_reason == "context_full":
        print("ds4c: warning: the answer stopped because the context is full", file=sys.stderr)
    return EXIT_OK


# ---------------------------------------------------------------------------------------------------------------
# The REPL
#
# A turn sends only the new user message with `session`: the daemon appends it to the session's conversation and
# renders the whole, paying only for the new tokens. While an answer streams, SIGINT (Ctrl+C in cooked mode) sends
# `cancel` and the stream runs on to its final result, so the partial answer is shown and kept in the session; a
# second Ctrl+C stops waiting altogether. Input is prompt_toolkit's, which owns Ctrl+C while the user types.
# ---------------------------------------------------------------------------------------------------------------

COMMANDS = {
    "/help": ("", "this list"),
    "/think": ("", "reason before answering"),
    "/think-max": ("", "maximum reasoning effort (runs as /think below a 393216-token context)"),
    "/nothink": ("", "answer directly"),
    "/session": ("NAME", "switch to session NAME (created when new), showing its history"),
    "/sessions": ("", "list the daemon's sessions"),
    "/fork": ("[NAME]", "copy this session (to NAME, or a generated name) and go on in the copy"),
    "/clear": ("", "empty this session: delete it and start it afresh under the same name"),
    "/read": ("FILE", "attach a text file to your next message"),
    "/tokens": ("", "how much of the context this session fills"),
    "/stats": ("", "the daemon's status and the last answer's speed"),
    "/quit": ("", "leave (also Ctrl+D); the session stays in the daemon"),
}

KEYS_HELP = ("Enter sends; Alt+Enter starts a new line (so does Enter after a \\ at the end of a line); pasted "
             "text keeps its lines; Ctrl+X Ctrl+E edits in $EDITOR. Ctrl+C cancels an answer, Ctrl+D quits. A message "
             "that starts with // is sent with one / less.")

THINKING_NAMES = {"none": "off", "high": "on", "max": "max"}


def _text(content) -> str:
    """A message's content as text (a string, or OpenAI-style parts)."""
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


class TurnView:
    """One streamed answer on the terminal: the prefill bar, reasoning (dim), a rule, the answer, tool calls, and
    a dim statistics line at the end."""

    BAR = 30
    BAR_AFTER_S = 0.3        # a prefill shorter than this gets no bar (it would only flicker)

    def __init__(self, out):
        self.out = out
        self.t0 = time.monotonic()
        self.t_first: float | None = None
        self.mode = ""                 # "", "reasoning", "content" or "tool": what the last piece was
        self.bar = False
        self.line_start = True
        self.stats = ""

    def show(self, item: Event | Result) -> None:
        if isinstance(item, Result):
            self.finish(item)
        elif item.kind == "progress":
            self._progress(item.done, item.total)
        else:
            self._clear_bar()
            if self.t_first is None:
                self.t_first = time.monotonic()
            if item.kind == "reasoning":
                self._enter("reasoning")
                self._write(item.text)
            elif item.kind == "content":
                self._enter("content")
                self._write(item.text)
            elif item.kind == "tool_call":
                self._enter("tool")
                self._write(item.arguments_delta)
        self.out.flush()

    def finish(self, r: Result) -> None:
        """Close the answer and print its statistics line (kept in `stats` for /stats)."""
        self._clear_bar()
        if self.mode in ("reasoning", "tool"):
            self._write(RESET)
        if not self.line_start:
            self._write("\n")
        end = time.monotonic()
        first = self.t_first or end
        u = r.usage
        n, p, c = u.get("completion_tokens", 0), u.get("prompt_tokens", 0), u.get("cached_tokens", 0)
        gen = f"{n} tokens" + (f", {(n - 1) / (end - first):.1f} tok/s" if n > 1 and end > first else "")
        prompt = f"prompt {p} tokens ({c} cached)"
        if p > c and n and first > self.t0:
            prompt += f", {(p - c) / (first - self.t0):.0f} tok/s"
        self.stats = f"{gen} · {prompt} · {r.finish_reason}"
        self._write(f"{DIM}[{self.stats}]{RESET}\n")

    def _enter(self, mode: str) -> None:
        if mode == self.mode and mode != "tool":
            return
        if self.mode == "reasoning":
            self._write(RESET + ("\n" if not self.line_start else "") + DIM + "-" * 40 + RESET + "\n")
        elif self.mode == "tool":
            self._write(RESET + "\n")
        if mode == "reasoning":
            self._write(DIM)
        elif mode == "tool":
            self._write(f"{DIM}[tool call] ")
        self.mode = mode

    def _progress(self, done: int, total: int) -> None:
        if done >= total or time.monotonic() - self.t0 < self.BAR_AFTER_S:
            self._clear_bar()
            return
        filled = self.BAR * done // max(total, 1)
        self.out.write(f"\r{DIM}prefill [{'#' * filled}{'.' * (self.BAR - filled)}] {done}/{total} tokens{RESET}"
                       f"{ERASE_LINE}")
        self.bar = True

    def _clear_bar(self) -> None:
        if self.bar:
            self.out.write("\r" + ERASE_LINE)
            self.bar = False

    def _write(self, text: str) -> None:
        if text:
            self.out.write(text)
            visible = text.replace(DIM, "").replace(RESET, "") if _STYLE else text
            if visible:
                self.line_start = visible.endswith("\n")


class Repl:
    """The chat loop: one daemon connection (re-made when the daemon went away), the current session, the
    thinking mode, files attached for the next message."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = sys.stdout
        self.client: Client | None = None
        self.session = args.session
        self.thinking = args.thinking or "high"
        self.max_tokens = args.max_tokens
        self.attachments: list[tuple[str, str]] = []
        self.last_stats = ""

    # --- the loop ---------------------------------------------------------------------------------------------
    def run(self) -> int:
        self._connect()
        self._banner()
        self._open(self.session)
        prompt = self._prompt_session()
        while True:
            try:
                text = prompt.prompt(f"{self.session}> ")
            except KeyboardInterrupt:
                continue
            except EOFError:
                return EXIT_OK
            if not text.strip():
                continue
            try:
                if self.client is None or not self.client.is_open():
                    self._say("reconnecting to the daemon")
                    self._connect()
                    self._open(self.session, show=False)
                if text.startswith("/") and not text.startswith("//"):
                    if self.command(text.strip()):
                        return EXIT_OK
                else:
                    self.turn(text[1:] if text.startswith("//") else text)
            except DaemonUnreachable as e:
                self.client = None
                self._say(f"lost the daemon: {e}")
            except DaemonError as e:
                self._say(f"error: {e.code}: {e}")

    def _connect(self) -> None:
        self.client = _connect(self.args)

    def _say(self, line: str) -> None:
        self.out.write(f"{DIM}{line}{RESET}\n")
        self.out.flush()

    def _banner(self) -> None:
        info = self.client.info
        m = info["model"]
        self.out.write(f"ds4c {__version__} · ds4d {info['daemon']} · {BOLD}{m['name']}{RESET} ({m['quant']}, "
                       f"{info['backend']}, {info['ctx']}-token context)\n")
        if m.get("demo"):
            if self.max_tokens is None:
                self.max_tokens = DEMO_MAX_TOKENS
            self.out.write(f"{BOLD}NOTE: {DEMO_NOTICE}. Answers stop after {self.max_tokens} tokens (-n).{RESET}\n")
        self._say(f"thinking {THINKING_NAMES[self.thinking]} · /help for commands · Ctrl+C cancels an answer · "
                  f"Ctrl+D quits")

    def _open(self, name: str | None, show: bool = True) -> None:
        """Make `name` the current session (a new generated one when None) and show its history."""
        s = self.client.session_open(name)
        self.session = s["name"]
        if not show:
            return
        messages = s["messages"]
        if not messages:
            self._say(f"session {self.session} (new; resume it later with `ds4c --session {self.session}`)")
            return
        self._say(f"session {self.session}: {len(messages)} messages, {s['tokens']} tokens")
        for msg in messages:
            role, text = msg.get("role"), _text(msg.get("content"))
            if role == "user":
                self.out.write(f"{BOLD}>{RESET} {text}\n")
            elif role == "assistant":
                self.out.write(text + ("" if text.endswith("\n") else "\n"))
                for call in msg.get("tool_calls") or []:
                    f = call.get("function", {})
                    self._say(f"[tool call] {f.get('name')} {f.get('arguments')}")
            else:
                self._say(f"[{role}] {text}")
        self._say("-" * 40)

    def _prompt_session(self):
        from prompt_toolkit import PromptSession
        from prompt_toolkit.completion import WordCompleter
        from prompt_toolkit.history import FileHistory, InMemoryHistory
        from prompt_toolkit.key_binding import KeyBindings

        keys = KeyBindings()

        # Ctrl+J sends too: Enter typed ahead while an answer streams reaches the prompt as \n (the terminal's
        # ICRNL in cooked mode), and it must still send.
        @keys.add("enter")
        @keys.add("c-j")
        def _send(event):
            buf = event.current_buffer
            if buf.document.text_before_cursor.endswith("\\"):     # a continued line
                buf.delete_before_cursor()
                buf.insert_text("\n")
            else:
                buf.validate_and_handle()

        @keys.add("escape", "enter")
        def _newline(event):
            event.current_buffer.insert_text("\n")

        path = state_dir() / "ds4c_history"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            history = FileHistory(str(path))
        except OSError as e:
            self._say(f"no input history: cannot create {path} ({e.strerror})")
            history = InMemoryHistory()
        return PromptSession(history=history, multiline=True, key_bindings=keys, enable_open_in_editor=True,
                             prompt_continuation=lambda width, line, soft: "." * (width - 1) + " ",
                             completer=WordCompleter(list(COMMANDS), WORD=True), complete_while_typing=False)

    # --- a turn -----------------------------------------------------------------------------------------------
    def turn(self, text: str) -> None:
        if self.attachments:
            files = "".join(f"{name}:\n```\n{body}\n```\n\n" for name, body in self.attachments)
            text, self.attachments = files + text, []
        stream = self.client.chat([{"role": "user", "content": text}], session=self.session,
                                  thinking=self.thinking, stream=True, **_sampling(self.args, self.max_tokens))
        view = TurnView(self.out)
        presses = 0

        def interrupt(signum, frame):
            nonlocal presses
            presses += 1
            if presses > 1:
                raise KeyboardInterrupt          # the daemon has not answered the cancel: stop waiting
            stream.cancel()

        previous = signal.signal(signal.SIGINT, interrupt)
        try:
            for item in stream:
                view.show(item)
        except KeyboardInterrupt:
            self.out.write(RESET + "\n")
            self._say("[stopped waiting for the answer]")
            return
        finally:
            signal.signal(signal.SIGINT, previous)
        self.last_stats = view.stats
        for warning in stream.result.warnings:
            self._say(f"warning: {warning}")

    # --- slash commands ---------------------------------------------------------------------------------------
    def command(self, line: str) -> bool:
        """Run a slash command; True means quit."""
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name not in COMMANDS:
            self._say(f"unknown command {name}; /help lists them (start with // to send a message with a /)")
            return False
        usage = COMMANDS[name][0]
        if usage and not usage.startswith("[") and not arg:
            self._say(f"usage: {name} {usage}")
            return False
        return bool(getattr(self, "cmd_" + name[1:].replace("-", "_"))(arg))

    def cmd_help(self, arg: str) -> None:
        for name, (usage, text) in COMMANDS.items():
            self.out.write(f"  {(name + ' ' + usage).strip():<16} {text}\n")
        self._say(KEYS_HELP)

    def _set_thinking(self, mode: str) -> None:
        self.thinking = mode
        self._say(f"thinking {THINKING_NAMES[mode]}")

    def cmd_think(self, arg: str) -> None:
        self._set_thinking("high")

    def cmd_nothink(self, arg: str) -> None:
        self._set_thinking("none")

    def cmd_think_max(self, arg: str) -> None:
        self._set_thinking("max")
        if "think_max" not in self.client.info.get("capabilities", ()):
            self._say(f"(this daemon's context is {self.client.info['ctx']} tokens: max runs as on)")

    def cmd_session(self, arg: str) -> None:
        if not valid_session_name(arg):
            self._say("session names are 1-64 letters, digits, '_', '.', '-' (not starting with '.' or '-')")
            return
        self._open(arg)

    def cmd_sessions(self, arg: str) -> None:
        sessions = self.client.session_list()
        if not sessions:
            self._say("no sessions")
        for s in sessions:
            mark = "*" if s["name"] == self.session else " "
            when = datetime.fromtimestamp(s["last_used"]).strftime("%Y-%m-%d %H:%M") if s.get("last_used") else ""
            extra = f"  ({s['error']})" if s.get("error") else ""
            self.out.write(f"{mark} {s['name']:<24} {s.get('tokens', 0):>8} tokens  {s.get('bytes', 0) / 2**20:>8.1f} "
                           f"MiB  {when}{extra}\n")

    def cmd_fork(self, arg: str) -> None:
        if arg and not valid_session_name(arg):
            self._say("session names are 1-64 letters, digits, '_', '.', '-' (not starting with '.' or '-')")
            return
        old = self.session
        self.session = self.client.session_fork(old, arg or None)
        self._say(f"forked {old} into {self.session}; now in {self.session}")

    def cmd_clear(self, arg: str) -> None:
        self.client.session_delete(self.session)
        self.client.session_open(self.session)
        self._say(f"session {self.session} is empty now")

    def cmd_read(self, arg: str) -> None:
        path = Path(arg).expanduser()
        try:
            body = path.read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            self._say(f"cannot read {path}: {e.strerror or e}")
            return
        self.attachments.append((arg, body))
        self._say(f"attached {arg} ({body.count(chr(10)) + 1} lines, {len(body)} characters): it goes with your "
                  f"next message")

    def cmd_tokens(self, arg: str) -> None:
        n, ctx = self.client.session_info(self.session)["tokens"], self.client.info["ctx"]
        pending = f"; {len(self.attachments)} file(s) attached for the next message" if self.attachments else ""
        self._say(f"session {self.session}: {n} of {ctx} tokens ({100 * n / ctx:.1f}% of the context){pending}")

    def cmd_stats(self, arg: str) -> None:
        s = self.client.status()
        mem, cnt = s["memory"], s["counters"]
        mib = {k: f"{v / 2**20:,.0f} MiB" for k, v in mem.items()}
        self.out.write(f"daemon    up {s['uptime_s'] / 60:.1f} min · {s['connections']} connections · "
                       f"{s['sessions']} sessions loaded · {s['queue']} requests in flight\n"
                       f"memory    weights {mib['weights']} · sessions {mib['sessions']} · prompt cache "
                       f"{mib['ram_cache']} in RAM, {mib['disk_cache']} on disk\n"
                       f"counters  {cnt['requests']} requests · {cnt['prefill_tokens']} prefilled · "
                       f"{cnt['cache_hit_tokens']} from the cache · {cnt['decode_tokens']} decoded\n")
        if self.last_stats:
            self.out.write(f"last turn {self.last_stats}\n")

    def cmd_quit(self, arg: str) -> bool:
        return True
