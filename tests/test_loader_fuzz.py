"""Loader fuzz: truncated files, flipped bytes in the header, metadata and tensor table, and random garbage all
end in one clear `ModelError` line (never another exception, a crash or a hang). The long run with thousands of
cases is `bench/fuzz_loader.py`; this one keeps a few hundred so it runs in seconds."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from ds4d.gguf_file import GGUFFile, ModelError
from ds4d.shape import read_shape
from ds4d.tiny import plan, tiny_shape, write_model
from ds4d.weights import load_weights

N_VOCAB = 512


def small_model(path) -> bytes:
    """A tiny-shape q2 model with a 512-token vocabulary: the same layout in 2 MB, so each case opens fast."""
    shape = dataclasses.replace(tiny_shape(), n_vocab=N_VOCAB)
    vocab = {"tokenizer.ggml.tokens": [f"t{i}" for i in range(N_VOCAB)],
             "tokenizer.ggml.token_type": [1] * N_VOCAB, "tokenizer.ggml.merges": ["t 1"]}
    write_model(path, plan(shape, "q2"), seed=5, metadata=vocab)
    return path.read_bytes()


def open_all(path) -> None:
    g = GGUFFile(path)
    load_weights(g, read_shape(g))


def check(path, data: bytes) -> str:
    path.write_bytes(data)
    try:
        open_all(path)
        return "ok"
    except ModelError as e:
        msg = str(e)
        assert msg and "\n" not in msg and str(path) in msg, msg
        return msg


@pytest.fixture(scope="module")
def model_bytes(tmp_path_factory):
    return small_model(tmp_path_factory.mktemp("fuzz") / "small.gguf")


def test_small_model_is_valid(tmp_path, model_bytes):
    assert check(tmp_path / "m.gguf", model_bytes) == "ok"


def test_truncations(tmp_path, model_bytes):
    rng = np.random.default_rng(0)
    header_end = GGUFFile(_write(tmp_path / "orig.gguf", model_bytes)).data_offset
    cuts = set(rng.integers(0, header_end, 150).tolist()) | set(rng.integers(header_end, len(model_bytes), 50).tolist())
    outcomes = [check(tmp_path / "t.gguf", model_bytes[:c]) for c in sorted(cuts)]
    assert "ok" not in outcomes


def test_flipped_bytes_in_header_metadata_and_tensor_table(tmp_path, model_bytes):
    rng = np.random.default_rng(1)
    header_end = GGUFFile(_write(tmp_path / "orig.gguf", model_bytes)).data_offset
    for _ in range(200):
        data = bytearray(model_bytes)
        at = int(rng.integers(0, header_end))
        data[at] ^= int(rng.integers(1, 256))
        check(tmp_path / "f.gguf", bytes(data))          # a clear error, or a file that still loads


def test_garbage(tmp_path):
    rng = np.random.default_rng(2)
    for n in (0, 3, 8, 24, 100, 4096):
        assert check(tmp_path / "g.gguf", rng.bytes(n)) != "ok"
        assert check(tmp_path / "g.gguf", b"GGUF\x03\x00\x00\x00" + rng.bytes(n)) != "ok"


def _write(path, data):
    path.write_bytes(data)
    return path
