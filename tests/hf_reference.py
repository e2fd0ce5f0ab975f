"""HF transformers' DeepseekV4ForCausalLM built from one of our GGUF files: the independent reference model.

Maps our shape to a Flash-shaped `DeepseekV4Config` (MODEL.md §11: the legacy `compress_ratios`, the hash-layer
count, YaRN rope parameters, `qk_rope_head_dim`) and copies every tensor, dequantized to float32 by gguf.quants,
under its HF name. HF does not emulate FP8 KV, the Hadamard+FP4 indexer or 8-bit activations: compare it with
`numerics="exact"`.
"""

from __future__ import annotations

import numpy as np

from ds4d.gguf_file import GGUFFile
from ds4d.shape import read_shape
from ds4d.weights import load_weights, Weight


def _f32(x) -> np.ndarray:
    if isinstance(x, Weight):
        return x.dequantize()
    return np.asarray(x, dtype=np.float32)


def hf_model(path):
    import torch
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    g = GGUFFile(path)
    s = read_shape(g)
    w = load_weights(g, s)
    cfg = DeepseekV4Config(
        vocab_size=s.n_vocab, hidden_size=s.n_embd, moe_intermediate_size=s.n_ff_exp,
        num_hidden_layers=s.n_layer, num_attention_heads=s.n_head, num_key_value_heads=1, head_dim=s.head_dim,
        q_lora_rank=s.q_lora_rank, num_experts_per_tok=s.n_expert_used, n_routed_experts=s.n_expert,
        n_shared_experts=1, scoring_func="sqrtsoftplus", norm_topk_prob=s.expert_weights_norm,
        routed_scaling_factor=s.expert_weights_scale, rope_theta=s.rope_freq_base,
        compress_ratios=list(s.compress_ratios), compress_rope_theta=s.compress_rope_freq_base,
        hc_mult=s.n_hc, hc_sinkhorn_iters=s.hc_sinkhorn_iters, hc_eps=s.hc_eps, num_hash_layers=s.n_hash_layer,
        swiglu_limit=s.swiglu_clamp_exp[0], sliding_window=s.n_swa, o_groups=s.n_out_group,
        o_lora_rank=s.o_lora_rank, index_n_heads=s.n_indexer_head, index_head_dim=s.indexer_head_dim,
        index_topk=s.indexer_top_k, rms_norm_eps=s.rms_eps, qk_rope_head_dim=s.n_rot,
        rope_parameters={"rope_type": "yarn", "factor": s.rope_scale_factor,
                         "original_max_position_embeddings": s.rope_orig_ctx,
                         "beta_fast": s.yarn_beta_fast, "beta_slow": s.yarn_beta_slow})
    cfg._attn_implementation = "eager"
    model = DeepseekV4ForCausalLM(cfg).eval().float()

    sd = {"model.embed_tokens.weight": w.token_embd, "lm_head.weight": w.output,
          "model.norm.weight": w.output_norm, "model.hc_head.hc_fn": w.output_hc.fn,
          "model.hc_head.hc_base": w.output_hc.base, "model.hc_head.hc_scale": w.output_hc.scale}
    for L in w.layers:
        p = f"model.layers.{L.index}."
        a = p + "self_attn."
        sd.update({
            p + "input_layernorm.weight": L.attn_norm, p + "post_attention_layernorm.weight": L.ffn_norm,
            a + "sinks": L.attn_sinks, a + "q_a_proj.weight": L.attn_q_a, a + "q_a_norm.weight": L.attn_q_a_norm,
            a + "q_b_proj.weight": L.attn_q_b, a + "kv_proj.weight": L.attn_kv, a + "kv_norm.weight": L.attn_kv_a_norm,
            a + "o_a_proj.weight": L.attn_output_a, a + "o_b_proj.weight": L.attn_output_b,
            p + "attn_hc.fn": L.hc_attn.fn, p + "attn_hc.base": L.hc_attn.base, p + "attn_hc.scale": L.hc_attn.scale,
            p + "ffn_hc.fn": L.hc_ffn.fn, p + "ffn_hc.base": L.hc_ffn.base, p + "ffn_hc.scale": L.hc_ffn.scale,
            p + "mlp.gate.weight": L.ffn_gate_inp,
            p + "mlp.shared_experts.gate_proj.weight": L.ffn_gate_shexp,
            p + "mlp.shared_experts.up_proj.weight": L.ffn_up_shexp,
            p + "mlp.shared_experts.down_proj.weight": L.ffn_down_shexp,
            p + "mlp.experts.down_proj": L.ffn_down_exps,
        })
        sd[p + "mlp.experts.gate_up_proj"] = np.concatenate([_f32(L.ffn_gate_exps), _f32(L.ffn_up_exps)], axis=1)
        if L.exp_probs_b is not None:
            sd[p + "mlp.gate.e_score_correction_bias"] = L.exp_probs_b
        if L.ffn_gate_tid2eid is not None:
            sd[p + "mlp.gate.tid2eid"] = L.ffn_gate_tid2eid.astype(np.int64)
        if L.compressor is not None:
            c = a + "compressor."
            sd.update({c + "kv_proj.weight": L.compressor.kv, c + "gate_proj.weight": L.compressor.gate,
                       c + "position_bias": L.compressor.ape, c + "kv_norm.weight": L.compressor.norm})
        if L.indexer is not None:
            i = a + "compressor.indexer."
            ic = L.indexer.compressor
            sd.update({i + "kv_proj.weight": ic.kv, i + "gate_proj.weight": ic.gate, i + "position_bias": ic.ape,
                       i + "kv_norm.weight": ic.norm, i + "q_b_proj.weight": L.indexer.attn_q_b,
                       i + "scorer.weights_proj.weight": L.indexer.proj})
    tensors = {}
    for k, v in sd.items():
        arr = np.asarray(v) if (isinstance(v, np.ndarray) and v.dtype == np.int64) else _f32(v)
        tensors[k] = torch.from_numpy(np.ascontiguousarray(arr))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    # Only non-persistent rope buffers may stay untouched.
    missing = [m for m in missing if "rotary_emb" not in m]
    assert not missing and not unexpected, (missing, unexpected)
    return model


def hf_logits(model, ids) -> np.ndarray:
    import torch
    with torch.no_grad():
        out = model(input_ids=torch.tensor([list(ids)], dtype=torch.long), use_cache=False)
    return out.logits[0].float().numpy()
