// The C++ entry points of ds4d._cpu, called by the binding file (binding.cpp), which has already checked every
// argument: types are supported, cols is a whole number of blocks, buffers are large enough and strides sane.
//
// Arguments go (outputs..., inputs..., params). Strides are in elements. All of these may run on the thread pool
// and must be called without the GIL.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "ds4_quant.h"

// ---- configuration ---------------------------------------------------------------------------------------------

// Reads DS4_CPU_ISA (an unavailable level throws std::runtime_error) and DS4_THREADS; called once at import.
void ds4_cpu_init();
// The levels both built into this module and supported by this CPU, worst first: "portable", "avx2", "avx512".
std::vector<std::string> ds4_cpu_available_isas();
const char* ds4_cpu_isa();
bool ds4_cpu_set_isa(const std::string& name);  // false (and no change) if the level is not available
void ds4_cpu_set_threads(int n);
int ds4_cpu_threads();

// ---- ops -----------------------------------------------------------------------------------------------------

// rows rows of `type` (row_bytes(type, cols) bytes each) -> f32 (rows, cols), exactly as gguf.quants.dequantize.
void ds4_cpu_dequantize(float* out, const uint8_t* w, int type, int64_t rows, int64_t cols);

// y[t, o] = sum_i W[o, i] x[t, i] for t < n_tokens, o < rows. act8 selects the integer product with quantized
// activations (quantized types only; ds4_quant.h), otherwise each output is an f32 dot in a fixed order.
void ds4_cpu_matmul(float* y, int64_t y_stride, const uint8_t* w, int type, int64_t rows, int64_t cols,
                    const float* x, int64_t x_stride, int64_t n_tokens, bool act8);

// The activation quantizer of the act8 product: n_tokens rows of cols values -> n_tokens quantized rows at out,
// act_row_layout(cols, block).bytes apart; block 32 gives Q8_0 activations, 256 gives Q8_K (ds4_quant.h).
void ds4_cpu_quantize_act(uint8_t* out, const float* x, int64_t x_stride, int64_t n_tokens, int64_t cols, int block);

// The routed experts of one MoE layer (moe.cpp has the exact numerics): out[t] = sum over j < k_used, in order,
// of down_e . swiglu(gate_e . h_t, up_e . h_t, clamp) * weights[t, j] with e = ids[t, j]. gate and up hold
// n_expert matrices of (n_ff, n_embd) weights, down n_expert of (n_embd, n_ff), each expert's rows consecutive.
// ids and weights are (n_tokens, k_used), contiguous; every id is in [0, n_expert).
void ds4_cpu_moe(float* out, int64_t out_stride, const float* h, int64_t h_stride, int64_t n_tokens, int64_t n_embd,
                 const int64_t* ids, const float* weights, int64_t k_used, const uint8_t* gate, int gate_type,
                 const uint8_t* up, int up_type, const uint8_t* down, int down_type, int64_t n_expert, int64_t n_ff,
                 float clamp, bool act8);

// Attention with a per-head sink (attention.cpp, isa/attention.cpp): q and out are (n_tokens, n_heads, dim),
// contiguous. Token t sees raw rows [raw_lo[t], raw_hi[t]) of raw (rows of dim values), then compressed rows c
// (row c % page_rows of comp_pages[c / page_rows]): comp_sel[t, :sel_width] where >= 0 when comp_sel is given,
// else c < comp_n[t]. Every row is f16 when f16, else float32.
void ds4_cpu_attention(float* out, const float* q, int64_t n_tokens, int64_t n_heads, int64_t dim, const void* raw,
                       const int64_t* raw_lo, const int64_t* raw_hi, const void* const* comp_pages,
                       int64_t page_rows, const int64_t* comp_sel, int64_t sel_width, const int64_t* comp_n, bool f16,
                       const float* sinks, float scale);

// The indexer's choice (attention.cpp): sel (n_tokens, top_k) gets, for token t with n = n_visible[t], 0..n-1 and
// -1s when n <= top_k, else the top_k rows c < n by sum_h (w[t, h] * w_scale) * max(0, q[t, h] . k_c), ties to
// the lower index, ascending. q is (n_tokens, n_heads, dim), w (n_tokens, n_heads), contiguous; key rows in pages
// as for ds4_cpu_attention.
void ds4_cpu_indexer_topk(int64_t* sel, const float* q, const float* w, int64_t n_tokens, int64_t n_heads,
                          int64_t dim, const void* const* pages, int64_t page_rows, bool f16, const int64_t* n_visible,
                          int64_t top_k, float w_scale);

// ---- module internals (dispatch.cpp -> matmul.cpp) -----------------------------------------------------------

namespace ds4::cpu {
struct IsaKernels;
class ThreadPool;
const IsaKernels& active_kernels();
ThreadPool& pool();
}  // namespace ds4::cpu
