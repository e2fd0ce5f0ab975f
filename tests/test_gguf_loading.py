"""GGUF loading: real layouts load with the right shapes, types and sizes; every kind of bad file is refused with
one clear line (and a non-zero exit from the CLI, without a traceback)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from ds4d.gguf_file import GGUFFile, ModelError
from ds4d.shape import flash_shape, read_shape
from ds4d.tiny import Plan, plan, tiny_shape, write_model
from ds4d.weights import load_weights


def load(path):
    g = GGUFFile(path)
    s = read_shape(g)
    return g, s, load_weights(g, s)


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "ds4d", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


# --- good files ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["f32", "f16", "q8", "q2", "q4"])
def test_tiny_variants_load_with_real_layout(tiny_model, variant):
    g, s, w = load(tiny_model(variant))
    assert s == tiny_shape()
    assert s.compress_ratios == (0, 0, 4, 128, 4, 128) and s.n_hash_layer == 3
    gate_up, down = {"f32": (Q.F32, Q.F32), "f16": (Q.F16, Q.F16), "q8": (Q.Q8_0, Q.Q8_0),
                     "q2": (Q.IQ2_XXS, Q.Q2_K), "q4": (Q.Q4_K, Q.Q4_K)}[variant]
    for L in w.layers:
        assert (L.ffn_gate_exps.type, L.ffn_up_exps.type, L.ffn_down_exps.type) == (gate_up, gate_up, down)
        assert (L.compressor is None) == (L.ratio == 0) and (L.indexer is None) == (L.ratio != 4)
        assert (L.ffn_gate_tid2eid is not None) == (L.index < 3) and (L.exp_probs_b is None) == (L.index < 3)
        assert L.ffn_gate_exps.shape == (16, 256, 256) and L.ffn_down_exps.shape == (16, 256, 256)
    if variant in ("q8", "q2", "q4"):  # the real files' non-routed types
        L = w.layers[2]
        assert w.token_embd.type == Q.F16 and w.output.type == Q.Q8_0 and L.hc_attn.fn.type == Q.F16
        assert L.attn_q_b.type == Q.Q8_0 and L.ffn_gate_shexp.type == Q.Q8_0 and L.ffn_gate_inp.type == Q.F16
        assert L.indexer.attn_q_b.type == Q.F16 and L.compressor.kv.type == Q.F16
    assert not w.unused
    assert g.get("deepseek4.expert_gating_func") == 4       # so llama.cpp reads the file too
    tokens = g.get("tokenizer.ggml.tokens")
    assert len(tokens) == 129280 and tokens[128803] == "<｜User｜>"


def test_expert_slices_are_views_of_the_mapped_file(tiny_model):
    _, _, w = load(tiny_model("q2"))
    gate = w.layers[3].ffn_gate_exps
    e = gate.expert(7)
    assert e.shape == (256, 256) and not e.raw.flags.writeable
    assert np.shares_memory(e.raw, gate.raw)
    assert np.array_equal(e.dequantize(), gate.dequantize()[7])


def test_same_seed_same_file(tmp_path):
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    for p in (a, b):
        write_model(p, plan(tiny_shape(2), "q2"), seed=3)
    assert a.read_bytes() == b.read_bytes()


@pytest.mark.parametrize("variant,total", [("q2", 86_714_775_900), ("q4", 164_628_167_004)])
def test_full_shape_has_the_real_sizes_and_opens_without_reading_data(tmp_path, variant, total):
    path = tmp_path / f"full-{variant}.gguf"
    r = run_cli("make-tiny", str(path), "--full-shape", "--variant", variant)
    assert r.returncode == 0, r.stderr
    assert os.stat(path).st_blocks * 512 < 64 * 2**20            # sparse: the data region costs no disk
    # Open in a fresh process and measure its peak memory: the 80-150 GB of tensor data must not be touched.
    # (VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent across exec.)
    code = ("import re, sys; from ds4d.gguf_file import GGUFFile; from ds4d.shape import read_shape; "
            "from ds4d.weights import load_weights; g = GGUFFile(sys.argv[1]); s = read_shape(g); "
            "w = load_weights(g, s); print(sum(t.nbytes for t in g.tensors.values()), len(g.tensors), "
            "re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    nbytes, ntensors, maxrss_kib = map(int, out.stdout.split())
    assert nbytes == total                                       # MODEL.md §10.1
    assert ntensors == 1328
    assert maxrss_kib < 400 * 1024, maxrss_kib
    g, s, w = load(path)
    assert s == flash_shape()
    per_layer = lambda il: sum(t.nbytes for n, t in g.tensors.items()   # noqa: E731
                               if n.startswith(f"blk.{il}.") and "_exps" not in n)
    assert [per_layer(il) for il in (0, 1, 2, 3, 4)] == [147_190_232, 147_190_232, 185_476_056, 152_610_264,
                                                         182_374_360]
    info = run_cli("info", "-m", str(path))
    assert info.returncode == 0 and "43 layers" in info.stdout and "6,880.0 KiB per 1K tokens" in info.stdout


def test_info_make_tiny_cli(tmp_path):
    path = tmp_path / "m.gguf"
    r = run_cli("make-tiny", str(path), "--variant", "q4", "--layers", "4", "--seed", "2")
    assert r.returncode == 0, r.stderr
    r = run_cli("info", str(path))
    assert r.returncode == 0, r.stderr
    assert "4 layers, hidden 256" in r.stdout and "routed type Q4_K" in r.stdout and "bytes by kind" in r.stdout
    for args in (["--version"], ["info", "--help"], ["make-tiny", "--help"]):
        r = run_cli(*args)
        assert r.returncode == 0 and r.stdout


# --- bad files -------------------------------------------------------------------------------------------------

def sparse_file(tmp_path, name="bad.gguf", shape=None, edit=None, metadata=None, variant="q2"):
    """A tiny-shaped file (header + directory, hole for the data) with its tensor list and metadata edited."""
    p = plan(shape or tiny_shape(), variant)
    tensors = list(p.tensors)
    if edit:
        tensors = edit(tensors)
    path = tmp_path / name
    write_model(path, Plan(p.shape, variant, tuple(tensors)), sparse=True, metadata=metadata)
    return path


def retype(tensors, name, qtype):
    return [(s, qtype if s.name == name else q) for s, q in tensors]


def redim(tensors, name, dims):
    return [(dataclasses.replace(s, dims=dims) if s.name == name else s, q) for s, q in tensors]


def expect_error(path, *fragments):
    with pytest.raises(ModelError) as e:
        load(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg, msg
    for f in fragments:
        assert f in msg, msg
    r = run_cli("info", str(path))
    assert r.returncode == 1 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert fragments[0] in r.stderr
    return msg


def test_not_a_gguf(tmp_path):
    p = tmp_path / "notes.gguf"
    p.write_text("this is not a model, just some text that is long enough")
    expect_error(p, "not a GGUF file", "bad magic")
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    expect_error(empty, "not a GGUF file")
    expect_error(tmp_path / "missing.gguf", "no such file")
    expect_error(tmp_path, "is a directory")


def test_wrong_version(tmp_path):
    p = sparse_file(tmp_path)
    with open(p, "r+b") as f:
        f.seek(4)
        f.write((2).to_bytes(4, "little"))
    expect_error(p, "GGUF version 2 is not supported")


def test_wrong_architecture(tmp_path):
    expect_error(sparse_file(tmp_path, metadata={"general.architecture": "llama"}), "architecture is 'llama'")


def test_missing_tensor(tmp_path):
    p = sparse_file(tmp_path, edit=lambda ts: [t for t in ts if t[0].name != "blk.2.attn_q_b.weight"])
    expect_error(p, "missing tensor blk.2.attn_q_b.weight")


def test_misshapen_tensor(tmp_path):
    p = sparse_file(tmp_path, edit=lambda ts: redim(ts, "blk.3.attn_kv.weight", (256, 64)))
    expect_error(p, "tensor blk.3.attn_kv.weight has dims [256, 64], expected [256, 128]")


@pytest.mark.parametrize("name,qtype,accepted", [
    ("blk.0.attn_norm.weight", Q.F16, "accepted: F32"),
    ("blk.1.ffn_gate_exps.weight", Q.Q4_0, "accepted: IQ2_XXS, Q2_K, Q4_K, Q8_0, F16, F32"),
    ("blk.2.attn_q_a.weight", Q.Q4_K, "accepted: F32, F16, BF16, Q8_0"),
    ("blk.0.ffn_gate_tid2eid.weight", Q.F32, "accepted: I32"),
])
def test_wrongly_typed_tensor(tmp_path, name, qtype, accepted):
    expect_error(sparse_file(tmp_path, edit=lambda ts: retype(ts, name, qtype)), f"tensor {name} has type", accepted)


def test_gate_and_up_experts_must_match(tmp_path):
    p = sparse_file(tmp_path, edit=lambda ts: retype(ts, "blk.4.ffn_up_exps.weight", Q.Q4_K))
    expect_error(p, "blk.4.ffn_up_exps is Q4_K but blk.4.ffn_gate_exps is IQ2_XXS")


@pytest.mark.parametrize("metadata,fragment", [
    ({"deepseek4.attention.value_length": 64}, "key length 128 and value length 64 differ"),
    ({"deepseek4.attention.output_group_count": 3}, "8 heads are not divisible by 3 output groups"),
    ({"deepseek4.attention.compress_ratios": [0, 0, 4, 128, 4]}, "has 5 entries, fewer than the 6 layers"),
    ({"deepseek4.attention.compress_ratios": [0, 0, 4, 8, 4, 128]}, "holds [8]; only 0, 4 and 128 exist"),
    ({"deepseek4.attention.indexer.key_length": 64}, "indexer head dim is 64"),
    ({"deepseek4.expert_used_count": 17}, "17 experts used of only 16"),
    ({"deepseek4.block_count": None}, "missing metadata key deepseek4.block_count"),
    ({"deepseek4.rope.freq_base": "ten thousand"}, "deepseek4.rope.freq_base must be a finite number"),
    ({"deepseek4.expert_gating_func": 1}, "expert_gating_func 1 is not sqrt-softplus"),
])
def test_inconsistent_metadata(tmp_path, metadata, fragment):
    expect_error(sparse_file(tmp_path, metadata=metadata), fragment)


def test_integer_keys_may_be_u32_or_u64(tmp_path):
    from gguf import GGUFValueType
    key = "deepseek4.rope.scaling.original_context_length"
    for vtype in (GGUFValueType.UINT32, GGUFValueType.UINT64):
        g, s, _ = load(sparse_file(tmp_path, name=f"{vtype.name}.gguf", metadata={key: (vtype, 65536)}))
        assert g.metadata_types[key][0] == vtype and s.rope_orig_ctx == 65536


def test_k_quant_input_dims_must_be_whole_super_blocks(tmp_path):
    # An expert width of 288 makes the down projection's input dim 288: not a multiple of Q2_K's 256.
    p = sparse_file(tmp_path, shape=dataclasses.replace(tiny_shape(), n_ff_exp=288))
    expect_error(p, "288 is not a multiple of the Q2_K block size 256")


def test_truncated_files(tmp_path, tiny_model):
    src = open(tiny_model("q2"), "rb").read()
    g = GGUFFile(tiny_model("q2"))
    data_start, size = g.data_offset, len(src)
    rng = np.random.default_rng(1)
    cuts = sorted(set([8, 30, 1000, 100_000, data_start - 1, data_start + 1, size - 1] +
                      list(rng.integers(24, size, 12))))
    for cut in cuts:
        p = tmp_path / f"cut{cut}.gguf"
        p.write_bytes(src[:cut])
        with pytest.raises(ModelError) as e:
            load(p)
        msg = str(e.value)
        assert "\n" not in msg and str(p) in msg
        if cut > data_start:
            assert "file is truncated" in msg
        p.unlink()
