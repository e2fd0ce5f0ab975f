"""Loader fuzz: truncated files, flipped bytes in the header, metadata and tensor table, tensors of the wrong type or
shape, metadata of the wrong type, and random garbage all end in one clear `ModelError` line (never another
exception, a crash or a hang). The cases are `bench/fuzz_loader.py`'s, whose long run (thousands of files) is in
docs/RELIABILITY.md; this one keeps a few hundred so it runs in seconds."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import fuzz_loader as fl  # noqa: E402


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """(plan, header bytes, file size) of the small model."""
    p = fl.small_plan()
    path = tmp_path_factory.mktemp("fuzz") / "small.gguf"
    header = fl.write_small(path, p)
    assert fl.check(path) == "ok"
    return p, header, path.stat().st_size


def test_truncations(tmp_path, small):
    _, header, size = small
    outcomes = [fl.check(path) for _, path in fl.truncations(tmp_path / "t.gguf", header, size, 250,
                                                             np.random.default_rng(0))]
    assert len(outcomes) == 250 and "ok" not in outcomes


def test_flipped_bytes_in_header_metadata_and_tensor_table(tmp_path, small):
    p, header, size = small
    where = fl.regions(header, p)
    assert where["metadata"][1] - where["metadata"][0] > 1000 and where["tensor_table"][1] > where["tensor_table"][0]
    kinds = set()
    for kind, path in fl.flips(tmp_path / "f.gguf", header, size, where, 300, np.random.default_rng(1)):
        fl.check(path)                          # a clear error, or a file that still loads
        kinds.add(kind)
    assert kinds == {"flip:fixed", "flip:metadata", "flip:tensor_table"}


def test_tensors_of_the_wrong_type_or_shape(tmp_path, small):
    p, _, _ = small
    types = [fl.check(path) for _, path in fl.wrong_types(tmp_path / "w.gguf", p, every=60)]
    assert sum(t != "ok" for t in types) > len(types) // 2      # F16 for an F32 matrix, say, is still accepted
    assert any("has type" in t for t in types)
    shapes = [fl.check(path) for _, path in fl.wrong_shapes(tmp_path / "s.gguf", p, every=60)]
    assert shapes and all(s != "ok" and "dims" in s for s in shapes)


@pytest.mark.parametrize("key, value, expect", [
    ("deepseek4.block_count", "six", "must be an integer"),
    ("deepseek4.attention.compress_ratios", 4, "must be an array"),
    ("deepseek4.expert_weights_norm", 1, "must be a bool"),
    ("deepseek4.rope.freq_base", "1e4", "must be a finite number"),
    # Found by bench/fuzz_loader.py: a size no real model has used to load, then fail at the first allocation
    # (or never finish the first token), far from the file.
    ("deepseek4.attention.sliding_window", 2**40, "n_swa is 1099511627776"),
    ("deepseek4.hyper_connection.sinkhorn_iterations", 100_000, "Sinkhorn iterations"),
])
def test_metadata_of_the_wrong_type_or_size(tmp_path, small, key, value, expect):
    p, _, _ = small
    fl.write_small(tmp_path / "m.gguf", p, {key: value})
    assert expect in fl.check(tmp_path / "m.gguf")


def test_garbage(tmp_path):
    assert all(fl.check(path) != "ok" for _, path in fl.garbage(tmp_path / "g.gguf", np.random.default_rng(2)))
